"""The fast torch path on the CPU (the qc:: ops' reference kernels): fast linears against float quant->GEMM math,
fast blocks and the fast runner in FP mode against STDiT3Block / the torch runner (fp32, ~1e-5), quantized mode at
the FP8 error level, and the refusals."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qc_compile.errors import UserError
from qc_compile.models import load_model
from qc_compile.models.stdit3 import Geometry
from qc_compile.plan import LinearPlan
from qc_compile.plugins import formats as Fm
from qc_compile.runtime import fast_linear as fl
from qc_compile.runtime.fast_blocks import FastBlock, FastModel, block_forward, fp8_block_plan
from qc_compile.runtime.generation import torch_executor
from qc_compile.runtime.policy import STAT_NAMES, Action, UnitDecision
from qc_compile.runtime.protocols import Conditioning
from qc_compile.runtime.runners.fast import FastRunner, check_fast_available
from qc_compile.runtime.step_executor import StepExecutor


def fast_executor(model, g, plan=None, **kw) -> StepExecutor:
    return StepExecutor(FastRunner(model, g, plan, **kw), g)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.fixture(scope="module")
def qcref():
    return load_model("qc-ref")


def _geometry(loaded, frames=4):
    c = loaded.config
    return Geometry.for_model(c, frames, c.default_height, c.default_width)


def _cond(loaded, B=2, seed=0):
    c = loaded.config
    gen = torch.Generator().manual_seed(seed)
    y = torch.randn(B, 1, c.model_max_length, c.caption_channels, generator=gen)
    mask = torch.ones(B, c.model_max_length, dtype=torch.bool)
    mask[0, 7:] = False  # different caption lengths per batch element
    mask[1, 5:] = False
    return Conditioning(y=y, mask=mask, fps=torch.full((B,), float(c.default_fps)))


def _z(loaded, g, B=2, seed=1):
    c = loaded.config
    return torch.randn(B, c.in_channels, g.frames, g.height, g.width, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------------- linears
def _float_reference(x, lin, s, rot):
    """quant -> GEMM in float math from the format definitions (what every kernel must compute)."""
    xin = x / s if s is not None else x
    xq, xs = Fm.quantize_fp8_per_token(Fm.blocked_hadamard(xin, rot or 0))
    w = lin.weight.detach().float() * (s[None, :] if s is not None else 1)
    if rot:
        w = Fm.blocked_hadamard(w.double(), rot).float()
    wq, ws = Fm.quantize_fp8_per_channel(w)
    return (xq.float() * xs) @ (wq.float() * ws[:, None]).t() + lin.bias.detach().float()


@pytest.mark.parametrize("rot,smooth", [(None, False), (32, False), (None, True), (64, True)])
def test_fast_linear_equals_float_quant_gemm(rot, smooth):
    torch.manual_seed(0)
    lin = nn.Linear(128, 96)
    x = torch.randn(3, 50, 128) * 2 + 0.3
    x[..., 5] += 20.0  # an outlier channel
    s = torch.rand(128) + 0.5 if smooth else None
    e = LinearPlan(unit="spatial_0", weight="fp8_e4m3", activation="fp8_e4m3", act_scale=0.1, rotation=rot)
    fast = fl.FastLinear(lin, e, e, s)
    assert fast.spec.mode == fl.FP8 and fast.w.dtype == torch.float8_e4m3fn
    y = fast(x)
    ref = _float_reference(x, lin, s, rot)
    assert rel(y, ref) < 1e-5  # the same arithmetic
    exact = lin(x)
    err = rel(y, exact)
    assert 1e-3 < err < 0.06  # FP8-level error against the unquantized linear: it really quantizes


def test_fast_linear_fused_producers_match_unfused():
    torch.manual_seed(1)
    B, T, C = 2, 40, 128
    x = torch.randn(B, T, C) * 3
    shift, scale = torch.randn(B, 1, C) * 0.3, torch.randn(B, 1, C) * 0.3
    s = torch.rand(C) + 0.5
    lin = nn.Linear(C, 256)
    e = LinearPlan(unit="spatial_0", weight="fp8_e4m3", activation="fp8_e4m3", act_scale=0.1, rotation=32)
    fast = fl.FastLinear(lin, e, e, s)
    mod = torch.nn.functional.layer_norm(x, (C,), eps=1e-6) * (1 + scale) + shift
    fused = fl.modulate_linear(fast.spec, fast.weights, x, shift, scale)  # smoothing folded into the modulation
    unfused = fast(mod)
    assert rel(fused, unfused) < 5e-3  # same quantizer; the fold reorders a few fp32 roundings
    assert rel(fused, lin(mod)) < 0.06
    h = torch.randn(B, T, 256)
    lin2 = nn.Linear(256, C)
    e2 = LinearPlan(unit="spatial_0", weight="fp8_e4m3", activation="fp8_e4m3", act_scale=0.1, rotation=None)
    f2 = fl.FastLinear(lin2, e2, e2, None)
    g = torch.nn.functional.gelu(h, approximate="tanh")
    assert rel(fl.gelu_linear(f2.spec, f2.weights, h), f2(g)) < 1e-6
    assert rel(fl.gelu_linear(f2.spec, f2.weights, h), lin2(g)) < 0.06


def test_dense_and_weight_only_linears():
    torch.manual_seed(2)
    lin = nn.Linear(64, 32)
    x = torch.randn(5, 64)
    dense = fl.FastLinear(lin)
    assert dense.spec.mode == fl.DENSE and torch.equal(dense(x), lin(x))
    # smoothing + rotation without quantization cancel exactly: the original weight is used
    e = LinearPlan(unit="spatial_0", rotation=16)
    assert fl.FastLinear(lin, e, e, torch.rand(64) + 0.5).spec.mode == fl.DENSE
    wo = LinearPlan(unit="spatial_0", weight="int4_b64", rotation=16)
    f = fl.FastLinear(lin, wo, wo, torch.rand(64) + 0.5)
    assert f.spec.mode == fl.DQ
    assert 1e-3 < rel(f(x), lin(x)) < 0.2


@pytest.mark.parametrize("entry", [
    LinearPlan(unit="spatial_0", weight="int8", activation="int8", act_scale=0.1),
    LinearPlan(unit="spatial_0", weight="nvfp4", activation="nvfp4", act_scale="dynamic", act_amax=3.0),
    LinearPlan(unit="spatial_0", weight="int4_b64", activation="fp8_e4m3", act_scale=0.1),
])
def test_unsupported_formats_are_refused(entry):
    with pytest.raises(UserError, match="fast path"):
        fl.FastLinear(nn.Linear(64, 32), entry, entry, None, name="spatial_blocks.0.attn.qkv")


def test_fast_refused_without_cuda():
    with pytest.raises(UserError, match="CUDA"):
        check_fast_available("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="CUDA"):
            check_fast_available("cuda")


# ---------------------------------------------------------------------------------------------------- blocks
@pytest.mark.parametrize("unit", ["spatial_1", "temporal_2"])
def test_fast_block_fp_equals_stdit3_block(qcref, unit):
    m = qcref.model
    g = _geometry(qcref)
    torch.manual_seed(3)
    B, C, L = 2, m.config.hidden_size, m.config.model_max_length
    x, t_mlp, y = torch.randn(B, g.N, C), torch.randn(B, 6 * C), torch.randn(B, L, C)
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[1, 4:] = False
    ref = m.run_unit(unit, {"x": x, "t_mlp": t_mlp, "y": y, "mask": mask}, g)["x"]
    fb = FastBlock(m.block(unit), m.rope.freqs)
    out = fb(x, t_mlp, y, mask, g.T, g.S)
    assert rel(out - x, ref - x) < 1e-5
    # the sub-steps (PAB/FORA caches, TeaCache's probe) against the model's own
    ctx = {"t_mlp": t_mlp, "y": y, "mask": mask}
    fast = FastModel(m, {unit: fb}).block_steps(unit, ctx, g)
    ref_steps = m.block_steps(unit, ctx, g)
    h = torch.randn(B, g.N, C)
    for part in ("attention_input", "self_attention", "cross_attention", "feed_forward"):
        assert rel(getattr(fast, part)(h), getattr(ref_steps, part)(h)) < 1e-5, part
    assert torch.equal(fast.gate_attn, ref_steps.gate_attn) and torch.equal(fast.gate_mlp, ref_steps.gate_mlp)


# ---------------------------------------------------------------------------------------------------- executor
def _decisions(step: int) -> dict[str, UnitDecision]:
    if step == 0:
        return {"spatial_0": UnitDecision(parts=())}
    return {"spatial_1": UnitDecision(Action.REUSE), "temporal_2": UnitDecision(Action.PRUNE),
            "spatial_0": UnitDecision(parts=("attn",)), "temporal_0": UnitDecision(variant="high")}


def _run(ex, loaded, g, steps=2):
    cond = _cond(loaded)
    z = _z(loaded, g)
    ex.reset()
    outs = []
    for i in range(steps):
        t = torch.full((2,), 900.0 - 300 * i)
        v, st = ex.step(z, t, cond, _decisions(i))
        outs.append((v, st))
        z = z + 0.1 * v[:, : z.shape[1]]
    return outs


def test_fast_executor_fp_equals_torch_executor(qcref):
    g = _geometry(qcref)
    ref = _run(torch_executor(qcref.model, g), qcref, g)
    fast = _run(fast_executor(qcref.model, g), qcref, g)
    for (v0, s0), (v1, s1) in zip(ref, fast):
        assert rel(v1, v0) < 1e-5
        nan0, nan1 = torch.isnan(s0), torch.isnan(s1)
        assert torch.equal(nan0, nan1), "the same statistics are reported"
        ok = ~nan0
        assert torch.allclose(s1[ok], s0[ok], rtol=1e-4, atol=1e-6), (s0 - s1).abs().max()
    assert len(STAT_NAMES) == ref[0][1].shape[1]


def test_fast_executor_quantized_fp8(qcref):
    g = _geometry(qcref)
    plan = fp8_block_plan(qcref.model, rotation=32)
    plan.variants = {"high": {"*.mlp.fc2": {"weight": "bf16", "activation": "bf16"}}}
    ex = fast_executor(qcref.model, g, plan)
    runner = ex.runner
    assert set(runner.variant_models) == {"default", "high", "fp"}
    assert runner.model_for("fp") is runner.fp_model and runner.model_for("low") is runner.variant_models["default"]
    blk = runner.variant_models["default"].block("temporal_1")
    assert blk.quantized == ["qkv", "proj", "q_linear", "kv_linear", "cproj", "fc1", "fc2"]
    assert runner.variant_models["high"].block("temporal_1").quantized[-1] == "fc1"
    d = ex.describe()
    assert d["plan"] and not d["plan_linears_run_unquantized"] and d["runner"] == "torch-fast"
    fp = _run(fast_executor(qcref.model, g), qcref, g)
    q = _run(ex, qcref, g)
    for (v0, _), (v1, s1) in zip(fp, q):
        err = rel(v1, v0)
        assert 1e-4 < err < 0.1, err  # quantized, at the FP8 error level after 8 blocks
        assert torch.isfinite(s1[1:, 0]).any()
    # the block's math is the fast linears': a fp8 block equals block_forward with the same specs
    x = torch.randn(2, g.N, qcref.config.hidden_size)
    t_mlp, y = torch.randn(2, 6 * qcref.config.hidden_size), torch.randn(2, 12, qcref.config.hidden_size)
    out = blk(x, t_mlp, y, None, g.T, g.S)
    assert torch.equal(out, block_forward(blk.spec, blk.w, x, t_mlp, y, None, g.T, g.S))


def test_fast_executor_drives_the_sampler(qcref):
    from qc_compile.runtime.generation import GenerationSettings, generate

    settings = GenerationSettings.defaults(qcref, steps=3, seed=0, frames=4)
    g = Geometry.for_model(qcref.config, settings.frames, settings.height, settings.width)
    v0, r0 = generate(qcref, ["a red circle moving right on a black background"], settings,
                      executor=torch_executor(qcref.model, g), progress=False)
    v1, r1 = generate(qcref, ["a red circle moving right on a black background"], settings,
                      executor=StepExecutor(FastRunner(qcref.model, g), g, stats="full"), progress=False)
    assert rel(v1, v0) < 1e-5
    assert len(r1.steps) == 3 and r1.steps[-1].stats["spatial_0"]["res_norm"] > 0
    # by default the level follows the policy: policy none measures nothing but the action, same video
    v2, r2 = generate(qcref, ["a red circle moving right on a black background"], settings,
                      executor=fast_executor(qcref.model, g), progress=False)
    assert torch.equal(v2, v1) and set(r2.steps[-1].stats["spatial_0"]) == {"action"}


def test_cuda_graphs_need_cuda(qcref):
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    with pytest.raises(UserError, match="CUDA"):
        FastRunner(qcref.model, _geometry(qcref), cuda_graphs=True)


# ---------------------------------------------------------------------------------------------------- user API
@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_pipeline_and_cli_refuse_fast_without_cuda(capsys, tmp_path):
    from qc_compile.cli import main
    from qc_compile.runtime.pipeline import Pipeline

    with pytest.raises(UserError, match="needs a CUDA GPU"):
        Pipeline.from_pretrained("qc-ref", fast=True)
    with pytest.raises(UserError, match="does not combine with --executor onnxruntime"):
        Pipeline(None, model="qc-ref", executor="onnxruntime", fast=True)
    try:
        main(["run", "--prompt", "a red circle moving left on a black background", "--fast", "--random-weights",
              "--steps", "1", "-o", str(tmp_path / "r"), "--quiet"])
        rc = 0
    except SystemExit as e:
        rc = int(e.code)
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error:") and "--fast" in err and "CUDA" in err
    assert not (tmp_path / "r").exists()


def test_fused_fp8_spec_is_the_same_function(qcref):
    """``fused`` (quantization as torch ops + ``_scaled_mm``, for inductor) computes what the qc:: ops compute: on
    the CPU both are the reference kernels, so the block outputs are bit-identical; the spec records the mode."""
    g = _geometry(qcref)
    plan = fp8_block_plan(qcref.model)
    entries = {}
    for name, e in plan.resolve("default").items():
        if plan.linears[name].unit == "spatial_1":
            entries[name.split(".", 2)[2]] = (e, plan.linears[name], None)
    ops = FastBlock(qcref.model.block("spatial_1"), qcref.model.rope.freqs, entries)
    fused = FastBlock(qcref.model.block("spatial_1"), qcref.model.rope.freqs, entries, fused=True)
    assert fused.spec.fc1.fused and not ops.spec.fc1.fused and fused.spec.fc1.mode == fl.FP8
    gen = torch.Generator().manual_seed(3)
    C = qcref.config.hidden_size
    x, t_mlp, y = (torch.randn(2, g.N, C, generator=gen), torch.randn(2, 6 * C, generator=gen),
                   torch.randn(2, 9, C, generator=gen))
    out = fused(x, t_mlp, y, None, g.T, g.S)
    assert torch.equal(out, ops(x, t_mlp, y, None, g.T, g.S))
    assert FastRunner(qcref.model, g, plan, compile=True).fused is False  # measured slower on the H200
    assert FastRunner(qcref.model, g, plan, compile=False, fused=True).describe()["fp8_quantization"].startswith(
        "torch ops")


@pytest.mark.parametrize("lengths", [(6, 6), (7, 5)])
def test_caption_keys_cut_after_the_last_kept_token(qcref, lengths):
    """Cross-attention on the caption tokens up to the last one any sample keeps: the same block output as on the
    padded captions; the mask is dropped when every kept token is valid in every sample (flash-attention path)."""
    g = _geometry(qcref)
    c = qcref.config
    gen = torch.Generator().manual_seed(4)
    L = c.model_max_length
    mask = torch.zeros(2, L, dtype=torch.bool)
    for i, n in enumerate(lengths):
        mask[i, :n] = True
    inp = {"x": torch.randn(2, g.N, c.hidden_size, generator=gen),
           "t_mlp": torch.randn(2, 6 * c.hidden_size, generator=gen),
           "y": torch.randn(2, L, c.hidden_size, generator=gen), "mask": mask}
    cut = FastRunner(qcref.model, g)
    full = FastRunner(qcref.model, g, trim_captions=False)
    a = cut.run_unit("spatial_1", "default", inp)["x"]
    b = full.run_unit("spatial_1", "default", inp)["x"]
    assert rel(a, b) < 1e-6
    ((_, (n, all_kept)),) = cut._cuts.values()
    assert n == max(lengths) and all_kept == (len(set(lengths)) == 1)
    cut.run_unit("temporal_1", "default", inp)
    assert len(cut._cuts) == 1, "the cut is read once per mask, not per call"
    cut.reset()
    assert not cut._cuts
    # the sampler's conditioning carries the cut read on the host: no device read, same result
    from qc_compile.runtime.protocols import caption_cut

    assert caption_cut(mask) == (n, all_kept)
    c2 = cut.run_unit("spatial_1", "default", {**inp, "caption_cut": caption_cut(mask)})["x"]
    assert torch.equal(c2, a) and not cut._cuts
    seen = {}
    orig = cut.model_for("default").blocks["spatial_1"].fn

    def spy(spec, w, x, t_mlp, y, m, T, S):
        seen.update(y=y.shape, mask=None if m is None else m.shape)
        return orig(spec, w, x, t_mlp, y, m, T, S)

    cut.model_for("default").blocks["spatial_1"].fn = spy
    cut.run_unit("spatial_1", "default", inp)
    assert seen["y"][1] == n and (seen["mask"] is None) == all_kept
    # a new mask (the old one freed: its id and address may be reused) gets its own cut, never a stale one
    del inp["mask"], mask
    other = torch.zeros(2, L, dtype=torch.bool)
    other[:, :3] = True
    cut.run_unit("spatial_1", "default", {**inp, "mask": other})
    assert seen["y"][1] == 3 and seen["mask"] is None


def test_layout_helpers_for_the_stats_kernel():
    """The cache-stats kernel walks memory: tensors qualify when dense, equally strided, batch outermost."""
    from qc_compile.plugins.cache_stats import dense, same_flat_layout

    x = torch.randn(2, 8, 5).transpose(1, 2)  # (2, 5, 8) channel-major, dense
    assert dense(x) and not x.is_contiguous()
    assert same_flat_layout([x, torch.empty_like(x)], 40)
    assert not same_flat_layout([x, x.contiguous()], 40)
    assert not dense(torch.randn(2, 10, 8)[:, :5])  # a token shard: gaps between batch elements
    assert not same_flat_layout([torch.randn(5, 2, 8).transpose(0, 1)], 40)  # batch not outermost


def test_fast_runner_keeps_the_hidden_state_row_major(qcref):
    """The patch embedding returns a channel-major view; the fast runner hands the blocks a row-major hidden state,
    so no block output (and no residual the executor caches) inherits the transposed layout."""
    g = _geometry(qcref)
    ex = fast_executor(qcref.model, g)
    cond = _cond(qcref)
    emb_plain = qcref.model.run_unit("embed", {"x": _z(qcref, g), "timestep": torch.full((2,), 500.0),
                                               "y": cond.y, "mask": cond.mask, "fps": cond.fps}, g)
    emb = ex.runner.run_unit("embed", "default", {"x": _z(qcref, g), "timestep": torch.full((2,), 500.0),
                                                  "y": cond.y, "mask": cond.mask, "fps": cond.fps})
    assert not emb_plain["x"].is_contiguous(), "the model's own embed output is a transposed view"
    assert emb["x"].is_contiguous() and torch.equal(emb["x"], emb_plain["x"])
    ex.step(_z(qcref, g), torch.full((2,), 500.0), cond, {})
    assert ex.residuals and all(r.is_contiguous() for r in ex.residuals.values())


def test_graph_input_chains_on_a_graph_output_else_copies(qcref):
    """CUDA-graph inputs (the pure bookkeeping; capture needs a GPU: tests/test_fast_executor_gpu.py): a unit whose
    input is a captured graph's output buffer reads it in place; one chained graph per unit; anything else is copied
    into the static buffer of its shape."""
    r = FastRunner(qcref.model, _geometry(qcref))
    a, b = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    r._outs = {a.data_ptr(): a, b.data_ptr(): b}
    x, key = r._graph_input("default", "spatial_1", a)
    assert x is a and key[-1] == a.data_ptr()
    r._graphs[key] = None  # captured
    assert r._graph_input("default", "spatial_1", a)[0] is a  # replayed chained
    other = r._graph_input("default", "spatial_1", b)  # a second producer: copied, not a second chained graph
    assert other[0] is not b and torch.equal(other[0], b) and other[1] == ("default", "spatial_1", (2, 5, 8))
    fresh = torch.randn(2, 5, 8)  # e.g. h + reused residual
    x, key = r._graph_input("default", "temporal_1", fresh)
    assert x is other[0] and torch.equal(x, fresh) and len(key) == 3
    part = a[:, :, :4]  # same address as a graph output, another shape: copied
    x, key = r._graph_input("default", "temporal_2", part)
    assert x is not a and torch.equal(x, part) and len(key) == 3


def test_fp8_plan_high_variant_runs_precision_requests_unquantized(qcref):
    """The benches' FP8 plan carries the ``high`` variant (every linear bf16, as ``calibrate --uniform`` plans do):
    a decision asking for ``high`` runs the unquantized block (equal to the ``fp`` model), ``default`` runs FP8; without
    the variant a ``high`` request falls back to the FP8 default (what the 1544a85 benches measured)."""
    g = _geometry(qcref)
    c = qcref.config
    gen = torch.Generator().manual_seed(11)
    L = c.model_max_length
    inp = {"x": torch.randn(2, g.N, c.hidden_size, generator=gen),
           "t_mlp": torch.randn(2, 6 * c.hidden_size, generator=gen),
           "y": torch.randn(2, L, c.hidden_size, generator=gen), "mask": torch.ones(2, L, dtype=torch.bool)}
    with_high = FastRunner(qcref.model, g, fp8_block_plan(qcref.model, high_variant=True))
    without = FastRunner(qcref.model, g, fp8_block_plan(qcref.model))
    assert "high" in with_high.describe()["variants"] and "high" not in without.describe()["variants"]
    high = with_high.run_unit("spatial_1", "high", inp)["x"]
    fp = with_high.run_unit("spatial_1", "fp", inp)["x"]
    default = with_high.run_unit("spatial_1", "default", inp)["x"]
    assert torch.equal(high, fp)
    assert rel(default, fp) > 1e-4  # FP8 changed something
    assert torch.equal(without.run_unit("spatial_1", "high", inp)["x"], default)


def test_fp8_block_plan_keep_bf16_roles(qcref):
    """`bench_e2e --fp8-keep ROLE`: the named block roles stay bf16, every other block linear is FP8; a pattern that
    matches no role is refused (a typo would otherwise be recorded as a kept role that never was)."""
    from qc_compile.errors import UserError

    plan = fp8_block_plan(qcref.model, keep_bf16=("cross_attn.kv_linear", "mlp.fc*"))
    kept = {n for n, e in plan.linears.items() if e.weight == "bf16" and "blocks." in n}
    fp8 = {n for n, e in plan.linears.items() if e.weight == "fp8_e4m3"}
    assert kept and all(n.endswith(("cross_attn.kv_linear", "mlp.fc1", "mlp.fc2")) for n in kept)
    assert fp8 and not any(n.endswith(("cross_attn.kv_linear", "mlp.fc1", "mlp.fc2")) for n in fp8)
    assert len(kept) == 3 * 2 * qcref.config.depth  # kv, fc1, fc2 in every spatial and temporal block
    assert plan.provenance["keep_bf16"] == ["cross_attn.kv_linear", "mlp.fc*"]
    with pytest.raises(UserError, match="no block linear role matches"):
        fp8_block_plan(qcref.model, keep_bf16=("cross_attn.kv",))
