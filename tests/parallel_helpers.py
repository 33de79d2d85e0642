"""Workers for the multi-process tests (spawned by :func:`qc_compile.runtime.parallel.launch`, so module-level):
every rank runs the same Pipeline calls and writes what it saw (decisions, the parallel record, the video) as JSON +
safetensors under ``out/<rank>/``."""

from __future__ import annotations

import json
from pathlib import Path

PROMPTS = ["a red circle moving right on a black background", "a blue square moving up on a gray background"]
SMALL = dict(frames=4, height=16, width=16, steps=6, seed=3)


def policy_spec(spec: str) -> tuple[str, dict]:
    """``"teacache:teacache.rel_l1_thresh=0.6"`` -> (policy, overrides): aggressive settings make a few-step tiny run
    actually reuse, so the comparison covers cache hits."""
    name, _, rest = spec.partition(":")
    return name, dict(kv.split("=", 1) for kv in rest.split(",") if kv)


def file_stem(spec: str) -> str:
    return "".join(ch if ch.isalnum() else "_" for ch in spec)


def decisions_of(res) -> list[list[str]]:
    return [[s.decisions.get(u, {}).get("action", "compute") + ":" + s.decisions.get(u, {}).get("variant", "default")
             for u in res.unit_names] for s in res.steps]


def run_policies(out: str, policies: list[str], frames: int | None = None, steps: int | None = None,
                 device: str = "cpu") -> None:
    from safetensors.torch import save_file

    from qc_compile.runtime import Pipeline
    from qc_compile.runtime.parallel import current_mesh

    mesh = current_mesh()
    rank = mesh.rank if mesh else 0
    d = Path(out, str(rank))
    d.mkdir(parents=True, exist_ok=True)
    pipe = Pipeline.from_pretrained("qc-ref", device=device)
    small = dict(SMALL, frames=frames or SMALL["frames"], steps=steps or SMALL["steps"])
    for spec in policies:
        name, overrides = policy_spec(spec)
        pol = file_stem(spec)
        res = pipe(PROMPTS, policy=name, overrides=overrides, **small)
        rec = {"decisions": decisions_of(res), "parallel": res.extra.get("parallel"),
               "stats": [s.stats for s in res.steps]}
        (d / f"{pol}.json").write_text(json.dumps(rec))
        save_file({"video": res.videos.contiguous()}, str(d / f"{pol}.safetensors"))


def run_shapes(out: str, policy: str = "quantcache", frames: int = 4) -> None:
    """One run through an executor we hold, to record what each rank keeps: the residual cache shapes (shards)."""
    from qc_compile.models.stdit3 import Geometry
    from qc_compile.runtime import Pipeline
    from qc_compile.runtime.generation import generate
    from qc_compile.runtime.parallel import current_mesh
    from qc_compile.runtime.policies import get_policy

    mesh = current_mesh()
    pipe = Pipeline.from_pretrained("qc-ref", device="cpu")
    small = dict(SMALL, frames=frames)
    settings = pipe.settings(small["seed"], small["steps"], None, frames=frames, height=small["height"],
                             width=small["width"])
    ex = pipe.make_executor(settings)
    generate(pipe.loaded, PROMPTS, settings, policy=get_policy(policy, None, None, seed=small["seed"]), executor=ex,
             progress=False)
    g = Geometry.for_model(pipe.loaded.config, settings.frames, settings.height, settings.width)
    d = Path(out, str(mesh.rank if mesh else 0))
    d.mkdir(parents=True, exist_ok=True)
    (d / "shapes.json").write_text(json.dumps({"T": g.T, "S": g.S, "runner": type(ex.runner).__name__,
                                               "residuals": {u: list(t.shape) for u, t in ex.residuals.items()}}))


def run_fast(out: str, policies: list[str], cuda_graphs: bool = True) -> None:
    """qc-ref on the torch-fast runner (bf16, FP8 W8A8 block plan, optional CUDA graphs), sharded over the mesh."""
    import torch
    from safetensors.torch import save_file

    from qc_compile.models import load_model
    from qc_compile.models.stdit3 import Geometry
    from qc_compile.runtime.fast_blocks import fp8_block_plan
    from qc_compile.runtime.generation import GenerationSettings, generate
    from qc_compile.runtime.parallel import current_mesh, shard_runner
    from qc_compile.runtime.policies import get_policy
    from qc_compile.runtime.runners.fast import FastRunner, fast_model_copy
    from qc_compile.runtime.step_executor import StepExecutor

    mesh = current_mesh()
    loaded = load_model("qc-ref", device="cuda")
    settings = GenerationSettings.defaults(loaded, **SMALL)
    g = Geometry.for_model(loaded.config, settings.frames, settings.height, settings.width)
    model = fast_model_copy(loaded.model)
    runner = FastRunner(model, g, fp8_block_plan(model), cuda_graphs=cuda_graphs)
    d = Path(out, str(mesh.rank if mesh else 0))
    d.mkdir(parents=True, exist_ok=True)
    for pol in policies:
        ex = StepExecutor(shard_runner(runner, g), g)
        videos, sample = generate(loaded, PROMPTS, settings, policy=get_policy(pol, None, None, seed=SMALL["seed"]),
                                  executor=ex, progress=False)
        dec = [[s.decisions.get(u, {}).get("action", "compute") for u in ex.unit_names] for s in sample.steps]
        (d / f"fast_{pol}.json").write_text(json.dumps({"decisions": dec}))
        save_file({"video": videos.contiguous()}, str(d / f"fast_{pol}.safetensors"))
    torch.cuda.synchronize()
