"""Quantized GEMMs in Triton: FP8 x FP8 with the dequantization + bias epilogue, and W4A8 (packed INT4 weights).

``y[m, n] = sum_k xq[m, k] wq[n, k] * xs[m] * ws[n] + bias[n]``. Both operands are K-major (the weight is the
row-major ``[N, K]`` nn.Linear layout), which is what Hopper's 8-bit wgmma wants. The FP8 kernel reads its
tiles through TMA descriptors when the layout allows (``tma=True``) or through plain pointers; the W4A8 kernel
unpacks two INT4 codes per byte in registers into FP8 (or INT8) values, which are exact there, and applies the
per-block weight scale once per quantization block.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # older Triton: pointer kernel only
    TensorDescriptor = None

_TL_OUT = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}


def _fp8_configs() -> list[triton.Config]:
    cfgs = []
    for bm, bn, bk, w, s in (
        (128, 256, 128, 8, 3), (128, 128, 128, 8, 4), (128, 128, 128, 4, 4), (64, 128, 128, 4, 4), (128, 256, 64, 8, 4),
    ):
        cfgs.append(triton.Config({"BM": bm, "BN": bn, "BK": bk, "GROUP_M": 8}, num_warps=w, num_stages=s))
    return cfgs


@triton.jit
def _epilogue(acc, xs_ptr, ws_ptr, bias_ptr, c_ptr, rm, rn, M, N, stride_cm, HAS_BIAS: tl.constexpr):
    xs = tl.load(xs_ptr + rm, mask=rm < M, other=0.0)
    ws = tl.load(ws_ptr + rn, mask=rn < N, other=0.0)
    acc = acc * xs[:, None] * ws[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    cmask = (rm[:, None] < M) & (rn[None, :] < N)
    tl.store(c_ptr + rm[:, None].to(tl.int64) * stride_cm + rn[None, :], acc.to(c_ptr.dtype.element_ty), mask=cmask)


@triton.jit
def _tile_ids(M, N, BM: tl.constexpr, BN: tl.constexpr, GROUP_M: tl.constexpr):
    """Grouped tile order so that GROUP_M row-tiles share the weight tiles while they sit in L2."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BM)
    num_n = tl.cdiv(N, BN)
    in_group = GROUP_M * num_n
    first_m = (pid // in_group) * GROUP_M
    size_m = min(num_m - first_m, GROUP_M)
    pid_m = first_m + ((pid % in_group) % size_m)
    pid_n = (pid % in_group) // size_m
    return pid_m, pid_n


@triton.autotune(configs=_fp8_configs(), key=["M_BUCKET", "N", "K"])
@triton.jit
def _fp8_gemm_ptr(
    a_ptr, b_ptr, c_ptr, xs_ptr, ws_ptr, bias_ptr, M, N, K, M_BUCKET, stride_am, stride_bn, stride_cm,
    HAS_BIAS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n = _tile_ids(M, N, BM, BN, GROUP_M)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    ram = (rm % M).to(tl.int64)
    rbn = (rn % N).to(tl.int64)
    a_ptrs = a_ptr + ram[:, None] * stride_am + rk[None, :]
    b_ptrs = b_ptr + rbn[None, :] * stride_bn + rk[:, None]
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BK)):
        kmask = rk < K - k * BK
        a = tl.load(a_ptrs, mask=kmask[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=kmask[:, None], other=0.0)
        acc = tl.dot(a, b, acc)
        a_ptrs += BK
        b_ptrs += BK
    _epilogue(acc, xs_ptr, ws_ptr, bias_ptr, c_ptr, rm, rn, M, N, stride_cm, HAS_BIAS)


def _tma_pre_hook(nargs):
    bm, bn, bk = nargs["BM"], nargs["BN"], nargs["BK"]
    nargs["a_desc"].block_shape = [bm, bk]
    nargs["b_desc"].block_shape = [bn, bk]


def _fp8_tma_configs() -> list[triton.Config]:
    return [triton.Config(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages, pre_hook=_tma_pre_hook)
            for c in _fp8_configs()]


@triton.autotune(configs=_fp8_tma_configs(), key=["M_BUCKET", "N", "K"])
@triton.jit
def _fp8_gemm_tma(
    a_desc, b_desc, c_ptr, xs_ptr, ws_ptr, bias_ptr, M, N, K, M_BUCKET, stride_cm,
    HAS_BIAS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n = _tile_ids(M, N, BM, BN, GROUP_M)
    off_m = pid_m * BM
    off_n = pid_n * BN
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BK)):
        a = a_desc.load([off_m, k * BK])
        b = b_desc.load([off_n, k * BK])
        acc = tl.dot(a, b.T, acc)
    rm = off_m + tl.arange(0, BM)
    rn = off_n + tl.arange(0, BN)
    _epilogue(acc, xs_ptr, ws_ptr, bias_ptr, c_ptr, rm, rn, M, N, stride_cm, HAS_BIAS)


def _m_bucket(m: int) -> int:
    return min(triton.next_power_of_2(max(m, 1)), 65536)


def fp8_gemm(
    a: torch.Tensor, xs: torch.Tensor, b: torch.Tensor, ws: torch.Tensor, bias: torch.Tensor | None,
    out_dtype: torch.dtype, tma: bool = True,
) -> torch.Tensor:
    """``a[M, K]`` fp8 (row-major), ``b[N, K]`` fp8, ``xs[M]``, ``ws[N]`` fp32 -> ``[M, N]`` in ``out_dtype``."""
    m, k = a.shape
    n = b.shape[0]
    c = torch.empty((m, n), dtype=out_dtype, device=a.device)
    if m == 0:
        return c
    a, b = a.contiguous(), b.contiguous()
    bias_arg = bias if bias is not None else ws

    def grid(meta):
        return (triton.cdiv(m, meta["BM"]) * triton.cdiv(n, meta["BN"]),)

    use_tma = tma and TensorDescriptor is not None and k % 16 == 0
    if use_tma:
        a_desc = TensorDescriptor(a, [m, k], [k, 1], [128, 128])
        b_desc = TensorDescriptor(b, [n, k], [k, 1], [128, 128])
        _fp8_gemm_tma[grid](a_desc, b_desc, c, xs, ws, bias_arg, m, n, k, _m_bucket(m), c.stride(0),
                            HAS_BIAS=bias is not None)
    else:
        _fp8_gemm_ptr[grid](a, b, c, xs, ws, bias_arg, m, n, k, _m_bucket(m), a.stride(0), b.stride(0), c.stride(0),
                            HAS_BIAS=bias is not None)
    return c


def _w4a8_configs() -> list[triton.Config]:
    return [
        triton.Config({"BM": bm, "BN": bn, "GROUP_M": 8}, num_warps=w, num_stages=s)
        for bm, bn, w, s in ((128, 128, 8, 3), (128, 64, 4, 4), (64, 128, 4, 4))
    ]


@triton.autotune(configs=_w4a8_configs(), key=["M_BUCKET", "N", "K", "G"])
@triton.jit
def _w4a8_kernel(
    a_ptr, w_ptr, c_ptr, xs_ptr, gs_ptr, bias_ptr, M, N, K, M_BUCKET, stride_am, stride_wn, stride_gn, stride_cm,
    G: tl.constexpr, BK: tl.constexpr, INT8_ACT: tl.constexpr, HAS_BIAS: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n = _tile_ids(M, N, BM, BN, GROUP_M)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    ram = (rm % M).to(tl.int64)
    rbn = (rn % N).to(tl.int64)
    rk = tl.arange(0, BK)
    rk2 = tl.arange(0, BK // 2)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for g in range(0, K // G):
        if INT8_ACT:
            accg = tl.zeros((BM, BN), dtype=tl.int32)
        else:
            accg = tl.zeros((BM, BN), dtype=tl.float32)
        for kk in tl.static_range(G // BK):
            k0 = g * G + kk * BK
            a = tl.load(a_ptr + ram[:, None] * stride_am + k0 + rk[None, :])
            p = tl.load(w_ptr + rbn[:, None] * stride_wn + k0 // 2 + rk2[None, :])
            lo = (p & 0xF).to(tl.int8) - 8
            hi = (p >> 4).to(tl.int8) - 8
            w = tl.reshape(tl.join(lo, hi), (BN, BK))
            if INT8_ACT:
                accg = tl.dot(a, tl.trans(w), accg, out_dtype=tl.int32)
            else:
                accg = tl.dot(a, tl.trans(w.to(tl.float16).to(tl.float8e4nv)), accg)
        gs = tl.load(gs_ptr + rbn * stride_gn + g)
        acc += accg.to(tl.float32) * gs[None, :]
    xs = tl.load(xs_ptr + rm, mask=rm < M, other=0.0)
    acc = acc * xs[:, None]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    cmask = (rm[:, None] < M) & (rn[None, :] < N)
    tl.store(c_ptr + rm[:, None].to(tl.int64) * stride_cm + rn[None, :], acc.to(c_ptr.dtype.element_ty), mask=cmask)


def w4a8_supported(k: int, group: int) -> bool:
    """The kernel needs whole quantization groups of 32..128 (or multiples of 128) channels."""
    return group % 32 == 0 and k % group == 0 and (group <= 128 or group % 128 == 0)


def w4a8_gemm(
    a: torch.Tensor, xs: torch.Tensor, w_packed: torch.Tensor, w_scales: torch.Tensor, bias: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """``a[M, K]`` fp8 or int8, ``w_packed[N, K/2]`` uint8, ``w_scales[N, K/G]`` fp32 -> ``[M, N]``."""
    m, k = a.shape
    n = w_packed.shape[0]
    group = k // w_scales.shape[1]
    c = torch.empty((m, n), dtype=out_dtype, device=a.device)
    if m == 0:
        return c
    a, w_packed, w_scales = a.contiguous(), w_packed.contiguous(), w_scales.contiguous()
    bk = min(group, 128)

    def grid(meta):
        return (triton.cdiv(m, meta["BM"]) * triton.cdiv(n, meta["BN"]),)

    _w4a8_kernel[grid](
        a, w_packed, c, xs, w_scales, bias if bias is not None else xs, m, n, k, _m_bucket(m),
        a.stride(0), w_packed.stride(0), w_scales.stride(0), c.stride(0),
        G=group, BK=bk, INT8_ACT=a.dtype == torch.int8, HAS_BIAS=bias is not None,
    )
    return c
