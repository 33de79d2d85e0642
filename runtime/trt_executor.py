"""Unit executor over TensorRT engines: the engines of ``qc-compile build`` (one per unit and precision variant) in
the sampler, on the deploy GPU.

Same step semantics as :class:`~qc_compile.runtime.ort_executor.OrtExecutor` (it reuses its ``step``): whole-unit
COMPUTE / REUSE / PRUNE, ``UnitDecision.variant`` picks the variant's engine, statistics stay on the device until the
sampler's one copy per step. Only how one unit runs differs: inputs are bound by device address
(``set_input_shape`` + ``set_tensor_address``), outputs are allocated from the shapes the context infers, and the
engine is enqueued on torch's current CUDA stream with ``execute_async_v3`` — no host synchronisation inside a step.

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
from qc_compile.runtime.ort_executor import OrtExecutor

_TORCH_DTYPES = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "BOOL": torch.bool,
                 "INT32": torch.int32, "INT64": torch.int64, "INT8": torch.int8, "UINT8": torch.uint8}


def torch_dtype(trt_dtype: Any) -> torch.dtype:
    """torch dtype of a ``trt.DataType`` (by member name, identical in both flavours)."""
    name = getattr(trt_dtype, "name", str(trt_dtype).rsplit(".", 1)[-1])
    if name not in _TORCH_DTYPES:
        raise ArtifactError(f"engine I/O tensor of TensorRT type {name}: the executor binds only "
                            f"{', '.join(_TORCH_DTYPES)}.")
    return _TORCH_DTYPES[name]


class _Unit:
    """One engine and its execution context, with the engine's I/O names split by direction."""

    def __init__(self, trt: Any, engine: Any, path: Path) -> None:
        self.engine = engine
        self.context = engine.create_execution_context()
        if self.context is None:
            raise ArtifactError(f"{path}: TensorRT could not create an execution context (out of GPU memory?).")
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]


class TrtExecutor(OrtExecutor):
    """``units[unit][variant]`` engines; ``io`` and ``unit_names`` as for :class:`OrtExecutor`."""

    def __init__(self, units: Mapping[str, Mapping[str, _Unit]], io: Mapping[str, dict],
                 unit_names: tuple[str, ...], device: str = "cuda") -> None:
        super().__init__(units, io, unit_names)
        self.device = torch.device(device)

    @classmethod
    def from_workdir(cls, work, target: str | None = None, *, trt: Any = None, device: str = "cuda",
                     check_runnable: bool = True) -> "TrtExecutor":
        """Deserialize every engine of ``target`` (default: the first target with engines) after the manifest's
        sha256 checks. ``trt`` (the TensorRT module) and ``check_runnable`` exist for tests with a stand-in."""
        from qc_compile import trt_compat
        from qc_compile.build import verify_manifest
        from qc_compile.workdir import WorkDir, read_model_info

        work = work if isinstance(work, WorkDir) else WorkDir(work)
        info = read_model_info(work)
        manifest = verify_manifest(work, target, info=info)
        targets = manifest["targets"]
        name = target or next((t for t, r in targets.items() if r.get("engines")), None)
        if name is None or name not in targets or not targets[name].get("engines"):
            built = ", ".join(targets) or "none"
            raise UserError(f"{work.root}: no TensorRT engines to run (targets built: {built}; a target built with "
                            "--onnx-only or --target torch has none). Run `qc-compile build WORK --target trt` on "
                            "the deploy machine.")
        t = trt_compat.parse_target(name)
        if check_runnable:
            why = trt_compat.runnable_reason(t)
            if why:
                raise UserError(f"--executor tensorrt: the {name} engines in {work.root} cannot run here: {why}.")
        trt = trt if trt is not None else trt_compat.load_trt(t)
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        units: dict[str, dict[str, _Unit]] = {}
        for u, rec in targets[name]["units"].items():
            units[u] = {}
            for v, vrec in rec["variants"].items():
                src = rec["variants"][vrec["same_as"]] if "same_as" in vrec else vrec
                if not src.get("engine"):
                    raise UserError(f"{work.root}: unit {u} variant {v} of {name} has no engine; re-run build.")
                path = work.root / src["engine"]["path"]
                engine = runtime.deserialize_cuda_engine(path.read_bytes())
                if engine is None:
                    raise ArtifactError(f"{path}: TensorRT could not deserialize this engine (built by another "
                                        f"TensorRT version or for another GPU?); rebuild it with `qc-compile build "
                                        f"WORK --target {name}` here.")
                units[u][v] = _Unit(trt, engine, path)
        return cls(units, {u["name"]: {"inputs": u["inputs"], "outputs": u["outputs"]} for u in info.units},
                   tuple(info.unit_names), device=device)

    def _stream(self) -> int:
        return torch.cuda.current_stream(self.device).cuda_stream if self.device.type == "cuda" else 0

    def _run(self, unit: str, variant: str, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        u: _Unit = self.sessions[unit].get(variant) or self.sessions[unit]["default"]
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
