"""`qc-compile export` of diffusers Wan transformers (qc-ref-wan folders, wan2.1:PATH): one ONNX graph per unit whose
onnxruntime chain equals diffusers' own forward at batch sizes other than the traced one; model.json records the
family, the transformer's config and its files' sha256, which every later stage checks; bad input exits 2 with
nothing written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

from cli_helpers import run_cli  # noqa: E402
from diffusers_helpers import randn, rel_err, tiny_qc_ref_wan_folder, tiny_wan, tiny_wan_folder  # noqa: E402

from qc_compile.errors import ArtifactError  # noqa: E402
from qc_compile.models import qc_ref_wan as qrw  # noqa: E402

SMALL = qrw.SamplingDefaults(frames=4, height=16, width=16, steps=3, cfg=3.0, shift=4.0)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def wan_folder(tmp_path_factory) -> Path:
    """A diffusers transformer folder (what `save_pretrained` writes), tiny and random."""
    return tiny_wan_folder(tmp_path_factory.mktemp("tw") / "Wan-tiny")


@pytest.fixture(scope="module")
def qrw_folder(tmp_path_factory) -> Path:
    return tiny_qc_ref_wan_folder(tmp_path_factory.mktemp("qrw"), SMALL)


@pytest.fixture(scope="module")
def wan_work(wan_folder: Path, tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("ww") / "work"
    assert run_cli(["export", f"wan2.1:{wan_folder}", "-o", str(work), "--frames", "5", "--height", "16",
                    "--width", "32", "--text-length", "7", "--quiet"]) == 0
    return work


def _ort_chain(work: Path, inputs: dict[str, np.ndarray]) -> np.ndarray:
    """embed -> blocks -> final through the exported graphs, each fed by name from the previous outputs."""
    from qc_compile.onnx_utils import ort_session
    from qc_compile.workdir import WorkDir, read_model_info

    info = read_model_info(WorkDir(work))
    env = dict(inputs)
    for u in info.units:
        sess = ort_session(work / u["onnx"][0]["path"])
        feed = {r["onnx_name"]: env[r["name"]] for r in u["inputs"]}
        outs = sess.run([r["onnx_name"] for r in u["outputs"]], feed)
        env.update({r["name"]: o for r, o in zip(u["outputs"], outs)})
    return env["v"]


def test_wan_folder_export_chain_equals_diffusers_forward(wan_work: Path, wan_folder: Path) -> None:
    from diffusers import WanTransformer3DModel

    data = json.loads((wan_work / "model.json").read_text())
    assert data["model"]["family"] == "wan" and data["model"]["config"]["diffusers"]["num_layers"] == 3
    assert [u["name"] for u in data["units"]] == ["embed", "block_0", "block_1", "block_2", "final"]
    assert data["geometry"]["model"] == {"frames": 2, "height": 2, "width": 4, "patch_size": [1, 2, 2]}
    assert data["geometry"]["text_length"] == 7 and data["geometry"]["tokens"] == 2 * 1 * 2
    lin = {li["name"]: li for u in data["units"] for li in u["linears"]}
    assert "blocks.1.attn1.to_q" in lin and "proj_out" in lin and "condition_embedder.time_proj" in lin
    assert {u["name"]: [li["name"] for li in u["linears"]] for u in data["units"]}["final"] == ["proj_out"]
    assert data["weights"]["files"] and all(len(v) == 64 for v in data["weights"]["files"].values())
    tr = WanTransformer3DModel.from_pretrained(str(wan_folder / "transformer")).eval()
    for batch in (1, 3):  # the graphs were traced at batch 2
        x, t, y = randn(batch, 4, 2, 2, 4, seed=11 + batch), torch.rand(batch) * 1000, randn(batch, 7, 16, seed=5)
        with torch.no_grad():
            ref = tr(hidden_states=x, timestep=t, encoder_hidden_states=y, return_dict=False)[0]
        got = torch.from_numpy(_ort_chain(wan_work, {"x": x.numpy(), "timestep": t.numpy(), "y": y.numpy()}))
        assert got.shape == ref.shape
        assert rel_err(got, ref) < 1e-5


def test_export_canonical_linears_and_no_batch_constants(wan_work: Path) -> None:
    """Every linear's weight is a named [K, N] initializer; no constant carries the traced batch (diffusers' RoPE
    scatter into empty_like would: the export swaps in ExportWanAttnProcessor)."""
    import onnx

    data = json.loads((wan_work / "model.json").read_text())
    u = next(u for u in data["units"] if u["name"] == "block_1")
    m = onnx.load(str(wan_work / u["onnx"][0]["path"]))
    inits = {i.name: list(i.dims) for i in m.graph.initializer}
    for li in u["linears"]:
        assert inits[f"{li['name']}.weight"] == [li["in_features"], li["out_features"]]
    assert not [n for n in m.graph.node if n.op_type == "ScatterND"]
    assert {n.attribute[0].t.dims[0] for n in m.graph.node if n.op_type == "Constant" and len(n.attribute[0].t.dims) == 4
            and n.attribute[0].t.dims[1] > 1} <= {1}


def test_export_patches_are_exact_and_undone() -> None:
    """The export's RMSNorm / attention processor replacements give diffusers' own block output (fp32) and are put
    back afterwards."""
    from qc_compile.export_diffusers import export_patches
    from qc_compile.models.diffusers_adapter import WanAdapter

    tr = tiny_wan(5)
    a = WanAdapter(tr)
    x = randn(2, 4, 2, 4, 4, seed=1)
    ctx = a.embed({"x": x, "timestep": torch.tensor([100.0, 900.0]), "y": randn(2, 5, 16, seed=2)},
                  a.geometry_of(x))
    procs = [m.processor for m in tr.modules() if hasattr(m, "processor")]
    rms_forward = torch.nn.RMSNorm.forward
    with torch.no_grad():
        ref = a.run_block("block_1", ctx, None)
        with export_patches(tr):
            got = a.run_block("block_1", ctx, None)
            assert type(tr.blocks[0].attn1.processor).__name__ == "ExportWanAttnProcessor"
    assert rel_err(got, ref) < 1e-6
    assert [m.processor for m in tr.modules() if hasattr(m, "processor")] == procs
    assert torch.nn.RMSNorm.forward is rms_forward


def test_qc_ref_wan_folder_export_and_load_for(qrw_folder: Path, tmp_path: Path) -> None:
    from qc_compile.workdir import WorkDir, load_model_for, read_model_info

    work = tmp_path / "w"
    assert run_cli(["export", "qc-ref-wan", "--checkpoint", str(qrw_folder), "-o", str(work), "--quiet"]) == 0
    info = read_model_info(WorkDir(work))
    assert info.is_diffusers and info.family == "wan" and info.text_length == 12
    assert info.video_size == (4, 16, 16) and info.geometry().N == 2 * 8 * 8
    assert info.config().head_dim == 12 and info.config().hidden_size == 24
    loaded = load_model_for(info)
    assert loaded.name == "qc-ref-wan"
    # the weights are checked against model.json: a changed file is refused before it is used
    f = next(qrw_folder.rglob("diffusion_pytorch_model*.safetensors"))
    backup = f.read_bytes()
    try:
        f.write_bytes(backup[:-4] + b"\x00\x00\x80\x3f")
        with pytest.raises(ArtifactError, match="changed since export"):
            load_model_for(info)
    finally:
        f.write_bytes(backup)


def test_export_refuses_bad_input_and_writes_nothing(wan_folder: Path, tmp_path: Path, capsys) -> None:
    work = tmp_path / "w"
    cases = [
        (["--random-weights"], "--random-weights"),
        (["--checkpoint", str(tmp_path)], "--checkpoint"),
        (["--frames", "6"], "1 + 4"),
    ]
    for extra, needle in cases:
        assert run_cli(["export", f"wan2.1:{wan_folder}", "-o", str(work), "--quiet", *extra]) == 2
        err = capsys.readouterr().err
        assert needle in err and "Traceback" not in err
        assert not work.exists()
    assert run_cli(["export", f"wan2.1:{tmp_path / 'nowhere'}", "-o", str(work)]) == 2
    assert "not a folder" in capsys.readouterr().err and not work.exists()
    assert run_cli(["export", "qc-ref", "-o", str(work), "--text-length", "5"]) == 2
    assert "--text-length" in capsys.readouterr().err
    # an image-conditioned Wan transformer is refused with the reason
    i2v = tmp_path / "i2v"
    tiny_wan(1, image_dim=8, added_kv_proj_dim=24).save_pretrained(str(i2v), safe_serialization=True)
    assert run_cli(["export", f"wan2.1:{i2v}", "-o", str(work), "--frames", "5", "--height", "16", "--width", "16",
                    "--quiet"]) == 2
    assert "image-conditioned" in capsys.readouterr().err and not work.exists()


def test_export_force_keeps_other_files_and_refuses_mixing(wan_work: Path, wan_folder: Path, tmp_path: Path,
                                                            capsys) -> None:
    work = tmp_path / "copy"
    shutil.copytree(wan_work, work)
    (work / "notes.txt").write_text("mine")
    before = (work / "model.json").read_bytes()
    assert run_cli(["export", "qc-ref", "-o", str(work), "--quiet"]) == 2  # another model, no --force
    assert "--force" in capsys.readouterr().err and (work / "model.json").read_bytes() == before
    assert run_cli(["export", f"wan2.1:{wan_folder}", "-o", str(work), "--frames", "5", "--height", "16",
                    "--width", "16", "--text-length", "3", "--force", "--quiet"]) == 0
    assert json.loads((work / "model.json").read_text())["geometry"]["text_length"] == 3
    assert (work / "notes.txt").read_text() == "mine"


def test_relative_folder_is_recorded_absolute_and_qc_ref_wan_size_is_its_own(wan_folder: Path, qrw_folder: Path,
                                                                              tmp_path: Path, monkeypatch,
                                                                              capsys) -> None:
    """A work dir is used from other directories: a relative ``wan2.1:PATH`` is recorded resolved (else the model
    would later load from whatever folder of that name the current directory holds); qc-ref-wan exports at its
    folder's own size only (its sampler, calibration and runs use that size)."""
    from qc_compile.workdir import WorkDir, read_model_info

    monkeypatch.chdir(wan_folder.parent)
    work = tmp_path / "rel"
    assert run_cli(["export", f"wan2.1:{wan_folder.name}", "-o", str(work), "--frames", "5", "--height", "16",
                    "--width", "16", "--text-length", "3", "--quiet"]) == 0
    info = read_model_info(WorkDir(work))
    assert info.name == f"wan2.1:{wan_folder.resolve()}" and info.data["weights"]["path"] == str(wan_folder.resolve())
    monkeypatch.chdir(tmp_path)
    assert run_cli(["export", "qc-ref-wan", "--checkpoint", str(qrw_folder), "-o", str(tmp_path / "w8"),
                    "--frames", "8", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "--frames 8" in err and "own size 4x16x16" in err and not (tmp_path / "w8").exists()


def test_model_json_text_length_must_be_positive(wan_work: Path, tmp_path: Path) -> None:
    from qc_compile.workdir import WorkDir, read_model_info

    work = tmp_path / "tl"
    shutil.copytree(wan_work, work)
    data = json.loads((work / "model.json").read_text())
    for bad in (0, True, "7"):
        data["geometry"]["text_length"] = bad
        (work / "model.json").write_text(json.dumps(data))
        with pytest.raises(ArtifactError, match="geometry.text_length"):
            read_model_info(WorkDir(work))


def test_enable_installs_all_transformers_or_none(monkeypatch) -> None:
    """A two-transformer pipeline (Wan 2.2 A14B) whose second transformer fails to install is left as it was."""
    import types

    import qc_compile
    from qc_compile.diffusers_enable import QCSession

    pipe = types.SimpleNamespace(transformer=tiny_wan(1), transformer_2=tiny_wan(2), scheduler=None)
    own = [pipe.transformer.forward, pipe.transformer_2.forward]
    real_install, calls = QCSession.install, []

    def install(self):
        calls.append(self)
        if len(calls) == 2:
            raise RuntimeError("second transformer refused")
        real_install(self)

    monkeypatch.setattr(QCSession, "install", install)
    with pytest.raises(RuntimeError, match="second transformer refused"):
        qc_compile.enable(pipe, policy="none")
    assert len(calls) == 2
    for tr, fwd in zip((pipe.transformer, pipe.transformer_2), own):
        assert getattr(tr, "_qc_session", None) is None and tr.forward == fwd
