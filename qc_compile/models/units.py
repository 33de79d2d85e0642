"""The unit vocabulary shared by every model family: which units exist and what kind each one is.

A model is a sequence of units: ``embed``, block units, ``final``. Per-unit engines, caches, statistics and policies
all key on these names, so the rule that tells a block from the rest lives here and nowhere else.
"""

from __future__ import annotations

import re

UNIT_KINDS = ("embed", "block", "final")
_BLOCK = re.compile(r"^(spatial|temporal|block)_\d+$")


def unit_kind(name: str) -> str:
    """'embed' | 'block' | 'final' for a unit name (``spatial_i`` / ``temporal_i`` for STDiT3, ``block_i`` for the
    diffusers families)."""
    if name in ("embed", "final"):
        return name
    if _BLOCK.match(name):
        return "block"
    raise ValueError(f"not a unit name: {name!r}")


def is_block(name: str) -> bool:
    return unit_kind(name) == "block"


def block_units(unit_names) -> tuple[str, ...]:
    """The block units of ``unit_names``, in order."""
    return tuple(n for n in unit_names if is_block(n))
