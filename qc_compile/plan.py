"""The plan: the one data model shared by calibrate, build and the runtime (DESIGN.md §1).

``WORK/plan.json`` (JSON Schema: ``qc_compile/schemas/plan.schema.json``) holds, per nn.Linear of the model:

* ``weight`` format — ``bf16`` (unquantized) | ``fp8_e4m3`` / ``int8`` (per output channel) | ``int4_b64`` /
  ``int4_b128`` (weight-only, blocks along K) | ``nvfp4`` (E2M1, FP8 scale per 16, fp32 per tensor);
* ``activation`` format — ``bf16`` | ``fp8_e4m3`` / ``int8`` (per-tensor, static ``act_scale`` = amax / qmax, or
  ``act_scale: "dynamic"``: one scale per token computed at run time, what the fast kernels do) |
  ``nvfp4`` (``act_scale: "dynamic"``: block-16 scales computed at run time, per-tensor scale amax / (6·448));
* ``smoothing`` — per-input-channel divisor ``s`` (the linear sees ``x / s``, its weight rows are multiplied by
  ``s``): inline list or ``{"tensor": key}`` in the sidecar safetensors file; ``rotation`` — Hadamard block or null.

plus named precision ``variants`` (overrides by linear name or fnmatch pattern), the per-step ``schedule`` of
variant names, the ``cache_policy`` block (free-form, read by the runtime), ``vc`` (a sidecar reference),
``sidecar`` (file + sha256) and ``provenance``.

``int6_sim`` is a *simulated* format (no hardware GEMM): it is allowed in plans and in the torch/onnxruntime
reference paths, flagged as simulated everywhere, and refused by every TensorRT target.

Smoothing of ``cross_attn.kv_linear`` folds into ``y_embedder.y_proj.fc2`` in the ``embed`` unit, whose output
feeds every block; so all kv_linear entries that smooth must reference the *same* vector (validated here), and the
build applies that one fold to the embed unit (see passes/fold_smoothing.py).
"""

from __future__ import annotations

import copy
import fnmatch
import json
import math
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from qc_compile.artifacts import read_json, sha256_file, write_bytes_atomic, write_json_atomic
from qc_compile.errors import ArtifactError, UserError
from qc_compile.plugins.codecs import CODECS, Codec, nvfp4_static_global_scale

SCHEMA_VERSION = 1
DEFAULT_VARIANT = "default"


# The plan's format menus: views of the codec table (qc_compile.plugins.codecs), which holds bits, code range, block
# size, whether a format is simulated and the ONNX opset its Q/DQ form needs.
WEIGHT_FORMATS: dict[str, Codec] = {n: c for n, c in CODECS.items() if c.weight}
ACTIVATION_FORMATS: dict[str, Codec] = {n: c for n, c in CODECS.items() if c.activation}
STATIC_ACT = ("fp8_e4m3", "int8", "int6_sim")
DYNAMIC_ACT = ("nvfp4",)


def act_scale_for(fmt: str, amax: float) -> float | str | None:
    """The plan's ``act_scale`` for an activation format and a calibrated |x| max."""
    if fmt == "bf16":
        return None
    if fmt in DYNAMIC_ACT:
        return "dynamic"
    return ACTIVATION_FORMATS[fmt].static_scale(amax)


@dataclass
class LinearPlan:
    unit: str
    weight: str = "bf16"
    activation: str = "bf16"
    act_scale: float | str | None = None
    act_amax: float | None = None
    smoothing: Any = None  # None | list[float] | {"tensor": key}
    rotation: int | None = None

    def to_dict(self) -> dict:
        d = {"unit": self.unit, "weight": self.weight, "activation": self.activation, "act_scale": self.act_scale,
             "act_amax": self.act_amax, "smoothing": self.smoothing, "rotation": self.rotation}
        return d

    @property
    def simulated(self) -> bool:
        return WEIGHT_FORMATS[self.weight].simulated or ACTIVATION_FORMATS[self.activation].simulated

    @property
    def global_scale(self) -> float:
        """NVFP4 activations: the static per-tensor (second-level) scale amax / (6 * 448)."""
        return nvfp4_static_global_scale(self.act_amax or 0.0)


@dataclass
class Plan:
    model: dict
    linears: dict[str, LinearPlan]
    target: str = "any"
    variants: dict[str, dict[str, dict]] = field(default_factory=dict)
    schedule: list[str] = field(default_factory=list)
    cache_policy: dict = field(default_factory=lambda: {"name": "none", "params": {}})
    vc: dict | None = None
    sidecar: dict | None = None
    provenance: dict = field(default_factory=dict)
    tensors: dict[str, np.ndarray] = field(default_factory=dict)  # sidecar contents
    schema_version: int = SCHEMA_VERSION

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict:
        return {"schema_version": self.schema_version, "model": dict(self.model), "target": self.target,
                "linears": {k: v.to_dict() for k, v in self.linears.items()},
                "variants": copy.deepcopy(self.variants), "schedule": list(self.schedule),
                "cache_policy": copy.deepcopy(self.cache_policy), "vc": copy.deepcopy(self.vc),
                "sidecar": copy.deepcopy(self.sidecar), "provenance": copy.deepcopy(self.provenance)}

    @classmethod
    def from_dict(cls, d: dict, tensors: dict[str, np.ndarray] | None = None) -> "Plan":
        return cls(model=dict(d["model"]), target=d["target"],
                   linears={k: LinearPlan(**{f: v.get(f) for f in ("unit", "weight", "activation", "act_scale",
                                                                   "act_amax", "smoothing", "rotation")})
                            for k, v in d["linears"].items()},
                   variants=copy.deepcopy(d.get("variants", {})), schedule=list(d.get("schedule", [])),
                   cache_policy=copy.deepcopy(d["cache_policy"]), vc=copy.deepcopy(d.get("vc")),
                   sidecar=copy.deepcopy(d.get("sidecar")), provenance=copy.deepcopy(d["provenance"]),
                   tensors=dict(tensors or {}), schema_version=d["schema_version"])

    # ------------------------------------------------------------------ queries
    @property
    def variant_names(self) -> list[str]:
        return [DEFAULT_VARIANT] + sorted(self.variants)

    def used_variants(self) -> list[str]:
        """Variants the schedule uses (the default always)."""
        used = {DEFAULT_VARIANT, *self.schedule}
        return [v for v in self.variant_names if v in used]

    def resolve(self, variant: str = DEFAULT_VARIANT) -> dict[str, LinearPlan]:
        """Linear entries with a variant's overrides applied (in the order the overrides are written)."""
        if variant == DEFAULT_VARIANT:
            return self.linears
        if variant not in self.variants:
            raise UserError(f"plan has no precision variant {variant!r}; variants: {', '.join(self.variant_names)}.")
        out = {k: copy.copy(v) for k, v in self.linears.items()}
        for pattern, upd in self.variants[variant].items():
            for name in fnmatch.filter(out, pattern):
                for k, v in upd.items():
                    setattr(out[name], k, v)
                if "activation" in upd and "act_scale" not in upd:  # keep act_scale consistent with the format
                    e = out[name]
                    e.act_scale = act_scale_for(e.activation, e.act_amax or 0.0) if e.activation != "bf16" else None
        return out

    def smoothing_vector(self, name: str) -> np.ndarray | None:
        s = self.linears[name].smoothing
        if s is None:
            return None
        if isinstance(s, dict):
            return np.asarray(self.tensors[s["tensor"]], dtype=np.float32)
        return np.asarray(s, dtype=np.float32)

    def formats_used(self) -> tuple[set[str], set[str]]:
        w, a = set(), set()
        for v in self.used_variants():
            for e in self.resolve(v).values():
                w.add(e.weight)
                a.add(e.activation)
        return w, a

    def units_touched(self, variant: str = DEFAULT_VARIANT) -> set[str]:
        """Units whose graph the plan changes for this variant (the caption fold touches embed)."""
        units = set()
        for name, e in self.resolve(variant).items():
            if e.weight != "bf16" or e.activation != "bf16" or e.smoothing is not None or e.rotation:
                units.add(e.unit)
                if e.smoothing is not None and name.endswith("cross_attn.kv_linear"):
                    units.add("embed")
        return units


# ---------------------------------------------------------------------- validation
@lru_cache(maxsize=1)
def plan_schema() -> dict:
    return json.loads(resources.files("qc_compile").joinpath("schemas/plan.schema.json").read_text())


def _field_path(err) -> str:
    return "/".join(str(p) for p in err.absolute_path) or "<root>"


def validate_schema(d: dict, where: str) -> None:
    import jsonschema

    validator = jsonschema.Draft202012Validator(plan_schema())
    errors = sorted(validator.iter_errors(d), key=lambda e: (len(list(e.absolute_path)), _field_path(e)))
    if errors:
        e = errors[0]
        # Prefer the most specific message for oneOf failures (e.g. an unknown format inside an entry).
        if e.context:
            e = sorted(e.context, key=lambda c: -len(list(c.absolute_path)))[0]
        more = f" ({len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
        raise UserError(f"{where}: field {_field_path(e)}: {e.message}{more}. Fix the plan or re-run qc-compile "
                        "calibrate.")


def validate(plan: Plan, *, linears: dict[str, dict] | None = None, model_name: str | None = None,
             config_sha256: str | None = None, weights_sha256: str | None = None, where: str = "plan") -> None:
    """Semantic checks. ``linears``: name -> {unit, in_features, out_features} from model.json."""
    if model_name is not None and plan.model["name"] != model_name:
        raise UserError(f"{where}: plan is for model {plan.model['name']!r} but the work dir holds {model_name!r}; "
                        "this plan comes from another work dir. Re-run qc-compile calibrate here.")
    if config_sha256 is not None and plan.model["config_sha256"] != config_sha256:
        raise UserError(f"{where}: plan.model.config_sha256 does not match this work dir's model configuration; the "
                        "plan was made for a different configuration. Re-run qc-compile calibrate here.")
    if weights_sha256 is not None and plan.model.get("weights_sha256") not in (None, weights_sha256):
        raise UserError(f"{where}: plan.model.weights_sha256 does not match the exported weights; it was calibrated "
                        "on other weights. Re-run qc-compile calibrate here.")
    if linears is not None:
        missing = sorted(set(linears) - set(plan.linears))
        unknown = sorted(set(plan.linears) - set(linears))
        if missing:
            raise UserError(f"{where}: field linears: missing {len(missing)} linear(s) of the model, e.g. "
                            f"{', '.join(missing[:3])}; every linear needs an entry.")
        if unknown:
            raise UserError(f"{where}: field linears/{unknown[0]}: no such linear layer in model "
                            f"{plan.model['name']} ({len(unknown)} unknown).")
    for name, e in plan.linears.items():
        info = linears[name] if linears is not None else None
        if info is not None and e.unit != info["unit"]:
            raise UserError(f"{where}: field linears/{name}/unit: {e.unit!r}, but the layer is in unit "
                            f"{info['unit']!r}.")
        _check_entry(plan, name, e, info, f"{where}: field linears/{name}")
    for v, overrides in plan.variants.items():
        for pattern in overrides:
            if not fnmatch.filter(plan.linears, pattern):
                raise UserError(f"{where}: field variants/{v}/{pattern}: matches no linear layer.")
        for name, e in plan.resolve(v).items():
            _check_entry(plan, name, e, linears[name] if linears is not None else None,
                         f"{where}: variant {v!r}, linear {name}")
    for i, v in enumerate(plan.schedule):
        if v != DEFAULT_VARIANT and v not in plan.variants:
            raise UserError(f"{where}: field schedule/{i}: unknown variant {v!r}; variants: "
                            f"{', '.join(plan.variant_names)}.")
    if plan.vc is not None and plan.vc["tensor"] not in plan.tensors:
        raise UserError(f"{where}: field vc/tensor: {plan.vc['tensor']!r} is not in the sidecar file.")
    # the caption fold: one shared smoothing vector for every kv_linear that smooths
    kv = [(n, plan.smoothing_vector(n)) for n in plan.linears if n.endswith("cross_attn.kv_linear")]
    kv = [(n, s) for n, s in kv if s is not None]
    if kv and not all(s.shape == kv[0][1].shape and np.array_equal(s, kv[0][1]) for _, s in kv):
        raise UserError(f"{where}: field linears/{kv[0][0]}/smoothing: cross_attn.kv_linear smoothing folds into "
                        "y_embedder.y_proj.fc2, whose output every block shares, so all kv_linear layers that smooth "
                        "must use the same vector (reference one sidecar tensor).")
    if kv and len(kv) != sum(1 for n in plan.linears if n.endswith("cross_attn.kv_linear")):
        raise UserError(f"{where}: field linears/*.cross_attn.kv_linear/smoothing: either every kv_linear smooths "
                        "(with the same vector, folded into y_proj.fc2) or none does.")


def _check_entry(plan: Plan, name: str, e: LinearPlan, info: dict | None, where: str) -> None:
    if e.weight not in WEIGHT_FORMATS:
        raise UserError(f"{where}/weight: unknown format {e.weight!r}; known: {', '.join(WEIGHT_FORMATS)}.")
    if e.activation not in ACTIVATION_FORMATS:
        raise UserError(f"{where}/activation: unknown format {e.activation!r}; known: "
                        f"{', '.join(ACTIVATION_FORMATS)}.")
    k = info["in_features"] if info else None
    wf, af = WEIGHT_FORMATS[e.weight], ACTIVATION_FORMATS[e.activation]
    for f, kind in ((wf, "weight"), (af, "activation")):
        if f.block and k is not None and k % f.block:
            raise UserError(f"{where}/{kind}: {f.name} needs the input size {k} to divide by its block {f.block}.")
    if e.activation == "bf16":
        if e.act_scale is not None:
            raise UserError(f"{where}/act_scale: must be null for bf16 activations, got {e.act_scale!r}.")
    elif e.activation in DYNAMIC_ACT:
        if e.act_scale != "dynamic":
            raise UserError(f"{where}/act_scale: {e.activation} activations are quantized dynamically; act_scale "
                            f"must be \"dynamic\", got {e.act_scale!r}.")
        if not e.act_amax or not math.isfinite(e.act_amax):
            raise UserError(f"{where}/act_amax: {e.activation} needs the calibrated amax (> 0) for its per-tensor "
                            "scale.")
    elif e.act_scale == "dynamic" and e.activation in ("fp8_e4m3", "int8"):
        pass  # fp8 / int8 per token, scales computed at run time (calibrate --act-scales dynamic)
    else:
        if not isinstance(e.act_scale, (int, float)) or isinstance(e.act_scale, bool) or not (
                0 < e.act_scale < math.inf):
            raise UserError(f"{where}/act_scale: {e.activation} activations need a static positive scale "
                            f"(amax / {af.qmax:g}) or \"dynamic\" (per token); got {e.act_scale!r}.")
    if e.rotation is not None:
        r = e.rotation
        if isinstance(r, bool) or not isinstance(r, int):
            raise UserError(f"{where}/rotation: must be an integer Hadamard block size (a power of two) or null, "
                            f"got {r!r}.")
        if r < 2 or r & (r - 1) or (k is not None and k % r):
            raise UserError(f"{where}/rotation: block {r} must be a power of two dividing the input size {k}.")
    if e.smoothing is not None:
        if isinstance(e.smoothing, dict) and e.smoothing["tensor"] not in plan.tensors:
            raise UserError(f"{where}/smoothing: sidecar tensor {e.smoothing['tensor']!r} not found in "
                            f"{(plan.sidecar or {}).get('file', 'the sidecar file (none recorded)')}.")
        s = plan.smoothing_vector(name)
        if s.ndim != 1 or (k is not None and s.shape[0] != k) or not np.all(np.isfinite(s)) or np.any(s <= 0):
            raise UserError(f"{where}/smoothing: needs {k} finite positive values (one per input channel), got "
                            f"shape {tuple(s.shape)}.")


# ---------------------------------------------------------------------- IO
def save_plan(plan: Plan, path: str | Path) -> str:
    """Write the sidecar (if any tensors) then plan.json, both atomically; returns the plan's sha256."""
    from safetensors.numpy import save

    path = Path(path)
    if plan.tensors:
        side = path.with_suffix(".safetensors")
        data = save({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in sorted(plan.tensors.items())})
        plan.sidecar = {"file": side.name, "sha256": write_bytes_atomic(side, data)}
    else:
        plan.sidecar = None
    validate_schema(plan.to_dict(), str(path))
    return write_json_atomic(path, plan.to_dict())


MAX_PLAN_BYTES = 64 << 20


def load_plan(path: str | Path, *, model_info=None) -> Plan:
    """Read, schema-validate and (with ``model_info``) semantically validate a plan; UserError names the field."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: plan not found; run `qc-compile calibrate {path.parent} --uniform FORMAT` first.")
    if not path.is_file():
        raise ArtifactError(f"{path}: the plan is not a regular file (a directory or a device); replace it with the "
                            "plan.json that qc-compile calibrate writes.")
    if path.stat().st_size > MAX_PLAN_BYTES:
        raise ArtifactError(f"{path}: {path.stat().st_size} bytes, larger than any plan ({MAX_PLAN_BYTES >> 20} MiB "
                            "at most; per-channel vectors live in the sidecar); the file is not a plan.")
    d = read_json(path, kind="plan")
    if d.get("schema_version") != SCHEMA_VERSION:
        raise ArtifactError(f"{path}: plan has schema_version {d.get('schema_version')!r}; this qc-compile reads "
                            f"{SCHEMA_VERSION}.")
    validate_schema(d, str(path))
    tensors = {}
    if d["sidecar"] is not None:
        from safetensors.numpy import load_file

        name = d["sidecar"]["file"]
        if Path(name).name != name or name in ("", ".", ".."):
            raise ArtifactError(f"{path}: field sidecar/file must be a file name beside the plan, got {name!r}.")
        side = path.with_name(name)
        if not side.is_file():
            raise ArtifactError(f"{path}: sidecar {side} is missing.")
        if sha256_file(side) != d["sidecar"]["sha256"]:
            raise ArtifactError(f"{side}: sha256 does not match plan.json's sidecar.sha256; the file changed after "
                                "the plan was written. Re-run qc-compile calibrate.")
        try:
            tensors = load_file(str(side))
        except Exception as e:  # noqa: BLE001  (safetensors raises its own SafetensorError, OSError, ...)
            raise ArtifactError(f"{side}: the plan's sidecar is not a readable safetensors file "
                                f"({type(e).__name__}: {str(e)[:120]}); qc-compile never unpickles. Re-run "
                                "qc-compile calibrate.") from None
        bad = [k for k, v in tensors.items() if v.dtype.kind != "f" or not np.all(np.isfinite(v))]
        if bad:
            raise ArtifactError(f"{side}: sidecar tensor {bad[0]!r} is not finite floating point; re-run qc-compile "
                                "calibrate.")
    try:
        plan = Plan.from_dict(d, tensors)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ArtifactError(f"{path}: the plan is malformed ({type(e).__name__}: {str(e)[:160]}); re-run qc-compile "
                            "calibrate.") from None
    if model_info is not None:
        lins = {li["name"]: li for li in model_info.linears()}
        validate(plan, linears=lins, model_name=model_info.name, config_sha256=model_info.config_sha256,
                 weights_sha256=model_info.data["weights"].get("state_sha256"), where=str(path))
    else:
        validate(plan, where=str(path))
    return plan


def uniform_plan(model_info, fmt: str, ranges: dict[str, dict], *, target: str = "any", exclude: list[str] = (),
                 blocks_only: bool = False, provenance: dict | None = None) -> tuple[Plan, list[str]]:
    """Every linear in one format (W and A; int4 formats are weight-only), from calibrated ranges; with
    ``blocks_only`` the embed and final units' linears stay bf16.

    Returns the plan and the names kept at bf16 (excluded by pattern or unit, or the format does not fit their shape).
    """
    from qc_compile.models.units import is_block

    if fmt not in WEIGHT_FORMATS:
        raise UserError(f"--uniform {fmt!r}: unknown format; known: {', '.join(WEIGHT_FORMATS)}.")
    w = fmt
    a = fmt if fmt in ACTIVATION_FORMATS else "bf16"  # int4_b* are weight-only
    kept: list[str] = []
    linears = {}
    for li in model_info.linears():
        name, k = li["name"], li["in_features"]
        amax = float(ranges[name]["amax"]) if name in ranges else None
        e = LinearPlan(unit=li["unit"], act_amax=amax)
        blocks = [f.block for f in (WEIGHT_FORMATS[w], ACTIVATION_FORMATS[a]) if f.block]
        if (any(fnmatch.fnmatch(name, p) for p in exclude) or any(k % b for b in blocks)
                or (blocks_only and not is_block(li["unit"]))):
            kept.append(name)
        else:
            e.weight, e.activation = w, a
            if a != "bf16":
                if amax is None:
                    raise UserError(f"calibration ranges lack linear {name}; re-run calibration.")
                e.act_scale = act_scale_for(a, amax)
        linears[name] = e
    plan = Plan(model={"name": model_info.name, "config_sha256": model_info.config_sha256,
                       "weights_sha256": model_info.data["weights"].get("state_sha256")},
                linears=linears, target=target, provenance=provenance or {})
    return plan, kept
