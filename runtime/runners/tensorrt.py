"""The TensorRT runner: the engines of ``qc-compile build`` (one per unit and precision variant) on the deploy GPU.

Every engine input is bound by device address (``set_input_shape`` + ``set_tensor_address``): the unit's inputs
from model.json, and the inputs a build adds (``cached_residual`` of a ``--plugins`` build, :data:`RUNNER_INPUTS`);
every engine output is allocated from the shapes the context infers. A ``--plugins`` build's ``qc::`` plugin creators
are registered with TensorRT before its engines are deserialized, and the engine enqueued on torch's current CUDA stream with ``execute_async_v3`` — no host
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


def register_plugin_creators(trt: Any) -> list[Any]:
    """Register the ``qc::`` plugin creators with this TensorRT before an engine of a ``--plugins`` build is
    deserialized (Python plugins are not stored in the engine; TensorRT recreates them through the registry)."""
    from qc_compile.plugins.trt_plugins import register_plugins

    try:
        return register_plugins(trt)
    except Exception as e:  # noqa: BLE001 (TensorRT raises its own types; the message says what failed)
        raise ArtifactError(f"the engines were built with --plugins, but the qc:: plugin creators could not be "
                            f"registered with {getattr(trt, '__name__', 'TensorRT')}: {e}") from e


def torch_dtype(trt_dtype: Any) -> torch.dtype:
    """torch dtype of a ``trt.DataType`` (by member name, identical in both flavours)."""
    name = getattr(trt_dtype, "name", str(trt_dtype).rsplit(".", 1)[-1])
    if name not in _TORCH_DTYPES:
        raise ArtifactError(f"engine I/O tensor of TensorRT type {name}: the runner binds only "
                            f"{', '.join(_TORCH_DTYPES)}.")
    return _TORCH_DTYPES[name]


# Engine inputs that the build adds beyond the unit's model.json record, and where the runner takes them from.
# ``cached_residual`` (plugin builds, ``qc::CacheStatsApply``): this unit's ``residual_out`` of its previous computed
# call, zeros before the first one (the cache statistics of that first call compare against "no change"; the step
# executor's own statistics, which drive the policies, do not depend on it).
RUNNER_INPUTS = {"cached_residual": ("residual_out", "x")}  # input -> (engine output it carries, input shaped like it)


class EngineUnit:
    """One engine and its execution context, with the engine's I/O names split by direction. Every engine input must
    have a source (the unit's model.json record or :data:`RUNNER_INPUTS`): checked here, before any step runs."""

    def __init__(self, trt: Any, engine: Any, path: Path, io: Mapping[str, list] | None = None) -> None:
        self.engine = engine
        self.context = engine.create_execution_context()
        if self.context is None:
            raise ArtifactError(f"{path}: TensorRT could not create an execution context (out of GPU memory?).")
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]
        if io is not None:
            known = {r["onnx_name"] for r in io["inputs"]} | set(RUNNER_INPUTS)
            unknown = [n for n in self.inputs if n not in known]
            if unknown:
                raise ArtifactError(
                    f"{path}: the engine has input(s) {unknown} that neither the unit's record in model.json "
                    f"({sorted(r['onnx_name'] for r in io['inputs'])}) nor the runner ({sorted(RUNNER_INPUTS)}) "
                    "provides; the engine was built from another graph. Rebuild it with `qc-compile build`.")
            for n, (out, _) in RUNNER_INPUTS.items():
                if n in self.inputs and out not in self.outputs:
                    raise ArtifactError(f"{path}: the engine takes {n!r} but has no {out!r} output to fill it from; "
                                        "rebuild it with `qc-compile build`.")


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
        self.plugin_creators: list[Any] = []  # kept alive while the engines live (plugin builds)
        self.carried: dict[tuple[str, str], torch.Tensor] = {}  # (unit, runner input) -> last value of its source

    def reset(self) -> None:
        """Forget the carried inputs (a new video)."""
        self.carried.clear()

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
                raise UserError(f"--executor tensorrt: the {src.target} engines in {getattr(work, 'root', work)} cannot "
                                f"run here: {why}.")
        trt = trt if trt is not None else trt_compat.load_trt(t)
        creators = register_plugin_creators(trt) if src.plugins else []
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
                units[u][v] = EngineUnit(trt, engine, path, src.io[u])
        runner = cls(units, src.io, src.unit_names, device=device)
        runner.plugin_creators = creators
        return runner

    def _stream(self) -> int:
        return torch.cuda.current_stream(self.device).cuda_stream if self.device.type == "cuda" else 0

    def run_unit(self, unit: str, variant: str, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        u = self.units[unit].get(variant) or self.units[unit]["default"]
        ctx, engine = u.context, u.engine
        by_onnx = {r["onnx_name"]: r["name"] for r in self.io[unit]["inputs"]}
        keep = []  # the bound tensors must outlive the enqueue
        for name in u.inputs:  # every engine input (inputs the builder folded away are not engine inputs)
            dtype = torch_dtype(engine.get_tensor_dtype(name))
            if name in by_onnx:
                if by_onnx[name] not in inputs:
                    raise ValueError(f"unit {unit}: engine input {name!r} needs {by_onnx[name]!r}, which the caller "
                                     f"did not pass (got {sorted(inputs)})")
                t = inputs[by_onnx[name]].to(self.device, dtype)
            else:  # a runner input (RUNNER_INPUTS): the carried value, zeros at first
                t = self.carried.get((unit, name))
                like = inputs[RUNNER_INPUTS[name][1]]
                if t is None or t.shape != like.shape:  # first call, or another batch size
                    t = torch.zeros(like.shape, dtype=dtype, device=self.device)
                t = t.to(dtype)
            t = t.contiguous()
            if not ctx.set_input_shape(name, tuple(t.shape)):
                raise UserError(f"unit {unit}: input {name} has shape {tuple(t.shape)}, outside the "
                                "engine's optimisation profile (batch = 2 x prompts with CFG); run fewer prompts per "
                                "call or rebuild with a larger `qc-compile build --max-batch`.")
            ctx.set_tensor_address(name, t.data_ptr())
            keep.append(t)
        names = {r["onnx_name"]: r["name"] for r in self.io[unit]["outputs"]}
        outs = {}
        for name in u.outputs:  # every engine output must have an address, recorded or not
            shape = tuple(ctx.get_tensor_shape(name))
            o = torch.empty(shape, dtype=torch_dtype(engine.get_tensor_dtype(name)), device=self.device)
            ctx.set_tensor_address(name, o.data_ptr())
            outs[names.get(name, name)] = o
        if not ctx.execute_async_v3(self._stream()):
            raise RuntimeError(f"unit {unit} ({variant}): TensorRT execute_async_v3 failed; see the TensorRT log.")
        for name, (src_out, _) in RUNNER_INPUTS.items():
            if name in u.inputs:
                self.carried[(unit, name)] = outs[names.get(src_out, src_out)]
        return {k: v.float() for k, v in outs.items()}

    def block_steps(self, unit, variant, ctx):
        raise NotImplementedError("the TensorRT runner runs whole unit engines")

    def begin_step(self, h: torch.Tensor, ctx) -> None:
        pass

    def describe(self) -> dict:
        return {"runner": self.backend, "device": str(self.device),
                "variants": sorted({v for s in self.units.values() for v in s})}
