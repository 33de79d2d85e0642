"""The fast torch runner (``torch-fast``, CUDA): block units on the ``qc::`` kernels (:mod:`..fast_blocks`),
optional torch.compile and per-unit CUDA graphs; statistics through the fused ``qc::cache_stats_apply``.

* **Precision variants**: the plan's variants (``plan.resolve``) are built as their own fast blocks, ``fp`` (unless
  the plan defines it) is the unquantized model, and a decision naming any other variant runs the plan's default.
* ``embed`` and ``final`` run on the model itself (unquantized even where the plan lists their linears; recorded in
  :meth:`FastRunner.describe`).
* ``cuda_graphs=True`` captures each (variant, block unit) once, after two eager warm-up calls (the Triton producers
  autotune on their first call), into one shared memory pool. A unit whose input is the previous unit graph's output
  reads that buffer directly; any other input is copied into a static buffer before the replay; the step's other
  block inputs are copied once per step (:meth:`begin_step`). ``compile=True`` compiles the
  block forward with inductor once per block kind. ``fused=True`` writes the FP8 quantization as torch ops for
  inductor to fuse into the kernels producing each activation (:mod:`..fast_linear`); it is off by default because
  on an H200 it was slower than the ``qc::`` producers (inductor split each producer into an amax reduction and a
  cast pass and re-ran GELU in both: 7.48 vs 6.44 ms per computed XL block, ``bench/results/e2e_h200.md``).
* **Caption keys trimmed**: cross-attention runs on the caption tokens up to the last one any sample's mask keeps
  (Open-Sora pads T5 features to 300 tokens; a prompt has tens). The dropped keys are masked out, so the result is
  the same function; when every kept token is valid in every sample the mask is dropped too, which lets SDPA take
  its flash kernels.
* ``attention="sage"``: spatial/temporal self-attention of at least 128 tokens per sequence on SageAttention's 8-bit
  kernel (optional extra ``sage``; :mod:`..attention`); off by default (``"sdpa"``). Cross-attention keeps SDPA. The sampler reads the cut from the mask on the host before the first step (``Conditioning.caption_cut``);
  other callers get one device read per mask tensor.
"""

from __future__ import annotations

import weakref
from typing import Any, Mapping, NamedTuple

import torch

from qc_compile.errors import UserError
from qc_compile.models.stdit3 import STDiT3, Geometry
from qc_compile.models.units import is_block, unit_kind
from qc_compile.runtime.attention import check_attention_backend
from qc_compile.runtime.fast_blocks import FastModel, block_forward, build_fast_model, compiled_block_forward
from qc_compile.runtime.protocols import caption_cut


class _UnitGraph(NamedTuple):
    graph: torch.cuda.CUDAGraph
    out: torch.Tensor


def check_fast_available(device: str) -> None:
    """UserError unless the fast path can run here (it needs CUDA for its kernels)."""
    if not str(device).startswith("cuda") or not torch.cuda.is_available():
        raise UserError(f"the fast path (--fast) runs the qc:: CUDA kernels and needs a CUDA GPU; device {device!r} "
                        f"{'is not a CUDA device' if not str(device).startswith('cuda') else 'is not available'} "
                        f"(torch {torch.__version__}). Run without --fast (the plain torch executor) here.")


class FastRunner:
    backend = "torch-fast"
    supports = frozenset({"parts", "gate", "shards"})
    stats = "fused"

    def __init__(self, model: STDiT3, geometry: Geometry, plan=None, *, compile: bool = False,
                 cuda_graphs: bool = False, fused: bool | None = None, trim_captions: bool = True,
                 attention: str = "sdpa") -> None:
        check_attention_backend(attention, model.x_embedder.proj.weight.device)
        if cuda_graphs and model.x_embedder.proj.weight.device.type != "cuda":
            raise UserError("cuda_graphs=True needs the model on a CUDA device.")
        self.model = model
        self.g = geometry
        self.unit_names = tuple(model.unit_names())
        self.plan = plan
        self.compile = compile
        self.cuda_graphs = cuda_graphs
        self.fused = False if fused is None else fused
        self.trim_captions = trim_captions
        self.attention = attention
        fn = compiled_block_forward() if compile else block_forward
        self.fp_model = build_fast_model(model, None, fn=fn, attention=attention)
        self.variant_models: dict[str, FastModel] = {}
        if plan is not None:
            self.variant_models = {v: build_fast_model(model, plan, v, fn=fn, fused=self.fused, attention=attention)
                                   for v in plan.variant_names}
            self.variant_models.setdefault("fp", self.fp_model)
        self.default_model = self.variant_models.get("default", self.fp_model)
        self._graphs: dict[tuple, _UnitGraph] = {}
        self._static: dict[str, torch.Tensor] = {}
        self._x: dict[tuple, torch.Tensor] = {}
        self._outs: dict[int, torch.Tensor] = {}  # data_ptr -> a captured graph's output buffer (chained inputs)
        self._chained: set[tuple] = set()  # units that already have their one chained graph
        self._x_dtype: torch.dtype | None = None
        self._pool = None
        # id(mask) -> (weak reference to the mask, its cut): a hit needs the same live tensor object, since ids
        # and addresses of freed masks are reused
        self._cuts: dict[int, tuple[weakref.ref, tuple[int, bool]]] = {}

    def model_for(self, variant: str) -> FastModel:
        return self.variant_models.get(variant, self.default_model)

    def describe(self) -> dict:
        ignored = []
        if self.plan is not None:
            ignored = sorted(n for n, e in self.plan.linears.items() if unit_kind(e.unit) != "block"
                             and (e.weight != "bf16" or e.activation != "bf16"))
        some = next(iter(self.default_model.blocks.values()))
        return {"runner": self.backend, "plan": self.plan is not None, "variants": sorted(self.variant_models),
                "compile": self.compile, "cuda_graphs": self.cuda_graphs,
                "fp8_quantization": "torch ops fused by inductor" if self.fused else "qc:: producer kernels",
                "trim_captions": self.trim_captions, "self_attention": self.attention,
                "activation_scales": "dynamic per token (the kernels'); the plan's static act_scale is not used",
                "quantized_roles_first_block": some.quantized, "plan_linears_run_unquantized": ignored}

    # ----------------------------------------------------------------------------------------- captions
    def reset(self) -> None:
        self._cuts.clear()

    def _captions(self, ctx: Mapping[str, Any]) -> dict[str, Any]:
        """``ctx`` with ``y`` / ``mask`` cut after the last caption token any sample keeps (see the module doc).
        The cut comes from the conditioning (``caption_cut``, read on the host by the sampler); without it, from one
        device read per mask, remembered."""
        mask = ctx.get("mask")
        if not self.trim_captions or mask is None or "y" not in ctx:
            return dict(ctx)
        known = ctx.get("caption_cut")  # for the whole [cond; null] batch: also right for any part of it
        if known is not None:
            n, all_kept = min(known[0], mask.shape[1]), known[1]
        else:
            entry = self._cuts.get(id(mask))
            if entry is None or entry[0]() is not mask:
                self._cuts = {k: v for k, v in self._cuts.items() if v[0]() is not None}  # drop freed masks
                entry = self._cuts[id(mask)] = (weakref.ref(mask), caption_cut(mask))  # the device read, once
            n, all_kept = entry[1]
        return {**ctx, "y": ctx["y"][:, :n], "mask": None if all_kept else mask[:, :n]}

    # ----------------------------------------------------------------------------------------- protocol
    def block_steps(self, unit: str, variant: str, ctx: Mapping[str, torch.Tensor], geometry=None):
        return self.model_for(variant).block_steps(unit, self._captions(ctx), geometry or self.g)

    def begin_step(self, h: torch.Tensor, ctx: Mapping[str, torch.Tensor]) -> None:
        if self.cuda_graphs and h.is_cuda:
            self._ensure_static(h, self._captions(ctx))

    def run_unit(self, unit: str, variant: str, inputs: Mapping[str, torch.Tensor],
                 geometry=None) -> dict[str, torch.Tensor]:
        """``geometry``: the token grid of a shard (:mod:`qc_compile.runtime.parallel`) for block units."""
        if not is_block(unit):
            out = self.model.run_unit(unit, dict(inputs), self.g)
            if unit_kind(unit) == "embed" and not out["x"].is_contiguous():
                # the patch embedding's (B, C, T, H, W) -> (B, N, C) is a channel-major view; every block output
                # inherits that layout and each kernel that needs rows of C then copies the whole hidden state
                # (1.16 ms per computed XL block on an H200: bench/results/probe_copies_h200_5c1b4f4.log). One
                # copy per step here instead.
                out = {**out, "x": out["x"].contiguous()}
            return out
        inputs = self._captions(inputs)
        fm, h, g = self.model_for(variant), inputs["x"], geometry or self.g
        if self.cuda_graphs and h.is_cuda:
            return {"x": self._graph_unit(fm, variant if variant in self.variant_models else "default", unit, h, g)}
        return {"x": fm.block(unit)(h, inputs["t_mlp"], inputs["y"], inputs["mask"], g.T, g.S)}

    # ----------------------------------------------------------------------------------------- CUDA graphs
    def _ensure_static(self, h: torch.Tensor, ctx: Mapping[str, torch.Tensor]) -> None:
        """Static buffers for the block inputs other than ``x`` (a mask dropped by the caption cut stays None)."""
        want = {"t_mlp": ctx["t_mlp"], "y": ctx["y"], "mask": ctx["mask"]}

        def differs(k: str, v: torch.Tensor | None) -> bool:
            old = self._static.get(k, ...)
            if v is None or old is None:
                return v is not old
            return old is ... or old.shape != v.shape or old.dtype != v.dtype

        if h.dtype != self._x_dtype or any(differs(k, v) for k, v in want.items()):
            self._graphs.clear()
            self._outs.clear()
            self._chained.clear()
            self._x.clear()
            self._x_dtype = h.dtype
            self._static = {k: None if v is None else torch.empty_like(v) for k, v in want.items()}
            self._pool = torch.cuda.graph_pool_handle()
        for k, v in want.items():
            if v is not None:
                self._static[k].copy_(v)

    def _graph_input(self, variant: str, name: str, h: torch.Tensor) -> tuple[torch.Tensor, tuple]:
        """The buffer the unit's graph reads and its key. When ``h`` is the output buffer of another unit's graph (the
        previous unit computed: every unit of a full-compute step) the graph reads that buffer directly: no copy (an
        XL step had one 110 MB device-to-device copy per block unit, 56 per step; the H200 profile of ours_fp8 at
        1544a85 showed 3.5 ms of Memcpy DtoD per 261 ms step, which these account for by size). Otherwise (a reused
        or pruned predecessor, the first unit) ``h`` is copied into the unit input buffer of its shape (a sharded
        run's spatial and temporal blocks may see different token counts). A unit keeps one chained graph (for the
        first producer it saw) besides its copying one, so memory stays bounded."""
        shape = tuple(h.shape)
        src = self._outs.get(h.data_ptr())
        if src is not None and src is not h and (src.shape != h.shape or src.stride() != h.stride()
                                                 or src.dtype != h.dtype):
            src = None
        if src is not None:
            key = (variant, name, shape, h.data_ptr())
            if key in self._graphs or (variant, name, shape, "chained") not in self._chained:
                self._chained.add((variant, name, shape, "chained"))
                return src, key
        x = self._x.get(shape)
        if x is None:
            x = self._x[shape] = torch.empty_like(h)
        x.copy_(h)
        return x, (variant, name, shape)

    def _graph_unit(self, fm: FastModel, variant: str, name: str, h: torch.Tensor, g) -> torch.Tensor:
        """Replay the unit's graph (captured on first use), reading its input as :meth:`_graph_input` says."""
        st = self._static
        x, key = self._graph_input(variant, name, h)
        entry = self._graphs.get(key)
        if entry is None:
            block = fm.block(name)

            def run() -> torch.Tensor:
                return block(x, st["t_mlp"], st["y"], st["mask"], g.T, g.S)

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
            self._outs[out.data_ptr()] = out
        entry.graph.replay()
        return entry.out


def fast_model_copy(model: Any) -> Any:
    """The model in bf16 for the fast path (the model itself when it already is)."""
    import copy

    return model if model.dtype == torch.bfloat16 else copy.deepcopy(model).to(torch.bfloat16)
