"""Open-Sora 1.2's VAE, T5 prompt conventions and caption cache, on tiny random weights of the real architectures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from qc_compile.errors import UserError

KEYS = Path(__file__).parent / "data" / "opensora_vae_v12_keys.json"


def test_vae_state_dict_matches_open_sora_table():
    """Every key and shape of the v1.2 VAE equals the table written from Open-Sora's own source (517 tensors)."""
    from qc_compile.models.opensora_vae import VideoAutoencoderPipeline

    ref = json.loads(KEYS.read_text())
    with torch.device("meta"):
        vae = VideoAutoencoderPipeline()
    ours = {k: list(v.shape) for k, v in vae.state_dict().items()}
    assert ours == ref["keys"] and ref["num_tensors"] == 517


@pytest.mark.parametrize("frames,height,width,latent", [(51, 480, 854, (15, 60, 106)), (51, 240, 426, (15, 30, 53)),
                                                        (102, 720, 1280, (30, 90, 160)), (1, 480, 854, (1, 60, 106)),
                                                        (17, 64, 64, (5, 8, 8)), (20, 64, 64, (6, 8, 8))])
def test_latent_size_formula_and_dit_geometry_agree(frames, height, width, latent):
    """51 frames at 480p <-> latent 4 x 15 x 60 x 106, by Open-Sora's formula and by running the full-size temporal
    VAE's encoder/decoder on the meta device (shapes only)."""
    from qc_compile.models.config import OPENSORA_V12
    from qc_compile.models.opensora_vae import OPENSORA_VAE_V12, TemporalVAE
    from qc_compile.models.stdit3 import Geometry

    assert OPENSORA_VAE_V12.latent_size(frames, height, width) == latent
    g = Geometry.for_model(OPENSORA_V12, frames, height, width)
    assert (g.frames, g.height, g.width) == latent
    with torch.device("meta"):
        tv = TemporalVAE(OPENSORA_VAE_V12.temporal)
        h, w = height // 8, width // 8
        x_z = torch.empty(1, 4, frames, h, w)
        t = sum(tv.encode(x_z[:, :, i:i + 17], sample=False, generator=None).shape[2] for i in range(0, frames, 17))
        assert t == latent[0]
        z = torch.empty(1, 4, 5, h, w)
        assert tv.decode(z, num_frames=17).shape == (1, 4, 17, h, w)


def test_tiny_vae_round_trip_shapes_and_chunked_decode(tmp_path):
    """Encode 51 frames -> (4, 15, h/8, w/8), decode back to 51 frames; save/load in the released layout keeps the
    weights; decoding chunk by chunk equals decoding each 17-frame chunk on its own (bounded memory, same result)."""
    from qc_compile.models.opensora_random import random_vae
    from qc_compile.models.opensora_vae import load_vae, save_vae

    vae = random_vae()
    x = torch.rand(1, 3, 51, 32, 48) * 2 - 1
    z = vae.encode(x, generator=torch.Generator().manual_seed(0))
    assert z.shape == (1, 4, 15, 4, 6)
    assert not torch.equal(z, vae.encode(x, sample=False))  # sampling draws from the posteriors, as Open-Sora does
    video = vae.decode(z, num_frames=51)
    assert video.shape == (1, 3, 51, 32, 48) and torch.isfinite(video).all()
    parts = torch.cat([vae.decode(z[:, :, i:i + 5], num_frames=17) for i in range(0, 15, 5)], dim=2)
    torch.testing.assert_close(video, parts, rtol=0, atol=0)
    save_vae(tmp_path / "model.safetensors", vae)
    again = load_vae(tmp_path)
    assert torch.equal(again.decode(z, num_frames=51), video)


def test_vae_decode_denormalises_with_scale_and_shift():
    """decode(z) == spatial(temporal(z * scale + shift)): the latent normalisation of Open-Sora 1.2."""
    from qc_compile.models.opensora_random import random_vae

    vae = random_vae().double()
    z = torch.randn(1, 4, 5, 4, 6, dtype=torch.float64)
    x_z = vae.temporal_vae.decode(z * vae.scale + vae.shift, num_frames=17)
    frames = x_z.transpose(1, 2).reshape(17, 4, 4, 6)
    ref = vae.spatial_vae.module.decode(frames / 0.18215).sample.reshape(1, 17, 3, 32, 48).transpose(1, 2)
    torch.testing.assert_close(vae.decode(z, num_frames=17, out_dtype=torch.float64), ref, rtol=1e-10, atol=1e-10)
    assert vae.scale.flatten().tolist() == pytest.approx([3.85, 2.32, 2.33, 3.06])
    assert vae.shift.flatten().tolist() == pytest.approx([-0.10, 0.34, 0.27, 0.98])


def test_vae_file_errors_name_file_and_keys(tmp_path):
    from safetensors.torch import save_file

    from qc_compile.models.opensora_vae import load_vae

    with pytest.raises(UserError, match="no model.safetensors"):
        load_vae(tmp_path)
    save_file({"encoder.down_blocks.0.resnets.0.conv1.weight": torch.zeros(1)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(UserError) as e:
        load_vae(tmp_path / "model.safetensors")
    msg = str(e.value)
    assert "model.safetensors" in msg and "spatial_vae.module" in msg and "517 tensors" in msg and "SD-XL" in msg


def test_prompt_conventions():
    from qc_compile.models.opensora_prompts import append_scores, preprocess

    assert append_scores("a cat") == "a cat aesthetic score: 6.5."
    assert append_scores("a cat", flow=4.0) == "a cat aesthetic score: 6.5. motion score: 4.0."
    assert append_scores("a cat aesthetic score: 5.0.", flow=None) == "a cat aesthetic score: 5.0."
    assert append_scores("a cat", aes=None, camera_motion="pan right") == "a cat camera motion: pan right."
    assert preprocess("A Cat, on a MAT!  See www.example.com") == "a cat, on a mat! see aesthetic score: 6.5."
    assert preprocess("“Hello” — world", aes=None) == '"hello" - world'
    assert preprocess("A Cat", clean=False) == "a cat aesthetic score: 6.5."


def test_caption_cache_round_trip_and_errors(tmp_path):
    from qc_compile.errors import ArtifactError
    from qc_compile.models.text_cache import CaptionCache

    path = tmp_path / "c.safetensors"
    c = CaptionCache(path)
    y, m = torch.randn(300, 8).bfloat16(), torch.arange(300) < 7
    c.put("enc-a", "a cat", y, m)
    c.save()
    c2 = CaptionCache(path)
    got = c2.get("enc-a", "a cat")
    assert got is not None and torch.equal(got[0], y) and torch.equal(got[1], m)
    assert c2.get("enc-b", "a cat") is None and c2.get("enc-a", "a dog") is None  # keyed by encoder and text
    path.write_bytes(b"not safetensors")
    with pytest.raises(ArtifactError, match="c.safetensors"):
        CaptionCache(path)
