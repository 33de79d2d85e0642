"""STDiT3 fidelity to Open-Sora 1.2: key names/shapes of the released checkpoint, loading, unit split == forward."""

from __future__ import annotations

import pytest
import torch

from qc_compile.errors import UserError
from qc_compile.models import load_model
from qc_compile.models.checkpoint import save_checkpoint
from qc_compile.models.config import OPENSORA_V12, QC_REF
from qc_compile.models.stdit3 import STDiT3, Geometry

# The table of shared/reference/opensora-1.2-stdit3.md §2, written out independently of the model code.
C, C6 = 1152, 6912
TOP = {
    "rope.freqs": (36,),
    "x_embedder.proj.weight": (C, 4, 1, 2, 2), "x_embedder.proj.bias": (C,),
    "t_embedder.mlp.0.weight": (C, 256), "t_embedder.mlp.0.bias": (C,),
    "t_embedder.mlp.2.weight": (C, C), "t_embedder.mlp.2.bias": (C,),
    "fps_embedder.mlp.0.weight": (C, 256), "fps_embedder.mlp.0.bias": (C,),
    "fps_embedder.mlp.2.weight": (C, C), "fps_embedder.mlp.2.bias": (C,),
    "t_block.1.weight": (C6, C), "t_block.1.bias": (C6,),
    "y_embedder.y_embedding": (300, 4096),
    "y_embedder.y_proj.fc1.weight": (C, 4096), "y_embedder.y_proj.fc1.bias": (C,),
    "y_embedder.y_proj.fc2.weight": (C, C), "y_embedder.y_proj.fc2.bias": (C,),
    "final_layer.scale_shift_table": (2, C),
    "final_layer.linear.weight": (32, C), "final_layer.linear.bias": (32,),
}
BLOCK = {
    "scale_shift_table": (6, C),
    "attn.qkv.weight": (3 * C, C), "attn.qkv.bias": (3 * C,),
    "attn.q_norm.weight": (72,), "attn.k_norm.weight": (72,),
    "attn.proj.weight": (C, C), "attn.proj.bias": (C,),
    "cross_attn.q_linear.weight": (C, C), "cross_attn.q_linear.bias": (C,),
    "cross_attn.kv_linear.weight": (2 * C, C), "cross_attn.kv_linear.bias": (2 * C,),
    "cross_attn.proj.weight": (C, C), "cross_attn.proj.bias": (C,),
    "mlp.fc1.weight": (4 * C, C), "mlp.fc1.bias": (4 * C,),
    "mlp.fc2.weight": (C, 4 * C), "mlp.fc2.bias": (C,),
}


def reference_table() -> dict[str, tuple[int, ...]]:
    table = dict(TOP)
    for kind in ("spatial_blocks", "temporal_blocks"):
        for i in range(28):
            table.update({f"{kind}.{i}.{k}": v for k, v in BLOCK.items()})
    return table


def test_opensora_keys_and_shapes_match_the_released_checkpoint():
    with torch.device("meta"):
        model = STDiT3(OPENSORA_V12)
    sd = model.state_dict()
    table = reference_table()
    assert len(table) == 973
    assert {k: tuple(v.shape) for k, v in sd.items()} == table
    assert sum(v.numel() for v in sd.values()) == 1_208_872_772


def _random_opensora_like(config, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    model = STDiT3(config)
    return {k: torch.randn(v.shape, generator=g) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("with_rope_freqs", [True, False])
def test_open_sora_format_state_dict_round_trips(tmp_path, with_rope_freqs):
    """A file in Open-Sora's layout (top-level keys, no metadata) loads unchanged, with or without rope.freqs."""
    from safetensors.torch import save_file

    sd = _random_opensora_like(QC_REF, 1)
    sd["rope.freqs"] = STDiT3(QC_REF).state_dict()["rope.freqs"]  # a real file holds the true inverse frequencies
    if not with_rope_freqs:
        del sd["rope.freqs"]
    path = tmp_path / "model.safetensors"
    save_file(sd, str(path))
    from qc_compile.models.checkpoint import load_stdit3_weights, read_safetensors

    model = STDiT3(QC_REF)
    tensors, meta = read_safetensors(path)
    assert meta == {} or "format" not in meta
    load_stdit3_weights(model, tensors, path=path, model_name="qc-ref")
    out = model.state_dict()
    for k, v in sd.items():
        assert torch.equal(out[k], v), k
    # and back out again in the same layout
    path2 = tmp_path / "again.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path2))
    tensors2, _ = read_safetensors(path2)
    assert set(tensors2) == set(out) and all(torch.equal(tensors2[k], out[k]) for k in out)


def test_qc_compile_checkpoint_round_trip(tmp_path):
    torch.manual_seed(3)
    loaded = load_model("qc-ref", random_weights=True, seed=3)
    path = tmp_path / "ref.safetensors"
    save_checkpoint(path, loaded.model, loaded.config, loaded.text_encoder, dtype=torch.float32)
    again = load_model("qc-ref", path)
    for (k, a), (k2, b) in zip(loaded.model.state_dict().items(), again.model.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    for a, b in zip(loaded.text_encoder.state_dict().values(), again.text_encoder.state_dict().values()):
        assert torch.equal(a, b)


def test_mismatched_checkpoint_is_a_clear_error(tmp_path):
    from safetensors.torch import save_file

    sd = _random_opensora_like(QC_REF, 2)
    sd["spatial_blocks.0.attn.qkv.weight"] = torch.randn(10, 10)
    del sd["final_layer.linear.bias"]
    sd["extra.weight"] = torch.randn(2)
    save_file(sd, str(tmp_path / "bad.safetensors"))
    with pytest.raises(UserError) as e:
        load_model("qc-ref", tmp_path / "bad.safetensors")
    msg = str(e.value)
    assert "final_layer.linear.bias" in msg and "extra.weight" in msg and "spatial_blocks.0.attn.qkv.weight" in msg
    (tmp_path / "garbage.safetensors").write_bytes(b"\x00\x01not a safetensors file")
    with pytest.raises(UserError, match="not a readable safetensors"):
        load_model("qc-ref", tmp_path / "garbage.safetensors")


def _inputs(config, B=2, frames=4, height=8, width=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, config.in_channels, frames, height, width, generator=g)
    ts = torch.rand(B, generator=g) * 1000
    L = config.model_max_length
    y = torch.randn(B, 1, L, config.caption_channels, generator=g)
    mask = torch.zeros(B, L, dtype=torch.bool)
    for b in range(B):
        mask[b, : int(torch.randint(1, L + 1, (1,), generator=g))] = True
    fps = torch.full((B,), 8.0)
    return x, ts, y, mask, fps


@pytest.mark.parametrize("size", [(4, 8, 12), (3, 6, 10)])
def test_unit_split_equals_whole_forward(size):
    """Units (padded captions + mask) == monolithic forward (packed captions, block-diagonal attention)."""
    torch.manual_seed(0)
    model = STDiT3(QC_REF).eval()
    for p in model.parameters():  # trained-like: nothing exactly zero
        p.data.add_(torch.randn_like(p) * 0.02)
    frames, height, width = size
    x, ts, y, mask, fps = _inputs(QC_REF, frames=frames, height=height, width=width)
    g = Geometry(frames, height, width, QC_REF.patch_size, height, width)
    with torch.no_grad():
        whole = model(x, ts, y, mask, fps=fps, height=torch.tensor([height]), width=torch.tensor([width]))
        units = model.forward_units(x, ts, y, mask, fps, g)
    assert whole.shape == (2, QC_REF.out_channels, frames, height, width)
    rel = ((whole - units).norm() / whole.norm()).item()
    assert rel < 1e-5, rel


def test_unit_modules_cover_the_model_and_padding_is_ignored():
    torch.manual_seed(1)
    model = STDiT3(QC_REF).eval()
    names = model.unit_names()
    assert names[0] == "embed" and names[-1] == "final" and len(names) == 2 + 2 * QC_REF.depth
    x, ts, y, mask, fps = _inputs(QC_REF)
    g = Geometry(4, 8, 12, QC_REF.patch_size, 8, 12)
    y2 = y.clone()
    y2[:, 0][~mask] = torch.randn(int((~mask).sum()), QC_REF.caption_channels)  # garbage in the padded positions
    with torch.no_grad():
        a = model.forward_units(x, ts, y, mask, fps, g)
        b = model.forward_units(x, ts, y2, mask, fps, g)
    assert torch.allclose(a, b, atol=1e-6)


def test_temporal_block_is_not_permutation_invariant_over_frames():
    """RoPE makes temporal attention position-aware: swapping two frames changes the result beyond a swap."""
    torch.manual_seed(2)
    model = STDiT3(QC_REF).eval()
    for p in model.parameters():
        p.data.add_(torch.randn_like(p) * 0.05)
    g = Geometry(4, 8, 8, QC_REF.patch_size, 8, 8)
    B, N, Cm = 1, g.N, QC_REF.hidden_size
    h = torch.randn(B, N, Cm)
    t_mlp = torch.randn(B, 6 * Cm)
    y = torch.randn(B, QC_REF.model_max_length, Cm)
    mask = torch.ones(B, QC_REF.model_max_length, dtype=torch.bool)
    perm = torch.tensor([1, 0, 2, 3])
    hp = h.view(B, 4, g.S, Cm)[:, perm].reshape(B, N, Cm)
    with torch.no_grad():
        out = model.run_block("temporal_0", h, t_mlp, y, mask, g)
        outp = model.run_block("temporal_0", hp, t_mlp, y, mask, g)
        sp = model.run_block("spatial_0", hp, t_mlp, y, mask, g)
        s = model.run_block("spatial_0", h, t_mlp, y, mask, g)
    unperm = outp.view(B, 4, g.S, Cm)[:, perm].reshape(B, N, Cm)
    assert not torch.allclose(unperm, out, atol=1e-4)
    assert torch.allclose(sp.view(B, 4, g.S, Cm)[:, perm].reshape(B, N, Cm), s, atol=1e-5)  # spatial: per frame


def test_geometry_for_opensora_240p_51_frames():
    g = Geometry.for_model(OPENSORA_V12, 51, 240, 426)
    assert (g.frames, g.height, g.width) == (15, 30, 53)
    assert g.grid == (15, 15, 27) and g.S == 405 and g.N == 6075


def test_geometry_rejects_sizes_not_divisible_by_patch():
    with pytest.raises(UserError, match="patch size"):
        Geometry.for_model(QC_REF, 16, 31, 32)


def test_position_embedding_first_half_encodes_columns():
    from qc_compile.models.layers import PositionEmbedding2D

    pe = PositionEmbedding2D(16)(2, 3, scale=1.0, base_size=None)[0]  # (6, 16)
    # tokens (r, c) in row-major order; first half depends on the column only
    assert torch.allclose(pe[0, :8], pe[3, :8]) and not torch.allclose(pe[0, :8], pe[1, :8])
    assert torch.allclose(pe[0, 8:], pe[1, 8:]) and not torch.allclose(pe[0, 8:], pe[3, 8:])


def test_block_sub_steps_compose_to_the_block_forward():
    """The public sub-steps (what the step executor's sub-block caches and TeaCache's probe run) are the block."""
    from qc_compile.models.units import block_units, unit_kind

    cfg = QC_REF
    m = STDiT3(cfg).eval()
    g = Geometry.for_model(cfg, 4, 16, 16)
    gen = torch.Generator().manual_seed(11)
    B, C, L = 2, cfg.hidden_size, cfg.model_max_length
    x, t_mlp, y = (torch.randn(B, g.N, C, generator=gen), torch.randn(B, 6 * C, generator=gen),
                   torch.randn(B, L, C, generator=gen))
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[1, 3:] = False
    for unit in block_units(m.unit_names()):
        assert unit_kind(unit) == "block"
        steps = m.block_steps(unit, {"t_mlp": t_mlp, "y": y, "mask": mask}, g)
        h = x + steps.gate_attn * steps.self_attention(x)
        h = h + steps.cross_attention(h)
        h = h + steps.gate_mlp * steps.feed_forward(h)
        ref = m.run_unit(unit, {"x": x, "t_mlp": t_mlp, "y": y, "mask": mask}, g)["x"]
        assert torch.equal(h, ref), unit
    assert [unit_kind(u) for u in ("embed", "final", "block_3")] == ["embed", "final", "block"]
    with pytest.raises(ValueError, match="not a unit name"):
        unit_kind("blocks.0")
