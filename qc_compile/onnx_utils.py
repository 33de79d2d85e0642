"""ONNX file IO shared by export, the graph passes, build and compare.

* :func:`save_onnx` writes a model atomically; a model whose tensors exceed :data:`EXTERNAL_DATA_THRESHOLD`
  goes to ``<name>.onnx`` + ``<name>.onnx.data`` (both written under temp names and renamed, data first).
* :func:`load_onnx` turns a missing, truncated or foreign file into a one-paragraph :class:`UserError`.
* Every graph qc-compile writes carries ``metadata_props`` (``qc.format``, ``qc.model``, ``qc.config_sha256``,
  ``qc.unit``, ``qc.stage``) so a later stage can tell our files from someone else's.
* :func:`ort_session` opens an onnxruntime session with graph optimisations **off**. onnxruntime 1.31 rewrites Q/DQ
  graphs in ways that change their numbers: the extended level fuses Q/DQ + MatMul into integer kernels
  (MatMulIntegerToFloat) that reject FP8 and, for per-channel INT8 on the ``[K, N]`` weight axis, gave 10% errors;
  even the basic level's QDQPropagationTransformer turned a correct FP8 W8A8 linear (error 0.14) into a wrong one
  (error 3.2) when the quantized tensor also fed another node. The comparisons must measure the ONNX Q/DQ
  semantics, so no rewrite is allowed (:data:`ORT_OPT_LEVEL`, also used for polygraphy's SessionFromOnnx). The same
  holds on the GPU (``device="cuda"``, onnxruntime-gpu's CUDA provider): the fusions are provider-independent graph
  rewrites, so they stay off there too.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterable

import numpy as np
import onnx
from onnx import helper

from qc_compile.artifacts import atomic_write, sha256_file
from qc_compile.errors import ArtifactError

FORMAT = "qc-compile/onnx"
EXTERNAL_DATA_THRESHOLD = 1_800_000_000  # bytes of tensor data; protobuf refuses messages over 2 GiB
ORT_MAX_IR = 11


def tensor_bytes(model: onnx.ModelProto) -> int:
    """Bytes of initializer data held inline."""
    total = 0
    for t in model.graph.initializer:
        total += len(t.raw_data) if t.raw_data else t.ByteSize()
    return total


def fix_ir_version(model: onnx.ModelProto) -> onnx.ModelProto:
    """The lowest IR version the default-domain opset needs (onnxruntime 1.31 reads up to IR 11)."""
    default = [o for o in model.opset_import if o.domain in ("", "ai.onnx")]
    need = helper.find_min_ir_version_for(default) if default else 8
    model.ir_version = max(need, 8) if need <= ORT_MAX_IR else need
    return model


def set_metadata(proto: onnx.ModelProto, **items: str) -> None:
    props = {p.key: p.value for p in proto.metadata_props}
    props.update({f"qc.{k}": str(v) for k, v in items.items()})
    props["qc.format"] = FORMAT
    del proto.metadata_props[:]
    for k in sorted(props):
        proto.metadata_props.add(key=k, value=props[k])


def get_metadata(model: onnx.ModelProto) -> dict[str, str]:
    return {p.key[3:]: p.value for p in model.metadata_props if p.key.startswith("qc.")}


def save_onnx(model: onnx.ModelProto, path: str | os.PathLike) -> list[Path]:
    """Write ``model`` atomically; returns the files written (the .onnx, and its .data file when external)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fix_ir_version(model)
    data_path = path.with_name(path.name + ".data")
    if tensor_bytes(model) < EXTERNAL_DATA_THRESHOLD:
        with atomic_write(path) as f:
            f.write(model.SerializeToString())
        with contextlib.suppress(FileNotFoundError):
            data_path.unlink()  # a stale side file from an earlier, larger export
        return [path]
    # External data: write both files in a temp folder beside the target, then rename data first, model last.
    with tempfile.TemporaryDirectory(prefix=f".{path.name}.", dir=path.parent) as tmp:
        tmp_model = Path(tmp) / path.name
        onnx.save_model(model, str(tmp_model), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data_path.name, size_threshold=1024)
        for p in (Path(tmp) / data_path.name, tmp_model):
            with open(p, "rb") as f:
                os.fsync(f.fileno())
        os.replace(Path(tmp) / data_path.name, data_path)
        os.replace(tmp_model, path)
    return [path, data_path]


def load_onnx(path: str | os.PathLike, *, what: str = "ONNX graph", load_external_data: bool = True,
              expect: dict[str, str] | None = None) -> onnx.ModelProto:
    """Load an ONNX file with clear errors; ``expect`` checks our metadata (e.g. ``{"model": "qc-ref"}``)."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path}: {what} not found. Re-run the stage that writes it (qc-compile export / build).")
    try:
        model = onnx.load(str(path), load_external_data=load_external_data)
    except Exception as e:  # protobuf DecodeError, missing external data, ...
        raise ArtifactError(f"{path}: cannot read this {what} ({type(e).__name__}: {str(e)[:200]}); the file is "
                            "truncated or is not an ONNX model. Re-run the stage that writes it.") from None
    if not model.graph.node:
        raise ArtifactError(f"{path}: {what} has no nodes; the file is truncated or not an ONNX model. Re-run the "
                            "stage that writes it.")
    if expect is not None:
        meta = get_metadata(model)
        if meta.get("format") != FORMAT:
            raise ArtifactError(f"{path}: this ONNX file was not written by qc-compile (no qc.* metadata), so it is "
                                f"not the {what} this work dir expects. Re-run qc-compile export into this work dir.")
        for k, v in expect.items():
            if meta.get(k) != v:
                raise ArtifactError(f"{path}: {what} was written for {k}={meta.get(k)!r}, but this work dir expects "
                                    f"{k}={v!r}. The file comes from another model or stage; re-run qc-compile "
                                    "export (and build) into this work dir.")
    return model


def onnx_files(path: str | os.PathLike) -> list[Path]:
    """The model file and, when present, its external-data side file."""
    path = Path(path)
    data = path.with_name(path.name + ".data")
    return [path, data] if data.is_file() else [path]


def file_records(paths: Iterable[Path], root: Path) -> list[dict]:
    return [{"path": str(p.relative_to(root)), "sha256": sha256_file(p), "bytes": p.stat().st_size} for p in paths]


def ort_providers(device: str = "cpu") -> list:
    """onnxruntime providers for ``device``: ``cpu``, or ``cuda[:N]`` = onnxruntime-gpu's CUDA provider on GPU N with
    the CPU provider behind it for the ops the CUDA provider lacks (onnxruntime places those on the CPU itself)."""
    if not str(device).startswith("cuda"):
        return ["CPUExecutionProvider"]
    index = int(str(device).split(":", 1)[1]) if ":" in str(device) else 0
    return [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"]


def ort_session(model: onnx.ModelProto | str | os.PathLike | bytes, threads: int | None = None,
                device: str = "cpu"):
    """An onnxruntime session without graph rewrites (see the module docstring) on ``device`` (``cpu`` or
    ``cuda[:N]``; the caller checks that the CUDA provider exists, :func:`ort_providers`)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort_opt_level()
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
    if isinstance(model, onnx.ModelProto):
        fix_ir_version(model)
        if tensor_bytes(model) < EXTERNAL_DATA_THRESHOLD:
            model = model.SerializeToString()
        else:
            raise ValueError("large in-memory models: save them first and open the file")
    elif not isinstance(model, bytes):
        model = str(model)
    sess = ort.InferenceSession(model, sess_options=so, providers=ort_providers(device))
    if str(device).startswith("cuda") and sess.get_providers()[0] != "CUDAExecutionProvider":
        # onnxruntime falls back to the CPU silently when the CUDA provider's libraries fail to load
        raise ArtifactError(f"onnxruntime could not start its CUDA provider for {device} (session providers: "
                            f"{sess.get_providers()}); check that the CUDA and cuDNN libraries onnxruntime-gpu "
                            f"{ort.__version__} needs are installed (its log above says which one failed to load).")
    return sess


def ort_opt_level():
    import onnxruntime as ort

    return ort.GraphOptimizationLevel.ORT_DISABLE_ALL


NP_DTYPE = {"float32": np.float32, "bool": np.bool_, "int64": np.int64, "float16": np.float16}
