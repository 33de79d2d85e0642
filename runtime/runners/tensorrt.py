"""The TensorRT runner: the engines of ``qc-compile build`` (one per unit and precision variant) on the deploy GPU.

Inputs are bound by device address (``set_input_shape`` + ``set_tensor_address``), outputs allocated from the shapes
the context infers, and the engine enqueued on torch's current CUDA stream with ``execute_async_v3`` — no host
synchronisation inside a step. Whole units only.

Both TensorRT flavours expose this runtime API under the same names; which module to import for a target and whether
this GPU can run its engines are decided in :mod:`qc_compile.trt_compat` (``load_trt``, ``runnable_reason``).
**Not executed on the project's machines**: full TensorRT cannot be installed here and the TensorRT-RTX runtime refuses
Hopper, so the binding logic is tested against a stand-in runtime backed by onnxruntime (tests/test_trt_executor.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch

from qc_compile.errors import ArtifactError, UserError
from qc_compile.runtime.runners.sources import variant_sources

_TORCH_DTYPES = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "BOOL": torch.bool,
                 "INT32": torch.int32, "INT64": torch.int64, "INT8": torch.int8, "UINT8": torch.uint8}


def torch_dtype(trt_dtype: Any) -> torch.dtype:
    """torch dtype of a ``trt.DataType`` (by member name, identical in both flavours)."""
    name = getattr(trt_dtype, "name", str(trt_dtype).rsplit(".", 1)[-1])
    if name not in _TORCH_DTYPES:
        raise ArtifactError(f"engine I/O tensor of TensorRT type {name}: the runner binds only "
                            f"{', '.join(_TORCH_DTYPES)}.")
    return _TORCH_DTYPES[name]


class EngineUnit:
    """One engine and its execution context, with the engine's I/O names split by direction."""

    def __init__(self, trt: Any, engine: Any, path: Path) -> None:
        self.engine = engine
        self.context = engine.create_execution_context()
        if self.context is None:
            raise ArtifactError(f"{path}: TensorRT could not create an execution context (out of GPU memory?).")
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]


class TrtRunner:
    """``units[unit][variant]`` engines; ``io`` and ``unit_names`` as for the onnxruntime runner."""

    backend = "tensorrt"
    supports: frozenset[str] = frozenset()
    stats = "torch"

    def __init__(self, units: Mapping[str, Mapping[str, EngineUnit]], io: Mapping[str, dict],
                 unit_names: tuple[str, ...], device: str = "cuda") -> None:
        self.units = {u: dict(v) for u, v in units.items()}
        self.io = dict(io)
        self.unit_names = tuple(unit_names)
        self.device = torch.device(device)
        missing = [u for u in self.unit_names if "default" not in self.units.get(u, {})]
        if missing:
            raise ValueError(f"no default engine for unit(s) {missing}")

    @classmethod
    def from_workdir(cls, work, target: str | None = None, *, trt: Any = None, device: str = "cuda",
                     check_runnable: bool = True) -> "TrtRunner":
        """Deserialize every engine of ``target`` (default: the first target with engines) after the manifest's
        sha256 checks. ``trt`` (the TensorRT module) and ``check_runnable`` exist for tests with a stand-in."""
        from qc_compile import trt_compat

        src = variant_sources(work, stage="q", target=target, need="engine")
        t = trt_compat.parse_target(src.target)
        if check_runnable:
            why = trt_compat.runnable_reason(t)
            if why:
                raise UserError(f"--executor tensorrt: the {src.target} engines in {work} cannot run here: {why}.")
        trt = trt if trt is not None else trt_compat.load_trt(t)
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        units: dict[str, dict[str, EngineUnit]] = {}
        for u, variants in src.files.items():
            units[u] = {}
            for v, source in variants.items():
                path = source.engine
                if path is None:
                    raise UserError(f"{work}: unit {u} variant {v} of {src.target} has no engine; re-run build.")
                engine = runtime.deserialize_cuda_engine(path.read_bytes())
                if engine is None:
                    raise ArtifactError(f"{path}: TensorRT could not deserialize this engine (built by another "
                                        f"TensorRT version or for another GPU?); rebuild it with `qc-compile build "
                                        f"WORK --target {src.target}` here.")
                units[u][v] = EngineUnit(trt, engine, path)
        return cls(units, src.io, src.unit_names, device=device)

    def _stream(self) -> int:
        return torch.cuda.current_stream(self.device).cuda_stream if self.device.type == "cuda" else 0

    def run_unit(self, unit: str, variant: str, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        u = self.units[unit].get(variant) or self.units[unit]["default"]
        ctx, engine = u.context, u.engine
        keep = []  # the bound tensors must outlive the enqueue
        for rec in self.io[unit]["inputs"]:
            if rec["onnx_name"] not in u.inputs:
                continue  # an input the builder folded away
            t = inputs[rec["name"]].to(self.device, torch_dtype(engine.get_tensor_dtype(rec["onnx_name"])))
            t = t.contiguous()
            if not ctx.set_input_shape(rec["onnx_name"], tuple(t.shape)):
                raise UserError(f"unit {unit}: input {rec['onnx_name']} has shape {tuple(t.shape)}, outside the "
                                "engine's optimisation profile (batch = 2 x prompts with CFG); run fewer prompts per "
                                "call or rebuild with a larger `qc-compile build --max-batch`.")
            ctx.set_tensor_address(rec["onnx_name"], t.data_ptr())
            keep.append(t)
        outs = {}
        for rec in self.io[unit]["outputs"]:
            shape = tuple(ctx.get_tensor_shape(rec["onnx_name"]))
            o = torch.empty(shape, dtype=torch_dtype(engine.get_tensor_dtype(rec["onnx_name"])), device=self.device)
            ctx.set_tensor_address(rec["onnx_name"], o.data_ptr())
            outs[rec["name"]] = o
        if not ctx.execute_async_v3(self._stream()):
            raise RuntimeError(f"unit {unit} ({variant}): TensorRT execute_async_v3 failed; see the TensorRT log.")
        return {k: v.float() for k, v in outs.items()}

    def block_steps(self, unit, variant, ctx):
        raise NotImplementedError("the TensorRT runner runs whole unit engines")

    def begin_step(self, h: torch.Tensor, ctx) -> None:
        pass

    def describe(self) -> dict:
        return {"runner": self.backend, "device": str(self.device),
                "variants": sorted({v for s in self.units.values() for v in s})}
