"""The 8-bit attention option's own code on the CPU (the sage kernel itself is CUDA-only: tests/test_attention_sage_gpu.py).

The kernel is replaced by SDPA on the padded tensors, so what is checked here is the wrapping: head-dim zero-padding
with the original softmax scale, key smoothing, the caller's tensors untouched, the backend choice per sequence
length in the fast blocks, and the user errors.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from qc_compile.errors import UserError
from qc_compile.runtime import attention as A


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def sdpa_mutating_kernel(q, k, v, sm_scale):
    """SDPA at the given scale, on head dims the sage kernels take, and writing into ``k`` afterwards as
    ``sageattn(smooth_k=True)`` does: a wrapper that handed it the caller's tensor would be caught."""
    assert q.shape[-1] in A.SAGE_HEAD_DIMS and k.shape[-1] == v.shape[-1] == q.shape[-1]
    out = F.scaled_dot_product_attention(q, k, v, scale=sm_scale)
    k -= k.mean(dim=-2, keepdim=True)
    k += 1.0
    return out


@pytest.mark.parametrize("d", [32, 72, 64])
def test_padded_path_equals_sdpa(monkeypatch, d):
    monkeypatch.setattr(A, "KERNEL", sdpa_mutating_kernel)
    gen = torch.Generator().manual_seed(d)
    q, k, v = (torch.randn(2, 3, 150, d, generator=gen) for _ in range(3))
    k = k + torch.randn(1, 3, 1, d, generator=gen) * 4  # a shared key bias: what smoothing removes
    saved = [t.clone() for t in (q, k, v)]
    out = A.sage_attention(q, k, v)
    ref = F.scaled_dot_product_attention(q, k, v)
    assert out.shape == ref.shape == (2, 3, 150, d)
    assert rel(out, ref) < 1e-5
    for t, s in zip((q, k, v), saved):
        assert torch.equal(t, s)  # nothing the caller holds is written
    # and the padding alone (no smoothing) is exact too
    assert rel(A.padded_attention(q, k, v, sdpa_mutating_kernel), ref) < 1e-5


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
    for n in (15, A.SAGE_MIN_TOKENS):
        q, k, v = (torch.randn(2, 4, n, 32, generator=gen) for _ in range(3))
        ref = F.scaled_dot_product_attention(q, k, v)
        assert rel(A.self_attend(q, k, v, "sage"), ref) < 1e-5
        assert rel(A.self_attend(q, k, v), ref) == 0.0  # default: SDPA itself
    assert calls == [(2, 4, A.SAGE_MIN_TOKENS, 64)]  # the short (temporal-like) sequence stayed on SDPA


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
    import sys
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
