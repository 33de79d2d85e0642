"""The runners a :class:`qc_compile.diffusers_enable.QCSession` drives: the adapter's torch modules
(:class:`AdapterRunner`), or a work dir's unit graphs through onnxruntime / TensorRT (:class:`WorkDirGraphs`, one per
session, checked against the transformer once, and a :class:`WorkDirRunner` view of it per CFG branch)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch

from qc_compile.errors import UserError


class AdapterRunner:
    """The torch runner over a diffusers adapter, plus the embed inputs the runtime's ``Conditioning`` does not
    carry (Wan I2V image features, CogVideoX's rotary table / ofs / timestep_cond): set per call in ``extra``."""

    def __init__(self, adapter: Any, g: Any) -> None:
        from qc_compile.runtime.runners.torch import TorchRunner

        self._torch = TorchRunner(adapter, g)
        self.backend, self.supports, self.stats = "torch", self._torch.supports, self._torch.stats
        self.unit_names = self._torch.unit_names
        self.extra: dict[str, torch.Tensor] = {}

    def run_unit(self, unit: str, variant: str, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if unit == "embed":
            inputs = {**inputs, **self.extra}
        return self._torch.run_unit(unit, variant, inputs)

    def block_steps(self, unit: str, variant: str, ctx: Mapping[str, torch.Tensor]):
        return self._torch.block_steps(unit, variant, ctx)

    def begin_step(self, h: torch.Tensor, ctx: Mapping[str, torch.Tensor]) -> None:
        pass

    def describe(self) -> dict:
        return {"runner": "torch", "model": type(self._torch.model.transformer).__name__}


class WorkDirGraphs:
    """The units of a work dir for ``executor="onnxruntime"`` / ``"tensorrt"``: one loaded runner (sessions or
    engines, sha256-checked once), checked against the transformer at enable, and a light per-branch view of it
    (:class:`WorkDirRunner`) for each step executor."""

    def __init__(self, executor: str, work: Any, transformer: torch.nn.Module, adapter: Any, *,
                 target: str | None, graphs: str, device: str | None, check_weights: bool) -> None:
        from qc_compile.workdir import WorkDir, read_model_info

        self.executor = executor
        self.work = work if isinstance(work, WorkDir) else WorkDir(Path(work))
        self.info = info = read_model_info(self.work)
        where = f"qc_compile.enable(executor={executor!r}, work={str(self.work.root)!r})"
        if not info.is_diffusers or info.family != adapter.family:
            raise UserError(f"{where}: the work dir holds {info.name} (family {info.family or 'STDiT3'}), but the "
                            f"transformer is a {type(transformer).__name__} (family {adapter.family}); export this "
                            "transformer with `qc-compile export` and pass that work dir.")
        self._check_transformer(where, transformer, check_weights)
        self.geometry = info.geometry()
        self.text_length = info.text_length
        self.model_name = info.name
        self.unit_names = tuple(info.unit_names)
        if tuple(adapter.unit_names()) != self.unit_names:
            raise UserError(f"{where}: the work dir has units {self.unit_names[0]} .. {self.unit_names[-1]} "
                            f"({len(self.unit_names)}), the transformer {len(tuple(adapter.unit_names()))}; "
                            "re-export this transformer.")
        self.stage, self.target = self._stage(where, target, graphs)
        if executor == "onnxruntime":
            from qc_compile.runtime.runners.onnxruntime import OrtRunner

            self.device = device or "cpu"
            self.runner_ = OrtRunner.from_workdir(self.work, stage=self.stage, target=self.target, device=self.device)
        else:
            from qc_compile.runtime.runners import _check_trt
            from qc_compile.runtime.runners.tensorrt import TrtRunner

            if self.stage == "fp":
                raise UserError(f"{where}: executor 'tensorrt' runs the engines of a build, and {self.work.root} "
                                "has none (no manifest.json, or graphs='fp' asked for the exported FP graphs). Run "
                                f"`qc-compile build {self.work.root} --target T` (e.g. rtx:sm89 for an RTX 4090/L40S) "
                                "first, or use executor='onnxruntime' for the FP graphs.")
            _check_trt("cuda")
            self.device = device or "cuda"
            self.runner_ = TrtRunner.from_workdir(self.work, self.target, device=self.device)
        self.loaded_target = getattr(self.runner_, "target", None) or self.target

    def _check_transformer(self, where: str, transformer: torch.nn.Module, check_weights: bool) -> None:
        import json as _json

        from qc_compile.export_diffusers import DiffusersConfig

        want = self.info.config().diffusers
        have = _json.loads(_json.dumps(DiffusersConfig.of(self.info.name, transformer).diffusers, default=list))
        diff = sorted(k for k in set(want) | set(have) if k != "_class_name" and want.get(k) != have.get(k))
        if diff:
            k = diff[0]
            raise UserError(f"{where}: the transformer is not the one this work dir was exported from: its config "
                            f"differs in {', '.join(diff[:4])}{' …' if len(diff) > 4 else ''} ({k}: "
                            f"{have.get(k)!r} here, {want.get(k)!r} exported). Export this transformer with "
                            "`qc-compile export` and pass that work dir.")
        if not check_weights:
            return
        from qc_compile.workdir import state_digest

        dtypes = sorted({str(p.dtype).replace("torch.", "") for p in transformer.parameters()})
        if dtypes != ["float32"]:
            raise UserError(f"{where}: the graphs carry the exported float32 weights, so the transformer's own "
                            f"weights do not run; they are checked against the export's state digest, which needs "
                            f"the float32 transformer, and this one holds {', '.join(dtypes)}. Pass "
                            "check_weights=False to run the work dir's graphs without that check, or enable the "
                            "float32 transformer.")
        if state_digest(transformer) != self.info.data["weights"]["state_sha256"]:
            raise UserError(f"{where}: the transformer's weights are not the ones this work dir was exported from "
                            "(state digest differs), and its graphs carry the exported weights, so the run would "
                            "silently use other weights. Export this transformer with `qc-compile export`, or pass "
                            "check_weights=False to run the work dir's weights knowingly.")

    def _stage(self, where: str, target: str | None, graphs: str) -> tuple[str, str | None]:
        if graphs not in ("auto", "fp", "q"):
            raise UserError(f"{where}: graphs must be 'auto', 'fp' or 'q', got {graphs!r}.")
        built = self.work.manifest_json.is_file()
        if graphs == "fp":
            if target is not None:
                raise UserError(f"{where}: graphs='fp' runs the exported FP graphs, which belong to no target; "
                                f"drop target={target!r} or use graphs='q'.")
            return "fp", None
        if not built:
            if graphs == "q" or target is not None or self.work.plan_json.is_file():
                why = ("has a plan but no build" if self.work.plan_json.is_file() else "has no build")
                raise UserError(f"{where}: {self.work.root} {why} (manifest.json is missing), so there are no Q/DQ "
                                f"graphs or engines to run (the FP graphs would run the plan unquantized). Run "
                                f"`qc-compile build {self.work.root} --target T` first (e.g. --target rtx:sm89 or "
                                "--target trt --onnx-only); from Python, enable(..., graphs='fp') runs the exported "
                                "FP graphs instead (the command line's --executor onnxruntime runs a build's graphs).")
            return "fp", None
        return "q", target

    def check_call(self, inputs: Mapping[str, torch.Tensor], g: Any) -> None:
        """The call must have the export's geometry and text length (the graphs fix every axis but the batch) and
        no inputs the graphs do not take."""
        where = f"qc_compile.enable(executor={self.executor!r})"
        if g != self.geometry:
            raise UserError(f"{where}: this call's latent is {_geom(g)} (frames x height x width), but the graphs of "
                            f"{self.work.root} were exported at {_geom(self.geometry)} (every axis but the batch is "
                            "fixed in them). Call the pipeline at the export's size, or export another work dir at "
                            "this size (`qc-compile export ... --frames F --height H --width W`).")
        L = int(inputs["y"].shape[1])
        if self.text_length is not None and L != self.text_length:
            raise UserError(f"{where}: this call's text features have {L} tokens, but the graphs of "
                            f"{self.work.root} were exported at text length {self.text_length} (fixed in them). "
                            f"Pad the prompt embeddings to {self.text_length} tokens (WanPipeline: "
                            f"max_sequence_length={self.text_length})"
                            + ("." if self.model_name == "qc-ref-wan" else f", or export with --text-length {L}."))
        taken = {r["name"] for r in self.info.unit("embed")["inputs"]}
        extra = sorted(k for k, v in inputs.items() if v is not None and k not in taken)
        if extra:
            raise UserError(f"{where}: this call passes {', '.join(extra)}, which the exported embed graph does not "
                            "take (image-conditioned Wan is not exported yet); use executor='torch'.")
        for rec in self.info.unit("embed")["inputs"]:
            t = inputs[rec["name"]]
            want = rec["shape"]
            if t.ndim != len(want) or any(not isinstance(d, str) and int(d) != n for d, n in zip(want, t.shape)):
                raise UserError(f"{where}: embed input {rec['name']} has shape {tuple(t.shape)}, the exported graph "
                                f"takes {want} ('batch' free); call the transformer as the export did.")

    def runner(self, g: Any) -> "WorkDirRunner":
        return WorkDirRunner(self)

    def describe(self) -> dict:
        return {"name": self.executor, "work": str(self.work.root), "graphs": self.stage,
                "target": self.loaded_target, **self.runner_.describe()}


def _geom(g: Any) -> str:
    return f"{g.frames}x{g.height}x{g.width}"


class WorkDirRunner:
    """One step executor's view of the work dir's runner: whole units, fed by the names in model.json; a TensorRT
    runner's carried inputs (``cached_residual`` of a --plugins build) kept per view, so CFG branches do not see each
    other's residuals."""

    supports: frozenset[str] = frozenset()
    stats = "torch"

    def __init__(self, graphs: WorkDirGraphs) -> None:
        self._graphs = graphs
        self._runner = graphs.runner_
        self.backend = self._runner.backend
        self.unit_names = graphs.unit_names
        self._carried: dict = {}

    def run_unit(self, unit: str, variant: str, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        r = self._runner
        if hasattr(r, "carried"):
            r.carried = self._carried
        return r.run_unit(unit, variant, inputs)

    def block_steps(self, unit: str, variant: str, ctx: Mapping[str, torch.Tensor]):
        return self._runner.block_steps(unit, variant, ctx)  # whole units only: the wrapped runner says so

    def begin_step(self, h: torch.Tensor, ctx: Mapping[str, torch.Tensor]) -> None:
        pass

    def reset(self) -> None:
        self._carried = {}

    def describe(self) -> dict:
        return self._graphs.describe()


def work_dir_graphs(executor: str, work: Any, transformers: list, quantize: str | None, **kw) -> WorkDirGraphs:
    where = f"qc_compile.enable(executor={executor!r})"
    if work is None:
        raise UserError(f"{where} runs the unit graphs of a work dir; pass work=WORK (from `qc-compile export`, "
                        "and `qc-compile build` for Q/DQ graphs or engines), or use executor='torch'.")
    if quantize is not None:
        raise UserError(f"{where}: quantize={quantize!r} swaps the transformer's torch linears, which this executor "
                        "does not run (the work dir's graphs carry their own precision); quantize with `qc-compile "
                        "calibrate` + `build` instead, or use executor='torch'.")
    if len(transformers) > 1:
        raise UserError(f"{where}: this pipeline has two transformers (Wan 2.2 A14B) and a work dir holds one; "
                        "graph executors for two-transformer pipelines are not supported yet: use executor='torch'.")
    from qc_compile.models.diffusers_adapter import adapter_for

    return WorkDirGraphs(executor, work, transformers[0], adapter_for(transformers[0]), **kw)
