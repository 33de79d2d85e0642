"""Per-unit ONNX export of a diffusers Wan transformer (``qc-ref-wan``, ``wan2.1:PATH``, ``wan2.2:PATH``).

The same work dir as an STDiT3 export (DESIGN.md §1: ``model.json`` + ``onnx/fp/<unit>.onnx``, canonical linears,
``qc.*`` metadata, onnxruntime checked against torch before success), with what differs for diffusers models:

* ``model.family`` (``"wan"``) and ``model.config`` = the transformer's diffusers config (:class:`DiffusersConfig`);
* linears are named by their path in the diffusers transformer (``blocks.3.attn1.to_q``), the names its
  ``state_dict`` and every peer's tooling use; ``blocks.<i>.*`` belong to unit ``block_<i>``, ``proj_out`` to
  ``final``, the rest (condition embedder) to ``embed``;
* units and I/O are those of :class:`~qc_compile.models.diffusers_adapter.WanAdapter` (``embed`` returns the RoPE
  tables, fixed by the geometry, as outputs so every block graph takes them as inputs rather than holding a copy);
* the text length is fixed at export (``geometry.text_length``; only the batch axis is dynamic): qc-ref-wan's caption
  encoder pads to 12 tokens, Wan's pipelines pad UMT5 features to 512.

What the exporter needs (torch's TorchScript exporter, opset 19): Wan's q/k norm is ``nn.RMSNorm``, which exports
to ``aten::rms_norm`` that the exporter does not support; :func:`rms_norm_patch` swaps in the same arithmetic in
elementary ops for the duration of the export. Image-conditioned (I2V) transformers are refused: their embed takes
image features this export does not model yet.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import onnx
import torch
from torch import nn

from qc_compile.errors import UserError

FAMILY = "wan"
UNIT_INPUTS: dict[str, tuple[str, ...]] = {
    "embed": ("x", "timestep", "y"),
    "block": ("x", "y", "timestep_proj", "rope_cos", "rope_sin"),
    "final": ("x", "temb"),
}
UNIT_OUTPUTS: dict[str, tuple[str, ...]] = {
    "embed": ("x", "temb", "timestep_proj", "y", "rope_cos", "rope_sin"),
    "block": ("x",),
    "final": ("v",),
}
BATCH_FREE = ("rope_cos", "rope_sin")  # (1, N, 1, D): the same for every batch element
DEFAULT_TEXT_LENGTH = 512  # WanPipeline's max_sequence_length
WAN_VIDEO_DEFAULTS = (81, 480, 832)  # Wan 2.1 T2V's pipeline default


@dataclass(frozen=True)
class DiffusersConfig:
    """``model.config`` of a diffusers work dir: the family and the transformer's own diffusers config."""

    name: str
    family: str
    diffusers: dict

    def to_dict(self) -> dict:
        return {"name": self.name, "family": self.family, "diffusers": self.diffusers}

    @classmethod
    def from_dict(cls, d: dict) -> "DiffusersConfig":
        unknown = set(d) - {"name", "family", "diffusers"}
        if unknown or not isinstance(d.get("diffusers"), dict):
            raise ValueError(f"expected name, family and diffusers fields; got {sorted(d)}")
        return cls(str(d["name"]), str(d["family"]), dict(d["diffusers"]))

    @classmethod
    def of(cls, name: str, transformer: nn.Module) -> "DiffusersConfig":
        cfg = json.loads(transformer.to_json_string()) if hasattr(transformer, "to_json_string") else \
            dict(transformer.config)
        cfg = {k: v for k, v in cfg.items() if not k.startswith("_") or k == "_class_name"}
        return cls(name, FAMILY, cfg)

    @property
    def head_dim(self) -> int:
        return int(self.diffusers["attention_head_dim"])

    @property
    def hidden_size(self) -> int:
        return int(self.diffusers["num_attention_heads"]) * self.head_dim

    @property
    def patch_size(self) -> tuple[int, int, int]:
        return tuple(self.diffusers["patch_size"])


# ----------------------------------------------------------------------------------------------- linears
def unit_of(name: str) -> tuple[str, str]:
    """(unit, role) of a linear of a Wan transformer: ``blocks.3.attn1.to_q`` -> (``block_3``, ``attn1.to_q``)."""
    parts = name.split(".")
    if len(parts) > 2 and parts[0] == "blocks" and parts[1].isdigit():
        return f"block_{parts[1]}", ".".join(parts[2:])
    if name == "proj_out" or name.startswith("proj_out."):
        return "final", name
    return "embed", name


def transformer_linears(transformer: nn.Module):
    """Every nn.Linear of the transformer as :class:`qc_compile.linears.LinearInfo` (diffusers module paths)."""
    from qc_compile.linears import model_linears

    return model_linears(transformer, unit_of=unit_of)


@contextlib.contextmanager
def rms_norm_patch():
    """``nn.RMSNorm`` in elementary fp32-preserving ops (same arithmetic) while exporting: aten::rms_norm has no
    TorchScript-exporter symbolic. Keeping diffusers' float()/type_as casts around it gave an invalid graph."""
    orig = nn.RMSNorm.forward

    def forward(self, x):
        eps = self.eps if self.eps is not None else torch.finfo(x.dtype).eps
        y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        return y * self.weight if self.weight is not None else y

    nn.RMSNorm.forward = forward
    try:
        yield
    finally:
        nn.RMSNorm.forward = orig


class ExportWanAttnProcessor:
    """diffusers' ``WanAttnProcessor`` (text-to-video path) with its RoPE written as stack + flatten: the original
    fills ``torch.empty_like(q)`` by strided assignment, which the exporter turns into a ScatterND on a constant of
    the traced batch size (so the graph would be wrong at any other batch). Same arithmetic, same order."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        from diffusers.models.attention_dispatch import dispatch_attention_fn
        from diffusers.models.transformers.transformer_wan import _get_qkv_projections

        query, key, value = _get_qkv_projections(attn, hidden_states, encoder_hidden_states)
        query, key = attn.norm_q(query), attn.norm_k(key)
        query, key, value = (t.unflatten(2, (attn.heads, -1)) for t in (query, key, value))
        if rotary_emb is not None:
            query, key = (_rope(t, *rotary_emb) for t in (query, key))
        out = dispatch_attention_fn(query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False)
        out = out.flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](out))


def _rope(x: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = freqs_cos[..., 0::2], freqs_sin[..., 1::2]
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2).type_as(x)


@contextlib.contextmanager
def export_patches(transformer: nn.Module):
    """Everything the export swaps in (numerically identical), undone afterwards: :func:`rms_norm_patch` and
    :class:`ExportWanAttnProcessor` on every attention module of ``transformer``."""
    from diffusers.models.transformers.transformer_wan import WanAttention

    attns = [m for m in transformer.modules() if isinstance(m, WanAttention)]
    saved = [m.processor for m in attns]
    try:
        for m in attns:
            m.processor = ExportWanAttnProcessor()
        with rms_norm_patch():
            yield
    finally:
        for m, p in zip(attns, saved):
            m.processor = p


class UnitModule(nn.Module):
    """One unit of the adapter with positional tensors in ``UNIT_INPUTS`` order (what the exporter traces). The
    transformer is registered as ``transformer`` so graph scopes read ``/transformer/blocks.0/attn1/to_q/...``."""

    def __init__(self, adapter, name: str, g) -> None:
        super().__init__()
        self.transformer = adapter.transformer
        self._adapter = [adapter]  # not a submodule: keeps the scopes under `transformer`
        self.unit, self.kind, self.g = name, adapter.unit_kind(name), g

    def forward(self, *tensors: torch.Tensor):
        adapter = self._adapter[0]
        inputs = dict(zip(UNIT_INPUTS[self.kind], tensors))
        out = adapter.run_unit(self.unit, inputs, self.g)
        return tuple(out[n] for n in UNIT_OUTPUTS[self.kind])


def example_inputs(config: DiffusersConfig, g, text_length: int, kind: str, batch: int = 2,
                   seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Fresh random inputs in ``UNIT_INPUTS`` order with realistic magnitudes (what the embed produces)."""
    gen = torch.Generator().manual_seed(seed)
    d = config.diffusers
    C, D = config.hidden_size, config.head_dim
    N = g.N

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=gen) * scale

    if kind == "embed":
        return (randn(batch, d["in_channels"], g.frames, g.height, g.width),
                torch.rand(batch, generator=gen) * 1000, randn(batch, text_length, d["text_dim"]))
    if kind == "block":
        ang = torch.rand(1, N, 1, D // 2, generator=gen) * 6.28
        ang = torch.stack((ang, ang), -1).flatten(-2)  # Wan's tables repeat each angle for the pair
        return randn(batch, N, C), randn(batch, text_length, C), randn(batch, 6, C, scale=0.3), ang.cos(), ang.sin()
    return randn(batch, N, C), randn(batch, C, scale=0.3)


def check_exportable(transformer: nn.Module, name: str) -> None:
    cfg = transformer.config
    if getattr(cfg, "image_dim", None) is not None or getattr(cfg, "added_kv_proj_dim", None) is not None:
        raise UserError(f"--model {name}: an image-conditioned Wan transformer (image_dim {cfg.image_dim}); export "
                        "handles text-to-video Wan transformers (Wan 2.1/2.2 T2V) so far. Run it through "
                        "qc_compile.enable(pipe) instead.")


def geometry_for(loaded, frames: int | None, height: int | None, width: int | None):
    """(video sizes, model geometry): qc-ref-wan samples pixels (the sizes are the model's); a Wan folder's video
    size maps through its VAE's ratios (Wan 2.1 T2V's 81 x 480 x 832 by default)."""
    adapter = loaded.model
    if getattr(loaded, "name", "") == "qc-ref-wan":
        d = loaded.defaults
        bad = [f"--{k} {v}" for k, v, own in (("frames", frames, d.frames), ("height", height, d.height),
                                              ("width", width, d.width)) if v is not None and v != own]
        if bad:
            raise UserError(f"{', '.join(bad)}: qc-ref-wan samples at its folder's own size {d.frames}x{d.height}x"
                            f"{d.width} (its sampler, calibration and runs use that size); drop "
                            + ("it." if len(bad) == 1 else "them."))
        video = (d.frames, d.height, d.width)
        from qc_compile.models.diffusers_adapter import DiffusersGeometry

        return video, DiffusersGeometry(*video, tuple(loaded.config.patch_size))
    video = (frames or WAN_VIDEO_DEFAULTS[0], height or WAN_VIDEO_DEFAULTS[1], width or WAN_VIDEO_DEFAULTS[2])
    return video, adapter.geometry_for_video(*video)


def model_spec(name: str) -> str:
    """The name model.json records: ``qc-ref-wan``, or ``FAMILY:PATH`` with PATH absolute (a work dir is used from
    other directories; a relative folder would then name another one)."""
    family, sep, path = name.partition(":")
    return f"{family}:{Path(path).resolve()}" if sep else name


def text_length_of(loaded, text_length: int | None) -> int:
    if getattr(loaded, "name", "") == "qc-ref-wan":
        from qc_compile.models.qc_ref_wan import TEXT_ENCODER_CONFIG

        n = TEXT_ENCODER_CONFIG["max_length"]
        if text_length not in (None, n):
            raise UserError(f"--text-length {text_length}: qc-ref-wan's caption encoder pads to {n} tokens; drop it.")
        return n
    return text_length or DEFAULT_TEXT_LENGTH


def export_diffusers_model(loaded, work, *, frames: int | None, height: int | None, width: int | None,
                           text_length: int | None = None, opset: int = 19, weights: dict, progress: bool = True,
                           verify: bool = True):
    """Export every unit of a loaded Wan model into ``work`` and write ``model.json`` last (as :func:`export_model`)."""
    from tqdm.auto import tqdm

    from qc_compile.export import (EXPORT_BATCH, VERIFY_RTOL, ExportResult, canonicalize, check_opset,
                                   io_records, onnx_output_name, verify_unit, write_model_json)
    from qc_compile.linears import config_sha256, linears_by_unit
    from qc_compile.onnx_utils import file_records, save_onnx, set_metadata

    check_opset(opset)
    transformer = loaded.transformer.float().eval()
    check_exportable(transformer, loaded.name)
    adapter = loaded.model
    video, g = geometry_for(loaded, frames, height, width)
    L = text_length_of(loaded, text_length)
    cfg = DiffusersConfig.of(model_spec(loaded.name), transformer)
    cfg_hash = config_sha256(cfg)
    by_unit = linears_by_unit(transformer_linears(transformer))
    modules = dict(transformer.named_modules())
    result = ExportResult()
    start = time.perf_counter()
    torch.set_grad_enabled(False)
    for name in tqdm(adapter.unit_names(), desc="export", unit="unit", disable=not progress):
        t0 = time.perf_counter()
        kind = adapter.unit_kind(name)
        module = UnitModule(adapter, name, g)
        ins = example_inputs(cfg, g, L, kind, batch=EXPORT_BATCH, seed=1)
        in_names, out_names = list(UNIT_INPUTS[kind]), [onnx_output_name(n) for n in UNIT_OUTPUTS[kind]]
        dyn = {n: {0: "batch"} for n in in_names if n not in BATCH_FREE}
        dyn.update({onnx_output_name(n): {0: "batch"} for n in UNIT_OUTPUTS[kind] if n not in BATCH_FREE})
        unit_lins = {li.name: modules[li.name] for li in by_unit.get(name, [])}
        with tempfile.TemporaryDirectory() as tmp, export_patches(transformer), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TracerWarnings about Python branches on fixed geometry sizes
            tmp_path = Path(tmp) / f"{name}.onnx"
            torch.onnx.export(module, ins, str(tmp_path), input_names=in_names, output_names=out_names,
                              opset_version=opset, dynamo=False, do_constant_folding=True, dynamic_axes=dyn)
            proto = onnx.load(str(tmp_path))
            fix_output_shapes(proto, [tuple(t.shape) for t in module(*ins)], UNIT_OUTPUTS[kind])
        proto = canonicalize(proto, unit_lins, prefix="transformer.")
        set_metadata(proto, model=cfg.name, config_sha256=cfg_hash, unit=name, stage="fp",
                     geometry=f"{g.frames}x{g.height}x{g.width}")
        path = work.fp_onnx(name)
        files = save_onnx(proto, path)
        err = None
        if verify:  # at batch sizes other than the traced one: a constant of the traced batch would show here
            err = max(verify_unit(path, module, example_inputs(cfg, g, L, kind, batch=b, seed=2 + b), kind,
                                  UNIT_INPUTS, UNIT_OUTPUTS) for b in (1, EXPORT_BATCH + 1))
            if not err <= VERIFY_RTOL:
                raise RuntimeError(f"unit {name}: onnxruntime output differs from torch by {err:.3g} (relative, "
                                   f"tolerance {VERIFY_RTOL}); the exported graph is wrong. This is a bug.")
        result.units.append({
            "name": name, "kind": kind, "onnx": file_records(files, work.root),
            "inputs": io_records(proto, kind, "inputs", UNIT_INPUTS, UNIT_OUTPUTS),
            "outputs": io_records(proto, kind, "outputs", UNIT_INPUTS, UNIT_OUTPUTS),
            "linears": [{"name": li.name, "role": li.role, "in_features": li.in_features,
                         "out_features": li.out_features} for li in by_unit.get(name, [])],
            "verify_rel_err": err, "seconds": round(time.perf_counter() - t0, 3),
        })
        del proto
    result.seconds = time.perf_counter() - start
    write_model_json(work, {"name": cfg.name, "family": FAMILY, "config": cfg.to_dict(), "config_sha256": cfg_hash},
                     weights, {"video": dict(zip(("frames", "height", "width"), video)),
                               "model": {"frames": g.frames, "height": g.height, "width": g.width,
                                         "patch_size": list(g.patch_size)},
                               "grid": list(g.grid), "tokens": g.N, "text_length": L}, opset, result)
    return result


def fix_output_shapes(proto: onnx.ModelProto, shapes: list[tuple[int, ...]], names: tuple[str, ...]) -> None:
    """Concrete output shapes (the exporter leaves names like ``Transposex_out_dim_1``): every size is fixed by
    the geometry except the batch axis, which is ``batch`` (none for the RoPE tables)."""
    for vi, shape, name in zip(proto.graph.output, shapes, names):
        dims = vi.type.tensor_type.shape.dim
        del dims[:]
        for i, n in enumerate(shape):
            d = dims.add()
            if i == 0 and name not in BATCH_FREE:
                d.dim_param = "batch"
            else:
                d.dim_value = int(n)


def weights_record(loaded, checkpoint: Path | None) -> dict:
    """Which files the export came from, with their sha256 and the transformer's state digest (checked on load)."""
    from qc_compile.artifacts import sha256_file
    from qc_compile.workdir import state_digest

    digest = state_digest(loaded.transformer)
    if loaded.name == "qc-ref-wan":
        files = dict(loaded.meta.get("files") or {})
        if checkpoint is None:
            return {"source": "shipped", "path": str(loaded.checkpoint), "files": files, "state_sha256": digest}
        return {"source": "checkpoint", "path": str(Path(checkpoint).resolve()), "files": files,
                "state_sha256": digest}
    folder = Path(loaded.checkpoint).resolve()
    files = {str(f.relative_to(folder)): sha256_file(f) for f in sorted(folder.rglob("*.safetensors"))
             if "transformer" in f.relative_to(folder).parts or f.parent == folder}
    return {"source": "checkpoint", "path": str(folder), "files": files, "state_sha256": digest}
