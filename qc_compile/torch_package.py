"""`build --target torch`: a package the torch executor loads (``WORK/torch/``).

Files: ``weights.safetensors`` (per quantized linear, in the kernels' conventions of
:mod:`qc_compile.plugins.formats`, torch weight layout ``[N, K]``: FP8 codes + per-channel scale ``[N]``; INT8
codes + scale; INT4 packed ``[N, K/2]`` + block scales ``[N, K/block]``; NVFP4 E2M1 values (stored as FP8 E4M3,
which holds them exactly) + FP8 block scales + fp32 tensor scale; plus smoothing vectors), ``plan.json`` (a copy of
the plan it was made from) and ``package.json`` (format per linear, sha256 of the others).

:func:`load_package` returns the model with each quantized linear's weight replaced by its dequantized value (after
smoothing ``diag(s) W`` and rotation ``R W``) and a forward pre-hook applying ``x / s``, ``x R`` and the activation
fake quantization (static per-tensor scale for fp8/int8/int6_sim, NVFP4 per-16 blocks with the static tensor
scale). That is the same computation as the Q/DQ graphs onnxruntime runs: a CPU reference, not a fast path (the
fast fused kernels are in :mod:`qc_compile.plugins`).
"""

from __future__ import annotations

import torch
from safetensors.torch import load_file, save

from qc_compile.artifacts import read_json, sha256_file, write_bytes_atomic, write_json_atomic
from qc_compile.errors import ArtifactError
from qc_compile.plan import LinearPlan, Plan, load_plan
from qc_compile.plugins.codecs import (codec, dequantize_nvfp4, fake_quant_nvfp4, pack_int4, quantize_nvfp4,
                                       unpack_int4)

PACKAGE_SCHEMA = 1


def _hadamard_rows(w: torch.Tensor, b: int) -> torch.Tensor:
    """``w [N, K]`` -> ``w R`` along K (= (R W_onnx)^T)."""
    from qc_compile.plugins.formats import blocked_hadamard

    return blocked_hadamard(w.double(), b).float()


def transformed_weight(w: torch.Tensor, e: LinearPlan, s: torch.Tensor | None) -> torch.Tensor:
    """Weight ``[N, K]`` after smoothing and rotation, before quantization."""
    w = w.detach().float()
    if s is not None:
        w = w * s.to(w.device)[None, :]
    if e.rotation:
        w = _hadamard_rows(w, e.rotation)
    return w


def quantize(w: torch.Tensor, fmt: str) -> dict[str, torch.Tensor]:
    """Weight ``[N, K]`` in the package's storage layout: ``q`` codes (INT4 packed, NVFP4 values as FP8), ``scale``
    and for NVFP4 ``block_scale``. FP8 uses the kernels' per-row form (it feeds ``qc::fp8_linear``), the others the
    given-scale form of the Q/DQ graphs (see :mod:`qc_compile.plugins.codecs`)."""
    c = codec(fmt)
    if fmt == "fp8_e4m3":
        q, s = c.quantize_rows(w)
        return {"q": q, "scale": s.squeeze(-1)}
    if c.block and c.kind == "int":
        q, s = c.quantize_blocks(w)
        return {"q": pack_int4(q), "scale": s}
    if c.kind == "int":
        q, s = c.quantize_channels(w)
        return {"q": q, "scale": s}
    if c.kind == "e2m1":
        vals, bscale, gscale = quantize_nvfp4(w)
        return {"q": vals.to(torch.float8_e4m3fn), "block_scale": bscale, "scale": gscale.reshape(1)}
    raise ValueError(fmt)


def dequantize(t: dict[str, torch.Tensor], fmt: str) -> torch.Tensor:
    """Inverse of :func:`quantize` (fp32 ``[N, K]``)."""
    c = codec(fmt)
    if c.block and c.kind == "int":
        return c.dequantize_blocks(unpack_int4(t["q"]), t["scale"])
    if c.kind in ("int", "float8"):
        return c.dequantize(t["q"], t["scale"][:, None])
    if c.kind == "e2m1":
        return dequantize_nvfp4(t["q"].float(), t["block_scale"], t["scale"].reshape(()))
    raise ValueError(fmt)


def fake_quant_activation(x: torch.Tensor, e: LinearPlan) -> torch.Tensor:
    """The activation Q/DQ of the graphs, in torch (float32 math, returned in ``x.dtype``): a static per-tensor
    scale for fp8 / int8 / int6_sim, NVFP4 blocks of 16 under the plan's static per-tensor scale."""
    if e.activation == "bf16":
        return x
    if e.activation == "nvfp4":
        return fake_quant_nvfp4(x, torch.tensor(e.global_scale, dtype=torch.float32)).to(x.dtype)
    c = codec(e.activation)
    if e.act_scale == "dynamic":  # per token: the fast kernels' computation (qc::rotate_quant_fp8)
        q, scale = c.quantize_rows(x)
        return (q.float() * scale).to(x.dtype)
    return c.fake_quant(x, float(e.act_scale)).to(x.dtype)


def transform_activation(x: torch.Tensor, e: LinearPlan, s: torch.Tensor | None, rot: int | None) -> torch.Tensor:
    """What a planned linear sees: ``x / s``, then ``x R``, then the activation fake quantization (the Q/DQ graphs'
    computation; the weight side is :func:`transformed_weight`)."""
    y = x
    if s is not None:
        y = y / s.to(y.device, y.dtype)
    if rot:
        y = _hadamard_rows(y.reshape(-1, y.shape[-1]), rot).reshape(y.shape).to(x.dtype)
    return fake_quant_activation(y, e)


def write_package(work, info, plan: Plan) -> dict:
    """Quantize the model's weights per the plan into ``WORK/torch``; returns the manifest record."""
    from qc_compile.workdir import load_model_for

    loaded = load_model_for(info)
    tensors = package_tensors(loaded.model, plan)
    formats = {name: {"weight": e.weight, "activation": e.activation, "rotation": e.rotation,
                      "smoothing": e.smoothing is not None} for name, e in plan.linears.items()}
    d = work.torch_dir
    w_sha = write_bytes_atomic(d / "weights.safetensors", save(tensors))
    p_sha = write_json_atomic(d / "plan.json", plan.to_dict())
    files = [{"path": work.rel(d / "weights.safetensors"), "sha256": w_sha},
             {"path": work.rel(d / "plan.json"), "sha256": p_sha}]
    if plan.sidecar:
        src = work.plan_json.with_name(plan.sidecar["file"])
        dst = d / plan.sidecar["file"]
        sha = write_bytes_atomic(dst, src.read_bytes())
        files.append({"path": work.rel(dst), "sha256": sha})
    pkg = {"schema_version": PACKAGE_SCHEMA, "model": info.name, "formats": formats, "files": files,
           "simulated": sorted(n for n, e in plan.linears.items() if e.simulated)}
    sha = write_json_atomic(d / "package.json", pkg)
    files.append({"path": work.rel(d / "package.json"), "sha256": sha})
    return {"files": files}


def load_package(work, *, device: str = "cpu", variant: str = "default"):
    """The LoadedModel with quantized linears (dequantized weights + activation hooks), for TorchExecutor."""
    from qc_compile.workdir import load_model_for, read_model_info

    info = read_model_info(work)
    d = work.torch_dir
    pkg = read_json(d / "package.json", kind="torch package", schema_version=PACKAGE_SCHEMA)
    for f in pkg["files"]:
        p = work.root / f["path"]
        if not p.is_file() or sha256_file(p) != f["sha256"]:
            raise ArtifactError(f"{p}: missing or changed since `build --target torch`; re-run it.")
    plan = load_plan(d / "plan.json", model_info=info)
    tensors = load_file(str(d / "weights.safetensors"))
    return apply_plan(load_model_for(info, device=device), plan, tensors, variant=variant, device=device)


def linear_modules(model) -> dict[str, torch.nn.Module]:
    """The model's modules by the names plans use: STDiT3's own module paths; for a diffusers adapter
    (:mod:`qc_compile.models.diffusers_adapter`) the paths in its transformer (``blocks.3.attn1.to_q``), which the
    diffusers export names its linears by."""
    from qc_compile.models.diffusers_adapter.base import DiffusersAdapter

    return dict((model.transformer if isinstance(model, DiffusersAdapter) else model).named_modules())


def package_tensors(model, plan: Plan) -> dict[str, torch.Tensor]:
    """What ``weights.safetensors`` holds, computed in memory (quantized weights + smoothing vectors)."""
    modules = linear_modules(model)
    tensors: dict[str, torch.Tensor] = {}
    for name, e in plan.linears.items():
        s = plan.smoothing_vector(name)
        st = None if s is None else torch.from_numpy(s)
        if st is not None:
            tensors[f"{name}.smoothing"] = st
        if e.weight != "bf16":
            w = transformed_weight(modules[name].weight, e, st)
            for k, v in quantize(w, e.weight).items():
                tensors[f"{name}.weight_{k}"] = v.contiguous()
    return tensors


def apply_plan(loaded, plan: Plan, tensors: dict[str, torch.Tensor] | None = None, *, variant: str = "default",
               device: str = "cpu"):
    """Turn ``loaded``'s linears into the plan's quantized computation (in place); returns ``loaded``."""
    tensors = package_tensors(loaded.model, plan) if tensors is None else tensors
    entries = plan.resolve(variant)
    modules = linear_modules(loaded.model)
    for name, e in entries.items():
        mod = modules[name]
        base = plan.linears[name]
        s = tensors.get(f"{name}.smoothing")
        if e.weight != base.weight:  # a variant with another weight format: quantize it here
            w = dequantize(quantize(transformed_weight(mod.weight, base, s), e.weight), e.weight) \
                if e.weight != "bf16" else transformed_weight(mod.weight, base, s)
        elif base.weight != "bf16":
            t = {k.split(".weight_")[1]: v for k, v in tensors.items() if k.startswith(f"{name}.weight_")}
            w = dequantize(t, base.weight)
        elif s is not None or base.rotation:
            w = transformed_weight(mod.weight, base, s)
        else:
            w = None
        if w is not None:
            mod.weight.data = w.to(device=device, dtype=mod.weight.dtype)
        if s is None and not base.rotation and e.activation == "bf16":
            continue

        def pre_hook(module, args, e=e, s=s, rot=base.rotation):
            return (transform_activation(args[0], e, s, rot),) + tuple(args[1:])

        mod.register_forward_pre_hook(pre_hook)
    return loaded
