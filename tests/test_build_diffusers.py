"""`qc-compile build` and the graph executors of `qc_compile.enable` on a diffusers (Wan) work dir: rtx:sm89 engines
built on the CPU with a manifest whose sha256 match the files; `trt --onnx-only` Q/DQ graphs with FP8 on every block
linear and none on embed/final; `--target torch` package; `enable(transformer, work=W, executor="onnxruntime")`
reproduces the torch sampler through the FP graphs (fp32) and stays within FP8 error through the Q/DQ graphs; a call
at another geometry, sub-block policies, and TensorRT on a machine without a GPU are refused with the reason."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import onnx
import pytest
import torch

pytest.importorskip("diffusers")

from cli_helpers import run_cli  # noqa: E402
from diffusers_helpers import QC_REF_WAN_TINY, rel_err, tiny_qc_ref_wan_folder  # noqa: E402

import qc_compile  # noqa: E402
from qc_compile.artifacts import sha256_file  # noqa: E402
from qc_compile.errors import UserError  # noqa: E402
from qc_compile.models import qc_ref_wan as qrw  # noqa: E402
from qc_compile.workdir import WorkDir, load_model_for, read_model_info  # noqa: E402

SMALL = qrw.SamplingDefaults(frames=4, height=16, width=16, steps=3, cfg=3.0, shift=4.0)
PROMPTS = ["a red circle moving left on a black background"]
HAS_RTX = importlib.util.find_spec("tensorrt_rtx") is not None


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def fp_work(tmp_path_factory) -> Path:
    """A tiny random qc-ref-wan folder, exported (FP graphs only, no plan)."""
    folder = tiny_qc_ref_wan_folder(tmp_path_factory.mktemp("qrw"), SMALL)
    work = tmp_path_factory.mktemp("wfp") / "work"
    assert run_cli(["export", "qc-ref-wan", "--checkpoint", str(folder), "-o", str(work), "--quiet"]) == 0
    return work


def _fp8_plan(work: Path) -> None:
    """Every block linear FP8 E4M3 (W8A8, static activation scales from a fixed range), embed/final bf16."""
    from qc_compile.plan import save_plan, uniform_plan

    info = read_model_info(WorkDir(work))
    ranges = {li["name"]: {"amax": 4.0, "max": 4.0} for li in info.linears()}
    plan, kept = uniform_plan(info, "fp8_e4m3", ranges, blocks_only=True,
                              provenance={"created": "test", "command": "test", "tool_versions": {}})
    assert kept and all(not n.startswith("blocks.") for n in kept)
    save_plan(plan, WorkDir(work).plan_json)


@pytest.fixture(scope="module")
def q_work(fp_work: Path, tmp_path_factory) -> Path:
    """The same export with an FP8 plan and a `trt --onnx-only` build."""
    work = tmp_path_factory.mktemp("wq") / "work"
    shutil.copytree(fp_work, work)
    _fp8_plan(work)
    assert run_cli(["build", str(work), "--target", "trt", "--onnx-only"]) == 0
    return work


@pytest.fixture(scope="module")
def loaded(fp_work: Path):
    return load_model_for(read_model_info(WorkDir(fp_work)))


@pytest.fixture(scope="module")
def reference(loaded) -> torch.Tensor:
    return loaded.sample(PROMPTS, seed=0)


def _sample_through(loaded, work: Path, **kw) -> tuple[torch.Tensor, dict]:
    s = qc_compile.enable(loaded.transformer, work=work, policy="none", **{"executor": "onnxruntime", **kw})
    try:
        out = loaded.sample(PROMPTS, seed=0)
    finally:
        qc_compile.disable(loaded.transformer)
    return out, s.trace()


# ------------------------------------------------------------------------------------------------ build
def _q_nodes(path: Path, linears: list[str]) -> dict[str, int]:
    """linear -> 1 when its MatMul's activation comes through an FP8 QuantizeLinear -> DequantizeLinear pair."""
    m = onnx.load(str(path))
    prod = {o: n for n in m.graph.node for o in n.output}
    fp8 = {i.name for i in m.graph.initializer if i.data_type == onnx.TensorProto.FLOAT8E4M3FN}
    fp8 |= {n.output[0] for n in m.graph.node if n.op_type == "Constant"
            and any(a.t.data_type == onnx.TensorProto.FLOAT8E4M3FN for a in n.attribute)}
    out: dict[str, int] = {}
    for n in m.graph.node:
        name = n.name.strip("/").removesuffix("/MatMul").replace("/", ".")
        if n.op_type != "MatMul" or name not in linears:
            continue
        a = prod.get(n.input[0])
        q = prod.get(a.input[0]) if a is not None and a.op_type == "DequantizeLinear" else None
        out[name] = int(q is not None and q.op_type == "QuantizeLinear" and len(q.input) > 2 and q.input[2] in fp8)
    return out


def test_trt_onnx_only_qdq_on_every_block_linear_only(q_work: Path) -> None:
    info = read_model_info(WorkDir(q_work))
    man = json.loads((q_work / "manifest.json").read_text())["targets"]["trt"]
    assert man["onnx_only"] and not man["engines"]
    for u in info.units:
        rec = man["units"][u["name"]]["variants"]["default"]
        path = q_work / rec["onnx"][0]["path"]
        assert sha256_file(path) == rec["onnx"][0]["sha256"]
        names = [li["name"] for li in u["linears"]]
        got = _q_nodes(path, names)
        assert set(got) == set(names), (u["name"], sorted(got), names)
        want = 1 if u["name"].startswith("block_") else 0
        assert all(v == want for v in got.values()), (u["name"], got)
    assert sum(1 for u in info.units if u["name"].startswith("block_")) == QC_REF_WAN_TINY["num_layers"]


@pytest.mark.skipif(not HAS_RTX, reason="tensorrt_rtx does not import here, so no engine can be built")
def test_build_rtx_sm89_engines_and_manifest(q_work: Path, tmp_path: Path) -> None:
    work = tmp_path / "work"
    shutil.copytree(q_work, work)
    assert run_cli(["build", str(work), "--target", "rtx:sm89", "--max-batch", "2"]) == 0
    info = read_model_info(WorkDir(work))
    man = json.loads((work / "manifest.json").read_text())["targets"]["rtx:sm89"]
    assert man["engines"] and man["tool"]["name"] == "tensorrt_rtx"
    engines = sorted((work / "engines").rglob("*.engine"))
    assert len(engines) == len(info.unit_names)
    for u in info.unit_names:
        e = man["units"][u]["variants"]["default"]["engine"]
        p = work / e["path"]
        assert p.is_file() and sha256_file(p) == e["sha256"] and p.stat().st_size == e["bytes"] > 0
    # the RoPE tables are static network inputs (no batch axis): no profile entry; the batch axis of the rest is
    from qc_compile.build import profile_shapes

    shapes = profile_shapes(info.unit("block_0")["inputs"], 2, block=True)
    assert "rope_cos" not in shapes and "rope_sin" not in shapes
    assert shapes["x"][0][0] == 1 and shapes["x"][2][0] == 2
    assert "cached_residual" in profile_shapes(info.unit("block_0")["inputs"], 2, plugins=True, block=True)
    # the engines cannot run on this machine: the tensorrt executor says why
    loaded = load_model_for(info)
    with pytest.raises(UserError, match="cannot run here|not installed"):
        qc_compile.enable(loaded.transformer, work=work, executor="tensorrt", policy="none")
    assert getattr(loaded.transformer, "_qc_session", None) is None


def test_build_torch_package(q_work: Path, tmp_path: Path) -> None:
    from qc_compile.torch_package import load_package

    work = tmp_path / "work"
    shutil.copytree(q_work, work)
    assert run_cli(["build", str(work), "--target", "torch"]) == 0
    man = json.loads((work / "manifest.json").read_text())["targets"]["torch"]
    for f in man["units"]["package"]["files"]:
        assert sha256_file(work / f["path"]) == f["sha256"]
    pkg = load_package(WorkDir(work))
    hooked = [n for n, m in pkg.transformer.named_modules() if m._forward_pre_hooks]
    assert len(hooked) == sum(1 for n in hooked if n.startswith("blocks.")) > 0


# ------------------------------------------------------------------------------------------------ executors
def test_onnxruntime_fp_graphs_equal_torch_sampler(loaded, fp_work: Path, reference: torch.Tensor) -> None:
    out, trace = _sample_through(loaded, fp_work)
    assert trace["settings"]["executor"]["graphs"] == "fp"
    assert rel_err(out, reference) < 1e-4
    assert loaded.transformer.forward.__func__ is type(loaded.transformer).forward  # disabled again


def test_onnxruntime_qdq_graphs_within_fp8_error(loaded, q_work: Path, reference: torch.Tensor) -> None:
    out, trace = _sample_through(loaded, q_work, target="trt")
    assert trace["settings"]["executor"]["graphs"] == "q" and trace["settings"]["executor"]["target"] == "trt"
    err = rel_err(out, reference)
    assert 1e-4 < err < 0.05, err  # quantized (not the FP graphs) yet close
    fp, _ = _sample_through(loaded, q_work, graphs="fp")  # the same work dir's FP graphs on request
    assert rel_err(fp, reference) < 1e-4


def test_mismatched_geometry_refused(loaded, fp_work: Path) -> None:
    qc_compile.enable(loaded.transformer, work=fp_work, executor="onnxruntime", policy="none")
    x = torch.randn(1, 4, SMALL.frames, 2 * SMALL.height, SMALL.width)
    y = loaded.encode_prompts(PROMPTS)
    try:
        with pytest.raises(UserError, match=r"4x32x16.*exported at 4x16x16"):
            loaded.transformer(hidden_states=x, timestep=torch.tensor([500.0]), encoder_hidden_states=y)
        x = torch.randn(1, 4, SMALL.frames, SMALL.height, SMALL.width)
        with pytest.raises(UserError, match="text length 12"):
            loaded.transformer(hidden_states=x, timestep=torch.tensor([500.0]), encoder_hidden_states=y[:, :5])
    finally:
        qc_compile.disable(loaded.transformer)


@pytest.mark.parametrize("kw, match", [
    ({"policy": "pab"}, "needs block sub-steps"),
    ({"policy": "fbcache"}, "needs in-step gates"),
    ({"quantize": "fp8"}, "swaps the transformer's torch linears"),
    ({"work": None}, "pass work=WORK"),
    ({"graphs": "q"}, "has no build"),
])
def test_graph_executor_refusals(loaded, fp_work: Path, kw: dict, match: str) -> None:
    args = {"work": fp_work, "executor": "onnxruntime", "policy": "none", **kw}
    with pytest.raises(UserError, match=match):
        qc_compile.enable(loaded.transformer, **args)
    assert getattr(loaded.transformer, "_qc_session", None) is None


def test_plan_without_build_refused(loaded, fp_work: Path, tmp_path: Path) -> None:
    work = tmp_path / "work"
    shutil.copytree(fp_work, work)
    _fp8_plan(work)
    with pytest.raises(UserError, match="has a plan but no build"):
        qc_compile.enable(loaded.transformer, work=work, executor="onnxruntime", policy="none")


def test_other_weights_refused(loaded, fp_work: Path) -> None:
    p = loaded.transformer.proj_out.bias
    saved = p.detach().clone()
    with torch.no_grad():
        p.add_(1.0)
    try:
        with pytest.raises(UserError, match="state digest differs"):
            qc_compile.enable(loaded.transformer, work=fp_work, executor="onnxruntime", policy="none")
    finally:
        with torch.no_grad():
            p.copy_(saved)


def test_compare_diffusers_work_dir(q_work: Path, tmp_path: Path) -> None:
    """`qc-compile compare` on the Wan work dir: torch units == FP graphs, Q/DQ graphs at FP8 error per block and
    end to end; embed/final (not quantized) exact. 2 steps with CFG: the first and the last step's first call."""
    work = tmp_path / "work"
    shutil.copytree(q_work, work)
    assert run_cli(["compare", str(work), "--target", "trt", "--steps", "2"]) == 0
    rep = json.loads((work / "report" / "compare.json").read_text())
    assert rep["passed"] and rep["model"] == "qc-ref-wan"
    for u, r in rep["units"].items():
        assert r["samples"] == 2 and r["fp_torch_vs_onnx"]["max_rel_err"] < 1e-5
        if u.startswith("block_"):
            assert 20.0 < r["fp_vs_q"]["snr_db"] < 80.0, (u, r)
        else:
            assert r["fp_vs_q"]["rel_l2"] == 0.0
        assert r["trt"] == {"not_run": "no engines in this build (--onnx-only)"}
    assert rep["e2e"]["onnx_fp"]["psnr_db"] > 60.0 and 20.0 < rep["e2e"]["onnx_q"]["psnr_db"] < 100.0


def test_plugin_graphs_take_block_units_by_kind(q_work: Path, tmp_path: Path) -> None:
    """`--plugins`: Wan block units (no STDiT3 t_mlp input) get the cache-stats node and the cached_residual input;
    embed/final do not; every FP8 block linear becomes RotateQuantFP8 + FP8Linear."""
    work = tmp_path / "work"
    shutil.copytree(q_work, work)
    assert run_cli(["build", str(work), "--target", "trt", "--onnx-only", "--plugins"]) == 0
    for u in read_model_info(WorkDir(work)).units:
        m = onnx.load(str(work / "onnx" / "q" / f"{u['name']}.plugins.onnx"))
        ops = [n.op_type for n in m.graph.node if n.domain == "qc"]
        block = u["name"].startswith("block_")
        assert ops.count("CacheStatsApply") == int(block)
        assert ("cached_residual" in [i.name for i in m.graph.input]) == block
        assert ops.count("FP8Linear") == (len(u["linears"]) if block else 0)
