"""Unit runners per backend and the registry that picks one (the loaders of polygraphy's layering).

==============  =====================================================  ==========  =======================
backend         runs                                                   devices     offers
==============  =====================================================  ==========  =======================
``torch``       the model unit by unit; a plan -> fake-quantized       cpu, cuda   sub-blocks, gates
                copies per precision variant (``fp`` = unquantized)
``torch-fast``  block units on the ``qc::`` kernels (FP8 per plan),    cuda        sub-blocks, gates
                optional torch.compile / CUDA graphs
``onnxruntime`` the exported FP graphs, or the build's Q/DQ graphs     cpu, cuda   whole units
``tensorrt``    the build's engines, bound by device address           cuda        whole units
==============  =====================================================  ==========  =======================

A new backend is one module with a runner class (the :class:`~qc_compile.runtime.protocols.UnitRunner` protocol)
and one :func:`register_backend` call with its loader; the step executor, the sampler, the policies, ``run``,
``sweep`` and ``serve`` then take it by name (``--executor NAME``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib.util import find_spec
from typing import Any, Callable

from qc_compile.errors import UserError


@dataclass
class RunnerRequest:
    """What a loader may use to build a runner for one run."""

    loaded: Any  # qc_compile.models.LoadedModel
    geometry: Any
    device: str
    plan: Any = None  # qc_compile.plan.Plan or None
    work: Any = None  # qc_compile.workdir.WorkDir or None
    quantized: bool = True  # False: the FP reference computation
    options: dict = field(default_factory=dict)  # backend options (compile, cuda_graphs, ...)
    cache: dict = field(default_factory=dict)  # per-pipeline memo (e.g. fake-quantized model copies)


@dataclass(frozen=True)
class Backend:
    name: str
    summary: str
    devices: tuple[str, ...]  # "cpu" and/or "cuda"
    needs_work_dir: bool
    load: Callable[[RunnerRequest], Any]
    check: Callable[[str], None] = lambda device: None  # raises UserError when it cannot run here


BACKENDS: dict[str, Backend] = {}


def register_backend(backend: Backend) -> Backend:
    BACKENDS[backend.name] = backend
    return backend


def get_backend(name: str) -> Backend:
    if name not in BACKENDS:
        raise UserError(f"--executor must be one of {', '.join(BACKENDS)}, got {name!r}.")
    return BACKENDS[name]


def check_backend(name: str, device: str, has_work_dir: bool) -> Backend:
    """The backend, after checking it can run on ``device`` with (or without) a work dir; UserError otherwise."""
    b = get_backend(name)
    b.check(device)  # the backend's own, more specific reason first (not installed, no CUDA for its kernels)
    kind = "cuda" if str(device).startswith("cuda") else "cpu"
    if kind not in b.devices:
        hint = "add --device cuda" if "cuda" in b.devices else "use --device cpu"
        raise UserError(f"--executor {name} runs on {' or '.join(b.devices)}, not {device!r}: {hint}.")
    if b.needs_work_dir and not has_work_dir:
        raise UserError(f"--executor {name} runs the graphs of a work dir; give WORK (from `qc-compile export`), "
                        "or use --executor torch.")
    return b


# --------------------------------------------------------------------------------------------------- loaders
def _load_torch(req: RunnerRequest):
    from qc_compile.runtime.runners.torch import TorchRunner

    if req.quantized and req.plan is not None:
        models = req.cache.get("plan_models")
        if models is None:
            models = req.cache["plan_models"] = plan_models(req.loaded, req.plan, req.device)
        return TorchRunner(models["default"], req.geometry, variant_models=models)
    return TorchRunner(req.loaded.model, req.geometry)


def plan_models(loaded: Any, plan: Any, device: str) -> dict:
    """``{variant: model}``: the plan applied to copies of the model (fake quantization, the same computation as the
    Q/DQ graphs), plus ``fp`` (the unquantized model) unless the plan defines it."""
    import copy

    from qc_compile.torch_package import apply_plan, package_tensors

    tensors = package_tensors(loaded.model, plan)
    models = {v: apply_plan(copy.deepcopy(loaded), plan, tensors, variant=v, device=device).model
              for v in plan.variant_names}
    models.setdefault("fp", loaded.model)
    return models


def _load_fast(req: RunnerRequest):
    from qc_compile.runtime.runners.fast import FastRunner, fast_model_copy
    from qc_compile.runtime.runners.torch import TorchRunner

    if not req.quantized:  # the FP reference stays the plain fp32 torch run
        return TorchRunner(req.loaded.model, req.geometry)
    model = req.cache.get("fast_model")
    if model is None:
        model = req.cache["fast_model"] = fast_model_copy(req.loaded.model)
    return FastRunner(model, req.geometry, req.plan, compile=bool(req.options.get("compile", False)),
                      cuda_graphs=bool(req.options.get("cuda_graphs", False)),
                      attention=str(req.options.get("attention", "sdpa")))


def _check_fast(device: str) -> None:
    from qc_compile.runtime.runners.fast import check_fast_available

    check_fast_available(device)


def _load_ort(req: RunnerRequest):
    from qc_compile.runtime.runners.onnxruntime import OrtRunner

    if req.quantized and req.plan is not None and not req.work.manifest_json.is_file():
        raise UserError(f"{req.work.root} has a plan but no build (manifest.json is missing), so --executor "
                        "onnxruntime would silently run the unquantized FP graphs. Run `qc-compile build "
                        f"{req.work.root} --target T` first (e.g. --target rtx:sm89 or --target torch).")
    stage = "q" if req.quantized and req.work.manifest_json.is_file() else "fp"
    return OrtRunner.from_workdir(req.work, stage=stage, target=req.options.get("target"), device=req.device)


def _check_ort(device: str) -> None:
    from qc_compile.runtime.runners.onnxruntime import check_ort_device

    check_ort_device(device)


def _load_trt(req: RunnerRequest):
    from qc_compile.runtime.runners.tensorrt import TrtRunner

    if not req.quantized:  # the FP reference: the torch model on the same GPU
        return _load_torch(req)
    return TrtRunner.from_workdir(req.work, req.options.get("target"), device=req.device)


def _check_trt(device: str) -> None:
    if find_spec("tensorrt") is None and find_spec("tensorrt_rtx") is None:
        raise UserError("--executor tensorrt: TensorRT is not installed on this machine (neither `tensorrt` nor "
                        "`tensorrt_rtx` imports). Engines run on a server with TensorRT; here use --executor "
                        "torch or onnxruntime.")


register_backend(Backend("torch", "the model's torch modules, unit by unit", ("cpu", "cuda"), False, _load_torch))
register_backend(Backend("torch-fast", "FP8 linears on the qc:: kernels, SDPA, optional compile/CUDA graphs",
                         ("cuda",), False, _load_fast, _check_fast))
register_backend(Backend("onnxruntime", "the work dir's ONNX graphs (Q/DQ after a build); cuda: onnxruntime-gpu",
                         ("cpu", "cuda"), True, _load_ort, _check_ort))
register_backend(Backend("tensorrt", "the build's TensorRT engines", ("cuda",), True, _load_trt, _check_trt))


def load_runner(name: str, req: RunnerRequest):
    return get_backend(name).load(req)


__all__ = ["BACKENDS", "Backend", "RunnerRequest", "register_backend", "get_backend", "check_backend",
           "load_runner", "plan_models"]
