"""Everything that differs between full TensorRT (``import tensorrt``) and TensorRT-RTX (``import tensorrt_rtx``).

The rest of the build (parse ONNX, optimisation profile, build, serialise) is shared code in
:mod:`qc_compile.build`. Differences kept here:

============================  ==========================================  ==========================================
                              full TensorRT (target ``trt[:smXX]``)       TensorRT-RTX (``rtx:sm86|sm89|sm120``)
============================  ==========================================  ==========================================
module                        ``tensorrt``                                ``tensorrt_rtx``
where the build runs          on the deploy GPU (kernels are timed there)  ahead of time on the CPU, no GPU needed;
                                                                          kernels are JIT-compiled on the user's GPU
target GPU                    the GPU present at build time; the suffix   ``IBuilderConfig.num_compute_capabilities
                              only declares it for the capability check    = 1; set_compute_capability(SMxx, 0)``
typing                        strongly typed network (flag; unconditional  strongly typed network (flag); precision
                              from TensorRT 11); no precision flags        flags do not exist
formats (see CAPABILITIES)    FP8 from sm89 (Hopper data-centre: sm90),   support matrix: FP8 sm89+, NVFP4 sm120,
                              INT8 W8A8, INT4 weight-only, NVFP4 sm100+   INT8/INT4 weight-only (no INT8-activation
                                                                          GEMM is listed)
plugins (``qc::`` nodes)      Python IPluginV3 registered in-process       not usable: TensorRT-RTX 1.7 has no plugin
                                                                          layers in its Python API and aborts on a
                                                                          node that resolves to a Python plugin
============================  ==========================================  ==========================================

Only the TensorRT-RTX column was executed on this project's machines (CPU builds). Full TensorRT cannot be
installed here (its wheels come from NVIDIA's own index), so its branch is written against the documented API and
has never run.
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass

from qc_compile.errors import UserError

RTX_SMS = (75, 80, 86, 89, 120, 121)
TARGET_HELP = "trt | trt:sm80 | trt:sm90 | trt:sm100 | rtx:sm86 | rtx:sm89 | rtx:sm120 | torch"


@dataclass(frozen=True)
class Target:
    name: str  # as given, normalised ("rtx:sm89")
    backend: str  # "tensorrt" | "tensorrt_rtx" | "torch"
    sm: int | None  # compute capability * 10 (89 = 8.9); for "trt" the deploy GPU assumed

    @property
    def dir_name(self) -> str:
        return self.name.replace(":", "-")

    @property
    def is_trt(self) -> bool:
        return self.backend in ("tensorrt", "tensorrt_rtx")


def parse_target(s: str, *, allow_any: bool = False) -> Target:
    s = s.strip().lower()
    if allow_any and s == "any":
        return Target("any", "any", None)
    if s == "torch":
        return Target("torch", "torch", None)
    if s == "trt":
        return Target("trt", "tensorrt", 90)  # "for sm_80/sm_90 servers": capability check at Hopper
    m = re.fullmatch(r"(trt|rtx):sm(\d+)", s)
    if m:
        kind, sm = m.group(1), int(m.group(2))
        if kind == "rtx":
            if sm not in (86, 89, 120):
                raise UserError(f"--target {s}: TensorRT-RTX targets here are rtx:sm86, rtx:sm89 and rtx:sm120 (its "
                                f"runtime refuses sm_90 Hopper; builds exist for {', '.join(map(str, RTX_SMS))}).")
            return Target(s, "tensorrt_rtx", sm)
        if sm not in (80, 86, 89, 90, 100, 120):
            raise UserError(f"--target {s}: full TensorRT targets are trt:sm80, sm86, sm89, sm90, sm100, sm120.")
        return Target(s, "tensorrt", sm)
    raise UserError(f"--target {s!r}: expected one of {TARGET_HELP}.")


# ------------------------------------------------------------------------------------------------ capabilities
def capabilities(t: Target) -> tuple[dict[str, str], dict[str, str]]:
    """(weight formats, activation formats) the target runs, each mapped to a short note."""
    if t.backend == "torch":
        w = {f: "reference (dequantized in torch)" for f in
             ("bf16", "fp8_e4m3", "int8", "int4_b64", "int4_b128", "nvfp4", "int6_sim")}
        a = {f: "reference (fake-quantized in torch)" for f in ("bf16", "fp8_e4m3", "int8", "nvfp4", "int6_sim")}
        return w, a
    sm = t.sm or 0
    w = {"bf16": "native", "int4_b64": "weight-only GEMM", "int4_b128": "weight-only GEMM"}
    a = {"bf16": "native"}
    if t.backend == "tensorrt_rtx":
        w["int8"] = "weight-only GEMM"
        if sm >= 89:
            w["fp8_e4m3"] = a["fp8_e4m3"] = "FP8 GEMM"
        if sm >= 120:
            w["nvfp4"] = a["nvfp4"] = "FP4 GEMM"
    else:
        w["int8"] = a["int8"] = "INT8 GEMM"
        if sm >= 89:
            w["fp8_e4m3"] = a["fp8_e4m3"] = "FP8 GEMM"
        if sm >= 100:
            w["nvfp4"] = a["nvfp4"] = "FP4 GEMM"
    return w, a


def compute_dtype(t: Target) -> str:
    """The float type a target's graphs compute in outside the quantized GEMMs: bfloat16 from sm_80 (Ampere) on,
    float16 before (Turing has no bf16 tensor cores); float32 for the torch target's reference package and ``any``.
    Every target accepted today (rtx:sm86/89/120, trt:sm80+) is bfloat16."""
    if not t.is_trt:
        return "float32"
    return "bfloat16" if (t.sm or 90) >= 80 else "float16"


def refusal_reason(t: Target, weight: str, activation: str) -> str | None:
    """Why the target cannot run a linear with these formats, or None."""
    from qc_compile.plan import ACTIVATION_FORMATS, WEIGHT_FORMATS

    if t.backend == "torch":
        return None
    for f in (WEIGHT_FORMATS[weight], ACTIVATION_FORMATS[activation]):
        if f.simulated:
            return (f"{f.name} is a simulated format (no GPU has a {f.bits}-bit GEMM); it runs only with --target "
                    "torch or in onnxruntime, and is never a speedup")
    w, a = capabilities(t)
    where = "TensorRT-RTX" if t.backend == "tensorrt_rtx" else "TensorRT"
    gpu = f"sm_{t.sm}" if t.sm else "this GPU"
    if weight not in w:
        need = {"nvfp4": "Blackwell: rtx:sm120 (or trt:sm100)", "fp8_e4m3": "sm_89 or newer (Ada/Hopper/Blackwell)"}
        return f"{where} on {gpu} has no {weight} weight path; {weight} needs {need.get(weight, 'another target')}"
    if activation not in a:
        if activation == "int8" and t.backend == "tensorrt_rtx":
            return ("TensorRT-RTX lists INT8 only as weight-only GEMMs (support matrix: no INT8-activation GEMM); use "
                    "int8 weights with bf16 activations, or fp8 activations on sm89+")
        need = {"nvfp4": "Blackwell: rtx:sm120 (or trt:sm100)", "fp8_e4m3": "sm_89 or newer (Ada/Hopper/Blackwell)"}
        return (f"{where} on {gpu} has no {activation} activation path; it needs "
                f"{need.get(activation, 'another target')}")
    if weight in ("int4_b64", "int4_b128") and activation != "bf16" and t.backend == "tensorrt_rtx":
        return ("TensorRT-RTX 1.7 fails to build INT4 weights with quantized activations (W4A8: Myelin "
                "'CHECK(is_constant())' internal error, tried here on sm89/sm120); use int4 weight-only (bf16 "
                "activations) or fp8 weights")
    if weight in ("int4_b64", "int4_b128") and activation != "bf16":
        return ("TensorRT supports INT4 only as weight-only quantization (docs, Quantization Schemes: \"TensorRT only "
                "supports INT4 for weight quantization\"; ModelOpt's support matrix deploys W4A8 through "
                "TensorRT-LLM, not TensorRT), so its ONNX parser has no INT4 x FP8 GEMM; use int4 weight-only (bf16 "
                "activations) or fp8 weights and activations")
    if weight != "bf16" and activation != "bf16":
        fam = {"fp8_e4m3": "fp8", "int8": "int8", "nvfp4": "fp4", "int4_b64": "int4", "int4_b128": "int4"}
        if fam.get(weight) != fam.get(activation) and not (fam.get(weight) == "int4" and activation == "fp8_e4m3"):
            return (f"no GEMM takes {weight} weights with {activation} activations on {where}; use one family for "
                    "both (or int4 weights with fp8 activations)")
    return None


# ------------------------------------------------------------------------------------------------ the module
def load_trt(t: Target):
    """Import the TensorRT flavour for this target, or raise a UserError that says why it is unavailable."""
    name = t.backend
    try:
        return importlib.import_module(name)
    except ImportError as e:
        if name == "tensorrt":
            raise UserError(f"--target {t.name} needs full TensorRT (`import tensorrt`), which is not installed here "
                            f"({e}). Install it from NVIDIA's package index on the deploy machine, or use "
                            "--onnx-only to write the Q/DQ graphs and build them there (trtexec --onnx=...).") from None
        raise UserError(f"--target {t.name} needs TensorRT-RTX: pip install 'qc-compile[rtx]' ({e}).") from None


def version(trt) -> str:
    return getattr(trt, "__version__", "unknown")


def create_network(trt, builder):
    """A strongly typed network (TensorRT >= 10 and TensorRT-RTX; the flag is a no-op from TensorRT 11)."""
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    return builder.create_network(0 if flag is None else 1 << int(flag))


def configure(trt, config, t: Target) -> None:
    """Target-specific builder-config settings."""
    if t.backend == "tensorrt_rtx":
        cc = getattr(trt.ComputeCapability, f"SM{t.sm}")
        config.num_compute_capabilities = 1
        config.set_compute_capability(cc, 0)
    # Full TensorRT: strongly typed networks take their precisions from the Q/DQ graph; no flags to set. The
    # builder targets the GPU it runs on, so t.sm is only checked against that GPU by check_build_host().


def check_build_host(trt, t: Target) -> None:
    """Full TensorRT builds for the GPU present; refuse a mismatch with the declared target."""
    if t.backend != "tensorrt" or t.name == "trt":
        return
    try:
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability()
            if major * 10 + minor != t.sm:
                raise UserError(f"--target {t.name}: full TensorRT builds for the GPU it runs on, which is sm_{major}"
                                f"{minor}; build on an sm_{t.sm} GPU or use --target trt.")
    except ImportError:
        pass


def runnable_reason(t: Target) -> str | None:
    """None when engines of this target can execute here, else why not (for `compare`)."""
    try:
        import torch

        if not torch.cuda.is_available():
            return "no CUDA GPU visible"
        major, minor = torch.cuda.get_device_capability()
    except ImportError:
        return "torch not importable"
    sm = major * 10 + minor
    if t.backend == "tensorrt_rtx":
        if sm not in RTX_SMS:
            return f"TensorRT-RTX runtime does not support sm_{sm} (supported: 8.0 8.6 8.9 12.0 12.1)"
        if t.sm != sm:
            return f"engines were built for sm_{t.sm}, this GPU is sm_{sm}"
    try:
        load_trt(t)
    except UserError as e:
        return str(e).split(".")[0]
    return None


def polygraphy_env(t: Target) -> dict[str, str]:
    """Environment polygraphy needs before import to pick this TensorRT flavour."""
    return {"POLYGRAPHY_USE_TENSORRT_RTX": "1" if t.backend == "tensorrt_rtx" else "0"}
