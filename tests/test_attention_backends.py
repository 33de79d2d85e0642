"""The 8-bit attention option's own code on the CPU (the sage kernel itself is CUDA-only: tests/test_attention_sage_gpu.py).

The kernel is replaced by SDPA on the padded tensors, so what is checked here is the wrapping: head-dim zero-padding
with the original softmax scale, key smoothing, the caller's tensors untouched, the backend choice per sequence
length in the fast blocks, and the user errors.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from qc_compile.errors import UserError
from qc_compile.runtime import attention as A


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def sdpa_kernel(q, k, v, sm_scale):
    return F.scaled_dot_product_attention(q, k, v, scale=sm_scale)


def sdpa_mutating_kernel(q, k, v, sm_scale):
    """What sageattention 1.0.6 computes, in exact arithmetic: keys padded with zeros (logit 0, value 0) up to a
    multiple of its 64-key block, on the head dims its kernels take; and writing into ``k`` afterwards as
    ``sageattn(smooth_k=True)`` does, so that a wrapper handing it the caller's tensor would be caught."""
    assert q.shape[-1] in A.SAGE_HEAD_DIMS and k.shape[-1] == v.shape[-1] == q.shape[-1]
    tail = -k.shape[-2] % A.SAGE_KV_BLOCK
    out = F.scaled_dot_product_attention(q, F.pad(k, (0, 0, 0, tail)), F.pad(v, (0, 0, 0, tail)), scale=sm_scale)
    k -= k.mean(dim=-2, keepdim=True)
    k += 1.0
    return out


@pytest.mark.parametrize("n", [150, 256, 15])
@pytest.mark.parametrize("d", [32, 72, 64])
def test_padded_path_equals_sdpa(monkeypatch, d, n):
    """Head-dim padding, key smoothing and the partial-key-block correction together give SDPA's result (150 and
    15 keys end in a partial block of 64, 256 does not)."""
    monkeypatch.setattr(A, "KERNEL", sdpa_mutating_kernel)
    gen = torch.Generator().manual_seed(d)
    q, k, v = (torch.randn(2, 3, n, d, generator=gen) for _ in range(3))
    k = k + torch.randn(1, 3, 1, d, generator=gen) * 4  # a shared key bias: what smoothing removes
    saved = [t.clone() for t in (q, k, v)]
    out = A.sage_attention(q, k, v)
    ref = F.scaled_dot_product_attention(q, k, v)
    assert out.shape == ref.shape == (2, 3, n, d)
    assert rel(out, ref) < 1e-5
    for t, s in zip((q, k, v), saved):
        assert torch.equal(t, s)  # nothing the caller holds is written
    # the head-dim padding alone is exact for an exact kernel
    assert rel(A.padded_attention(q, k, v, sdpa_kernel), ref) < 1e-5
    if n % A.SAGE_KV_BLOCK:  # and the correction is needed: without it the emulated kernel is off
        assert rel(A.padded_attention(q, A.smooth_keys(k), v, sdpa_mutating_kernel), ref) > 1e-3


def test_padded_head_dims():
    assert [A.padded_head_dim(d) for d in (1, 32, 64, 65, 72, 96, 97, 128)] == [64, 64, 64, 96, 96, 96, 128, 128]
    with pytest.raises(ValueError, match="129"):
        A.padded_head_dim(129)


def test_self_attend_takes_sage_only_for_long_sequences(monkeypatch):
    calls = []

    def kernel(q, k, v, sm_scale):
        calls.append(q.shape)
        return F.scaled_dot_product_attention(q, k, v, scale=sm_scale)

    monkeypatch.setattr(A, "KERNEL", kernel)
    gen = torch.Generator().manual_seed(3)
    for n, d in ((15, 32), (A.SAGE_MIN_TOKENS, 32), (200, 72), (200, 128), (256, 128)):
        q, k, v = (torch.randn(2, 4, n, d, generator=gen) for _ in range(3))
        ref = F.scaled_dot_product_attention(q, k, v)
        assert rel(A.self_attend(q, k, v, "sage"), ref) < 1e-5
        assert rel(A.self_attend(q, k, v), ref) == 0.0  # default: SDPA itself
    # the short (temporal-like) sequence and head dim 128 with a partial key block (no room for the correction
    # column) stayed on SDPA; 72 with a partial block took 96 (72 + the ones column, padded)
    assert calls == [(2, 4, A.SAGE_MIN_TOKENS, 64), (2, 4, 200, 96), (2, 4, 256, 128)]


def test_fast_block_with_sage_backend_equals_sdpa_on_cpu(monkeypatch):
    """A qc-ref-sized block (4 heads of 32, S=256 spatial tokens) through the fast block with attention="sage" and
    the kernel replaced by SDPA computes the same block output as attention="sdpa" (the option is wired to the
    spatial self-attention and only there)."""
    from qc_compile.models import load_model
    from qc_compile.runtime.fast_blocks import FastBlock

    calls = []

    def kernel(q, k, v, sm_scale):
        calls.append(tuple(q.shape))
        return F.scaled_dot_product_attention(q, k, v, scale=sm_scale)

    monkeypatch.setattr(A, "KERNEL", kernel)
    torch.set_grad_enabled(False)
    model = load_model("qc-ref", device="cpu").model.float()
    gen = torch.Generator().manual_seed(5)
    T, S, C, L = 4, 256, model.config.hidden_size, 12
    x = torch.randn(1, T * S, C, generator=gen)
    t_mlp = torch.randn(1, 6 * C, generator=gen) * 0.3
    y = torch.randn(1, L, C, generator=gen)
    for name in ("spatial_0", "temporal_0"):
        blk = model.block(name)
        ref = FastBlock(blk, model.rope.freqs)(x, t_mlp, y, None, T, S)
        sage = FastBlock(blk, model.rope.freqs, attention="sage")
        assert sage.spec.attention == "sage"
        assert rel(sage(x, t_mlp, y, None, T, S), ref) < 1e-5
    assert calls == [(T, model.config.num_heads, S, 64)]  # spatial only; temporal (T tokens) kept SDPA


def test_user_errors():
    with pytest.raises(UserError, match="expected one of"):
        A.check_attention_backend("flash8", "cpu")
    with pytest.raises(UserError, match="needs a CUDA GPU"):
        A.check_attention_backend("sage", "cpu")
    A.check_attention_backend("sdpa", "cpu")


def test_fast_runner_refuses_sage_off_cuda():
    from qc_compile.models import load_model
    from qc_compile.models.stdit3 import Geometry
    from qc_compile.runtime.runners.fast import FastRunner

    lm = load_model("qc-ref", device="cpu")
    g = Geometry.for_model(lm.config, 16, 32, 32)
    assert FastRunner(lm.model, g).describe()["self_attention"] == "sdpa"  # the default
    with pytest.raises(UserError, match=r"qc-compile\[sage\]|needs a CUDA GPU"):
        FastRunner(lm.model, g, attention="sage")


def test_bench_profile_counts_sage_kernels_as_attention():
    """The per-block kernel split (tools/bench_lib.py) must put SageAttention's Triton kernels under attention, or
    an 8-bit attention run would look like elementwise work."""
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
    import bench_lib as B

    assert B.kernel_class("_attn_fwd") == "attention"
    assert B.kernel_class("quant_per_block_int8_kernel") == "attention"
    assert B.kernel_class("_attn_fwd_inner") == "attention"


_STAND_IN = {"on": False, "calls": 0}


def _cpu_stand_in(q, k, v, sm_scale):
    """SDPA as the CPU kernel of qc::sage_attention, live only inside the test below (registrations last for the
    process: everywhere else a CPU call still fails as in production)."""
    if not _STAND_IN["on"]:
        raise RuntimeError("qc::sage_attention is CUDA-only")
    _STAND_IN["calls"] += 1
    return F.scaled_dot_product_attention(q, k, v, scale=sm_scale).contiguous()


def test_sage_op_traces_in_one_graph_under_torch_compile():
    """The kernel call is a custom op with a fake kernel: torch.compile(fullgraph=True) traces self_attend("sage")
    without a graph break (the real op runs Triton, which dynamo would otherwise trace into or break on)."""
    q, k, v = torch.randn(3, 2, 4, 200, 72, generator=torch.Generator().manual_seed(9)).unbind(0)
    with pytest.raises((NotImplementedError, RuntimeError)):  # no CPU kernel: the op is CUDA-only
        torch.ops.qc.sage_attention(q, k, v, 0.1)
    if not getattr(_cpu_stand_in, "registered", False):
        A._sage_op.register_kernel("cpu")(_cpu_stand_in)
        _cpu_stand_in.registered = True
    _STAND_IN.update(on=True, calls=0)
    try:
        fn = torch.compile(lambda a, b, c: A.self_attend(a, b, c, "sage"), fullgraph=True, dynamic=False,
                           backend="aot_eager")
        out = fn(q, k, v)
    finally:
        _STAND_IN["on"] = False
    assert _STAND_IN["calls"] == 1
    assert rel(out, F.scaled_dot_product_attention(q, k, v)) < 1e-5


def test_qc_ref_generation_through_fast_runner_with_sage_wiring(monkeypatch):
    """The fidelity configuration (qc-ref through FastRunner(attention="sage") in the sampler) on the CPU with SDPA
    in the kernel's place and the CUDA check bypassed: the video equals attention="sdpa"'s and the kernel was called
    for every spatial self-attention (so a GPU run of this configuration measures the 8-bit kernel)."""
    from qc_compile.models import load_model
    from qc_compile.models.stdit3 import Geometry
    from qc_compile.runtime.generation import GenerationSettings, generate
    from qc_compile.runtime.runners import fast as fast_mod
    from qc_compile.runtime.step_executor import StepExecutor

    calls = []

    def kernel(q, k, v, sm_scale):
        calls.append(tuple(q.shape))
        return F.scaled_dot_product_attention(q, k, v, scale=sm_scale)

    monkeypatch.setattr(A, "KERNEL", kernel)
    monkeypatch.setattr(fast_mod, "check_attention_backend", lambda backend, device: None)
    lm = load_model("qc-ref")
    s = GenerationSettings.defaults(lm, steps=2, seed=0, frames=4)
    g = Geometry.for_model(lm.config, s.frames, s.height, s.width)
    caption = ["a red circle moving right on a black background"]
    v0, _ = generate(lm, caption, s, executor=StepExecutor(fast_mod.FastRunner(lm.model, g), g), progress=False)
    assert not calls
    runner = fast_mod.FastRunner(lm.model, g, attention="sage")
    v1, _ = generate(lm, caption, s, executor=StepExecutor(runner, g), progress=False)
    spatial = sum(1 for u in runner.unit_names if u.startswith("spatial"))
    assert len(calls) == 2 * spatial and set(calls) == {(2 * g.T, 4, g.S, 64)}  # 2 steps, CFG pair
    assert rel(v1, v0) < 1e-5


_INTERPRETED = r"""
import os
os.environ["TRITON_INTERPRET"] = "1"  # before sageattention's @triton.jit kernels are made
import torch, torch.nn.functional as F
from sageattention.quant_per_block import per_block_int8
from sageattention.quant_per_block_hd96 import per_block_int8_hd96
from sageattention.attn_qk_int8_per_block import forward as attn
from sageattention.attn_qk_int8_per_block_h96 import forward as attn96
from qc_compile.runtime import attention as A

def kernel(q, k, v, sm_scale):  # sageattn(smooth_k=False) without its is_cuda assert
    quant, fwd = (per_block_int8_hd96, attn96) if q.shape[-1] == 96 else (per_block_int8, attn)
    qi, qs, ki, ks = quant(q, k, sm_scale=sm_scale, tensor_layout="HND")
    return fwd(qi, ki, v.to(torch.float16), qs, ks, tensor_layout="HND", output_dtype=q.dtype)

A.KERNEL = kernel
for shape in [(1, 2, 200, 72), (1, 2, 256, 32), (2, 2, 15, 72), (1, 2, 130, 64)]:
    g = torch.Generator().manual_seed(shape[2])
    q, k, v = (torch.randn(*shape, generator=g) for _ in range(3))
    k = k + torch.randn(1, shape[1], 1, shape[3], generator=g) * 3
    ref = F.scaled_dot_product_attention(q, k, v)
    fixed = A.sage_attention(q, k, v)
    plain = A.padded_attention(q, A.smooth_keys(k), v, kernel)  # no partial-block correction
    print(shape[2], float((fixed - ref).norm() / ref.norm()), float((plain - ref).norm() / ref.norm()))
"""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None or importlib.util.find_spec("sageattention") is None,
                    reason="needs triton and the sage extra (Triton's interpreter runs the kernels on the CPU)")
def test_real_sage_kernels_in_triton_interpreter():
    """sageattention 1.0.6's own Triton kernels, run by Triton's CPU interpreter (fp32 inputs, INT8 Q·K^T, FP16
    P·V): through :func:`sage_attention` within 3e-2 of fp32 SDPA at every sequence length; without the partial
    key block correction, off by more than 0.1 where the key count is not a multiple of 64."""
    r = subprocess.run([sys.executable, "-c", _INTERPRETED], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    for line in r.stdout.split("\n"):
        if line.strip():
            n, fixed, plain = line.split()
            assert float(fixed) < 3e-2, line
            if int(n) % A.SAGE_KV_BLOCK:
                assert float(plain) > 0.1, line
