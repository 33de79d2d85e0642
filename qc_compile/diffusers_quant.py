"""FP8 W8A8 for a diffusers transformer's blocks through qc-compile's own kernels: ``enable(pipe, quantize="fp8")``.

Why: the peers' quantizers (torchao's FP8 dynamic-activation config, ModelOpt's FP8 PTQ) run on diffusers models, and
the comparison needs qc-compile's quantized path on the same model. Every ``nn.Linear`` inside the transformer's
blocks becomes a :class:`~qc_compile.runtime.fast_linear.FastLinear`: FP8 E4M3 weights per output channel, FP8
activations with dynamic per-token scales, on the ``qc::`` kernels (their CPU reference off the GPU) — the same
linears the STDiT3 fast path runs. Embedding, condition and output projections stay in the model's dtype, as
``calibrate --uniform`` plans keep them (they are under 1% of the work and the most sensitive). The swap is undone by
:func:`restore` (``disable(pipe)``): the original modules go back, bit for bit.
"""

from __future__ import annotations

from torch import nn

from qc_compile.errors import UserError

QUANTIZE_FORMATS = ("fp8",)

Swap = tuple[nn.Module, str, nn.Linear]  # (parent module, attribute name, the original linear)


def check_format(quantize: str | None) -> None:
    if quantize is not None and quantize not in QUANTIZE_FORMATS:
        raise UserError(f"qc_compile.enable: quantize={quantize!r}; expected None (the model's own dtype) or one of "
                        f"{', '.join(QUANTIZE_FORMATS)} (W8A8 FP8 E4M3 on every block linear, per-token activation "
                        "scales).")


def quantize_blocks(blocks: nn.Module, quantize: str) -> list[Swap]:
    """Replace every ``nn.Linear`` under ``blocks`` by its FP8 W8A8 ``FastLinear``; returns what :func:`restore`
    needs to put the originals back."""
    from qc_compile.plan import LinearPlan
    from qc_compile.runtime.fast_linear import FastLinear

    check_format(quantize)
    entry = LinearPlan(unit="block", weight="fp8_e4m3", activation="fp8_e4m3")
    targets = [(name, mod) for name, mod in blocks.named_modules() if isinstance(mod, nn.Linear)]
    if not targets:
        raise UserError("qc_compile.enable(quantize=...): the transformer's blocks hold no nn.Linear to quantize.")
    swaps: list[Swap] = []
    try:
        for name, lin in targets:
            parent_name, _, attr = name.rpartition(".")
            parent = blocks.get_submodule(parent_name) if parent_name else blocks
            setattr(parent, attr, FastLinear(lin, entry, name=name))
            swaps.append((parent, attr, lin))
    except BaseException:  # all or nothing: a linear the kernels refuse leaves the model as it was
        restore(swaps)
        raise
    return swaps


def plan_is_quantized(plan) -> bool:
    """Whether the plan's default variant runs any linear in a format other than bf16 x bf16."""
    return any(e.weight != "bf16" or e.activation != "bf16" or e.smoothing is not None or e.rotation
               for e in plan.resolve("default").values())


class VariantSelector:
    """The precision variant each unit runs this step (the step policy's decisions, e.g. the plan's ``schedule``
    under ``aigq`` / ``quantcache``), read by the :class:`PlanLinear` modules of that unit."""

    def __init__(self) -> None:
        self.by_unit: dict[str, str] = {}

    def set(self, decisions) -> None:
        self.by_unit = {u: d.variant for u, d in decisions.items()}


class PlanLinear(nn.Module):
    """A linear of a plan with precision variants: one module per variant (the original linear where the variant
    runs it unquantized, else its FastLinear), chosen per call by the unit's current variant."""

    def __init__(self, modules: dict[str, nn.Module], unit: str, selector: VariantSelector, name: str) -> None:
        super().__init__()
        self.__dict__["_impl"] = dict(modules)  # not registered: the transformer's state_dict keeps its keys
        self.unit, self.selector, self.name = unit, selector, name

    def forward(self, x):
        v = self.selector.by_unit.get(self.unit, "default")
        m = self._impl.get(v)
        if m is None:
            raise UserError(f"the step policy asked unit {self.unit} for precision variant {v!r}; the plan has "
                            f"{', '.join(sorted(self._impl))}.")
        return m(x)


def apply_plan(transformer: nn.Module, plan, selector: VariantSelector | None = None) -> list[Swap]:
    """Replace every linear of ``transformer`` that ``plan`` (a :class:`qc_compile.plan.Plan` of this transformer,
    linears named by their diffusers module path) quantizes by its :class:`~qc_compile.runtime.fast_linear.FastLinear`
    under the plan's entry (smoothing and rotation of the plan's own entry included); linears the plan keeps at
    bf16 x bf16 stay the original modules (so an unquantized plan changes nothing, bit for bit). With ``selector``
    and a plan with precision variants (``high``: the schedule's steps), a linear that differs across variants
    becomes a :class:`PlanLinear` over all of them; without one, the default variant runs. All or nothing: a plan
    naming a module that is not an ``nn.Linear`` of this transformer, or a format the torch executor's kernels
    refuse, leaves the model as it was (UserError)."""
    import torch

    from qc_compile.runtime.fast_linear import FastLinear

    variants = plan.variant_names if selector is not None else ["default"]
    resolved = {v: plan.resolve(v) for v in variants}
    modules = dict(transformer.named_modules())
    missing = [n for n in plan.linears if not isinstance(modules.get(n), nn.Linear)]
    if missing:
        raise UserError(f"plan: linear(s) {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''} are not "
                        f"nn.Linear modules of this {type(transformer).__name__}; the plan was calibrated for another "
                        "model. Re-run qc-compile calibrate on this model's work dir.")
    swaps: list[Swap] = []
    name, e = "", None
    try:
        for name, base in plan.linears.items():
            lin = modules[name]
            sv = plan.smoothing_vector(name)
            smoothing = None if sv is None else torch.from_numpy(sv).to(lin.weight.device)
            per: dict[str, nn.Module] = {}
            for v in variants:
                e = resolved[v][name]
                plain = e.weight == "bf16" and e.activation == "bf16" and base.smoothing is None and not base.rotation
                per[v] = lin if plain else FastLinear(lin, e, base=base, smoothing=smoothing, name=name)
            if all(m is lin for m in per.values()):
                continue
            new = per["default"] if len(per) == 1 else PlanLinear(per, base.unit, selector, name)
            parent_name, _, attr = name.rpartition(".")
            parent = transformer.get_submodule(parent_name) if parent_name else transformer
            setattr(parent, attr, new)
            swaps.append((parent, attr, lin))
    except UserError:  # all or nothing: a linear the kernels refuse leaves the model as it was
        restore(swaps)
        raise UserError(f"plan: linear {name} runs {e.weight} weights with {e.activation} activations, which a "
                        "diffusers model's torch executor does not run: its linears run through qc-compile's "
                        "FastLinear kernels, which take FP8 E4M3 weights with FP8 E4M3 activations, or bf16 "
                        "activations with any weight format (weight-only, dequantized). Calibrate with "
                        "--uniform fp8, int4_b128, int4_b64 or bf16 instead.") from None
    except BaseException:
        restore(swaps)
        raise
    return swaps


def restore(swaps: list[Swap]) -> None:
    """Put the original linears back (in reverse order of the swap)."""
    for parent, attr, lin in reversed(swaps):
        setattr(parent, attr, lin)
