"""The fast torch executor: STDiT3 block units on the ``qc::`` kernels, SDPA attention, optional torch.compile and
per-unit CUDA graphs, statistics from one fused pass, no host synchronisation inside a step.

Same interface as :class:`~qc_compile.runtime.executor.TorchExecutor` (``unit_names``, ``reset``, ``step``,
``supports``, ``g``, ``variant_models``), so the sampler and every step policy drive it unchanged. What differs:

* **Block units** run :func:`block_forward`, a pure function of static specs and prepared weights
  (:mod:`~qc_compile.runtime.fast_linear`): per the plan, each linear is dense (bf16) or FP8 (``qkv`` / ``fc1``
  take the fused ``modulate_quant_fp8`` producer, ``fc2`` ``gelu_rotate_quant_fp8``, the others
  ``rotate_quant_fp8``; then ``fp8_linear``). Attention is ``F.scaled_dot_product_attention``; cross-attention is
  batched with the caption mask as a boolean ``attn_mask`` (the padded form of ``layers.MultiHeadCrossAttention``,
  identical math to its packed per-sample loop). Temporal blocks permute the FP8 codes of the block input (half the
  bytes of the bf16 tensor the reference permutes). Without a plan every linear is dense: the same math as
  ``STDiT3Block`` (tested equal in fp32).
* ``embed`` and ``final`` run on the model itself (unquantized even where the plan lists their linears: they hold
  <0.2% of the FLOPs at Open-Sora scale and dominate no error budget; recorded in :meth:`FastExecutor.describe`).
* **Statistics**: ``qc::cache_stats_apply`` computes the new residual and every sum in one pass; ``in_outlier``
  and ``motion`` (``stats="full"``, the default) cost two more reads of the unit's input / residual. All stay on
  the device until the sampler's one copy per step (an in-step ``Gate`` still costs its one scalar, as in
  TorchExecutor).
* **Precision variants**: the plan's variants (``plan.resolve``) are built as their own fast blocks, ``fp`` (unless
  the plan defines it) is the unquantized model, and a decision naming any other variant runs the plan's default
  (as Pipeline's torch executor does).
* ``cuda_graphs=True`` captures each (variant, block unit) once, after two eager warm-up calls (the Triton
  producers autotune on their first call), into one shared memory pool; the unit input is copied into a static
  buffer before each replay. ``compile=True`` compiles :func:`block_forward` with inductor once per block kind.
"""

from __future__ import annotations

from typing import Callable, Mapping, NamedTuple

import torch
import torch.nn.functional as F

from qc_compile.errors import UserError
from qc_compile.models.layers import RotaryEmbedding
from qc_compile.models.stdit3 import STDiT3, STDiT3Block, Geometry, unit_kind
from qc_compile.plugins import cache_stats as CS
from qc_compile.runtime import fast_linear as fl
from qc_compile.runtime.executor import TorchExecutor
from qc_compile.runtime.fast_linear import LinearSpec, LinearWeights
from qc_compile.runtime.policy import STAT_INDEX

ROLES: tuple[tuple[str, str], ...] = (
    ("qkv", "attn.qkv"), ("proj", "attn.proj"), ("q_linear", "cross_attn.q_linear"),
    ("kv_linear", "cross_attn.kv_linear"), ("cproj", "cross_attn.proj"), ("fc1", "mlp.fc1"), ("fc2", "mlp.fc2"))
STATS_LEVELS = ("full", "cache")


class BlockSpec(NamedTuple):
    """Static description of one block (constants only: torch.compile guards on these values)."""

    temporal: bool
    heads: int
    head_dim: int
    qk_norm: bool
    norm_eps: float
    qkv: LinearSpec
    proj: LinearSpec
    q_linear: LinearSpec
    kv_linear: LinearSpec
    cproj: LinearSpec
    fc1: LinearSpec
    fc2: LinearSpec


class BlockWeights(NamedTuple):
    table: torch.Tensor  # scale_shift_table (6, C)
    q_norm: torch.Tensor | None
    k_norm: torch.Tensor | None
    rope: torch.Tensor | None  # RotaryEmbedding.freqs (temporal blocks)
    qkv: LinearWeights
    proj: LinearWeights
    q_linear: LinearWeights
    kv_linear: LinearWeights
    cproj: LinearWeights
    fc1: LinearWeights
    fc2: LinearWeights


# ---------------------------------------------------------------------------------------------------- block math
def modulation(table: torch.Tensor, t_mlp: torch.Tensor) -> tuple[torch.Tensor, ...]:
    B = t_mlp.shape[0]
    return (table[None] + t_mlp.reshape(B, 6, -1)).chunk(6, dim=1)


def _layer_norm(x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, (x.shape[-1],), eps=1e-6)


def _rms(h: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """LlamaRMSNorm (statistic in fp32, weight applied after the cast back)."""
    dtype = h.dtype
    hf = h.float()
    hf = hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)
    return w * hf.to(dtype)


def _rope(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """RotaryEmbedding.rotate_queries_or_keys with the freqs passed in (same arithmetic, same dtypes)."""
    pos = torch.arange(x.shape[-2], device=x.device, dtype=freqs.dtype)
    ang = (pos[:, None] * freqs[None, :]).repeat_interleave(2, dim=-1)
    return x * ang.cos().to(x.dtype) + RotaryEmbedding.rotate_half(x) * ang.sin().to(x.dtype)


def _to_time_major(t: torch.Tensor, B: int, T: int, S: int) -> torch.Tensor:
    """(B, T*S, c) in (t, s) token order -> (B*S, T, c): the sequences temporal attention runs over."""
    return t.reshape(B, T, S, t.shape[-1]).transpose(1, 2).reshape(B * S, T, t.shape[-1])


def _from_time_major(t: torch.Tensor, B: int, T: int, S: int) -> torch.Tensor:
    return t.reshape(B, S, T, t.shape[-1]).transpose(1, 2).reshape(B, T * S, t.shape[-1])


def _attend(spec: BlockSpec, w: BlockWeights, qkv: torch.Tensor) -> torch.Tensor:
    """Self-attention core on ``qkv (B', n, 3C)`` -> ``(B', n, C)`` before the output projection."""
    Bp, n, _ = qkv.shape
    q, k, v = qkv.view(Bp, n, 3, spec.heads, spec.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    if spec.qk_norm:
        q, k = _rms(q, w.q_norm, spec.norm_eps), _rms(k, w.k_norm, spec.norm_eps)
    if spec.temporal:
        q, k = _rope(q, w.rope), _rope(k, w.rope)
    out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2).reshape(Bp, n, spec.heads * spec.head_dim)


def _qkv_from_input(spec: BlockSpec, w: BlockWeights, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
                    T: int, S: int) -> torch.Tensor:
    """qkv of the modulated block input, in the layout attention runs on ((B*T, S, 3C) or (B*S, T, 3C))."""
    B = x.shape[0]
    if spec.qkv.mode == fl.FP8:
        xq, xs = fl.modulate_quant(spec.qkv, w.qkv, x, shift, scale)
        if spec.temporal:
            xq, xs = _to_time_major(xq, B, T, S), _to_time_major(xs, B, T, S)
        else:
            xq, xs = xq.reshape(B * T, S, -1), xs.reshape(B * T, S, 1)
        return fl.linear_q(w.qkv, xq, xs, x.dtype)
    return _qkv_from_modulated(spec, w, _layer_norm(x) * (1 + scale) + shift, T, S)


def _qkv_from_modulated(spec: BlockSpec, w: BlockWeights, h: torch.Tensor, T: int, S: int) -> torch.Tensor:
    B = h.shape[0]
    h = _to_time_major(h, B, T, S) if spec.temporal else h.reshape(B * T, S, h.shape[-1])
    return fl.linear(spec.qkv, w.qkv, h)


def _proj_back(spec: BlockSpec, w: BlockWeights, a: torch.Tensor, B: int, T: int, S: int) -> torch.Tensor:
    """Output projection of the attention result, back in (B, T*S, C) token order."""
    if not spec.temporal:
        return fl.linear(spec.proj, w.proj, a).reshape(B, T * S, -1)
    if spec.proj.mode == fl.FP8:  # permute the FP8 codes (1 byte/element) rather than the bf16 output
        aq, as_ = fl.quant_input(spec.proj, w.proj, a)
        return fl.linear_q(w.proj, _from_time_major(aq, B, T, S), _from_time_major(as_, B, T, S), a.dtype)
    return _from_time_major(fl.linear(spec.proj, w.proj, a), B, T, S)


def self_attention(spec: BlockSpec, w: BlockWeights, h: torch.Tensor, T: int, S: int) -> torch.Tensor:
    """Self-attention of an already modulated input ``h (B, N, C)`` (the sub-block API)."""
    return _proj_back(spec, w, _attend(spec, w, _qkv_from_modulated(spec, w, h, T, S)), h.shape[0], T, S)


def cross_attention(spec: BlockSpec, w: BlockWeights, x: torch.Tensor, y: torch.Tensor,
                    mask: torch.Tensor | None) -> torch.Tensor:
    """Batched cross-attention to the padded captions ``y (B, L, C)`` with the bool ``mask (B, L)``."""
    B, N, C = x.shape
    h, hd = spec.heads, spec.head_dim
    q = fl.linear(spec.q_linear, w.q_linear, x).view(B, N, h, hd).transpose(1, 2)
    k, v = fl.linear(spec.kv_linear, w.kv_linear, y).chunk(2, dim=-1)
    k, v = (t.unflatten(-1, (h, hd)).transpose(1, 2) for t in (k, v))
    attn_mask = None if mask is None else mask.bool()[:, None, None, :]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
    return fl.linear(spec.cproj, w.cproj, out.transpose(1, 2).reshape(B, N, C))


def mlp(spec: BlockSpec, w: BlockWeights, h: torch.Tensor) -> torch.Tensor:
    """MLP of an already modulated input (the sub-block API)."""
    return fl.gelu_linear(spec.fc2, w.fc2, fl.linear(spec.fc1, w.fc1, h))


def block_forward(spec: BlockSpec, w: BlockWeights, x: torch.Tensor, t_mlp: torch.Tensor, y: torch.Tensor,
                  mask: torch.Tensor | None, T: int, S: int) -> torch.Tensor:
    """STDiT3Block.forward (no x_mask) with the fused producers in front of qkv / fc1 / fc2."""
    B = x.shape[0]
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = modulation(w.table, t_mlp)
    a = _attend(spec, w, _qkv_from_input(spec, w, x, shift_msa, scale_msa, T, S))
    x = x + gate_msa * _proj_back(spec, w, a, B, T, S)
    x = x + cross_attention(spec, w, x, y, mask)
    h = fl.modulate_linear(spec.fc1, w.fc1, x, shift_mlp, scale_mlp)
    return x + gate_mlp * fl.gelu_linear(spec.fc2, w.fc2, h)


# ---------------------------------------------------------------------------------------------------- modules
class FastBlock:
    """One block unit: specs + weights + the (eager or compiled) forward; also the sub-block API of
    ``STDiT3Block`` (``modulation``, ``norm1``/``norm2``, ``_self_attention``, ``cross_attn``, ``mlp``) that
    TorchExecutor's sub-block caches (PAB, FORA) call."""

    def __init__(self, block: STDiT3Block, rope_freqs: torch.Tensor, entries: Mapping[str, tuple] | None = None,
                 *, prefix: str = "block", fn: Callable = block_forward) -> None:
        entries = entries or {}
        specs, weights = {}, {}
        for key, role in ROLES:
            mod = block.get_submodule(role)
            e = entries.get(role)
            specs[key], weights[key] = fl.prepare_linear(mod, *(e or (None, None, None)), name=f"{prefix}.{role}")
        attn = block.attn
        qk = not isinstance(attn.q_norm, torch.nn.Identity)
        self.spec = BlockSpec(block.temporal, attn.num_heads, attn.head_dim, qk, attn.q_norm.eps if qk else 1e-6,
                              **specs)
        self.w = BlockWeights(block.scale_shift_table.detach(), attn.q_norm.weight.detach() if qk else None,
                              attn.k_norm.weight.detach() if qk else None,
                              rope_freqs.detach() if block.temporal else None, **weights)
        self.fn = fn

    def __call__(self, x: torch.Tensor, t_mlp: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None,
                 T: int, S: int) -> torch.Tensor:
        return self.fn(self.spec, self.w, x, t_mlp, y, mask, T, S)

    @property
    def quantized(self) -> list[str]:
        return [k for k, _ in ROLES if getattr(self.spec, k).mode != fl.DENSE]

    def modulation(self, t_mlp: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return modulation(self.w.table, t_mlp)

    def norm1(self, x: torch.Tensor) -> torch.Tensor:
        return _layer_norm(x)

    norm2 = norm1

    def _self_attention(self, h: torch.Tensor, T: int, S: int) -> torch.Tensor:
        return self_attention(self.spec, self.w, h, T, S)

    def cross_attn(self, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return cross_attention(self.spec, self.w, x, y, mask)

    def mlp(self, h: torch.Tensor) -> torch.Tensor:
        return mlp(self.spec, self.w, h)


class FastModel:
    """Duck-typed STDiT3 for an executor: block units run :class:`FastBlock`, ``embed``/``final`` the model."""

    def __init__(self, model: STDiT3, blocks: Mapping[str, FastBlock]) -> None:
        self.model = model
        self.blocks = dict(blocks)
        self.config = model.config

    def unit_names(self) -> list[str]:
        return self.model.unit_names()

    def block(self, name: str) -> FastBlock:
        return self.blocks[name]

    def run_unit(self, name: str, inputs: dict[str, torch.Tensor], g: Geometry) -> dict[str, torch.Tensor]:
        if unit_kind(name) != "block":
            return self.model.run_unit(name, inputs, g)
        return {"x": self.blocks[name](inputs["x"], inputs["t_mlp"], inputs["y"], inputs["mask"], g.T, g.S)}


def build_fast_model(model: STDiT3, plan=None, variant: str = "default", *, fn: Callable = block_forward) -> FastModel:
    """Fast blocks of ``model`` under ``plan``'s ``variant`` (None: dense FP blocks sharing the model's weights)."""
    entries_by_unit: dict[str, dict[str, tuple]] = {}
    if plan is not None:
        resolved = plan.resolve(variant)
        for name, e in resolved.items():
            unit = plan.linears[name].unit
            if unit_kind(unit) != "block":
                continue
            s = plan.smoothing_vector(name)
            st = None if s is None else torch.from_numpy(s)
            role = name.split(".", 2)[2]
            entries_by_unit.setdefault(unit, {})[role] = (e, plan.linears[name], st)
    blocks = {}
    for unit in model.unit_names():
        if unit_kind(unit) == "block":
            blocks[unit] = FastBlock(model.block(unit), model.rope.freqs, entries_by_unit.get(unit), prefix=unit,
                                     fn=fn)
    return FastModel(model, blocks)


def fp8_block_plan(model: STDiT3, ranges: Mapping[str, Mapping] | None = None, *, rotation: int | None = None,
                   include_embed_final: bool = False):
    """A W8A8 FP8 plan over every block linear of ``model`` (other linears bf16), for the fast path and the benches.

    ``ranges`` (name -> {"amax": ...}, from :class:`qc_compile.calib.ranges.RangeCollector`) give the static
    ``act_scale`` the Q/DQ graphs and ``torch_package`` use; without them ``act_scale`` stays None (the fast path
    quantizes per token at run time and never reads it; such a plan is not saved: the schema requires the scale).
    """
    from qc_compile.linears import config_sha256, model_linears
    from qc_compile.plan import LinearPlan, Plan, act_scale_for

    linears = {}
    for li in model_linears(model):
        e = LinearPlan(unit=li.unit)
        if unit_kind(li.unit) == "block" or include_embed_final:
            amax = None if ranges is None else float(ranges[li.name]["amax"])
            e = LinearPlan(unit=li.unit, weight="fp8_e4m3", activation="fp8_e4m3", act_amax=amax,
                           act_scale=None if amax is None else act_scale_for("fp8_e4m3", amax), rotation=rotation)
        linears[li.name] = e
    return Plan(model={"name": model.config.name, "config_sha256": config_sha256(model.config)}, linears=linears,
                provenance={"made_by": "qc_compile.runtime.fast_executor.fp8_block_plan",
                            "act_scale": "calibrated ranges" if ranges is not None else
                            "none: dynamic per-token scales only"})


def _compiled_block_forward() -> Callable:
    import torch._dynamo

    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    return torch.compile(block_forward, dynamic=False)


# ---------------------------------------------------------------------------------------------------- executor
class _UnitGraph(NamedTuple):
    graph: torch.cuda.CUDAGraph
    out: torch.Tensor


class FastExecutor(TorchExecutor):
    """TorchExecutor's interface on the fast path (see the module docstring). ``plan=None``: FP (dense bf16)."""

    supports = frozenset({"parts", "gate"})

    def __init__(self, model: STDiT3, geometry: Geometry, plan=None, *, compile: bool = False,
                 cuda_graphs: bool = False, stats: str = "full") -> None:
        super().__init__(model, geometry)
        if stats not in STATS_LEVELS:
            raise UserError(f"stats must be one of {', '.join(STATS_LEVELS)}, got {stats!r}.")
        if cuda_graphs and model.x_embedder.proj.weight.device.type != "cuda":
            raise UserError("cuda_graphs=True needs the model on a CUDA device.")
        self.plan = plan
        self.compile = compile
        self.cuda_graphs = cuda_graphs
        self.stats_level = stats
        fn = _compiled_block_forward() if compile else block_forward
        self.fp_model = build_fast_model(model, None, fn=fn)
        self.variant_models: dict[str, FastModel] = {}
        if plan is not None:  # as Pipeline's torch executor: the plan's variants, plus ``fp`` = unquantized
            self.variant_models = {v: build_fast_model(model, plan, v, fn=fn) for v in plan.variant_names}
            self.variant_models.setdefault("fp", self.fp_model)
        self.default_model = self.variant_models.get("default", self.fp_model)
        self._graphs: dict[tuple[str, str], _UnitGraph] = {}
        self._static: dict[str, torch.Tensor] = {}
        self._pool = None

    def describe(self) -> dict:
        """What this executor runs (recorded beside benchmark results)."""
        ignored = []
        if self.plan is not None:
            ignored = sorted(n for n, e in self.plan.linears.items() if unit_kind(e.unit) != "block"
                             and (e.weight != "bf16" or e.activation != "bf16"))
        some = next(iter(self.default_model.blocks.values()))
        return {"executor": "fast", "plan": self.plan is not None, "variants": sorted(self.variant_models),
                "compile": self.compile, "cuda_graphs": self.cuda_graphs, "stats": self.stats_level,
                "activation_scales": "dynamic per token (the kernels'); the plan's static act_scale is not used",
                "quantized_roles_first_block": some.quantized, "plan_linears_run_unquantized": ignored}

    def _model_for(self, variant: str) -> FastModel:  # type: ignore[override]
        return self.variant_models.get(variant, self.default_model)

    # ----------------------------------------------------------------------------------------- CUDA graphs
    def _ensure_static(self, h: torch.Tensor, emb: dict, mask: torch.Tensor) -> None:
        want = {"x": h, "t_mlp": emb["t_mlp"], "y": emb["y"], "mask": mask}
        if any(k not in self._static or self._static[k].shape != v.shape or self._static[k].dtype != v.dtype
               for k, v in want.items()):
            self._graphs.clear()
            self._static = {k: torch.empty_like(v) for k, v in want.items()}
            self._pool = torch.cuda.graph_pool_handle()
        for k in ("t_mlp", "y", "mask"):
            self._static[k].copy_(want[k])

    def _graph_unit(self, fm: FastModel, variant: str, name: str, h: torch.Tensor) -> torch.Tensor:
        st, g = self._static, self.g
        st["x"].copy_(h)
        key = (variant, name)
        entry = self._graphs.get(key)
        if entry is None:
            block = fm.block(name)

            def run() -> torch.Tensor:
                return block(st["x"], st["t_mlp"], st["y"], st["mask"], g.T, g.S)

            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):  # autotuning and compilation happen here, outside the capture
                    run()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                out = run()
            entry = self._graphs[key] = _UnitGraph(graph, out)
        entry.graph.replay()
        return entry.out

    # ----------------------------------------------------------------------------------------- statistics
    def _unit_stats(self, row: torch.Tensor, name: str, h: torch.Tensor, out: torch.Tensor, has_prev: bool) -> None:
        """Fill ``row`` for a computed unit and cache its residual (one fused pass + two reads for full stats)."""
        S = STAT_INDEX
        cached = self.residuals.get(name)
        res, raw = torch.ops.qc.cache_stats_apply(h, cached, out)
        v = raw.sum(0)
        i = CS.IDX
        row[S["in_norm"]] = v[i["sq_in"]].sqrt()
        row[S["res_norm"]] = v[i["sq_res"]].sqrt()
        if cached is not None:
            row[S["res_rel_l1"]] = v[i["l1_diff"]] / v[i["l1_cached"]].clamp_min(1e-12)
        if has_prev:
            row[S["cos_prev"]] = v[i["dot_in_out"]] / (v[i["sq_in"]] * v[i["sq_out"]]).sqrt().clamp_min(1e-8)
        row[S["in_out_rel_l1"]] = v[i["l1_res"]] / v[i["l1_in"]].clamp_min(1e-12)
        if self.stats_level == "full":
            row[S["in_outlier"]] = h.abs().amax().float() / (v[i["l1_in"]] / h.numel()).clamp_min(1e-12)
            g = self.g
            if g.T > 1:
                r4 = res.view(res.shape[0], g.T, g.S, -1)
                row[S["motion"]] = ((r4[:, 1:] - r4[:, :-1]).abs().sum(dtype=torch.float32)
                                    / v[i["l1_res"]].clamp_min(1e-12))
        self.residuals[name] = res

    # ----------------------------------------------------------------------------------------- hooks
    def _begin_step(self, h: torch.Tensor, emb: dict, mask: torch.Tensor) -> None:
        if self.cuda_graphs and h.is_cuda:
            self._ensure_static(h, emb, mask)

    def _run_block(self, model: FastModel, variant: str, name: str,  # type: ignore[override]
                   h: torch.Tensor, emb: dict, mask: torch.Tensor) -> torch.Tensor:
        if self.cuda_graphs and h.is_cuda:
            return self._graph_unit(model, variant if variant in self.variant_models else "default", name, h)
        return model.block(name)(h, emb["t_mlp"], emb["y"], mask, self.g.T, self.g.S)


def check_fast_available(device: str) -> None:
    """UserError unless the fast path can run here (it needs CUDA for its kernels)."""
    if not str(device).startswith("cuda") or not torch.cuda.is_available():
        raise UserError(f"the fast path (--fast) runs the qc:: CUDA kernels and needs a CUDA GPU; device {device!r} "
                        f"{'is not a CUDA device' if not str(device).startswith('cuda') else 'is not available'} "
                        f"(torch {torch.__version__}). Run without --fast (the plain torch executor) here.")


__all__ = ["FastExecutor", "FastBlock", "FastModel", "BlockSpec", "BlockWeights", "block_forward",
           "build_fast_model", "check_fast_available", "fp8_block_plan"]
