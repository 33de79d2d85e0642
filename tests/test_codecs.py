"""The codec table (plugins/codecs.py) against the formulas it replaced, kept here verbatim as an independent
reference: Q/DQ graph weights (numpy, ``passes/insert_qdq``), the torch package's weights and activation fake
quantization (``torch_package``), and the kernels' reference quantizers (``plugins/formats``). Every comparison is
bit-exact (bytes of the codes and scales), on fixed-seed random tensors with outliers, zero rows and values placed
on rounding midpoints, so any drift in rounding, clamping, scale floors or operation order fails here."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
import torch

from qc_compile.plan import LinearPlan

AMAX_FLOOR = 1e-12
QMAX = {"fp8_e4m3": 448.0, "int8": 127.0, "int6_sim": 31.0, "int4_b64": 7.0, "int4_b128": 7.0, "nvfp4": 6.0}
BLOCK = {"int4_b64": 64, "int4_b128": 128}


# ------------------------------------------------------------------------------------------------ old formulas
def old_round_to_e2m1(x):
    a = x.float().abs()
    code = ((a > 0.25).int() + (a >= 0.75).int() + (a > 1.25).int() + (a >= 1.75).int()
            + (a > 2.5).int() + (a >= 3.5).int() + (a > 5.0).int())
    grid = torch.tensor((0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0), device=x.device)
    return torch.sign(x.float()) * grid[code]


def old_quantize_nvfp4(x):
    k = x.shape[-1]
    xf = x.float()
    gscale = (xf.abs().amax().clamp_min(AMAX_FLOOR) / (448.0 * 6.0)).reshape(())
    xb = xf.reshape(*x.shape[:-1], k // 16, 16)
    bamax = xb.abs().amax(-1, keepdim=True)
    bscale = (bamax / 6.0 / gscale).clamp(max=448.0).to(torch.float8_e4m3fn)
    denom = bscale.float() * gscale
    vals = old_round_to_e2m1(torch.where(denom > 0, xb / denom.clamp_min(torch.finfo(torch.float32).tiny), 0.0))
    return vals.reshape(x.shape), bscale.squeeze(-1), gscale


def old_dequantize_nvfp4(vals, bscale, gscale):
    k = vals.shape[-1]
    vb = vals.float().reshape(*vals.shape[:-1], k // 16, 16)
    return (vb * (bscale.float().unsqueeze(-1) * gscale)).reshape(vals.shape)


def old_per_token(x, fmt):
    amax = x.float().abs().amax(dim=-1, keepdim=True).clamp_min(AMAX_FLOOR)
    if fmt == "fp8":
        q = (x.float() * (448.0 / amax)).clamp(-448.0, 448.0).to(torch.float8_e4m3fn)
        return q, amax / 448.0
    q = torch.round(x.float() * (127.0 / amax)).clamp(-127.0, 127.0).to(torch.int8)
    return q, amax / 127.0


def old_pack_int4(q):
    u = (q.to(torch.int16) + 8).to(torch.uint8)
    return u[..., 0::2] | (u[..., 1::2] << 4)


def old_quantize_int4_blockwise(w, block):
    n, k = w.shape
    wb = w.float().reshape(n, k // block, block)
    amax = wb.abs().amax(-1, keepdim=True).clamp_min(AMAX_FLOOR)
    scale = amax / 7.0
    q = torch.round(wb / scale).clamp(-8, 7).to(torch.int8).reshape(n, k)
    return old_pack_int4(q), scale.squeeze(-1)


def old_qdq_weight(w, fmt):
    """passes/insert_qdq.quantize_weight before the codec table (numpy, ``w [K, N]``)."""
    w = w.astype(np.float32)
    if fmt in ("fp8_e4m3", "int8", "int6_sim"):
        qmax = QMAX[fmt]
        scale = (np.maximum(np.abs(w).max(axis=0), AMAX_FLOOR) / qmax).astype(np.float32)
        x = w / scale[None, :]
        if fmt == "fp8_e4m3":
            q = np.clip(x, -qmax, qmax).astype(ml_dtypes.float8_e4m3fn)
        else:
            q = np.clip(np.round(x), -qmax, qmax).astype(np.int8)
        return {"codes": q, "scale": scale, "axis": 1, "block": None}
    if fmt in BLOCK:
        b = BLOCK[fmt]
        k, n = w.shape
        wb = w.reshape(k // b, b, n)
        scale = (np.maximum(np.abs(wb).max(axis=1), AMAX_FLOOR) / 7.0).astype(np.float32)
        q = np.clip(np.round(wb / scale[:, None, :]), -8, 7).reshape(k, n).astype(ml_dtypes.int4)
        return {"codes": q, "scale": scale, "axis": 0, "block": b}
    vals, bscale, gscale = old_quantize_nvfp4(torch.from_numpy(np.ascontiguousarray(w.T)))
    return {"codes": vals.numpy().T.astype(ml_dtypes.float4_e2m1fn),
            "block_scale": bscale.view(torch.uint8).numpy().T.copy().view(ml_dtypes.float8_e4m3fn),
            "scale": np.array(float(gscale), dtype=np.float32), "axis": 0, "block": 16}


def old_package_quantize(w, fmt):
    if fmt == "fp8_e4m3":
        q, s = old_per_token(w, "fp8")
        return {"q": q, "scale": s.squeeze(-1)}
    if fmt in ("int8", "int6_sim"):
        qmax = QMAX[fmt]
        s = w.float().abs().amax(dim=1).clamp_min(AMAX_FLOOR) / qmax
        return {"q": torch.round(w / s[:, None]).clamp(-qmax, qmax).to(torch.int8), "scale": s}
    if fmt in BLOCK:
        packed, s = old_quantize_int4_blockwise(w, BLOCK[fmt])
        return {"q": packed, "scale": s}
    vals, bscale, gscale = old_quantize_nvfp4(w)
    return {"q": vals.to(torch.float8_e4m3fn), "block_scale": bscale, "scale": gscale.reshape(1)}


def old_package_dequantize(t, fmt):
    if fmt in ("fp8_e4m3", "int8", "int6_sim"):
        return t["q"].float() * t["scale"][:, None]
    if fmt in BLOCK:
        p = t["q"]
        lo, hi = (p & 0x0F).to(torch.int8) - 8, (p >> 4).to(torch.int8) - 8
        q = torch.stack([lo, hi], dim=-1).reshape(p.shape[0], p.shape[1] * 2).float()
        n, k = q.shape
        block = k // t["scale"].shape[-1]
        return (q.reshape(n, k // block, block) * t["scale"].float().unsqueeze(-1)).reshape(n, k)
    return old_dequantize_nvfp4(t["q"].float(), t["block_scale"], t["scale"].reshape(()))


def old_fake_quant_activation(x, e):
    fmt = e.activation
    if fmt == "bf16":
        return x
    xf = x.float()
    if fmt == "nvfp4":
        g = torch.tensor(max(float(e.act_amax or 0.0), 1e-8) / (6.0 * 448.0), dtype=torch.float32)
        k = xf.shape[-1]
        xb = xf.reshape(-1, k // 16, 16)
        bamax = xb.abs().amax(-1, keepdim=True)
        bscale = (bamax / 6.0 / g).clamp(max=448.0).to(torch.float8_e4m3fn).float()
        denom = bscale * g
        vals = old_round_to_e2m1(torch.where(denom > 0, xb / denom.clamp_min(torch.finfo(torch.float32).tiny), 0.0))
        return (vals * denom).reshape(x.shape).to(x.dtype)
    s = float(e.act_scale)
    qmax = QMAX[fmt]
    if fmt == "fp8_e4m3":
        q = (xf / s).clamp(-qmax, qmax).to(torch.float8_e4m3fn).float()
    elif fmt == "int8":
        q = torch.round(xf / s).clamp(-qmax - 1, qmax)
    else:
        q = torch.round(xf / s).clamp(-qmax, qmax)
    return (q * s).to(x.dtype)


# ------------------------------------------------------------------------------------------------ inputs
def weights(seed: int) -> torch.Tensor:
    """Seed 1 is large enough that the division and reciprocal forms of INT8 differ on one code (seed 0 for FP8)."""
    n, k = (256, 1024) if seed == 1 else (48, 256)
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * torch.logspace(-3, 1, n)[:, None]
    w[3] = 0.0  # an all-zero row: scale floor, zero codes
    w[5, 7] = 50.0  # an outlier
    w[9, :16] = 0.0  # an all-zero NVFP4 block
    return w


def activations(seed: int, scale: float, qmax: float) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 5, 256, generator=g) * 2.0
    x[0, 0, :64] = (torch.arange(-32, 32) + 0.5) * scale  # on the rounding midpoints of an integer grid
    x[1, 1, 3] = 10 * qmax * scale  # saturates
    x[2, 2, :16] = 0.0
    return x


def nbytes(t) -> bytes:
    if isinstance(t, torch.Tensor):
        t = t.contiguous()
        return t.view(torch.uint8).numpy().tobytes() if t.dtype.itemsize == 1 else t.numpy().tobytes()
    return np.ascontiguousarray(t).tobytes()


# ------------------------------------------------------------------------------------------------ tests
@pytest.mark.parametrize("fmt", list(QMAX))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_qdq_weights_unchanged(fmt, seed):
    from qc_compile.passes.insert_qdq import quantize_weight

    w = weights(seed).numpy().T.copy()  # [K, N], the MatMul layout
    new, old = quantize_weight(w, fmt), old_qdq_weight(w, fmt)
    assert set(new) == set(old)
    for key in old:
        if isinstance(old[key], np.ndarray):
            assert new[key].dtype == old[key].dtype and new[key].shape == old[key].shape, key
            assert nbytes(new[key]) == nbytes(old[key]), f"{fmt} {key} drifted"
        else:
            assert new[key] == old[key], key


@pytest.mark.parametrize("fmt", list(QMAX))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_package_weights_unchanged(fmt, seed):
    from qc_compile.torch_package import dequantize, quantize

    w = weights(seed)
    new, old = quantize(w, fmt), old_package_quantize(w, fmt)
    assert set(new) == set(old)
    for key in old:
        assert new[key].dtype == old[key].dtype and new[key].shape == old[key].shape, key
        assert nbytes(new[key]) == nbytes(old[key]), f"{fmt} {key} drifted"
    assert nbytes(dequantize(new, fmt)) == nbytes(old_package_dequantize(old, fmt))


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "int8", "int6_sim", "nvfp4"])
@pytest.mark.parametrize("seed", [0, 1])
def test_activation_fake_quant_unchanged(fmt, seed):
    from qc_compile.plan import act_scale_for
    from qc_compile.torch_package import fake_quant_activation

    amax = 3.7 + seed
    e = LinearPlan("spatial_0", activation=fmt, act_scale=act_scale_for(fmt, amax), act_amax=amax)
    s = e.act_scale if fmt != "nvfp4" else e.global_scale
    x = activations(seed, s, QMAX[fmt])
    assert nbytes(fake_quant_activation(x, e)) == nbytes(old_fake_quant_activation(x, e))


@pytest.mark.parametrize("seed", [0, 1])
def test_kernel_references_unchanged(seed):
    from qc_compile.plugins import formats as F

    x = activations(seed, 0.01, 127.0).reshape(-1, 256) * 5
    for fmt, fn in (("fp8", F.quantize_fp8_per_token), ("int8", F.quantize_int8_per_token)):
        (q, s), (q0, s0) = fn(x), old_per_token(x, fmt)
        assert nbytes(q) == nbytes(q0) and nbytes(s) == nbytes(s0), fmt
    w = weights(seed)
    for block in (64, 128):
        (p, s), (p0, s0) = F.quantize_int4_blockwise(w, block), old_quantize_int4_blockwise(w, block)
        assert nbytes(p) == nbytes(p0) and nbytes(s) == nbytes(s0)
    for t in (w, x):
        new, old = F.quantize_nvfp4(t), old_quantize_nvfp4(t)
        assert all(nbytes(a) == nbytes(b) for a, b in zip(new, old))
        assert nbytes(F.fake_quant_nvfp4(t)) == nbytes(old_dequantize_nvfp4(*old))
    y = torch.linspace(-8, 8, 4097)  # every E2M1 tie and the saturation
    assert torch.equal(F.round_to_e2m1(y), old_round_to_e2m1(y))
