"""Model configurations: the released STDiT3-XL/2 and the small `qc-ref` reference model (same code)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from qc_compile.errors import UserError


@dataclass(frozen=True)
class STDiT3Config:
    name: str
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    patch_size: tuple[int, int, int] = (1, 2, 2)
    in_channels: int = 4
    pred_sigma: bool = True
    mlp_ratio: float = 4.0
    caption_channels: int = 4096
    model_max_length: int = 300
    qk_norm: bool = True
    input_sq_size: int = 512
    class_dropout_prob: float = 0.1
    # What the sampler and the CLI need to know about the model's input space.
    space: str = "latent"  # "latent" (Open-Sora VAE latents) or "pixel" (qc-ref: RGB in [-1, 1])
    default_frames: int = 51
    default_height: int = 240
    default_width: int = 426
    default_fps: int = 24
    default_steps: int = 30
    default_cfg: float = 7.0
    use_timestep_transform: bool = True
    # Learned absolute frame embedding (rows = max latent frames); 0 = none, as in the released STDiT3. Open-Sora
    # needs none because its causal VAE makes latent frame 0 look unlike the others (an absolute-time cue); a
    # pixel-space model has no such cue and, with relative RoPE only, cannot tell "moving left" from "moving right"
    # when it starts from pure noise (measured on qc-ref: direction accuracy at chance, the model time-reversal
    # equivariant to 1%). qc-ref therefore adds this one table; everything else is the released code.
    temporal_pos_max: int = 0
    # A fixed transform ratio (SD3-style shift) used instead of Open-Sora's resolution formula; None: the formula.
    timestep_shift: float | None = None
    text_encoder: dict = field(default_factory=dict)  # qc-ref: CaptionEncoder kwargs; opensora: {} (external T5)

    @property
    def out_channels(self) -> int:
        return self.in_channels * 2 if self.pred_sigma else self.in_channels

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["patch_size"] = list(self.patch_size)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "STDiT3Config":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise UserError(f"model config has unknown field(s) {sorted(unknown)}; expected only {sorted(names)}.")
        d = dict(d)
        if "patch_size" in d:
            d["patch_size"] = tuple(d["patch_size"])
        return cls(**d)


OPENSORA_V12 = STDiT3Config(name="opensora-v1.2")

# qc-ref: pixel-space RGB 16 x 32 x 32, patch 1x2x2 -> 16 x 16 x 16 = 4096 tokens; sized so that a 30-step CFG
# generation runs in well under a minute on 2 CPU cores and the bf16 checkpoint stays far below 24 MB.
QC_REF = STDiT3Config(
    name="qc-ref",
    hidden_size=128,
    depth=4,
    num_heads=4,
    patch_size=(1, 2, 2),
    in_channels=3,
    pred_sigma=False,
    mlp_ratio=4.0,
    caption_channels=64,
    model_max_length=12,
    qk_norm=True,
    input_sq_size=32,
    class_dropout_prob=0.1,
    space="pixel",
    default_frames=16,
    default_height=32,
    default_width=32,
    default_fps=8,
    default_steps=30,
    default_cfg=4.0,
    # The Open-Sora transform's frame factor floor(F/17)*5 is 0 below 17 frames, so qc-ref uses a fixed ratio
    # instead (trained and sampled with shift 4: motion direction is decided at high noise, see MODEL_CARD.md).
    use_timestep_transform=False,
    timestep_shift=4.0,
    temporal_pos_max=16,
    text_encoder={"dim": 64, "layers": 2, "heads": 4, "max_length": 12},
)

CONFIGS: dict[str, STDiT3Config] = {c.name: c for c in (OPENSORA_V12, QC_REF)}


DIFFUSERS_FAMILIES = ("wan2.1", "wan2.2", "cogvideox")


def is_diffusers_spec(name: str) -> bool:
    """``qc-ref-wan`` or ``FAMILY:PATH`` (a local diffusers folder of a supported family)."""
    return name == "qc-ref-wan" or (":" in name and name.split(":", 1)[0].lower() in DIFFUSERS_FAMILIES)


def diffusers_cli_refusal(name: str) -> UserError:
    """Why the STDiT3 command-line path refuses a diffusers model, and where that model runs instead."""
    return UserError(f"model {name!r} is a diffusers video transformer. On the command line, `run` and `sweep` "
                     "(without a work dir) and `generate` accept qc-ref-wan (--model qc-ref-wan, --checkpoint FOLDER "
                     "for another qc-ref-wan folder) and local diffusers WanPipeline folders (--model wan2.1:PATH or "
                     "wan2.2:PATH, the whole pipeline: transformer, text encoder, tokenizer, VAE, scheduler); a qc-ref-wan "
                     "work dir (`qc-compile export qc-ref-wan -o WORK`, `calibrate WORK --uniform FORMAT`) runs with "
                     "`run WORK` / `sweep WORK` given alone (the work dir names its model: no --model), a work dir "
                     f"of an STDiT3 model ({', '.join(sorted(CONFIGS))}) takes no diffusers --model, and "
                     f"cogvideox:PATH folders run from Python only. Run {name} "
                     "from Python through `qc_compile.enable(transformer, policy=...)` (README, 'Diffusers "
                     "pipelines'), or sweep policies and the peers' caches on it with tools/peers_wan.py.")


def get_config(name: str) -> STDiT3Config:
    if name not in CONFIGS and is_diffusers_spec(name):
        raise diffusers_cli_refusal(name)
    if name not in CONFIGS:
        raise UserError(f"unknown model {name!r}; known models: {', '.join(sorted(CONFIGS))}.")
    return CONFIGS[name]
