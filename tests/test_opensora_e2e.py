"""Open-Sora 1.2 from its three files to an mp4 on tiny random weights of the real architectures:
prompt -> Open-Sora's prompt conventions -> T5 (transformers, local folder) -> STDiT3 (RFLOW, CFG with the learned
null caption) -> VAE (SD-XL AutoencoderKL + causal temporal VAE) -> mp4 at the model's fps; plus the verbs' errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from qc_compile.cli import main
from qc_compile.models.config import STDiT3Config

TINY_DIT = STDiT3Config(name="opensora-v1.2", hidden_size=32, depth=1, num_heads=2, caption_channels=32,
                        default_frames=17, default_height=32, default_width=48, default_steps=3)
PROMPT = "A cat playing the piano in a sunny room."


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """The three checkpoints a user has, made tiny: DiT .safetensors, T5 folder, OpenSora-VAE folder."""
    from qc_compile.models.checkpoint import save_checkpoint
    from qc_compile.models.opensora_random import random_vae, save_random_t5
    from qc_compile.models.opensora_vae import save_vae
    from qc_compile.models.stdit3 import STDiT3

    d = tmp_path_factory.mktemp("opensora")
    torch.manual_seed(0)
    save_checkpoint(d / "dit.safetensors", STDiT3(TINY_DIT), TINY_DIT, dtype=torch.float32)
    save_random_t5(d / "t5")
    (d / "vae").mkdir()
    save_vae(d / "vae" / "model.safetensors", random_vae())
    return {"dit": d / "dit.safetensors", "t5": d / "t5", "vae": d / "vae"}


def run_cli(args: list[str], capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as e:
        main(args)
    return e.value.code, capsys.readouterr().err


def _gen(files, out: Path, *extra: str) -> list[str]:
    return ["generate", "--model", "opensora-v1.2", "--checkpoint", str(files["dit"]), "--text-encoder",
            str(files["t5"]), "--vae", str(files["vae"]), "-p", PROMPT, "-o", str(out), "--quiet", *extra]


def test_prompt_to_mp4(files, tmp_path, capsys):
    """Defaults of the tiny model (17 frames, 32x48, 3 steps): the mp4 has every frame at full size and 24 fps,
    and the caption cache makes a second run skip T5 and give the same video."""
    from qc_compile.video_io import read_video

    out, cache = tmp_path / "v.mp4", tmp_path / "captions.safetensors"
    main(_gen(files, out, "--caption-cache", str(cache)))
    video = read_video(out, size=(32, 48))
    assert video.shape == (3, 17, 32, 48)
    assert float(video.std()) > 0.01  # random weights: not a constant frame
    import imageio_ffmpeg

    assert imageio_ffmpeg.count_frames_and_secs(str(out))[0] == 17
    meta = next(imageio_ffmpeg.read_frames(str(out)))
    assert meta["fps"] == pytest.approx(24) and tuple(meta["size"]) == (48, 32)
    assert cache.is_file()
    out2 = tmp_path / "v2.mp4"
    main(_gen(files, out2, "--caption-cache", str(cache)))
    assert torch.equal(read_video(out2, size=(32, 48)), video)


def test_generate_matches_library_path(files):
    """The CLI's pieces composed by hand: prompt features come from T5 on Open-Sora's processed text, the video is
    the VAE decode of the sampled latent (n, 4, 5, 4, 6)."""
    from qc_compile.models import load_model
    from qc_compile.models.opensora_parts import attach_opensora_parts
    from qc_compile.runtime.generation import GenerationSettings, generate

    loaded = load_model("opensora-v1.2", files["dit"])
    vae = attach_opensora_parts(loaded, text_encoder=files["t5"], vae=files["vae"])
    enc = loaded.prompt_encoder
    assert enc.texts([PROMPT]) == ["a cat playing the piano in a sunny room. aesthetic score: 6.5."]
    y, mask = loaded.encode_prompts([PROMPT])
    y_ref, m_ref = enc.t5.encode(enc.texts([PROMPT]))
    assert y.shape == (1, 1, 300, 32) and torch.equal(y, y_ref.float()) and torch.equal(mask, m_ref)
    assert 5 < int(mask.sum()) < 300  # EOS included, padding masked
    s = GenerationSettings.defaults(loaded, steps=2)
    z, _ = generate(loaded, [PROMPT], s, progress=False)
    assert z.shape == (1, 4, 5, 4, 6)
    video = vae.decode(z, num_frames=17)
    assert video.shape == (1, 3, 17, 32, 48) and torch.isfinite(video).all()


def test_missing_parts_name_the_option(files, tmp_path, capsys):
    base = ["generate", "--model", "opensora-v1.2", "--checkpoint", str(files["dit"]), "-p", PROMPT, "-o",
            str(tmp_path / "x.mp4")]
    code, err = run_cli(base + ["--vae", str(files["vae"])], capsys)
    assert code == 2 and "--text-encoder" in err and "Traceback" not in err
    code, err = run_cli(base + ["--text-encoder", str(files["t5"])], capsys)
    assert code == 2 and "--vae" in err and "OpenSora-VAE-v1.2" in err
    code, err = run_cli(base + ["--text-encoder", str(tmp_path / "no_t5"), "--vae", str(files["vae"])], capsys)
    assert code == 2 and "no_t5" in err and "not a folder" in err
    code, err = run_cli(["generate", "-p", "a red circle moving right on a black background", "--vae",
                         str(files["vae"]), "-o", str(tmp_path / "x.mp4")], capsys)
    assert code == 2 and "pixel space" in err


def test_wrong_files_name_the_file_and_expected_keys(files, tmp_path, capsys):
    """The DiT checkpoint passed as --vae; a VAE file passed as the T5 folder's weights; a non-T5 config."""
    base = ["generate", "--model", "opensora-v1.2", "--checkpoint", str(files["dit"]), "-p", PROMPT, "-o",
            str(tmp_path / "x.mp4")]
    code, err = run_cli(base + ["--text-encoder", str(files["t5"]), "--vae", str(files["dit"])], capsys)
    assert code == 2 and str(files["dit"]) in err and "spatial_vae.module" in err and "temporal_vae" in err
    assert "DiT checkpoint" in err
    import shutil

    bad = tmp_path / "bad_t5"
    shutil.copytree(files["t5"], bad)  # a complete folder whose config is then made wrong
    (bad / "config.json").write_text('{"model_type": "bert", "d_model": 32}')
    code, err = run_cli(base + ["--text-encoder", str(bad), "--vae", str(files["vae"])], capsys)
    assert code == 2 and "config.json" in err and "'t5'" in err
    (bad / "config.json").write_text('{"model_type": "t5", "d_model": 64}')
    code, err = run_cli(base + ["--text-encoder", str(bad), "--vae", str(files["vae"])], capsys)
    assert code == 2 and "d_model is 64" in err
    (bad / "config.json").write_text('{"model_type": "t5", "d_model": 32}')
    for f in bad.glob("*.safetensors"):  # pickled weights only
        f.unlink()
    (bad / "pytorch_model.bin").write_bytes(b"\x80\x02")
    code, err = run_cli(base + ["--text-encoder", str(bad), "--vae", str(files["vae"])], capsys)
    assert code == 2 and "pytorch_model.bin" in err and "safetensors" in err


def test_calibrate_through_t5(files, tmp_path, capsys):
    """calibrate refuses opensora-v1.2 without --text-encoder (naming the option) and calibrates with it, on the
    built-in prompts through Open-Sora's conventions and T5, filling the caption cache."""
    import json

    work, cache = tmp_path / "work", tmp_path / "captions.safetensors"
    main(["export", "opensora-v1.2", "-o", str(work), "--checkpoint", str(files["dit"]), "--frames", "17", "--height",
          "32", "--width", "48", "--quiet"])
    code, err = run_cli(["calibrate", str(work), "--uniform", "fp8", "--steps", "2"], capsys)
    assert code == 2 and "--text-encoder" in err and "Traceback" not in err
    main(["calibrate", str(work), "--uniform", "fp8", "--steps", "2", "--num-prompts", "2", "--text-encoder",
          str(files["t5"]), "--caption-cache", str(cache), "--quiet"])
    ranges = json.loads((work / "calib" / "ranges.json").read_text())
    assert len(ranges["calibration"]["prompts"]) == 2
    assert all(r["amax"] > 0 for r in ranges["ranges"].values())
    assert (work / "plan.json").is_file()
    from qc_compile.models.text_cache import CaptionCache

    assert len(CaptionCache(cache)) == 2


def test_bench_request_cpu_smoke(tmp_path):
    """tools/bench_request.py at tiny size on the CPU: every phase timed, the decoded video has the request's shape."""
    import json
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    import bench_request

    out = tmp_path / "req.json"
    assert bench_request.main(["--tiny", "--device", "cpu", "--steps", "6", "--rows", "plain_bf16_eager,ours_headline",
                               "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    rows = {r["row"]: r for r in doc["rows"]}
    assert set(rows) == {"plain_bf16_eager", "ours_headline"}
    for row in rows.values():
        assert "error" not in row and row["finite"], row
        assert all(row[k] > 0 for k in ("t5_s", "dit_s", "vae_s")) and row["video_shape"] == [1, 3, 17, 32, 48]
    assert rows["plain_bf16_eager"]["compute_fraction"] == 1.0
    assert rows["ours_headline"]["compute_fraction"] < 1.0  # the replayed quantcache decisions skip units
    assert doc["env"]["commit"] and "latent 4x5x4x6" in doc["what"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_prompt_to_mp4_on_gpu_bf16(files, tmp_path):
    """The same request on CUDA: DiT and VAE in bf16 (--dtype auto), T5 in bf16; the video is finite and full size."""
    from qc_compile.video_io import read_video

    out = tmp_path / "g.mp4"
    main(_gen(files, out, "--device", "cuda"))
    video = read_video(out, size=(32, 48))
    assert video.shape == (3, 17, 32, 48) and float(video.std()) > 0.01


def test_run_with_a_policy_decodes_and_compares_frames(files, tmp_path, capsys):
    """`run` on opensora-v1.2 with T5 and the VAE: the run dir holds full-size decoded frames at the model's fps, the
    trace its decisions, and --reference compares *decoded* frames (PSNR finite, below identity: hlc reuses)."""
    import json

    from qc_compile.video_io import read_video

    out = tmp_path / "run"
    main(["run", "--model", "opensora-v1.2", "--checkpoint", str(files["dit"]), "--text-encoder", str(files["t5"]),
          "--vae", str(files["vae"]), "-p", PROMPT, "--policy", "hlc", "--steps", "8",
          "--reference", "-o", str(out), "--quiet"])
    video = read_video(out / "video.mp4", size=(32, 48))
    assert video.shape == (3, 17, 32, 48) and float(video.std()) > 0.01
    m = json.loads((out / "metrics.json").read_text())
    assert m["compute_fraction"] < 1.0  # the policy reused something
    psnr = m["reference"]["psnr_db"]
    assert 0 < psnr < 200, psnr
    trace = json.loads((out / "trace.json").read_text())
    assert trace["decoded"].startswith("latents decoded")


def test_run_without_the_parts_names_the_option(files, tmp_path, capsys):
    code, err = run_cli(["run", "--model", "opensora-v1.2", "--checkpoint", str(files["dit"]), "-p", PROMPT,
                         "-o", str(tmp_path / "r"), "--quiet"], capsys)
    assert code == 2 and "--text-encoder" in err and "Traceback" not in err


def test_sweep_compares_decoded_frames(files, tmp_path, capsys):
    """`sweep` on opensora-v1.2 with T5 + VAE: one row per policy, PSNR of decoded frames against the FP run."""
    import json

    out = tmp_path / "sweep"
    main(["sweep", "--model", "opensora-v1.2", "--checkpoint", str(files["dit"]), "--text-encoder", str(files["t5"]),
          "--vae", str(files["vae"]), "--policies", "none,hlc", "--prompts", "1", "--steps", "8", "-o", str(out)])
    doc = json.loads((out / "sweep.json").read_text())
    rows = {r["config"]: r for r in doc["rows"]}
    assert rows["none"]["compute_fraction"] == 1.0 and rows["hlc"]["compute_fraction"] < 1.0
    assert rows["none"]["psnr_db"] >= 100  # policy none (identical: PSNR capped at 100) reproduces the FP frames
    assert rows["hlc"]["psnr_db"] < rows["none"]["psnr_db"]
    code, err = run_cli(["sweep", "--model", "opensora-v1.2", "--checkpoint", str(files["dit"]), "--text-encoder",
                         str(files["t5"]), "--vae", str(files["vae"]), "--policies", "hlc", "--jobs", "2", "-o",
                         str(tmp_path / "s2")],
                        capsys)
    assert code == 2 and "--jobs 2" in err
