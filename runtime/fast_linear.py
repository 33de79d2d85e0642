"""Quantized linears of the fast torch path on the ``qc::`` kernels, as plain functions over prepared weights.

A plan entry (:class:`qc_compile.plan.LinearPlan`) becomes a :class:`LinearSpec` (static: what to run) and a
:class:`LinearWeights` (tensors). Weights are prepared offline exactly as :mod:`qc_compile.torch_package` does:
smoothing ``diag(s)`` and the blocked Hadamard ``R`` are applied to ``W [N, K]`` (``transformed_weight``), then
quantized per output channel. At run time the activation is divided by ``s`` (or ``s`` is folded into the adaLN
modulation vectors in front of ``qkv`` / ``fc1``), rotated by the same ``R`` and quantized per token.

Modes:

* ``dense`` — ``F.linear`` with the original weight (bf16 x bf16, or a plan entry that only smooths/rotates: those
  transforms cancel exactly, so the original weight is the same function);
* ``fp8`` — FP8 E4M3 weights and activations: ``qc::rotate_quant_fp8`` (or the fused ``modulate_quant_fp8`` /
  ``gelu_rotate_quant_fp8`` producer) then ``qc::fp8_linear`` (per-token x per-channel scales, bias in the
  epilogue);
* ``dq`` — weight-only formats (activation bf16): the dequantized weight in the model dtype (correct numerics, no
  speed gain; there is no fast W-only kernel on Hopper worth using).

Two ways to run ``fp8`` (``LinearSpec.fused``): the ``qc::`` custom ops (opaque to ``torch.compile``: each producer
is its own Triton kernel), or — when the block is compiled — the same quantization written as torch ops
(:mod:`qc_compile.plugins.reference`, the kernels' truth) and the GEMM as ``torch._scaled_mm`` with the kernels'
row-wise scales and fast accumulation, so inductor fuses the per-token quantization into the kernel that produces
the activation (LayerNorm + modulation, GELU, the attention output's transpose) instead of writing and re-reading
it. Same numerics either way (the reference is what the kernels are tested against).

Activation scales are **dynamic per token** (what the kernels compute), not the plan's static per-tensor
``act_scale`` that the Q/DQ graphs and ``torch_package`` use; the difference is measured in
``bench/results/e2e_*.md``. Functions here are pure (tensors in, tensors out, static specs), so ``torch.compile``
traces them once per block kind and CUDA graphs capture them.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from qc_compile.errors import UserError
from qc_compile.plugins import ops as _ops  # noqa: F401  (registers torch.ops.qc)
from qc_compile.plugins import reference as R
from qc_compile.plugins.formats import blocked_hadamard

DENSE, FP8, DQ = "dense", "fp8", "dq"
FAST_ACTIVATIONS = ("bf16", "fp8_e4m3")


class LinearSpec(NamedTuple):
    """Static description of one linear in the fast path (a tuple of constants: what ``torch.compile`` guards on by
    value, so every block of a kind shares one compiled graph)."""

    mode: str = DENSE
    rotation: int = 0  # Hadamard block (0 = none)
    smooth: bool = False  # the activation is divided by a smoothing vector first
    fused: bool = False  # fp8: quantization as torch ops + torch._scaled_mm (for inductor to fuse), not qc:: ops


class LinearWeights(NamedTuple):
    """Tensors of one linear: ``w`` = dense/dequantized weight ``[N, K]`` or FP8 codes; ``w_scale [N]`` (fp8);
    ``bias [N]``; ``smooth [K]`` (divisor of the activation)."""

    w: torch.Tensor
    w_scale: torch.Tensor | None
    bias: torch.Tensor | None
    smooth: torch.Tensor | None


def prepare_linear(linear: nn.Linear, entry=None, base=None, smoothing: torch.Tensor | None = None,
                   *, name: str = "linear", fused: bool = False) -> tuple[LinearSpec, LinearWeights]:
    """Spec and weights of ``linear`` under a plan entry (``entry`` = the variant's resolved entry, ``base`` = the
    plan's own entry, whose smoothing and rotation the weights carry, as in ``torch_package.apply_plan``).
    ``fused``: run FP8 as inductor-fusable torch ops (for a compiled block; see the module docstring).

    ``entry`` None (or bf16 x bf16) gives the dense FP linear. Formats the fast path cannot run raise UserError.
    """
    from qc_compile.torch_package import dequantize, quantize, transformed_weight

    w, b = linear.weight.detach(), None if linear.bias is None else linear.bias.detach()
    dtype = w.dtype
    if entry is None or (entry.weight == "bf16" and entry.activation == "bf16"):
        return LinearSpec(DENSE), LinearWeights(w, None, b, None)
    base = base or entry
    if entry.activation not in FAST_ACTIVATIONS:
        raise UserError(f"fast path: linear {name} has {entry.activation} activations; the fast torch path runs "
                        f"{' and '.join(FAST_ACTIVATIONS)} activations only (INT8 GEMMs through torch are slower "
                        "than BF16 on Hopper, NVFP4 is simulated there). Use the plain torch executor for this plan.")
    if entry.activation == "fp8_e4m3" and entry.weight != "fp8_e4m3":
        raise UserError(f"fast path: linear {name} pairs {entry.weight} weights with FP8 activations; the fast "
                        "path runs FP8 activations with FP8 weights only. Use the plain torch executor for this plan.")
    rot = int(base.rotation or 0)
    s = None if smoothing is None else smoothing.to(device=w.device, dtype=torch.float32)
    tw = transformed_weight(w, base, s)
    if entry.activation == "fp8_e4m3":
        q = quantize(tw, "fp8_e4m3")
        spec = LinearSpec(FP8, rot, s is not None, fused)
        return spec, LinearWeights(q["q"].contiguous(), q["scale"].float().contiguous(), b,
                                   None if s is None else s.to(dtype))
    wd = tw if entry.weight == "bf16" else dequantize(quantize(tw, entry.weight), entry.weight)
    return LinearSpec(DQ, rot, s is not None), LinearWeights(wd.to(dtype).contiguous(), None, b,
                                                             None if s is None else s.to(dtype))


def _pre(spec: LinearSpec, wt: LinearWeights, x: torch.Tensor) -> torch.Tensor:
    return x / wt.smooth if spec.smooth else x


def quant_input(spec: LinearSpec, wt: LinearWeights, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token FP8 of the (smoothed, rotated) activation: ``qc::rotate_quant_fp8`` (or its torch form)."""
    if spec.fused:
        return R.rotate_quant(_pre(spec, wt, x), spec.rotation, "fp8")
    return torch.ops.qc.rotate_quant_fp8(_pre(spec, wt, x), spec.rotation)


def _scaled_mm_ok(wt: LinearWeights, xq: torch.Tensor, out_dtype: torch.dtype) -> bool:
    """What ``torch._scaled_mm``'s row-wise FP8 path takes (else the ``qc::fp8_linear`` op runs)."""
    n, k = wt.w.shape
    return xq.is_cuda and out_dtype == torch.bfloat16 and k % 16 == 0 and n % 16 == 0


def linear_q(spec: LinearSpec, wt: LinearWeights, xq: torch.Tensor, xs: torch.Tensor,
             out_dtype: torch.dtype) -> torch.Tensor:
    """The FP8 GEMM on an already quantized activation: ``qc::fp8_linear``, or (``spec.fused``) ``torch._scaled_mm``
    with the same row-wise scales and fast accumulation that op's default backend uses."""
    if not (spec.fused and _scaled_mm_ok(wt, xq, out_dtype)):
        return torch.ops.qc.fp8_linear(xq, xs, wt.w, wt.w_scale, wt.bias, out_dtype)
    k = xq.shape[-1]
    bias = wt.bias if wt.bias is None or wt.bias.dtype == out_dtype else wt.bias.to(out_dtype)
    y = torch._scaled_mm(xq.reshape(-1, k), wt.w.t(), scale_a=xs.reshape(-1, 1), scale_b=wt.w_scale.view(1, -1),
                         bias=bias, out_dtype=out_dtype, use_fast_accum=True)
    return y.reshape(*xq.shape[:-1], wt.w.shape[0])


def linear(spec: LinearSpec, wt: LinearWeights, x: torch.Tensor) -> torch.Tensor:
    """The linear on an unquantized activation ``x [..., K]`` (output in ``x.dtype``)."""
    if spec.mode == DENSE:
        return F.linear(x, wt.w, wt.bias)
    if spec.mode == FP8:
        xq, xs = quant_input(spec, wt, x)
        return linear_q(spec, wt, xq, xs, x.dtype)
    h = _pre(spec, wt, x)
    if spec.rotation:
        h = blocked_hadamard(h, spec.rotation).to(x.dtype)
    return F.linear(h, wt.w, wt.bias)


def modulate_quant(spec: LinearSpec, wt: LinearWeights, x: torch.Tensor, shift: torch.Tensor,
                   scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """FP8 of ``LayerNorm(x) * (1 + scale) + shift`` through the fused ``qc::modulate_quant_fp8`` producer, with the
    smoothing folded into the modulation vectors (``(1+scale)/s - 1``, ``shift/s``: exact, as the ONNX pass)."""
    if spec.smooth:
        sm = wt.smooth.float()
        shift, scale = shift.float() / sm, (1 + scale.float()) / sm - 1
    if spec.fused:
        return R.modulate_quant_fp8(x, shift.to(x.dtype), scale.to(x.dtype), spec.rotation)
    return torch.ops.qc.modulate_quant_fp8(x, shift.to(x.dtype), scale.to(x.dtype), spec.rotation)


def modulate_linear(spec: LinearSpec, wt: LinearWeights, x: torch.Tensor, shift: torch.Tensor,
                    scale: torch.Tensor) -> torch.Tensor:
    """``linear(LayerNorm(x) * (1 + scale) + shift)`` (fused producer for FP8)."""
    if spec.mode != FP8:
        h = F.layer_norm(x, (x.shape[-1],), eps=1e-6) * (1 + scale) + shift
        return linear(spec, wt, h)
    xq, xs = modulate_quant(spec, wt, x, shift, scale)
    return linear_q(spec, wt, xq, xs, x.dtype)


def gelu_linear(spec: LinearSpec, wt: LinearWeights, h: torch.Tensor) -> torch.Tensor:
    """``linear(GELU_tanh(h))``; FP8 without smoothing runs the fused ``qc::gelu_rotate_quant_fp8`` producer."""
    if spec.mode == FP8 and not spec.smooth:
        if spec.fused:
            hq, hs = R.gelu_rotate_quant_fp8(h, spec.rotation)
        else:
            hq, hs = torch.ops.qc.gelu_rotate_quant_fp8(h, spec.rotation)
        return linear_q(spec, wt, hq, hs, h.dtype)
    return linear(spec, wt, F.gelu(h, approximate="tanh"))


class FastLinear(nn.Module):
    """Drop-in replacement for an ``nn.Linear`` under a plan entry (the module-swap form of this file)."""

    def __init__(self, linear: nn.Linear, entry=None, base=None, smoothing: torch.Tensor | None = None,
                 name: str = "linear", fused: bool = False) -> None:
        super().__init__()
        self.spec, wt = prepare_linear(linear, entry, base, smoothing, name=name, fused=fused)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        for k, v in wt._asdict().items():
            self.register_buffer(k, v, persistent=False)

    @property
    def weights(self) -> LinearWeights:
        return LinearWeights(self.w, self.w_scale, self.bias, self.smooth)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(self.spec, self.weights, x)

    def extra_repr(self) -> str:
        return f"{self.in_features}->{self.out_features}, {self.spec}"
