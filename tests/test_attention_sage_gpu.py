"""The 8-bit self-attention option (SageAttention, ``FastRunner(attention="sage")``) on a GPU; skipped without CUDA or
without the ``sage`` extra (``pip install "qc-compile[sage]"``).

Shapes are STDiT3-XL/2's (16 heads of 72, padded to 96 for the kernel) with a smaller batch; the reference is fp32
SDPA on the same inputs. INT8 Q·K^T per block of tokens with FP16 P·V is expected near 1e-2 relative error here
(unit-variance q and smoothed k: the INT8 step is ~1/40 of the largest of a block, so the logit noise is ~1e-2 and
so is the output's relative error; the bound is 5e-2).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from qc_compile.models.config import OPENSORA_V12
from qc_compile.models.stdit3 import STDiT3, Geometry
from qc_compile.runtime import attention as A
from qc_compile.runtime.fast_blocks import fp8_block_plan
from qc_compile.runtime.protocols import Conditioning, caption_cut
from qc_compile.runtime.runners.fast import FastRunner
from qc_compile.runtime.step_executor import StepExecutor

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
sageattention = pytest.importorskip("sageattention", reason="needs the sage extra: pip install 'qc-compile[sage]'")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def qkv(B: int, H: int, N: int, d: int, seed: int) -> tuple[torch.Tensor, ...]:
    """Fresh random (B, H, N, d) in fp32 on the GPU; keys with a per-channel bias shared by all tokens (the pattern
    of real DiT keys that SageAttention's smoothing targets)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(B, H, N, d, device="cuda", generator=g)
    k = torch.randn(B, H, N, d, device="cuda", generator=g) + torch.randn(1, H, 1, d, device="cuda", generator=g) * 3
    v = torch.randn(B, H, N, d, device="cuda", generator=g)
    return q, k, v


@pytest.mark.parametrize("shape", [(2, 16, 1590, 72), (64, 16, 15, 72), (2, 4, 256, 32), (2, 16, 1024, 64)],
                         ids=["xl-spatial", "xl-temporal", "qc-ref-spatial", "d64"])
def test_sage_vs_sdpa_relative_error(shape):
    qb, kb, vb = (t.bfloat16() for t in qkv(*shape, seed=shape[2]))
    ref = F.scaled_dot_product_attention(qb.float(), kb.float(), vb.float())  # fp32 math on the same values
    kept = [t.clone() for t in (qb, kb, vb)]
    sdpa = F.scaled_dot_product_attention(qb, kb, vb)
    sage = A.sage_attention(qb, kb, vb)
    assert sage.shape == ref.shape and sage.dtype == torch.bfloat16
    e_sdpa, e_sage = rel(sdpa, ref), rel(sage, ref)
    print(f"{shape}: rel error bf16 SDPA {e_sdpa:.2e}, sage {e_sage:.2e}")
    assert e_sdpa < 1e-2
    assert e_sage < 5e-2, e_sage
    assert e_sage > 1e-4  # the 8-bit kernel ran (it is not bf16 SDPA under another name)
    for t, s in zip((qb, kb, vb), kept):
        assert torch.equal(t, s)  # the caller's tensors are not written (sageattn's smooth_k would write k)


def test_sage_compiles_without_graph_break_and_captures():
    """520 tokens (a partial last key block: the ones-column correction is in the graph too)."""
    q, k, v = (t.bfloat16() for t in qkv(2, 16, 520, 72, seed=7))
    eager = A.self_attend(q, k, v, "sage")
    compiled = torch.compile(lambda a, b, c: A.self_attend(a, b, c, "sage"), fullgraph=True, dynamic=False)
    assert rel(compiled(q, k, v), eager) < 1e-2  # inductor's fused pad/smoothing rounds differently in bf16
    # CUDA-graph capture of the eager call (kernels already compiled by the calls above), replayed on new inputs
    sq, sk, sv = (t.clone() for t in (q, k, v))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        A.self_attend(sq, sk, sv, "sage")
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = A.self_attend(sq, sk, sv, "sage")
    q2, k2, v2 = (t.bfloat16() for t in qkv(2, 16, 520, 72, seed=8))
    for s, t in zip((sq, sk, sv), (q2, k2, v2)):
        s.copy_(t)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, A.self_attend(q2, k2, v2, "sage"))


@pytest.fixture(scope="module")
def xl():
    """STDiT3-XL/2 blocks (depth 2), random weights, bf16, on a grid of 5 x 208 tokens (spatial attention long
    enough for the sage kernel, temporal attention 5 tokens: SDPA)."""
    cfg = dataclasses.replace(OPENSORA_V12, depth=2)
    torch.manual_seed(0)
    m = STDiT3(cfg).to(torch.bfloat16)
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 2 and p.shape[0] == 6:
                p.normal_(0, 0.3)
    g = Geometry(5, 26, 32, cfg.patch_size, 208, 256)  # S = 13 x 16 = 208 tokens per frame: a partial key block
    assert g.S >= A.SAGE_MIN_TOKENS > g.T
    return m.to("cuda").eval(), g


def _steps(ex, g, n=2, seed=4):
    gen = torch.Generator().manual_seed(3)
    mask = torch.ones(2, 300, dtype=torch.bool)
    mask[:, 60:] = False
    cond = Conditioning(y=torch.randn(2, 1, 300, 4096, generator=gen).cuda(), mask=mask.cuda(),
                        fps=torch.full((2,), 24.0, device="cuda"), caption_cut=caption_cut(mask))
    z = torch.randn(2, 4, g.frames, g.height, g.width, generator=torch.Generator().manual_seed(seed)).cuda()
    ex.reset()
    outs = []
    for i in range(n):
        v, _ = ex.step(z, torch.full((2,), 900.0 - 300 * i, device="cuda"), cond, {})
        outs.append(v.float().cpu())
        z = z + 0.1 * v[:, :4].float()
    return outs


@pytest.mark.parametrize("compile", [False, True])
def test_fast_runner_sage_under_cuda_graphs_matches_sdpa(xl, monkeypatch, compile):
    gpu, g = xl
    plan = fp8_block_plan(gpu)
    calls = []
    real = A.KERNEL

    def counting(q, k, v, sm_scale):
        calls.append(tuple(q.shape))
        return real(q, k, v, sm_scale)

    monkeypatch.setattr(A, "KERNEL", counting)
    sdpa = _steps(StepExecutor(FastRunner(gpu, g, plan, cuda_graphs=True), g), g)
    assert not calls
    runner = FastRunner(gpu, g, plan, cuda_graphs=True, compile=compile, attention="sage")
    assert runner.describe()["self_attention"] == "sage"
    sage = _steps(StepExecutor(runner, g), g)
    assert calls and all(c[-2:] == (g.S, 96) for c in calls)  # spatial only, head dim 72 padded to 96
    assert len(runner._graphs) > 0  # replayed from CUDA graphs
    eager = _steps(StepExecutor(FastRunner(gpu, g, plan, attention="sage"), g), g)
    for v_sdpa, v_sage, v_eager in zip(sdpa, sage, eager):
        err = rel(v_sage, v_sdpa)
        print(f"compile={compile}: velocity rel error sage vs sdpa {err:.2e}")
        assert 1e-5 < err < 5e-2, err
        assert rel(v_sage, v_eager) < (2e-2 if compile else 1e-3)
