"""Unit executor over onnxruntime sessions: the per-unit ONNX graphs (FP, or the Q/DQ graphs of a build) in the
sampler, for end-to-end numerics of the compiled graphs on a machine without a GPU.

Same interface and semantics as :class:`~qc_compile.runtime.executor.TorchExecutor` for what whole-unit graphs can do:
``unit_names``, ``block_units``, ``residuals``, ``reset()`` and ``step(z, timestep, cond, decisions) -> (v, stats)``
with COMPUTE / REUSE (apply the residual cached at the unit's last computation) / PRUNE per block unit, and
``UnitDecision.variant`` choosing the precision variant's graph (the default graph when the unit has none). The
statistics columns follow ``STAT_NAMES`` (``in_norm``, ``res_norm``, ``res_rel_l1``, ``cos_prev`` and, where the
installed policy module defines them, ``in_out_rel_l1`` / ``action``), computed with torch on the outputs. Sub-block
decisions (``parts``) and in-step gates need the block split below unit level, which a unit graph does not expose:
they raise.

Q/DQ graphs holding TensorRT-only ops (NVFP4) run through :func:`~qc_compile.passes.ort_twin.pass_ort_twin`.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import torch

from qc_compile.runtime.executor import Conditioning
from qc_compile.runtime.policy import COMPUTE, STAT_NAMES, Action, UnitDecision

_STAT = {n: i for i, n in enumerate(STAT_NAMES)}


def _session_for(path, twin: bool = True):
    import onnx_graphsurgeon as gs

    from qc_compile.onnx_utils import load_onnx, ort_session
    from qc_compile.passes.ort_twin import needs_twin, pass_ort_twin

    proto = load_onnx(path, what="unit graph")
    graph = gs.import_onnx(proto)
    if twin and needs_twin(graph):
        proto = gs.export_onnx(pass_ort_twin(graph))
    return ort_session(proto)


class OrtExecutor:
    """``sessions[unit][variant]``; ``io[unit]`` = {"inputs": [...], "outputs": [...]} records from model.json."""

    def __init__(self, sessions: Mapping[str, Mapping[str, object]], io: Mapping[str, dict],
                 unit_names: tuple[str, ...]) -> None:
        self.sessions = {u: dict(v) for u, v in sessions.items()}
        self.io = dict(io)
        self.unit_names = tuple(unit_names)
        self.block_units = tuple(n for n in self.unit_names if n not in ("embed", "final"))
        self.residuals: dict[str, torch.Tensor] = {}
        missing = [u for u in self.unit_names if "default" not in self.sessions.get(u, {})]
        if missing:
            raise ValueError(f"no default graph for unit(s) {missing}")

    @classmethod
    def from_workdir(cls, work, stage: str = "q", target: str | None = None) -> "OrtExecutor":
        """``stage="fp"``: the exported graphs; ``"q"``: the graphs of a build (``target``: which manifest entry;
        default the first built). The manifest's sha256 records are checked first."""
        from qc_compile.workdir import WorkDir, read_model_info

        work = work if isinstance(work, WorkDir) else WorkDir(work)
        info = read_model_info(work)
        io = {u["name"]: {"inputs": u["inputs"], "outputs": u["outputs"]} for u in info.units}
        sessions: dict[str, dict] = {}
        if stage == "fp":
            from qc_compile.export import check_fp_graph

            for u in info.unit_names:
                check_fp_graph(work.fp_onnx(u), info.name, info.config_sha256, u)
                sessions[u] = {"default": _session_for(work.fp_onnx(u), twin=False)}
            return cls(sessions, io, tuple(info.unit_names))
        from qc_compile.build import verify_manifest

        manifest = verify_manifest(work, target, info=info)
        targets = manifest["targets"]
        name = target or next((t for t, r in targets.items() if r["backend"] != "torch"), None)
        if name is None or "package" in targets[name]["units"]:
            raise ValueError("no Q/DQ graphs in this work dir's manifest; run qc-compile build first")
        for u, rec in targets[name]["units"].items():
            sessions[u] = {}
            for v, vrec in rec["variants"].items():
                src = rec["variants"][vrec["same_as"]] if "same_as" in vrec else vrec
                sessions[u][v] = _session_for(work.root / src["onnx"][0]["path"])
        return cls(sessions, io, tuple(info.unit_names))

    def reset(self) -> None:
        self.residuals.clear()

    def _run(self, unit: str, variant: str, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        sess = self.sessions[unit].get(variant) or self.sessions[unit]["default"]
        names = {i.name for i in sess.get_inputs()}
        feed = {}
        for rec in self.io[unit]["inputs"]:
            if rec["onnx_name"] in names:
                t = inputs[rec["name"]]
                feed[rec["onnx_name"]] = t.detach().cpu().numpy().astype(
                    np.bool_ if rec["dtype"] == "bool" else np.float32)
        outs = sess.run([r["onnx_name"] for r in self.io[unit]["outputs"]], feed)
        return {r["name"]: torch.from_numpy(np.asarray(o)) for r, o in zip(self.io[unit]["outputs"], outs)}

    @torch.no_grad()
    def step(self, z: torch.Tensor, timestep: torch.Tensor, cond: Conditioning,
             decisions: Mapping[str, UnitDecision]) -> tuple[torch.Tensor, torch.Tensor]:
        device = z.device
        stats = torch.full((len(self.unit_names), len(STAT_NAMES)), float("nan"), device=z.device)
        emb = self._run("embed", decisions.get("embed", COMPUTE).variant,
                        {"x": z, "timestep": timestep, "y": cond.y, "mask": cond.mask, "fps": cond.fps})
        h, prev = emb["x"], None
        for i, name in enumerate(self.block_units, start=1):
            d = decisions.get(name, COMPUTE)
            if getattr(d, "parts", None) is not None or getattr(d, "gate", None) is not None:
                raise NotImplementedError("OrtExecutor runs whole unit graphs: sub-block parts and in-step gates need "
                                          "the torch executor")
            row = stats[i]
            if d.action is Action.PRUNE:
                if "action" in _STAT:
                    row[_STAT["action"]] = 2.0
                continue
            if d.action is Action.REUSE:
                if name not in self.residuals:
                    raise RuntimeError(f"policy asked to reuse {name} before it was ever computed")
                h = prev = h + self.residuals[name]
                if "action" in _STAT:
                    row[_STAT["action"]] = 1.0
                continue
            if d.action is not Action.COMPUTE:
                raise NotImplementedError(f"OrtExecutor does not support action {d.action.value!r}")
            out = self._run(name, d.variant, {"x": h, "t_mlp": emb["t_mlp"], "y": emb["y"], "mask": cond.mask})["x"]
            res = (out - h).float()
            row[0] = h.float().norm()
            row[1] = res.norm()
            cached = self.residuals.get(name)
            if cached is not None:
                row[2] = (res - cached).abs().sum() / cached.abs().sum().clamp_min(1e-12)
            if prev is not None:
                row[3] = torch.nn.functional.cosine_similarity(out.float().flatten(), prev.float().flatten(), dim=0)
            if "in_out_rel_l1" in _STAT:
                row[_STAT["in_out_rel_l1"]] = res.abs().sum() / h.float().abs().sum().clamp_min(1e-12)
            if "action" in _STAT:
                row[_STAT["action"]] = 0.0
            self.residuals[name] = res
            h = prev = out
        v = self._run("final", decisions.get("final", COMPUTE).variant, {"x": h, "t": emb["t"]})["v"]
        return v.to(device), stats.to(device)
