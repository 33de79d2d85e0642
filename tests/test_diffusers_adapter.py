"""Diffusers adapters: unit-by-unit execution and the sub-block hooks equal diffusers' own forward (fp32)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")

from diffusers_helpers import randn, rel_err, tiny_cogvideox, tiny_wan  # noqa: E402

from qc_compile.errors import UserError  # noqa: E402
from qc_compile.runtime.protocols import BlockSteps  # noqa: E402
from qc_compile.models.diffusers_adapter import (CogVideoXAdapter, DiffusersGeometry, WanAdapter,  # noqa: E402
                                                 adapter_for, parse_model_spec)

TOL = 1e-5


def _check_units_and_parts(adapter, inputs, ref, g):
    with torch.no_grad():
        v = adapter.forward_units(inputs, g)
        assert v.shape == ref.shape
        assert rel_err(v, ref) < TOL
        ctx = adapter.run_unit("embed", inputs, g)
        h = ctx["x"]
        for name in adapter.unit_names()[1:-1]:
            whole = adapter.run_unit(name, {**ctx, "x": h}, g)["x"]
            parts = adapter.block_forward_parts(name, h, {**ctx, "x": h})
            assert rel_err(parts, whole) < TOL, name
            steps = adapter.block_steps(name, {**ctx, "x": h}, g)  # the runtime's BlockSteps, composed as the
            assert isinstance(steps, BlockSteps)                  # step executor composes it
            y = h + steps.gate_attn * steps.self_attention(h)
            y = y + steps.cross_attention(y)
            y = y + steps.gate_mlp * steps.feed_forward(y)
            assert rel_err(y, whole) < TOL, name
            assert rel_err(whole, h) > 1e-3  # the block does something (no test that cannot fail)
            h = whole
        v2 = adapter.run_unit("final", {**ctx, "x": h}, g)["v"]
        assert rel_err(v2, ref) < TOL


@pytest.mark.parametrize("variant", ["t2v", "ti2v", "i2v"])
def test_wan_units_equal_forward(variant):
    kw = {"image_dim": 8, "added_kv_proj_dim": 24} if variant == "i2v" else {}
    m = tiny_wan(seed=1, **kw)
    a = adapter_for(m)
    assert isinstance(a, WanAdapter)
    assert a.unit_names() == ["embed", "block_0", "block_1", "block_2", "final"]
    assert [a.unit_kind(u) for u in a.unit_names()] == ["embed", "block", "block", "block", "final"]
    x = randn(2, 4, 3, 8, 6, seed=2)
    L = 512 if variant == "i2v" else 5  # diffusers' Wan I2V processor assumes 512 text tokens
    y = randn(2, L, 16, seed=3)
    t = torch.tensor([870.0, 130.0])
    if variant == "ti2v":  # Wan 2.2 TI2V: one timestep per token (first frame at t=0)
        t = torch.tensor([870.0, 130.0])[:, None].repeat(1, 3 * 4 * 3)
        t[:, :12] = 0.0
    img = randn(2, 6, 8, seed=4) if variant == "i2v" else None
    with torch.no_grad():
        ref = m(x, t, y, encoder_hidden_states_image=img, return_dict=False)[0]
    g = a.geometry_of(x)
    assert (g.T, g.S, g.N) == (3, 12, 36)
    _check_units_and_parts(a, a.forward_inputs(x, t, y, img), ref, g)


@pytest.mark.parametrize("variant", ["2b_sincos", "5b_rope", "1.5_rope_pt"])
def test_cogvideox_units_equal_forward(variant):
    kw = {"2b_sincos": {}, "5b_rope": {"use_rotary_positional_embeddings": True},
          "1.5_rope_pt": {"use_rotary_positional_embeddings": True, "patch_size_t": 2}}[variant]
    m = tiny_cogvideox(seed=5, **kw)
    a = adapter_for(m)
    assert isinstance(a, CogVideoXAdapter) and a.sub_blocks == ("attn", "mlp")
    F = 4 if variant == "1.5_rope_pt" else 3
    x = randn(2, F, 4, 8, 8, seed=6)
    y = randn(2, 7, 16, seed=7)
    t = torch.tensor([900, 40])
    g = a.geometry_of(x, text_len=7)
    assert g.prefix_tokens == 7
    rope = a.rotary_embedding(g) if m.config.use_rotary_positional_embeddings else None
    with torch.no_grad():
        ref = m(x, y, t, image_rotary_emb=rope, return_dict=False)[0]
    inputs = {"x": x, "timestep": t, "y": y}
    _check_units_and_parts(a, inputs, ref, g)  # rope computed by the embed unit from the geometry
    if rope is not None:
        _check_units_and_parts(a, {**inputs, "rope_cos": rope[0], "rope_sin": rope[1]}, ref, g)


@torch.no_grad()
def test_wan_hooks_split_the_block_as_documented():
    """The self-attention / MLP outputs are un-gated and their gates are the modulation's: the block output moves by
    exactly (gate' - gate)·out when the gate changes (what FORA's re-gating relies on)."""
    m = tiny_wan(seed=8)
    a = WanAdapter(m)
    x = randn(1, 4, 2, 4, 4, seed=9)
    ctx = a.run_unit("embed", a.forward_inputs(x, torch.tensor([500.0]), randn(1, 5, 16, seed=10)), a.geometry_of(x))
    h = ctx["x"]
    mods = a.block_modulation("block_1", ctx)
    out, gate = a.block_self_attention("block_1", h, mods, ctx)
    assert gate is mods["gate_msa"] and out.shape == h.shape
    g2 = gate * 1.5
    moved = a.add_gated(h, out, g2) - a.add_gated(h, out, gate)
    assert rel_err(moved, (g2 - gate) * out) < TOL
    assert rel_err(a.block_modulated_input("block_1", h, ctx), h) > 1e-2


def test_geometry_checks_and_model_spec():
    with pytest.raises(UserError, match="patch size"):
        DiffusersGeometry(3, 7, 8, (1, 2, 2))
    g = DiffusersGeometry.from_video(81, 480, 832, patch_size=(1, 2, 2), temporal_ratio=4, spatial_ratio=8)
    assert (g.frames, g.height, g.width, g.N) == (21, 60, 104, 21 * 30 * 52)
    with pytest.raises(UserError, match="1 \\+ 4"):
        DiffusersGeometry.from_video(80, 480, 832, patch_size=(1, 2, 2), temporal_ratio=4, spatial_ratio=8)
    assert parse_model_spec("wan2.1:/m") == ("wan2.1", "/m")
    assert parse_model_spec("qc-ref") is None
    with pytest.raises(UserError, match="folder"):
        parse_model_spec("cogvideox:")
    with pytest.raises(UserError, match="no adapter"):
        adapter_for(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("with_accelerate", [False, True])
def test_load_model_reads_local_diffusers_folders(tmp_path, monkeypatch, with_accelerate):
    """Both loading paths: diffusers' from_pretrained (needs accelerate for Wan) and our strict safetensors load."""
    import qc_compile.models.diffusers_adapter as da
    from qc_compile.models import load_model

    if with_accelerate:
        pytest.importorskip("accelerate")
    monkeypatch.setattr(da, "_accelerate_available", lambda: with_accelerate)

    m = tiny_wan(seed=11)
    m.save_pretrained(tmp_path / "pipe" / "transformer", safe_serialization=True)
    (tmp_path / "pipe" / "model_index.json").write_text("{}")
    x, y, t = randn(1, 4, 2, 4, 4, seed=12), randn(1, 5, 16, seed=13), torch.tensor([700.0])
    with torch.no_grad():
        ref = m(x, t, y, return_dict=False)[0]
    for folder in (tmp_path / "pipe", tmp_path / "pipe" / "transformer"):
        loaded = load_model(f"wan2.1:{folder}")
        assert loaded.family == "wan2.1" and isinstance(loaded.model, WanAdapter)
        with torch.no_grad():
            v = loaded.model.forward_units(loaded.model.forward_inputs(x, t, y), loaded.model.geometry_of(x))
        assert rel_err(v, ref) < TOL
    with pytest.raises(UserError, match="not a folder"):
        load_model(f"wan2.1:{tmp_path / 'missing'}")
    with pytest.raises(UserError, match="CogVideoXTransformer3DModel"):
        load_model(f"cogvideox:{tmp_path / 'pipe'}")
    with pytest.raises(UserError, match="checkpoint"):
        load_model(f"wan2.1:{tmp_path / 'pipe'}", checkpoint="x.safetensors")
