"""The fast torch runner (``torch-fast``, CUDA): block units on the ``qc::`` kernels (:mod:`..fast_blocks`),
optional torch.compile and per-unit CUDA graphs; statistics through the fused ``qc::cache_stats_apply``.

* **Precision variants**: the plan's variants (``plan.resolve``) are built as their own fast blocks, ``fp`` (unless
  the plan defines it) is the unquantized model, and a decision naming any other variant runs the plan's default.
* ``embed`` and ``final`` run on the model itself (unquantized even where the plan lists their linears; recorded in
  :meth:`FastRunner.describe`).
* ``cuda_graphs=True`` captures each (variant, block unit) once, after two eager warm-up calls (the Triton producers
  autotune on their first call), into one shared memory pool; the unit input is copied into a static buffer before
  each replay and the step's other block inputs once per step (:meth:`begin_step`). ``compile=True`` compiles the
  block forward with inductor once per block kind.
"""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple

import torch

from qc_compile.errors import UserError
from qc_compile.models.stdit3 import STDiT3, Geometry
from qc_compile.models.units import is_block, unit_kind
from qc_compile.runtime.fast_blocks import FastModel, block_forward, build_fast_model, compiled_block_forward


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
    supports = frozenset({"parts", "gate"})
    stats = "fused"

    def __init__(self, model: STDiT3, geometry: Geometry, plan=None, *, compile: bool = False,
                 cuda_graphs: bool = False) -> None:
        if cuda_graphs and model.x_embedder.proj.weight.device.type != "cuda":
            raise UserError("cuda_graphs=True needs the model on a CUDA device.")
        self.model = model
        self.g = geometry
        self.unit_names = tuple(model.unit_names())
        self.plan = plan
        self.compile = compile
        self.cuda_graphs = cuda_graphs
        fn = compiled_block_forward() if compile else block_forward
        self.fp_model = build_fast_model(model, None, fn=fn)
        self.variant_models: dict[str, FastModel] = {}
        if plan is not None:
            self.variant_models = {v: build_fast_model(model, plan, v, fn=fn) for v in plan.variant_names}
            self.variant_models.setdefault("fp", self.fp_model)
        self.default_model = self.variant_models.get("default", self.fp_model)
        self._graphs: dict[tuple[str, str], _UnitGraph] = {}
        self._static: dict[str, torch.Tensor] = {}
        self._pool = None

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
                "activation_scales": "dynamic per token (the kernels'); the plan's static act_scale is not used",
                "quantized_roles_first_block": some.quantized, "plan_linears_run_unquantized": ignored}

    # ----------------------------------------------------------------------------------------- protocol
    def block_steps(self, unit: str, variant: str, ctx: Mapping[str, torch.Tensor]):
        return self.model_for(variant).block_steps(unit, dict(ctx), self.g)

    def begin_step(self, h: torch.Tensor, ctx: Mapping[str, torch.Tensor]) -> None:
        if self.cuda_graphs and h.is_cuda:
            self._ensure_static(h, ctx)

    def run_unit(self, unit: str, variant: str, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if not is_block(unit):
            return self.model.run_unit(unit, dict(inputs), self.g)
        fm, h = self.model_for(variant), inputs["x"]
        if self.cuda_graphs and h.is_cuda:
            return {"x": self._graph_unit(fm, variant if variant in self.variant_models else "default", unit, h)}
        return {"x": fm.block(unit)(h, inputs["t_mlp"], inputs["y"], inputs["mask"], self.g.T, self.g.S)}

    # ----------------------------------------------------------------------------------------- CUDA graphs
    def _ensure_static(self, h: torch.Tensor, ctx: Mapping[str, torch.Tensor]) -> None:
        want = {"x": h, "t_mlp": ctx["t_mlp"], "y": ctx["y"], "mask": ctx["mask"]}
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


def fast_model_copy(model: Any) -> Any:
    """The model in bf16 for the fast path (the model itself when it already is)."""
    import copy

    return model if model.dtype == torch.bfloat16 else copy.deepcopy(model).to(torch.bfloat16)
