"""`qc-compile run` / `generate` / `sweep --model wan2.1:DIR`: a local diffusers WanPipeline folder (a tiny random one
written here with save_pretrained: Wan transformer, Wan VAE, flow-matching scheduler, a random UMT5 encoder and a
word-level tokenizer built offline) through its own pipeline with the transformer under qc_compile.enable. Policy none
is the plain pipeline bit for bit; a caching policy computes fewer unit evaluations; bad folders are one paragraph."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from diffusers_helpers import tiny_wan  # noqa: E402

from cli_helpers import run_cli  # noqa: E402

PROMPT = "a red circle moving right on a black background"
PROMPT2 = "a blue square moving up on a gray background"
WORDS = ("a red green blue yellow circle square triangle moving left right up down on black white gray background "
         "cat walking grass").split()
SIZE = ["--frames", "5", "--height", "32", "--width", "32"]
HLC = ["--set", "hlc.delta1=0.5", "--set", "hlc.delta2=1", "--set", "hlc.tail=0", "--set", "hlc.warmup=1"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(dict.fromkeys(WORDS))}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def tiny_pipeline(seed: int = 0):
    """A WanPipeline of tiny random parts, text encoder and tokenizer included (text_dim 16 = the UMT5's d_model)."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline
    from transformers import UMT5Config, UMT5EncoderModel

    tokenizer = _tokenizer()
    torch.manual_seed(seed)
    text_encoder = UMT5EncoderModel(UMT5Config(
        vocab_size=len(tokenizer), d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
        relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)).eval()
    vae = AutoencoderKLWan(base_dim=3, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True], latents_mean=[0.1, -0.2, 0.0, 0.3],
                           latents_std=[1.5, 0.8, 1.0, 1.2]).eval()
    return WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, transformer=tiny_wan(seed, text_dim=16), vae=vae,
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    from diffusers import WanPipeline

    d = tmp_path_factory.mktemp("wanpipe") / "Wan-tiny-Diffusers"
    tiny_pipeline().save_pretrained(str(d), safe_serialization=True)
    assert not list(d.rglob("*.bin")) and (d / "tokenizer").is_dir()
    back = WanPipeline.from_pretrained(str(d), local_files_only=True, use_safetensors=True)
    assert type(back.text_encoder).__name__ == "UMT5EncoderModel" and back.tokenizer is not None
    return d


def plain(folder: Path, prompts: list[str], seed: int, steps: int, cfg: float = 5.0) -> torch.Tensor:
    """The pipeline's own output (nothing of qc-compile involved), as (n, 3, F, H, W) in [-1, 1]."""
    from diffusers import WanPipeline

    pipe = WanPipeline.from_pretrained(str(folder), local_files_only=True, use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    gens = [torch.Generator().manual_seed(seed + k) for k in range(len(prompts))]
    frames = pipe(prompt=prompts, negative_prompt=[""] * len(prompts), height=32, width=32, num_frames=5,
                  num_inference_steps=steps, guidance_scale=cfg, generator=gens, output_type="pt").frames
    return (frames.float().permute(0, 2, 1, 3, 4) * 2 - 1).clamp(-1, 1)


def test_policy_none_is_the_plain_pipeline_bit_for_bit(folder: Path, tmp_path: Path, capsys) -> None:
    from qc_compile.diffusers_run import load, sample_under_policy
    from qc_compile.video_io import read_video, to_uint8_frames

    spec = f"wan2.1:{folder}"
    loaded = load(spec, None, "cpu", size=dict(frames=5, height=32, width=32))
    assert (loaded.defaults.frames, loaded.defaults.height, loaded.defaults.width) == (5, 32, 32)
    assert loaded.defaults.steps == 50 and loaded.defaults.cfg == 5.0  # the pipeline's own defaults otherwise
    prompts = [PROMPT, PROMPT2]
    ref = plain(folder, prompts, seed=4, steps=3)
    res = sample_under_policy(loaded, prompts, policy="none", seed=4, steps=3)
    assert torch.equal(res.videos, ref) and res.videos.shape == (2, 3, 5, 32, 32)
    assert not torch.equal(res.videos[0], res.videos[1])
    assert res.compute_fraction == 1.0 and len(res.steps) == 3 and res.settings["seeds"] == [4, 5]
    assert getattr(loaded.transformer, "_qc_session", None) is None  # disabled again
    assert not torch.equal(plain(folder, [PROMPT], seed=5, steps=3)[0], ref[0])  # the seed matters

    out = tmp_path / "none"
    rc = run_cli(["run", "--model", spec, "--prompt", PROMPT, "--policy", "none", *SIZE, "--steps", "3", "--seed", "4",
                  "--reference", "--quiet", "-o", str(out)])
    assert rc == 0, capsys.readouterr().err
    written = read_video(out / "video.png")  # the lossless strip: the CLI's video, frame for frame
    alone = plain(folder, [PROMPT], seed=4, steps=3)[0]  # the plain pipeline on this prompt alone
    assert np.array_equal(to_uint8_frames(written), to_uint8_frames(alone))
    assert (out / "video.mp4").stat().st_size > 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["compute_fraction"] == 1.0 and m["reference"]["psnr_db"] == 100.0 and m["reference"]["ssim"] == 1.0
    t = json.loads((out / "trace.json").read_text())
    assert t["model"]["name"] == spec and t["model"]["family"] == "wan2.1" and t["model"]["folder"] == str(folder)
    assert set(t["model"]["files_sha256"]) == {"transformer/diffusion_pytorch_model.safetensors",
                                               "text_encoder/model.safetensors",
                                               "vae/diffusion_pytorch_model.safetensors"}
    assert t["settings"]["frames"] == 5 and t["settings"]["fps"] == 16 and t["settings"]["negative_prompt"] == ""


def test_run_quantcache_computes_less_and_is_measured(folder: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    rc = run_cli(["run", "--model", f"wan2.1:{folder}", "--prompt", PROMPT, "--policy", "quantcache", *HLC, *SIZE,
                  "--steps", "6", "--cfg", "4", "--reference", "--quiet", "-o", str(out)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    for name in ("video.mp4", "video.png", "trace.json", "metrics.json", "decisions.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    m = json.loads((out / "metrics.json").read_text())
    assert 0 < m["compute_fraction"] < 1 and 0 < m["flop_fraction"] < 1 and m["steps"] == 6
    assert 0 < m["reference"]["psnr_db"] < 100 and 0 < m["reference"]["ssim"] <= 1
    t = json.loads((out / "trace.json").read_text())
    assert t["settings"]["cfg"] == 4.0 and t["units"] == ["embed", "block_0", "block_1", "block_2", "final"]
    assert t["compute_fraction"] == t["session"]["compute_fraction"] and t["settings"]["driver"] == "qc_compile.enable"
    assert "quantcache: " in captured.out and "vs FP: PSNR" in captured.out


def test_generate_writes_mp4_and_png(folder: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "a.mp4"
    rc = run_cli(["generate", "--model", f"wan2.1:{folder}", "--prompt", PROMPT, *SIZE, "--steps", "2",
                  "--negative-prompt", "gray", "--quiet", "-o", str(out)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert out.stat().st_size > 0 and out.with_suffix(".png").stat().st_size > 0
    assert "1 video(s), 2 steps, cfg 5.0, seed 0, 5x32x32" in captured.out
    assert "Loading pipeline components" not in captured.err  # --quiet: no diffusers loading bars either


def test_sweep_pipeline_folder(folder: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "sweep"
    rc = run_cli(["sweep", "--model", f"wan2.1:{folder}", "--policies", "none,quantcache", *HLC, *SIZE, "--prompts",
                  "1", "--seeds", "0", "--steps", "6", "-o", str(out)])
    assert rc == 0, capsys.readouterr().err
    res = json.loads((out / "sweep.json").read_text())
    rows = {r["config"]: r for r in res["rows"]}
    assert rows["none"]["psnr_db"] == 100.0 and rows["none"]["compute_fraction"] == 1.0
    assert 0 < rows["quantcache"]["compute_fraction"] < 1 and (out / "pareto.png").stat().st_size > 0


def _refused(args: list[str], capsys, *needles: str) -> str:
    assert run_cli(args) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().count("\n") == 0, err  # one paragraph
    for n in needles:
        assert n in err, (n, err)
    return err


def test_bad_folders_are_one_paragraph(folder: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    run = ["run", "--prompt", PROMPT, "-o", str(out), "--model"]
    _refused([*run, f"wan2.1:{tmp_path / 'missing'}"], capsys, "is not a folder", "WanPipeline")
    _refused([*run, "wan2.1:"], capsys, "give the local diffusers model folder")

    pickled = tmp_path / "pickled"
    shutil.copytree(folder, pickled)
    for f in (pickled / "transformer").glob("*.safetensors"):
        torch.save({}, f.with_suffix(".bin"))  # never read: the check looks at names only
        f.unlink()
    _refused([*run, f"wan2.1:{pickled}"], capsys, "never unpickles", str(pickled / "transformer"))

    _refused([*run, f"wan2.1:{folder / 'transformer'}"], capsys, "WanTransformer3DModel folder only",
             "text_encoder", "VAE")

    no_text = tmp_path / "no_text"
    shutil.copytree(folder, no_text)
    index = json.loads((no_text / "model_index.json").read_text())
    (no_text / "model_index.json").write_text(json.dumps({**index, "text_encoder": [None, None]}))
    _refused([*run, f"wan2.1:{no_text}"], capsys, "no text_encoder component", "model_index.json")

    other = tmp_path / "other"
    shutil.copytree(folder, other)
    (other / "model_index.json").write_text(json.dumps({**index, "_class_name": "WanImageToVideoPipeline"}))
    _refused([*run, f"wan2.1:{other}"], capsys, "_class_name 'WanImageToVideoPipeline'", "'WanPipeline'")

    _refused([*run, f"wan2.1:{folder}", "--frames", "6"], capsys, "--frames 6", "multiple of 4")
    _refused([*run, f"wan2.1:{folder}", "--checkpoint", str(folder)], capsys, "--checkpoint")
    _refused([*run, f"wan2.1:{folder}", "--executor", "onnxruntime"], capsys, "--executor onnxruntime")
    _refused(["run", str(tmp_path / "work"), "--model", f"wan2.1:{folder}", "--prompt", PROMPT, "-o", str(out)],
             capsys, "diffusers video transformer", "wan2.1:PATH")
    _refused(["run", "--model", "qc-ref", "--negative-prompt", "x", "--prompt", PROMPT, "-o", str(out)], capsys,
             "--negative-prompt")
    assert not out.exists()
