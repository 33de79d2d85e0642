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
