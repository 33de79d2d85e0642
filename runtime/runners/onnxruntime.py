"""The onnxruntime runner: the per-unit ONNX graphs of a work dir (the exported FP graphs, or the Q/DQ graphs of a
build, one per precision variant), for end-to-end numerics of the compiled graphs on a machine without a GPU.

Whole units only (no block sub-steps, no in-step gates). Q/DQ graphs holding TensorRT-only ops (NVFP4) run through
their onnxruntime twin. ``device="cuda"`` uses onnxruntime-gpu's CUDA provider (the ``ort-gpu`` extra), with graph
optimizations off as on the CPU (:mod:`qc_compile.onnx_utils` says why).
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import torch

from qc_compile.errors import UserError
from qc_compile.runtime.runners.sources import unit_io, variant_sources


def check_ort_device(device: str) -> None:
    """UserError unless onnxruntime can run on ``device`` (``cuda`` needs onnxruntime-gpu's CUDA provider)."""
    if not str(device).startswith("cuda"):
        return
    import onnxruntime as ort

    have = ort.get_available_providers()
    if "CUDAExecutionProvider" not in have:
        raise UserError(
            f"--executor onnxruntime --device {device} needs onnxruntime-gpu's CUDAExecutionProvider, and the "
            f"onnxruntime installed here ({ort.__version__}) has only {', '.join(have)}. On a machine with an NVIDIA "
            "GPU and driver, switch to the GPU build: `pip install 'qc-compile[ort-gpu]' && pip uninstall -y "
            "onnxruntime && pip install --force-reinstall --no-deps 'onnxruntime-gpu>=1.18,<1.32'` (both wheels "
            "ship the same `onnxruntime` package, so only one may stay), or run the Q/DQ graphs with --device cpu. "
            "Graph optimizations stay off on the GPU as on the CPU: onnxruntime's Q/DQ fusions change the numbers "
            "the graphs define.")


def session_for(path, device: str = "cpu"):
    """An onnxruntime session for one ONNX file as it is (graphs with TensorRT-only ops need their twin)."""
    from qc_compile.onnx_utils import ort_session

    check_ort_device(device)
    return ort_session(path, device=device)


class OrtRunner:
    """``sessions[unit][variant]``; ``io[unit]`` = {"inputs": [...], "outputs": [...]} records from model.json."""

    backend = "onnxruntime"
    supports: frozenset[str] = frozenset()
    stats = "torch"

    def __init__(self, sessions: Mapping[str, Mapping[str, object]], io: Mapping[str, dict],
                 unit_names: tuple[str, ...], device: str = "cpu") -> None:
        self.device = torch.device(device)
        self.sessions = {u: dict(v) for u, v in sessions.items()}
        self.io = dict(io)
        self.unit_names = tuple(unit_names)
        missing = [u for u in self.unit_names if "default" not in self.sessions.get(u, {})]
        if missing:
            raise ValueError(f"no default graph for unit(s) {missing}")

    @classmethod
    def from_workdir(cls, work, stage: str = "q", target: str | None = None, device: str = "cpu") -> "OrtRunner":
        """``stage="fp"``: the exported graphs; ``"q"``: the graphs of a build (``target``: which manifest entry;
        default the first built). Every file's sha256 is checked first. ``device="cuda[:N]"`` runs them with
        onnxruntime-gpu's CUDA provider (inputs and outputs still cross the host: this backend is for numerics)."""
        from qc_compile.manifest import ort_session_for

        check_ort_device(device)
        src = variant_sources(work, stage=stage, target=target, need="onnx")
        sessions = {u: {v: ort_session_for(s, device=device) for v, s in vs.items()} for u, vs in src.files.items()}
        return cls(sessions, src.io, src.unit_names, device=device)

    def run_unit(self, unit: str, variant: str, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        sess = self.sessions[unit].get(variant) or self.sessions[unit]["default"]
        names = {i.name for i in sess.get_inputs()}
        feed = {}
        for rec in self.io[unit]["inputs"]:
            if rec["onnx_name"] in names:
                t = inputs[rec["name"]]
                feed[rec["onnx_name"]] = t.detach().cpu().numpy().astype(
                    np.bool_ if rec["dtype"] == "bool" else np.float32)
        outs = sess.run([r["onnx_name"] for r in self.io[unit]["outputs"]], feed)
        return {r["name"]: torch.from_numpy(np.asarray(o)).to(self.device)
                for r, o in zip(self.io[unit]["outputs"], outs)}

    def block_steps(self, unit, variant, ctx):
        raise NotImplementedError("the onnxruntime runner runs whole unit graphs")

    def begin_step(self, h: torch.Tensor, ctx) -> None:
        pass

    def describe(self) -> dict:
        return {"runner": self.backend, "device": str(self.device),
                "variants": sorted({v for s in self.sessions.values() for v in s})}


__all__ = ["OrtRunner", "check_ort_device", "session_for", "unit_io"]
