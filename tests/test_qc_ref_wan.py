"""qc-ref-wan: diffusers-layout folder round trip, WanPipeline-style sampling, the training and eval tools."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

from qc_compile.errors import ArtifactError, UserError  # noqa: E402
from qc_compile.models import load_model  # noqa: E402
from qc_compile.models import qc_ref_wan as qrw  # noqa: E402

TINY = {"num_attention_heads": 2, "attention_head_dim": 12, "ffn_dim": 32, "num_layers": 2, "freq_dim": 32}
SMALL = qrw.SamplingDefaults(frames=4, height=8, width=8, steps=3, cfg=3.0, shift=4.0)


def _tiny_folder(tmp_path: Path, defaults: qrw.SamplingDefaults = SMALL, **config) -> Path:
    """A qc-ref-wan folder with a tiny random transformer (weights moved off the init)."""
    torch.manual_seed(0)
    tr = qrw.build_transformer({**qrw.TRANSFORMER_CONFIG, **TINY, **config})
    with torch.no_grad():
        for p in tr.parameters():  # off the zero init, so outputs depend on the weights
            p.add_(0.05 * torch.randn_like(p))
    return qrw.save_qc_ref_wan(tmp_path / "qc_ref_wan", tr, qrw.build_text_encoder(), defaults=defaults,
                               provenance={"test": True})


def test_folder_round_trip_and_diffusers_layout(tmp_path):
    folder = _tiny_folder(tmp_path)
    loaded = load_model("qc-ref-wan", checkpoint=folder)
    assert loaded.defaults == SMALL and loaded.transformer.config.in_channels == 4
    assert json.loads((folder / "transformer" / "config.json").read_text())["_class_name"] == "WanTransformer3DModel"
    assert json.loads((folder / "scheduler" / "scheduler_config.json").read_text())["shift"] == 4.0
    from diffusers import WanTransformer3DModel
    from diffusers.utils import is_accelerate_available

    if is_accelerate_available():  # diffusers' own loader (it needs accelerate for Wan; the models extra has it)
        tr = WanTransformer3DModel.from_pretrained(str(folder / "transformer"))
        for (k, a), (_, b) in zip(tr.state_dict().items(), loaded.transformer.state_dict().items()):
            assert torch.equal(a, b), k


def test_checked_on_load(tmp_path):
    folder = _tiny_folder(tmp_path)
    w = folder / "text_encoder.safetensors"
    w.write_bytes(w.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(ArtifactError, match="sha256"):
        load_model("qc-ref-wan", checkpoint=folder)
    with pytest.raises(UserError, match="not found"):
        load_model("qc-ref-wan", checkpoint=tmp_path / "nowhere")


@torch.no_grad()
def test_sampling_is_seeded_and_cfg_is_two_branch_calls(tmp_path):
    loaded = load_model("qc-ref-wan", checkpoint=_tiny_folder(tmp_path))
    caps = ["a red circle moving left on a black background", "a blue square moving up on a gray background"]
    seen = []
    orig = loaded.transformer.cache_context

    def spy(name, **kw):
        seen.append((name, kw["step_index"]))
        return orig(name, **kw)

    loaded.transformer.cache_context = spy
    a = loaded.sample(caps, seed=5)
    del loaded.transformer.cache_context
    b = loaded.sample(caps[1:], seed=6)  # caption k uses seed + k, whatever the batch
    assert a.shape == (2, 3, 4, 8, 8) and a.abs().max() <= 1
    assert torch.allclose(a[1:], b, atol=1e-5)
    assert seen == [(n, i) for i in range(3) for n in ("cond", "uncond")]
    y, null = loaded.encode_prompts(caps[:1]), loaded.null_captions(1)
    assert y.shape == (1, 12, 64) and float(null[0, 1:].abs().sum()) == 0.0  # padding zeroed as WanPipeline does


@pytest.mark.slow
def test_training_tool_runs_and_writes_a_loadable_folder(tmp_path):
    import train_reference_wan

    cfg = tmp_path / "tiny.json"
    cfg.write_text(json.dumps(TINY))
    out = tmp_path / "run"
    rc = train_reference_wan.main(["--out", str(out), "--max-steps", "3", "--batch", "2", "--warmup", "1",
                                   "--log-every", "1", "--config", str(cfg)])
    assert rc == 0
    log = json.loads((out / "train_log.json").read_text())
    assert [s for s, _ in log["losses"]] == [0, 1, 2] and log["runs"][-1]["steps_end"] == 3
    loaded = load_model("qc-ref-wan", checkpoint=out / "qc_ref_wan")
    assert loaded.meta["provenance"]["train_steps"] == 3
    rc = train_reference_wan.main(["--out", str(tmp_path / "run2"), "--resume", str(out), "--max-steps", "1",
                                   "--batch", "2", "--config", str(cfg)])
    assert rc == 0 and json.loads((tmp_path / "run2" / "train_log.json").read_text())["runs"][-1]["steps_end"] == 4


def test_eval_tool_on_a_tiny_folder(tmp_path):
    import eval_reference_wan

    folder = _tiny_folder(tmp_path)
    out = tmp_path / "eval.json"
    assert eval_reference_wan.main(["--checkpoint", str(folder), "--n", "2", "--device", "cpu", "--json", str(out),
                                    "--steps", "2"]) == 0
    rep = json.loads(out.read_text())
    assert rep["summary"]["n"] == 2 and rep["caption_seed"] == 20261122 and len(rep["results"]) == 2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_shipped_qc_ref_wan_passes_the_checker_on_held_out_captions():
    """The issue's bar at the shipped defaults: >= 90% on colour, shape and direction (32 held-out captions)."""
    if not (qrw.ASSET_DIR / qrw.META_FILE).is_file():
        pytest.skip("qc-ref-wan weights are not shipped in this checkout yet")
    import eval_reference_wan
    from qc_compile.data.shapes import sample_captions

    loaded = load_model("qc-ref-wan", device="cuda")
    caps = [c.text() for c in sample_captions(32, seed=eval_reference_wan.EVAL_SEED)]
    _, s, _ = eval_reference_wan.evaluate(loaded, caps, seed=0, steps=None, cfg=None, shift=None, batch=32)
    assert s["color"] >= 0.9 and s["shape"] >= 0.9 and s["direction"] >= 0.9, s


@torch.no_grad()
def test_enable_on_the_qc_ref_wan_sampler(tmp_path):
    """qc_compile.enable on the transformer under the WanPipeline-style loop: policy none changes nothing, a
    caching policy computes fewer blocks; the batched-CFG mode gives the same videos as two calls per step."""
    import qc_compile

    loaded = load_model("qc-ref-wan", checkpoint=_tiny_folder(tmp_path, qrw.SamplingDefaults(
        frames=4, height=8, width=8, steps=10, cfg=3.0), num_layers=3))
    caps = ["a red circle moving left on a black background"]
    ref = loaded.sample(caps, seed=1)
    assert torch.allclose(loaded.sample(caps, seed=1, cfg_batched=True), ref, atol=1e-5)
    session = qc_compile.enable(loaded.transformer, policy="none")
    assert torch.equal(loaded.sample(caps, seed=1), ref)
    qc_compile.disable(loaded.transformer)
    session = qc_compile.enable(loaded.transformer, policy="fbcache", overrides={"threshold": 1.0})
    out = loaded.sample(caps, seed=1)
    qc_compile.disable(loaded.transformer)
    assert session.compute_fraction < 1.0 and not torch.equal(out, ref)
    assert len(session.steps) == 10 and session.runs == 1


def _readme_block(marker: str) -> str:
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    blocks = text.split("```python\n")[1:]
    found = [b.split("```", 1)[0] for b in blocks if marker in b]
    assert len(found) == 1, f"README has {len(found)} python blocks with {marker!r}"
    return found[0]


@pytest.mark.slow
def test_readme_enable_example_on_the_shipped_qc_ref_wan():
    """The README's qc-ref-wan example, verbatim (needs the shipped weights; about 90 s on 2 CPU cores)."""
    code = _readme_block('load_model("qc-ref-wan")')
    if not (qrw.ASSET_DIR / qrw.META_FILE).is_file():
        pytest.skip("qc-ref-wan weights are not shipped in this checkout yet")
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert scope["videos"].shape == (1, 3, 16, 32, 32) and 0 < scope["session"].compute_fraction <= 1


@pytest.mark.slow  # bf16 kernels are slow on CPU (about 25 s)
@torch.no_grad()
def test_bf16_load_keeps_diffusers_fp32_modules_and_samples(tmp_path):
    """Loaded in bf16, diffusers keeps Wan's scale/shift tables and norms in fp32: the sampler and the adapter take
    the compute dtype from the linears, and the sub-block path (bf16 gates) runs."""
    import qc_compile

    loaded = load_model("qc-ref-wan", checkpoint=_tiny_folder(tmp_path, num_layers=3), dtype=torch.bfloat16)
    assert loaded.transformer.scale_shift_table.dtype == torch.float32 and loaded.model.dtype == torch.bfloat16
    ref = loaded.sample(["a red circle moving left on a black background"], seed=0)
    qc_compile.enable(loaded.transformer, policy="fora")
    out = loaded.sample(["a red circle moving left on a black background"], seed=0)
    qc_compile.disable(loaded.transformer)
    assert torch.isfinite(out).all() and out.shape == ref.shape


def _record_inputs(transformer, into: list) -> None:
    """Record (hidden_states, timestep) of every transformer call."""

    def hook(_mod, args, kwargs):
        hs = kwargs.get("hidden_states", args[0] if args else None)
        ts = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        into.append((hs.detach().float().clone(), ts.detach().float().clone()))

    transformer.register_forward_pre_hook(hook, with_kwargs=True)


def test_training_and_sampling_feed_the_transformer_alike(tmp_path, monkeypatch):
    """The direction-at-chance hypotheses of issue 16: the frame-position channel (channel 3, rising from -1 at frame
    0 to 1 at the last frame, the same in every batch row and CFG branch) and timestep = σ·1000 must reach the
    transformer identically from the trainer and from the sampler."""
    import train_reference_wan

    frames = qrw.SamplingDefaults().frames
    ramp = torch.linspace(-1.0, 1.0, frames).view(1, frames, 1, 1)
    trained: list = []
    build = qrw.build_transformer

    def recording_build(config=None):
        tr = build(config)
        _record_inputs(tr, trained)
        return tr

    monkeypatch.setattr(train_reference_wan.qrw, "build_transformer", recording_build)
    cfg = tmp_path / "tiny.json"
    cfg.write_text(json.dumps(TINY))
    assert train_reference_wan.main(["--out", str(tmp_path / "run"), "--max-steps", "1", "--batch", "2",
                                     "--warmup", "1", "--config", str(cfg)]) == 0
    (hs, ts), = trained
    assert hs.shape == (2, 4, frames, 32, 32)
    assert torch.equal(hs[:, 3], ramp.expand(2, frames, 32, 32))  # frame channel, frames on dim 2
    assert ts.shape == (2,) and bool(((ts > 0) & (ts < 1000)).all())  # σ·1000 per row

    monkeypatch.undo()
    loaded = load_model("qc-ref-wan", checkpoint=_tiny_folder(tmp_path))
    sampled: list = []
    _record_inputs(loaded.transformer, sampled)
    z0 = loaded.sample(["a red circle moving left on a black background"], seed=3, steps=2)
    d = loaded.defaults
    sched = qrw.flow_scheduler(d.shift)
    sched.set_timesteps(2)
    assert len(sampled) == 4  # cond + uncond per step
    sr = torch.linspace(-1.0, 1.0, d.frames).view(1, d.frames, 1, 1).expand(1, d.frames, d.height, d.width)
    for k, (hs, ts) in enumerate(sampled):
        assert hs.shape == (1, 4, d.frames, d.height, d.width) and torch.equal(hs[:, 3], sr)
        assert torch.allclose(ts, sched.sigmas[k // 2] * 1000)
    from qc_compile.runtime.sampler import noise

    assert torch.equal(sampled[0][0][:, :3], noise((1, 3, d.frames, d.height, d.width), 3))  # the start: pure noise
    assert z0.shape == (1, 3, d.frames, d.height, d.width)


def test_init_from_starts_a_run_from_a_folders_weights(tmp_path):
    """``--init-from`` (a further training stage with a fresh schedule): at lr 0 the written folder's weights are
    exactly the source folder's."""
    import train_reference_wan

    src = _tiny_folder(tmp_path)
    cfg = tmp_path / "tiny.json"
    cfg.write_text(json.dumps(TINY))
    out = tmp_path / "stage2"
    assert train_reference_wan.main(["--out", str(out), "--init-from", str(src), "--max-steps", "1", "--batch", "2",
                                     "--lr", "0", "--warmup", "1", "--config", str(cfg)]) == 0
    a, b = load_model("qc-ref-wan", checkpoint=src), load_model("qc-ref-wan", checkpoint=out / "qc_ref_wan")
    for x, y in ((a.transformer, b.transformer), (a.text_encoder, b.text_encoder)):
        sx, sy = x.state_dict(), y.state_dict()
        assert sx.keys() == sy.keys() and all(torch.equal(sx[k], sy[k]) for k in sx)
    assert b.meta["provenance"]["init_from"]["folder"] == str(src)
    with pytest.raises(UserError, match="config differs"):
        train_reference_wan.main(["--out", str(tmp_path / "bad"), "--init-from", str(src), "--max-steps", "1",
                                  "--batch", "2"])


def test_diagnose_tool_on_a_tiny_folder(tmp_path):
    import diagnose_qc_ref_wan

    folder = _tiny_folder(tmp_path, defaults=qrw.SamplingDefaults(frames=8, height=16, width=16, steps=2))
    out = tmp_path / "diag.json"
    assert diagnose_qc_ref_wan.main(["--checkpoint", str(folder), "--n", "2", "--device", "cpu",
                                     "--json", str(out)]) == 0
    rep = json.loads(out.read_text())
    assert rep["checker_ground_truth"] == {"color": 1.0, "shape": 1.0, "direction": 1.0, "background": 1.0}
    sens = rep["caption_sensitivity"]
    assert set(sens) == {"color", "shape", "direction"} and all(v > 0 for v in sens.values())  # random weights
    assert rep["time_flip"] > 0 and sum(rep["direction_from_noise"]["read_directions"].values()) == 8


def test_train_init_from_a_missing_folder_is_a_clear_error(tmp_path) -> None:
    """A bad --init-from is one paragraph on stderr and exit 2, not a traceback."""
    import subprocess

    tool = Path(__file__).resolve().parents[1] / "tools" / "train_reference_wan.py"
    r = subprocess.run([sys.executable, str(tool), "--out", str(tmp_path / "o"), "--init-from",
                        str(tmp_path / "missing"), "--max-steps", "1", "--batch", "2"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.startswith("error:") and "missing" in r.stderr
