"""The runner layer: the protocols, the backend registry, and that a new backend plugs in by one registration."""

from __future__ import annotations

import pytest
import torch

from qc_compile.errors import UserError
from qc_compile.runtime.protocols import Executor, UnitRunner
from qc_compile.runtime.runners import BACKENDS, Backend, check_backend, register_backend
from qc_compile.runtime.runners.torch import TorchRunner
from qc_compile.runtime.step_executor import StepExecutor


def test_registry_lists_the_backends_and_checks_devices():
    assert {"torch", "torch-fast", "onnxruntime", "tensorrt"} <= set(BACKENDS)
    with pytest.raises(UserError, match="--executor must be one of"):
        check_backend("tvm", "cpu", False)
    with pytest.raises(UserError, match="runs the graphs of a work dir"):
        check_backend("onnxruntime", "cpu", False)
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="CUDA"):
            check_backend("torch-fast", "cpu", False)
    assert check_backend("torch", "cpu", False).name == "torch"


class CountingRunner(TorchRunner):
    """A stand-in third-party backend: the torch runner that counts the units it ran."""

    backend = "counting"

    def __init__(self, *a, **kw) -> None:
        super().__init__(*a, **kw)
        self.calls: dict[str, int] = {}

    def run_unit(self, unit, variant, inputs):
        self.calls[unit] = self.calls.get(unit, 0) + 1
        return super().run_unit(unit, variant, inputs)


def test_a_registered_backend_runs_through_the_pipeline():
    from qc_compile.runtime.pipeline import Pipeline

    made: list[CountingRunner] = []

    def load(req):
        made.append(CountingRunner(req.loaded.model, req.geometry))
        return made[-1]

    register_backend(Backend("counting", "test backend", ("cpu",), False, load))
    torch.set_grad_enabled(True)
    try:
        pipe = Pipeline.from_pretrained("qc-ref", random_weights=True)
        ref = pipe("a red circle moving right on a black background", steps=3, seed=1, frames=4, height=16,
                   width=16, policy="interval")
        pipe = Pipeline(None, model="qc-ref", random_weights=True, executor="counting")
        res = pipe("a red circle moving right on a black background", steps=3, seed=1, frames=4, height=16,
                   width=16, policy="interval")
    finally:
        del BACKENDS["counting"]
    runner = made[-1]
    assert isinstance(runner, UnitRunner)
    assert runner.calls["embed"] == runner.calls["final"] == 3
    assert runner.calls["spatial_0"] == 2  # interval N=2 reuses it on one of the three steps
    assert torch.equal(res.videos, ref.videos)  # same decisions, same math as the torch backend
    assert res.executor == "counting"
    assert torch.is_grad_enabled()  # the pipeline turns autograd off only inside its own calls


def test_step_executor_is_the_sampler_protocol_and_refuses_what_a_runner_lacks():
    from qc_compile.models.config import QC_REF
    from qc_compile.models.stdit3 import STDiT3, Geometry
    from qc_compile.runtime.policy import UnitDecision
    from qc_compile.runtime.protocols import Conditioning

    m = STDiT3(QC_REF).eval()
    g = Geometry.for_model(QC_REF, 4, 16, 16)

    class WholeUnitsOnly(TorchRunner):
        backend = "whole"
        supports = frozenset()

    ex = StepExecutor(WholeUnitsOnly(m, g), g)
    assert isinstance(ex, Executor)
    L, Cy = QC_REF.model_max_length, QC_REF.caption_channels
    cond = Conditioning(torch.randn(2, 1, L, Cy), torch.ones(2, L, dtype=torch.bool), torch.full((2,), 8.0))
    z, t = torch.randn(2, 3, 4, 16, 16), torch.full((2,), 500.0)
    v, stats = ex.step(z, t, cond, {})
    assert v.shape == z.shape and stats.shape[0] == len(ex.unit_names)
    with pytest.raises(NotImplementedError, match="sub-block parts"):
        ex.step(z, t, cond, {"spatial_0": UnitDecision(parts=())})
