"""Workers for the multi-process tests (spawned by :func:`qc_compile.runtime.parallel.launch`, so module-level):
every rank runs the same Pipeline calls and writes what it saw (decisions, the parallel record, the video) as JSON +
safetensors under ``out/<rank>/``."""

from __future__ import annotations

import json
from pathlib import Path

PROMPTS = ["a red circle moving right on a black background", "a blue square moving up on a gray background"]
SMALL = dict(frames=4, height=16, width=16, steps=6, seed=3)


def decisions_of(res) -> list[list[str]]:
    return [[s.decisions.get(u, {}).get("action", "compute") + ":" + s.decisions.get(u, {}).get("variant", "default")
             for u in res.unit_names] for s in res.steps]


def run_policies(out: str, policies: list[str], work: str | None = None, executor: str = "torch") -> None:
    from safetensors.torch import save_file

    from qc_compile.runtime import Pipeline
    from qc_compile.runtime.parallel import current_mesh

    mesh = current_mesh()
    rank = mesh.rank if mesh else 0
    d = Path(out, str(rank))
    d.mkdir(parents=True, exist_ok=True)
    pipe = Pipeline(work, executor=executor) if work else Pipeline.from_pretrained("qc-ref")
    for pol in policies:
        res = pipe(PROMPTS, policy=pol, **SMALL)
        rec = {"decisions": decisions_of(res), "parallel": res.extra.get("parallel"),
               "stats": [s.stats for s in res.steps]}
        (d / f"{pol}.json").write_text(json.dumps(rec))
        save_file({"video": res.videos.contiguous()}, str(d / f"{pol}.safetensors"))
