"""STDiT3 block units on the ``qc::`` kernels: pure functions of static specs and prepared weights, so that
torch.compile and CUDA graphs see plain tensors (the fast runner, :mod:`qc_compile.runtime.runners.fast`, runs them).

Per the plan each linear is dense (bf16) or FP8 (``qkv`` / ``fc1`` take the fused ``modulate_quant_fp8`` producer,
``fc2`` ``gelu_rotate_quant_fp8``, the others ``rotate_quant_fp8``; then ``fp8_linear``). Attention is
``F.scaled_dot_product_attention``, or for self-attention SageAttention's 8-bit kernel where the spec says
``attention="sage"`` (:mod:`qc_compile.runtime.attention`; optional, off by default); cross-attention is batched with the caption mask as a boolean ``attn_mask`` (the
padded form of ``layers.MultiHeadCrossAttention``, identical math to its packed per-sample loop). Temporal blocks
permute the FP8 codes of the block input (half the bytes of the bf16 tensor the reference permutes). Without a plan
every linear is dense: the same math as ``STDiT3Block`` (tested equal in fp32).

The block is composed of the same sub-steps as :class:`~qc_compile.models.stdit3.STDiT3Block` (modulation,
self-attention, cross-attention, feed-forward), each with its fused producers; :class:`FastBlockSteps` exposes them
to the step executor's sub-block caches.
"""

from __future__ import annotations

from typing import Callable, Mapping, NamedTuple

import torch
import torch.nn.functional as F

from qc_compile.models.layers import RotaryEmbedding
from qc_compile.models.stdit3 import STDiT3, BlockSteps, STDiT3Block, Geometry, Modulation, unit_kind
from qc_compile.runtime import fast_linear as fl
from qc_compile.runtime.attention import self_attend
from qc_compile.runtime.fast_linear import LinearSpec, LinearWeights

ROLES: tuple[tuple[str, str], ...] = (
    ("qkv", "attn.qkv"), ("proj", "attn.proj"), ("q_linear", "cross_attn.q_linear"),
    ("kv_linear", "cross_attn.kv_linear"), ("cproj", "cross_attn.proj"), ("fc1", "mlp.fc1"), ("fc2", "mlp.fc2"))


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
    attention: str = "sdpa"  # self-attention backend (qc_compile.runtime.attention.BACKENDS)


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
def modulation(table: torch.Tensor, t_mlp: torch.Tensor) -> Modulation:
    B = t_mlp.shape[0]
    return Modulation(*(table[None] + t_mlp.reshape(B, 6, -1)).chunk(6, dim=1))


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
    out = self_attend(q, k, v, spec.attention)
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
        return fl.linear_q(spec.qkv, w.qkv, xq, xs, x.dtype)
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
        return fl.linear_q(spec.proj, w.proj, _from_time_major(aq, B, T, S), _from_time_major(as_, B, T, S),
                            a.dtype)
    return _from_time_major(fl.linear(spec.proj, w.proj, a), B, T, S)


def attention_input(x: torch.Tensor, mods: Modulation) -> torch.Tensor:
    return _layer_norm(x) * (1 + mods.scale_msa) + mods.shift_msa


def self_attention(spec: BlockSpec, w: BlockWeights, x: torch.Tensor, mods: Modulation, T: int,
                   S: int) -> torch.Tensor:
    """Self-attention sub-step on the residual stream ``x (B, N, C)``, before its gate (fused producer for FP8)."""
    a = _attend(spec, w, _qkv_from_input(spec, w, x, mods.shift_msa, mods.scale_msa, T, S))
    return _proj_back(spec, w, a, x.shape[0], T, S)


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


def feed_forward(spec: BlockSpec, w: BlockWeights, x: torch.Tensor, mods: Modulation) -> torch.Tensor:
    """MLP sub-step on the residual stream, before its gate (fused modulate+quant and GELU producers for FP8)."""
    return fl.gelu_linear(spec.fc2, w.fc2, fl.modulate_linear(spec.fc1, w.fc1, x, mods.shift_mlp, mods.scale_mlp))


def block_forward(spec: BlockSpec, w: BlockWeights, x: torch.Tensor, t_mlp: torch.Tensor, y: torch.Tensor,
                  mask: torch.Tensor | None, T: int, S: int) -> torch.Tensor:
    """STDiT3Block.forward (no x_mask), composed of the fused sub-steps."""
    mods = modulation(w.table, t_mlp)
    x = x + mods.gate_msa * self_attention(spec, w, x, mods, T, S)
    x = x + cross_attention(spec, w, x, y, mask)
    return x + mods.gate_mlp * feed_forward(spec, w, x, mods)


# ---------------------------------------------------------------------------------------------------- modules
class FastBlock:
    """One block unit: specs + weights + the (eager or compiled) forward."""

    def __init__(self, block: STDiT3Block, rope_freqs: torch.Tensor, entries: Mapping[str, tuple] | None = None,
                 *, prefix: str = "block", fn: Callable = block_forward, fused: bool = False,
                 attention: str = "sdpa") -> None:
        entries = entries or {}
        specs, weights = {}, {}
        for key, role in ROLES:
            mod = block.get_submodule(role)
            e = entries.get(role)
            specs[key], weights[key] = fl.prepare_linear(mod, *(e or (None, None, None)), name=f"{prefix}.{role}",
                                                         fused=fused)
        attn = block.attn
        qk = not isinstance(attn.q_norm, torch.nn.Identity)
        self.spec = BlockSpec(block.temporal, attn.num_heads, attn.head_dim, qk, attn.q_norm.eps if qk else 1e-6,
                              **specs, attention=attention)
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



class FastBlockSteps(BlockSteps):
    """:class:`~qc_compile.models.stdit3.BlockSteps` on the fast kernels (same interface and gates)."""

    def __init__(self, block: FastBlock, ctx: dict[str, torch.Tensor], g: Geometry) -> None:
        self.spec, self.w, self.ctx, self.g = block.spec, block.w, ctx, g
        self.mods = modulation(block.w.table, ctx["t_mlp"])

    def attention_input(self, x: torch.Tensor) -> torch.Tensor:
        return attention_input(x, self.mods)

    def self_attention(self, x: torch.Tensor) -> torch.Tensor:
        return self_attention(self.spec, self.w, x, self.mods, self.g.T, self.g.S)

    def cross_attention(self, x: torch.Tensor) -> torch.Tensor:
        return cross_attention(self.spec, self.w, x, self.ctx["y"], self.ctx.get("mask"))

    def feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        return feed_forward(self.spec, self.w, x, self.mods)


class FastModel:
    """The model-family protocol on fast blocks: block units run :class:`FastBlock`, ``embed``/``final`` the
    model itself (unquantized: they hold <0.2% of the FLOPs at Open-Sora scale)."""

    def __init__(self, model: STDiT3, blocks: Mapping[str, FastBlock]) -> None:
        self.model = model
        self.blocks = dict(blocks)
        self.config = model.config

    def unit_names(self) -> list[str]:
        return self.model.unit_names()

    def block(self, name: str) -> FastBlock:
        return self.blocks[name]

    def block_steps(self, name: str, ctx: dict[str, torch.Tensor], g: Geometry) -> FastBlockSteps:
        return FastBlockSteps(self.blocks[name], ctx, g)

    def run_unit(self, name: str, inputs: dict[str, torch.Tensor], g: Geometry) -> dict[str, torch.Tensor]:
        if unit_kind(name) != "block":
            return self.model.run_unit(name, inputs, g)
        return {"x": self.blocks[name](inputs["x"], inputs["t_mlp"], inputs["y"], inputs["mask"], g.T, g.S)}


def build_fast_model(model: STDiT3, plan=None, variant: str = "default", *, fn: Callable = block_forward,
                     fused: bool = False, attention: str = "sdpa") -> FastModel:
    """Fast blocks of ``model`` under ``plan``'s ``variant`` (None: dense FP blocks sharing the model's weights);
    ``fused``: FP8 linears as inductor-fusable torch ops (for a compiled ``fn``); ``attention``: the
    self-attention backend (:mod:`qc_compile.runtime.attention`)."""
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
                                     fn=fn, fused=fused, attention=attention)
    return FastModel(model, blocks)


def fp8_block_plan(model: STDiT3, ranges: Mapping[str, Mapping] | None = None, *, rotation: int | None = None,
                   include_embed_final: bool = False, high_variant: bool = False, keep_bf16: tuple[str, ...] = ()):
    """A W8A8 FP8 plan over every block linear of ``model`` (other linears bf16), for the fast path and the benches.

    ``high_variant`` adds the ``high`` precision variant (every linear bf16) that ``calibrate --uniform`` plans carry,
    so the precision requests of a policy (AIGQ's computes after a reuse) run at that precision instead of falling
    back to the FP8 default.

    ``ranges`` (name -> {"amax": ...}, from :class:`qc_compile.calib.ranges.RangeCollector`) give the static
    ``act_scale`` the Q/DQ graphs and ``torch_package`` use; without them ``act_scale`` stays None (the fast path
    quantizes per token at run time and never reads it; such a plan is not saved: the schema requires the scale).
    ``keep_bf16``: fnmatch patterns of block roles (``cross_attn.kv_linear``) that stay bf16.
    """
    import fnmatch

    from qc_compile.linears import config_sha256, model_linears
    from qc_compile.plan import LinearPlan, Plan, act_scale_for

    infos = model_linears(model)
    unmatched = [p for p in keep_bf16 if not any(fnmatch.fnmatchcase(li.role, p) for li in infos
                                                  if unit_kind(li.unit) == "block")]
    if unmatched:
        from qc_compile.errors import UserError

        roles = sorted({li.role for li in infos if unit_kind(li.unit) == "block"})
        raise UserError(f"keep bf16 {unmatched}: no block linear role matches; the roles are {', '.join(roles)}.")
    linears = {}
    for li in infos:
        e = LinearPlan(unit=li.unit)
        if (unit_kind(li.unit) == "block" or include_embed_final) and \
                not any(fnmatch.fnmatchcase(li.role, p) for p in keep_bf16):
            amax = None if ranges is None else float(ranges[li.name]["amax"])
            e = LinearPlan(unit=li.unit, weight="fp8_e4m3", activation="fp8_e4m3", act_amax=amax,
                           act_scale=None if amax is None else act_scale_for("fp8_e4m3", amax), rotation=rotation)
        linears[li.name] = e
    variants = {"high": {"*": {"weight": "bf16", "activation": "bf16"}}} if high_variant else {}
    return Plan(model={"name": model.config.name, "config_sha256": config_sha256(model.config)}, linears=linears,
                variants=variants,
                provenance={"made_by": "qc_compile.runtime.fast_blocks.fp8_block_plan", "keep_bf16": list(keep_bf16),
                            "act_scale": "calibrated ranges" if ranges is not None else
                            "none: dynamic per-token scales only"})


def compiled_block_forward() -> Callable:
    """:func:`block_forward` compiled by inductor (one graph per block kind; guards on the static specs)."""
    import torch._dynamo

    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    return torch.compile(block_forward, dynamic=False)
