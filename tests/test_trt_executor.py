"""The TensorRT runner's binding logic (engine lookup, shapes, dtypes, addresses, outputs, variants) against a
stand-in TensorRT runtime whose "engines" run the unit's Q/DQ graph in onnxruntime, reading and writing the bound
host addresses. Real engines cannot execute on these machines (no GPU here; the TensorRT-RTX runtime refuses Hopper)."""

from __future__ import annotations

import ctypes
import enum
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from compile_helpers import built, copy_of
from qc_compile.errors import ArtifactError, UserError
from qc_compile.runtime.generation import GenerationSettings, generate
from qc_compile.runtime.policy import Action, UnitDecision
from qc_compile.runtime.runners.onnxruntime import OrtRunner, session_for
from qc_compile.runtime.runners.tensorrt import TrtRunner, torch_dtype
from qc_compile.runtime.step_executor import StepExecutor
from qc_compile.workdir import WorkDir, load_model_for, read_model_info


def _executor(runner, work) -> StepExecutor:
    return StepExecutor(runner, read_model_info(work).geometry())

_NP = {"FLOAT": np.float32, "BOOL": np.bool_}


class DataType(enum.Enum):
    FLOAT = 0
    BOOL = 1


class TensorIOMode(enum.Enum):
    INPUT = 0
    OUTPUT = 1


class FakeContext:
    def __init__(self, engine: "FakeEngine") -> None:
        self.engine, self.shapes, self.addr, self._outs = engine, {}, {}, None
        engine.contexts.append(self)

    def set_input_shape(self, name, shape) -> bool:
        assert name in self.engine.inputs, name
        self.shapes[name] = tuple(shape)
        self._outs = None
        return shape[0] <= self.engine.max_batch  # the optimisation profile's range

    def set_tensor_address(self, name, ptr) -> None:
        self.addr[name] = ptr

    def _read(self, name):
        shape, dt = self.shapes[name], _NP[self.engine.dtypes[name].name]
        n = int(np.prod(shape)) * np.dtype(dt).itemsize
        return np.frombuffer(ctypes.string_at(self.addr[name], n), dtype=dt).reshape(shape).copy()

    def _run(self):
        if self._outs is None:
            feed = {n: self._read(n) for n in self.engine.inputs}
            names = [o.name for o in self.engine.session.get_outputs()]
            self._outs = dict(zip(names, self.engine.session.run(names, feed)))
        return self._outs

    def get_tensor_shape(self, name):
        return self._run()[name].shape

    def execute_async_v3(self, stream: int) -> bool:
        assert stream == 0  # CPU stand-in: no CUDA stream
        self.engine.calls += 1
        for name, arr in self._run().items():
            arr = np.ascontiguousarray(arr, dtype=np.float32)
            ctypes.memmove(self.addr[name], arr.ctypes.data, arr.nbytes)
        return True


class FakeEngine:
    def __init__(self, onnx_path: Path, max_batch: int) -> None:
        self.session, self.max_batch = session_for(onnx_path), max_batch
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.dtypes = {i.name: DataType.BOOL if "bool" in i.type else DataType.FLOAT for i in self.session.get_inputs()}
        self.dtypes.update({o: DataType.FLOAT for o in self.outputs})
        self.num_io_tensors = len(self.inputs) + len(self.outputs)
        self.contexts, self.calls = [], 0

    def get_tensor_name(self, i):
        return (self.inputs + self.outputs)[i]

    def get_tensor_mode(self, name):
        return TensorIOMode.INPUT if name in self.inputs else TensorIOMode.OUTPUT

    def get_tensor_dtype(self, name):
        return self.dtypes[name]

    def create_execution_context(self):
        return FakeContext(self)


class FakeTrt:
    """The slice of the TensorRT runtime API the executor uses; the engine bytes are looked up by sha256 in the
    manifest to find the unit's Q/DQ graph."""

    DataType, TensorIOMode = DataType, TensorIOMode

    class Logger:
        WARNING = 2

        def __init__(self, level) -> None:
            self.level = level

    def __init__(self, work: Path, target: str) -> None:
        import hashlib

        man = json.loads((work / "manifest.json").read_text())
        self.by_sha, max_batch = {}, man["targets"][target]["max_batch"]
        for rec in man["targets"][target]["units"].values():
            for v in rec["variants"].values():
                if v.get("engine"):
                    # the engine was built from the bf16 graph; onnxruntime (CPU) runs its float32 twin
                    self.by_sha[v["engine"]["sha256"]] = work / v.get("ort_onnx", v["onnx"])[0]["path"]
        self.engines = []
        self._hash = lambda b: hashlib.sha256(b).hexdigest()
        fake = self

        class Runtime:
            def __init__(self, logger) -> None:
                pass

            def deserialize_cuda_engine(self, blob: bytes):
                path = fake.by_sha.get(fake._hash(blob))
                if path is None:
                    return None
                fake.engines.append(FakeEngine(path, max_batch))
                return fake.engines[-1]

        self.Runtime = Runtime


def test_trt_executor_binds_engines_like_onnxruntime_runs_the_graphs() -> None:
    work = WorkDir(built("fp8_e4m3", "rtx:sm89"))
    fake = FakeTrt(work.root, "rtx:sm89")
    runner = TrtRunner.from_workdir(work, "rtx:sm89", trt=fake, device="cpu", check_runnable=False)
    # one engine per unit and precision variant (calibrated plans carry `default` and `high`)
    assert len(fake.engines) == sum(len(v) for v in runner.units.values()) >= 10
    assert set(runner.unit_names) == set(runner.units)
    default = [runner.units[u]["default"].engine for u in runner.unit_names]
    ex = _executor(runner, work)
    fp = load_model_for(read_model_info(work))
    s = GenerationSettings.defaults(fp, steps=3, frames=4, height=16, width=16)
    prompts = ["a red circle moving up on a gray background"]  # CFG batch 2 = the build's --max-batch
    v_trt, _ = generate(fp, prompts, s, executor=ex, progress=False)
    v_ort, _ = generate(fp, prompts, s, executor=_executor(OrtRunner.from_workdir(work, "q", "rtx:sm89"), work),
                        progress=False)
    assert torch.equal(v_trt, v_ort)  # same graphs, same inputs: bit-identical through the address bindings
    assert all(e.calls == 3 for e in default)  # every unit once per step (CFG batch of 2 in one call)
    ctx = default[1].contexts[0]
    assert ctx.shapes["x"][0] == 2 * len(prompts)  # CFG batch [cond; null]
    with pytest.raises(UserError, match="optimisation profile"):
        generate(fp, prompts * 2, s, executor=ex, progress=False)


def test_trt_executor_reuse_skips_the_engine() -> None:
    work = WorkDir(built("fp8_e4m3", "rtx:sm89"))
    fake = FakeTrt(work.root, "rtx:sm89")
    ex = _executor(TrtRunner.from_workdir(work, "rtx:sm89", trt=fake, device="cpu", check_runnable=False), work)
    fp = load_model_for(read_model_info(work))
    s = GenerationSettings.defaults(fp, steps=3, frames=4, height=16, width=16)

    class ReuseSpatial0:
        name = "reuse-spatial-0"

        def reset(self, units, n):
            pass

        def decide(self, step):
            return {"spatial_0": UnitDecision(Action.REUSE)} if step.index == 2 else {}

        def observe(self, step, stats):
            pass

    generate(fp, ["a red circle moving up on a gray background"], s, policy=ReuseSpatial0(), executor=ex,
             progress=False)
    calls = {u: ex.runner.units[u]["default"].engine.calls for u in ex.unit_names}
    assert calls["spatial_0"] == 2 and calls["temporal_0"] == 3


def test_trt_executor_errors(tmp_path: Path) -> None:
    work = WorkDir(copy_of(built("fp8_e4m3", "rtx:sm89"), "trt-errors"))
    with pytest.raises(UserError, match="cannot run here"):  # this machine: no GPU
        TrtRunner.from_workdir(work, "rtx:sm89")
    fake = FakeTrt(work.root, "rtx:sm89")
    eng = next((work.root / "engines" / "rtx-sm89").glob("spatial_0*.engine"))
    eng.write_bytes(b"\x00" * 64)  # changed after the build: the manifest check refuses it before TensorRT sees it
    with pytest.raises(ArtifactError, match="spatial_0"):
        TrtRunner.from_workdir(work, "rtx:sm89", trt=fake, device="cpu", check_runnable=False)
    onnx_only = WorkDir(copy_of(built("fp8_e4m3", "rtx:sm89"), "trt-none"))
    man = json.loads(onnx_only.manifest_json.read_text())
    man["targets"]["rtx:sm89"]["engines"] = False
    onnx_only.manifest_json.write_text(json.dumps(man))
    with pytest.raises(UserError, match="no TensorRT engines"):
        TrtRunner.from_workdir(onnx_only, check_runnable=False, trt=fake)
    assert torch_dtype(DataType.FLOAT) is torch.float32
    with pytest.raises(ArtifactError, match="binds only"):
        torch_dtype(enum.Enum("D", "FP8").FP8)


def test_pipeline_tensorrt_needs_a_gpu() -> None:
    from qc_compile.runtime import Pipeline

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(UserError, match="--device cuda|no CUDA GPU"):
        Pipeline(built("fp8_e4m3", "rtx:sm89"), executor="tensorrt")
