"""Fused producer kernels: (LayerNorm + modulate | GELU) + blocked Hadamard + per-token quantization, one pass.

A program owns ``ROWS`` token rows and holds them in registers as a ``[ROWS, NCHP, CH]`` tile (``NCH = K / CH``
chunks padded to a power of two and masked), so the input is read from device memory once and the quantized
rows and their scales are written once; ``ROWS`` and the warp count are autotuned per shape.

The rotation by ``H_b`` (Sylvester, ``b = CH``) uses ``H_b = H_{b/16} (x) H_16`` so that no ``b x b`` matrix is
ever multiplied: viewing each chunk as a ``[b/16, 16]`` matrix ``X``, ``H_b x = vec(H_{b/16} X H_16)``. Stage A
is a tensor-core product of the tile, reshaped ``[*, 16]``, with ``H_16`` (or ``blockdiag(H_b)`` for b < 16);
stage B is a batched product of ``blockdiag(H_{b/16}, ...)`` (16 x 16) with groups of 16 such rows. That is 32
multiply-adds per element instead of ``b``. The +-1 matrices are exact in bf16; operands that are not exactly
bf16 are split into ``hi + lo`` bf16 halves (two products), so the rotation keeps ~16 significant bits, well
below the FP8/INT8 rounding that follows. The ``1/sqrt(b)`` factor is applied in fp32.

``OUT_MODE`` 2 writes the prologue result in the input dtype unquantized: the fused BF16 producer that the
benchmarks use as a fair baseline.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from .. import formats as F

PROLOGUE_NONE, PROLOGUE_GELU, PROLOGUE_LN_MODULATE = 0, 1, 2
OUT_FP8, OUT_INT8, OUT_PASSTHROUGH = 0, 1, 2
_QMAX = {OUT_FP8: F.FP8_E4M3_MAX, OUT_INT8: F.INT8_MAX, OUT_PASSTHROUGH: 1.0}
_QDTYPE = {OUT_FP8: torch.float8_e4m3fn, OUT_INT8: torch.int8}
MAX_BLOCK = 256
MAX_TILE = 16384
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
FALLBACKS: list[int] = []
ROTATION_FORM = {"stage_b": 1, "split_b": False}
"""How the second Hadamard factor is applied: stage_b 1 = batched 3-D product, 2 = transpose + 2-D product,
3 = one dense ``H_b`` product (b <= 128, no factorisation); split_b = keep ~16 bits through stage B for FP8
outputs too (INT8 outputs always split). Without it the stage-A result is rounded to bf16 first, a 2^-9 relative
error on the rotated values, far below FP8's 2^-4. The default is the fastest form measured by
tools/bench_linear.py on an H200 (bench/results/linear_h200.md: batched, unsplit, same error vs exact math); a
form that fails to compile on this Triton falls back to 2."""


@triton.jit
def _round_half_even(y):
    """Round to nearest, ties to even (torch.round), exact for |y| < 2**22; plain ALU ops."""
    t = tl.floor(y + 0.5)
    odd = (t - 2.0 * tl.floor(t * 0.5)) != 0.0
    return tl.where(((t - y) == 0.5) & odd, t - 1.0, t)


@triton.jit
def _gelu_tanh(x, FAST: tl.constexpr):
    """GELU(tanh) as ``x * sigmoid(2u)`` (== 0.5 x (1 + tanh u)), accurate also where 1 + tanh(u) is tiny."""
    e = tl.exp2(-2.8853900817779268 * 0.7978845608028654 * (x + 0.044715 * x * x * x))  # exp(-2u)
    if FAST:  # ex2.approx + rcp.approx: ~1 ulp, a handful of instructions per element
        return x * tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=f,f", [1.0 + e], dtype=tl.float32,
                                             is_pure=True, pack=1)
    else:
        return x / (1.0 + e)


@triton.jit
def _dot(a, b, acc, EMULATE: tl.constexpr):
    """bf16 x bf16 -> fp32 on the tensor cores; in fp32 under TRITON_INTERPRET, whose bf16 dot is broken."""
    if EMULATE:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


def _configs() -> list[triton.Config]:
    return [triton.Config({"ROWS": r}, num_warps=w) for r, w in ((1, 4), (2, 4), (4, 4), (4, 8), (8, 8), (16, 8))]


def _prune(configs, named_args, **kwargs):
    tile = kwargs["NCHP"] * kwargs["CH"]
    keep = [c for c in configs if c.kwargs["ROWS"] * tile <= MAX_TILE and c.kwargs["ROWS"] * tile >= 256]
    return keep or [min(configs, key=lambda c: c.kwargs["ROWS"])]


@triton.autotune(configs=_configs(),
                 key=["K", "NCH", "CH", "PROLOGUE", "ROTATE", "STAGE_B", "OUT_MODE", "SPLIT_A", "SPLIT_B"],
                 prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _producer_kernel(
    x_ptr, shift_ptr, scale_ptr, ha_ptr, hb_ptr, hd_ptr, q_ptr, s_ptr,
    M, K, T, S_MOD, stride_mb, stride_ms,
    inv_sqrt_block, eps, qmax, amax_floor,
    NCH: tl.constexpr, NCHP: tl.constexpr, CH: tl.constexpr,
    PROLOGUE: tl.constexpr, ROTATE: tl.constexpr, STAGE_B: tl.constexpr, SPLIT_A: tl.constexpr,
    SPLIT_B: tl.constexpr,
    OUT_MODE: tl.constexpr, FAST_MATH: tl.constexpr, EMULATE: tl.constexpr, ROWS: tl.constexpr,
):
    NE: tl.constexpr = ROWS * NCHP * CH
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    ci = tl.arange(0, NCHP)
    cj = tl.arange(0, CH)
    col = (ci[:, None] * CH + cj[None, :])[None, :, :]
    mask = (rows < M)[:, None, None] & ((ci < NCH)[:, None] & (cj < CH)[None, :])[None, :, :]
    offs = rows[:, None, None] * K + col
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if PROLOGUE == 2:
        mean = tl.sum(tl.sum(x, 2), 1) / K
        xc = tl.where(mask, x - mean[:, None, None], 0.0)
        var = tl.sum(tl.sum(xc * xc, 2), 1) / K
        rstd = 1.0 / tl.sqrt(var + eps)
        t = tl.where(S_MOD > 1, rows % T, 0)
        moff = ((rows // T) * stride_mb + t * stride_ms)[:, None, None] + col
        sh = tl.load(shift_ptr + moff, mask=mask, other=0.0).to(tl.float32)
        sc = tl.load(scale_ptr + moff, mask=mask, other=0.0).to(tl.float32)
        x = xc * rstd[:, None, None] * (1.0 + sc) + sh
    elif PROLOGUE == 1:
        x = _gelu_tanh(x, FAST_MATH)
    if PROLOGUE != 0:
        # materialise in the activation dtype, exactly like the unfused graph
        x = x.to(x_ptr.dtype.element_ty).to(tl.float32)
    if ROTATE and STAGE_B == 3:  # one dense product with H_CH (loaded once per program)
        ich = tl.arange(0, CH)
        hd = tl.load(hd_ptr + ich[:, None] * CH + ich[None, :])
        x2 = tl.reshape(x, (ROWS * NCHP, CH))
        hi = x2.to(tl.bfloat16)
        y2 = _dot(hi, hd, None, EMULATE)
        if SPLIT_A:
            y2 = _dot((x2 - hi.to(tl.float32)).to(tl.bfloat16), hd, y2, EMULATE)
    elif ROTATE:
        i16 = tl.arange(0, 16)
        ha = tl.load(ha_ptr + i16[:, None] * 16 + i16[None, :])
        x2 = tl.reshape(x, (NE // 16, 16))
        hi = x2.to(tl.bfloat16)
        y2 = _dot(hi, ha, None, EMULATE)
        if SPLIT_A:
            y2 = _dot((x2 - hi.to(tl.float32)).to(tl.bfloat16), ha, y2, EMULATE)
        if STAGE_B == 1:  # batched left product with blockdiag(H_b1) over groups of 16 rows
            hb = tl.load(hb_ptr + i16[:, None] * 16 + i16[None, :])
            hb3 = tl.broadcast_to(hb[None, :, :], (NE // 256, 16, 16))
            y3 = tl.reshape(y2, (NE // 256, 16, 16))
            h3 = y3.to(tl.bfloat16)
            y3b = _dot(hb3, h3, None, EMULATE)
            if SPLIT_B:
                y3b = _dot(hb3, (y3 - h3.to(tl.float32)).to(tl.bfloat16), y3b, EMULATE)
            y2 = tl.reshape(y3b, (NE // 16, 16))
        elif STAGE_B == 2:  # same product through a transpose and a 2-D right product
            B1: tl.constexpr = CH // 16
            hb = tl.load(hb_ptr + i16[:, None] * 16 + i16[None, :])
            yf = tl.reshape(tl.permute(tl.reshape(y2, (NE // CH, B1, 16)), (0, 2, 1)), (NE // 16, 16))
            h2 = yf.to(tl.bfloat16)
            yt = _dot(h2, hb, None, EMULATE)
            if SPLIT_B:
                yt = _dot((yf - h2.to(tl.float32)).to(tl.bfloat16), hb, yt, EMULATE)
            y2 = tl.reshape(tl.permute(tl.reshape(yt, (NE // CH, 16, B1)), (0, 2, 1)), (NE // 16, 16))
    if ROTATE:
        x = tl.reshape(y2, (ROWS, NCHP, CH)) * inv_sqrt_block
    if OUT_MODE == 2:
        tl.store(q_ptr + offs, x.to(q_ptr.dtype.element_ty), mask=mask)
    else:
        amax = tl.maximum(tl.max(tl.max(tl.abs(x), 2), 1), amax_floor)
        y = x * (qmax / amax)[:, None, None]
        y = tl.minimum(tl.maximum(y, -qmax), qmax)
        if OUT_MODE == 1:
            y = _round_half_even(y)
        tl.store(q_ptr + offs, y.to(q_ptr.dtype.element_ty), mask=mask)
        tl.store(s_ptr + rows, amax / qmax, mask=rows < M)


@functools.lru_cache(maxsize=16)
def hadamard_dense(block: int, device: str) -> torch.Tensor:
    """Unnormalised ``H_block`` in bf16 (+-1, exact) for the dense form."""
    return F.hadamard_matrix(block, torch.float64, normalized=False).to(device=device, dtype=torch.bfloat16)


@functools.lru_cache(maxsize=64)
def hadamard_factors(block: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(stage A, stage B) 16x16 bf16 matrices for ``H_block``: A = blockdiag(H_min(b,16)), B = blockdiag(H_b/16)."""
    a = min(block, 16)
    ha = torch.block_diag(*[F.hadamard_matrix(a, torch.float64, normalized=False)] * (16 // a))
    b1 = max(block // 16, 1)
    hb = torch.block_diag(*[F.hadamard_matrix(b1, torch.float64, normalized=False)] * (16 // b1))
    return ha.to(device=device, dtype=torch.bfloat16), hb.to(device=device, dtype=torch.bfloat16)


def chunking(k: int, block: int) -> tuple[int, int] | None:
    """(CH, NCH) for a row of ``k`` channels, or None when the kernel cannot take this (k, block)."""
    if block > 1:
        ch = max(block, 16)
        if ch > MAX_BLOCK or k % ch:
            return None
    else:
        ch = min(k & -k, 128)  # largest power of two dividing k, capped
    if triton.next_power_of_2(k // ch) * ch > MAX_TILE:
        return None
    return ch, k // ch


def supported(k: int, block: int) -> bool:
    """Whether :func:`launch` handles this row length and rotation block."""
    return chunking(k, block) is not None


def launch(
    x: torch.Tensor, block: int, prologue: int, out_mode: int,
    shift: torch.Tensor | None = None, scale: torch.Tensor | None = None, eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run the fused producer on a CUDA tensor ``x[..., K]`` (``[B, T, C]`` for LN+modulate)."""
    k = x.shape[-1]
    ch, nch = chunking(k, block)
    rotate = block > 1
    # the rotation's reshapes need >= 256 elements per row tile
    nchp = max(triton.next_power_of_2(nch), 256 // ch if rotate else 1)
    x = x.contiguous()
    m = x.numel() // k
    q = torch.empty(x.shape, dtype=_QDTYPE.get(out_mode, x.dtype), device=x.device)
    s = torch.empty((*x.shape[:-1], 1), dtype=torch.float32, device=x.device) if out_mode != OUT_PASSTHROUGH else None
    if prologue == PROLOGUE_LN_MODULATE:
        shift, scale = shift.contiguous(), scale.contiguous()
        t, s_mod, smb, sms = x.shape[1], shift.shape[1], shift.stride(0), shift.stride(1)
    else:
        shift = scale = x
        t, s_mod, smb, sms = 1, 1, 0, 0
    ha, hb = hadamard_factors(block if rotate else 16, str(x.device))
    form = dict(ROTATION_FORM)
    if not (rotate and ch > 16):
        form["stage_b"] = 0
    elif form["stage_b"] == 3 and ch > 128:
        form["stage_b"] = 1
    if form["stage_b"] == 3:
        nchp = max(nchp, 16)  # the dense product needs >= 16 rows per tile
    hd = hadamard_dense(ch, str(x.device)) if form["stage_b"] == 3 else ha
    if m:
        def grid(meta):
            return (triton.cdiv(m, meta["ROWS"]),)

        def run(stage_b: int) -> None:
            _producer_kernel[grid](
                x, shift, scale, ha, hb, hd, q, s if s is not None else q,
                m, k, t, s_mod, smb, sms,
                1.0 / (block ** 0.5) if rotate else 1.0, eps, _QMAX[out_mode], F.AMAX_FLOOR,
                NCH=nch, NCHP=nchp, CH=ch, PROLOGUE=prologue, ROTATE=rotate, STAGE_B=stage_b,
                SPLIT_A=x.dtype != torch.bfloat16, SPLIT_B=form["split_b"] or out_mode == OUT_INT8,
                OUT_MODE=out_mode,
                FAST_MATH=not _INTERPRET, EMULATE=_INTERPRET,
            )

        if form["stage_b"] in (1, 3):
            try:
                run(form["stage_b"])
            except Exception:  # noqa: BLE001 - a Triton lowering gap, not a user error: take the other form
                ROTATION_FORM["stage_b"] = 2
                FALLBACKS.append(form["stage_b"])
                run(2)
        else:
            run(form["stage_b"])
    return q, s
