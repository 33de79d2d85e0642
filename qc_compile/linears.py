"""The linear layers of an STDiT3 model: names, owning unit, shapes, and where smoothing can be folded.

Every per-linear decision (plan entries, calibration ranges, graph passes) is keyed by the nn.Linear's module path
in the model (``spatial_blocks.0.attn.qkv``), which is also the name the exporter gives its weight initializer in
the unit's ONNX graph (``<linear>.weight`` in the MatMul layout ``[K, N]``, ``<linear>.bias``).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass

from torch import nn

_BLOCK = re.compile(r"^(spatial|temporal)_blocks\.(\d+)\.(.+)$")

# Where per-input-channel smoothing of a linear is folded exactly (DESIGN.md §4); see passes/fold_smoothing.py.
FOLD_MODULATION = "modulation"  # LN(x)*(1+scale)+shift in the same unit: scale the (B,1,C) scale/shift vectors
FOLD_V_ROWS = "v_rows"  # attention output projection: divide the V rows of the producing qkv / kv linear
FOLD_CAPTION = "caption"  # cross_attn.kv_linear: divide y_embedder.y_proj.fc2 outputs (embed unit, shared by all)
FOLD_ONLINE = "online"  # no exact fold: an explicit per-channel Mul is inserted before the linear

FOLD_BY_ROLE: dict[str, str] = {
    "attn.qkv": FOLD_MODULATION,
    "mlp.fc1": FOLD_MODULATION,
    "final_layer.linear": FOLD_MODULATION,
    "attn.proj": FOLD_V_ROWS,
    "cross_attn.proj": FOLD_V_ROWS,
    "cross_attn.kv_linear": FOLD_CAPTION,
}
CAPTION_FOLD_LINEAR = "y_embedder.y_proj.fc2"


@dataclass(frozen=True)
class LinearInfo:
    name: str  # module path, e.g. "spatial_blocks.0.attn.qkv"
    unit: str  # "embed" | "spatial_<i>" | "temporal_<i>" | "final"
    role: str  # the name inside its block ("attn.qkv") or the full name outside blocks
    in_features: int
    out_features: int

    @property
    def fold(self) -> str:
        return FOLD_BY_ROLE.get(self.role, FOLD_ONLINE)


def unit_of(name: str) -> tuple[str, str]:
    """(unit, role) of a parameter or module path."""
    m = _BLOCK.match(name)
    if m:
        return f"{m.group(1)}_{m.group(2)}", m.group(3)
    if name.startswith("final_layer."):
        return "final", name
    return "embed", name


def model_linears(model: nn.Module, unit_of=unit_of) -> list[LinearInfo]:
    """All nn.Linear layers of the model in module order; ``unit_of`` maps a module path to (unit, role) (STDiT3's by
    default; the diffusers export passes its family's)."""
    out = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            unit, role = unit_of(name)
            out.append(LinearInfo(name, unit, role, mod.in_features, mod.out_features))
    return out


def linears_by_unit(linears: list[LinearInfo]) -> dict[str, list[LinearInfo]]:
    by: dict[str, list[LinearInfo]] = {}
    for li in linears:
        by.setdefault(li.unit, []).append(li)
    return by


def config_sha256(config) -> str:
    """A stable hash of a model configuration (what plan/model.json/manifest use to recognise the model)."""
    return hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True).encode()).hexdigest()
