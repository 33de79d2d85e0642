"""The torch runner: the model's own modules, unit by unit, on any device; one model per precision variant.

``variant_models`` holds e.g. fake-quantized copies of the model per plan variant (``fp`` = the unquantized model);
a decision naming a variant that is not listed runs ``model``. It offers block sub-steps (``parts``) and the
in-step gates, since the whole block structure is there, and runs blocks on a shard's token grid (``geometry=``,
``"shards"``) for :mod:`qc_compile.runtime.parallel`.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from qc_compile.models.stdit3 import Geometry


class TorchRunner:
    backend = "torch"
    supports = frozenset({"parts", "gate", "shards"})
    stats = "torch"

    def __init__(self, model: Any, geometry: Geometry, variant_models: Mapping[str, Any] | None = None) -> None:
        self.model = model
        self.g = geometry
        self.unit_names = tuple(model.unit_names())
        self.variant_models = dict(variant_models or {})

    def model_for(self, variant: str) -> Any:
        return self.variant_models.get(variant, self.model)

    def run_unit(self, unit: str, variant: str, inputs: Mapping[str, torch.Tensor],
                 geometry: Any = None) -> dict[str, torch.Tensor]:
        return self.model_for(variant).run_unit(unit, dict(inputs), geometry or self.g)

    def block_steps(self, unit: str, variant: str, ctx: Mapping[str, torch.Tensor], geometry: Any = None):
        return self.model_for(variant).block_steps(unit, dict(ctx), geometry or self.g)

    def begin_step(self, h: torch.Tensor, ctx: Mapping[str, torch.Tensor]) -> None:
        pass

    def describe(self) -> dict:
        return {"runner": self.backend, "variants": sorted(self.variant_models) or ["default"]}
