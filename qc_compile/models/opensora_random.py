"""Random-weight Open-Sora 1.2 parts of the real architectures, made locally (no hub): for speed work and tests.

* a small T5 tokenizer (a ``tokenizers`` Unigram model trained on a few lines, EOS appended, pad id 0 / EOS id 1 as
  in T5), saved with ``save_pretrained`` so ``AutoTokenizer`` loads it like DeepFloyd's;
* T5 encoders: ``T5_XXL`` (T5 v1.1 XXL's config: d_model 4096, 24 layers, 64 heads, gated-GELU d_ff 10240) or a
  tiny one of the same kind, saved with ``save_pretrained`` (safetensors);
* VAEs: the v1.2 config (SD-XL spatial + ``VAE_Temporal_SD``) or a tiny one with the same strides (/8 spatial,
  /4 temporal, micro-frame 17), written in the released key layout.

Random weights give real shapes, memory and time; their outputs mean nothing.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from qc_compile.models.opensora_vae import OPENSORA_VAE_V12, TemporalConfig, VAEConfig, VideoAutoencoderPipeline

T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
              feed_forward_proj="gated-gelu", relative_attention_num_buckets=32,
              relative_attention_max_distance=128, layer_norm_epsilon=1e-6, dropout_rate=0.0,
              tie_word_embeddings=False, pad_token_id=0, eos_token_id=1)
T5_TINY = dict(T5_XXL, vocab_size=256, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4)

TINY_VAE = VAEConfig(
    spatial=dict(OPENSORA_VAE_V12.spatial, block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4,
                 sample_size=64),
    temporal=TemporalConfig(filters=8, num_res_blocks=1, num_groups=4))

_LINES = ["a red circle moving right on a black background", "a cat playing the piano in a sunny room",
          "drone view of waves crashing against rugged cliffs at sunset", "a snowy forest with a dirt road",
          "aesthetic score: 6.5.", "motion score: 4.0.", "camera motion: pan right.", "the quick brown fox jumps",
          "over the lazy dog, 0123456789 times"]


def make_tokenizer(out_dir: str | os.PathLike, vocab_size: int = 120, max_length: int = 300):
    """Train a tiny T5-style (Unigram, metaspace) tokenizer on a few lines and save it to ``out_dir``."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import T5Tokenizer

    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "</s>", "<unk>"],
                                      unk_token="<unk>", show_progress=False)
    tok.train_from_iterator(_LINES * 4, trainer)
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", tok.token_to_id("</s>"))])
    t5_tok = T5Tokenizer(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>", extra_ids=0)
    t5_tok.model_max_length = max_length
    t5_tok.save_pretrained(str(out_dir))
    return t5_tok


def random_t5(config: dict = T5_TINY, *, seed: int = 0, device: str | torch.device = "cpu",
              dtype: torch.dtype = torch.float32):
    """A ``transformers.T5EncoderModel`` with random weights (built directly on ``device`` in ``dtype``)."""
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    cfg = T5Config(**config, is_encoder_decoder=False, use_cache=False)
    with torch.device(device):
        model = T5EncoderModel(cfg).to(dtype)
    return model.eval()


def save_random_t5(out_dir: str | os.PathLike, config: dict = T5_TINY, *, seed: int = 0) -> Path:
    """A T5 folder (config.json, model.safetensors, tokenizer) as ``--text-encoder`` takes it."""
    out = Path(out_dir)
    random_t5(config, seed=seed).save_pretrained(str(out), safe_serialization=True)
    make_tokenizer(out)
    return out


def random_vae(config: VAEConfig = TINY_VAE, *, seed: int = 0, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32) -> VideoAutoencoderPipeline:
    """A VideoAutoencoderPipeline with diffusers' / torch's default random initialisation."""
    torch.manual_seed(seed)
    with torch.device(device):
        vae = VideoAutoencoderPipeline(config)
    vae.scale.copy_(torch.tensor(config.scale)[None, :, None, None, None])
    vae.shift.copy_(torch.tensor(config.shift)[None, :, None, None, None])
    return vae.to(dtype).eval()
