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


class PatchGrid:
    """Token counts of a geometry with ``frames``/``height``/``width`` (model input sizes) and ``patch_size``
    (pt, ph, pw): mixed into every family's geometry so T, S and N mean the same everywhere (per-frame
    statistics, sequence-parallel shards, unit costs)."""

    frames: int
    height: int
    width: int
    patch_size: tuple[int, int, int]

    @property
    def grid(self) -> tuple[int, int, int]:
        """Tokens along (time, rows, columns); a partial patch counts as one (STDiT3 pads to the patch)."""
        pt, ph, pw = self.patch_size
        return -(-self.frames // pt), -(-self.height // ph), -(-self.width // pw)

    @property
    def T(self) -> int:
        return self.grid[0]

    @property
    def S(self) -> int:
        """Tokens per frame."""
        return self.grid[1] * self.grid[2]

    @property
    def N(self) -> int:
        """Video tokens."""
        return self.T * self.S
