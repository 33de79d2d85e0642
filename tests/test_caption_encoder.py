"""Caption tokenizer and encoder (qc-ref's T5 stand-in)."""

from __future__ import annotations

import pytest
import torch

from qc_compile.errors import UserError
from qc_compile.models.caption_encoder import EOS_ID, PAD_ID, CaptionEncoder, CaptionTokenizer


def test_vocabulary_order_is_fixed() -> None:
    tok = CaptionTokenizer()
    assert tok.vocab[:6] == ("<pad>", "<eos>", "a", "moving", "on", "background")
    assert tok.vocab_size == 23
    assert tok.token_to_id["red"] == 6 and tok.token_to_id["navy"] == 22


def test_encode_ids_mask_and_eos() -> None:
    tok = CaptionTokenizer()
    ids, mask = tok.encode(["a red circle moving left on a black background", "Red circle."])
    assert ids.shape == mask.shape == (2, 12) and ids.dtype == torch.long and mask.dtype == torch.long
    assert ids[0, 9] == EOS_ID and mask[0].sum() == 10 and ids[0, 10:].eq(PAD_ID).all()
    assert ids[1].tolist()[:3] == [tok.token_to_id["red"], tok.token_to_id["circle"], EOS_ID]
    assert mask[1].tolist() == [1, 1, 1] + [0] * 9
    assert tok.decode(ids[0]) == "a red circle moving left on a black background"


def test_unknown_word_and_too_long() -> None:
    tok = CaptionTokenizer()
    with pytest.raises(UserError) as e:
        tok.encode(["a red dodecahedron"])
    assert "'dodecahedron'" in str(e.value) and "triangle" in str(e.value) and "navy" in str(e.value)
    with pytest.raises(UserError, match="'and'"):
        tok.encode(["a red circle moving left on a black background and"])  # unknown word reported first
    with pytest.raises(UserError, match="at most 11 words"):
        tok.encode(["red " * 12])


def test_encoder_shapes_names_and_padding_invariance() -> None:
    torch.manual_seed(0)
    tok = CaptionTokenizer()
    enc = CaptionEncoder(tok.vocab_size, max_length=12, dim=64, layers=2, heads=4).eval()
    names = set(enc.state_dict())
    assert {"token_embedding.weight", "position_embedding", "final_norm.weight", "layers.1.attn.qkv.weight",
            "layers.0.mlp.0.weight", "layers.0.norm1.bias"} <= names
    ids, mask = tok.encode(["a red circle moving left on a black background", "a cyan square"])
    out = enc(ids, mask)
    assert out.shape == (2, 1, 12, 64) and torch.isfinite(out).all()
    # Real tokens do not see padding: changing pad ids leaves them unchanged.
    ids2 = ids.clone()
    ids2[mask == 0] = 5
    out2 = enc(ids2, mask)
    torch.testing.assert_close(out[mask.bool()[:, None]], out2[mask.bool()[:, None]])
    # The same caption alone or in a batch encodes the same.
    torch.testing.assert_close(enc(ids[1:], mask[1:]), out[1:])
    # A row without any real token does not produce NaN.
    assert torch.isfinite(enc(torch.zeros(1, 12, dtype=torch.long), torch.zeros(1, 12, dtype=torch.long))).all()


def test_encoder_is_trainable() -> None:
    torch.manual_seed(0)
    enc = CaptionEncoder(23, layers=1)
    ids, mask = CaptionTokenizer().encode(["a red circle", "a blue circle"])
    opt = torch.optim.Adam(enc.parameters(), lr=1e-2)
    for _ in range(30):
        out = enc(ids, mask)[:, 0, 1]  # colour position
        loss = -(out[0] - out[1]).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert (enc(ids, mask)[0, 0, 1] - enc(ids, mask)[1, 0, 1]).abs().mean() > 0.5
