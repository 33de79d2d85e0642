"""The runtime: sampler, step policies, one step executor over per-backend unit runners, and ``Pipeline``.

Owns: ``runners/`` (one module per backend + the registry), ``step_executor`` (compute / reuse / prune, caches,
gates, statistics), ``sampler`` (rectified flow + CFG), ``policy`` + ``policies/`` (the decision interface and every
policy), ``pipeline`` / ``result`` (the user API), ``trace`` and ``sweep``. It may import ``qc_compile.models``,
``qc_compile.plugins``, ``qc_compile.plan``, ``qc_compile.workdir`` / ``qc_compile.manifest`` (to verify what it
runs), ``qc_compile.artifacts``, ``qc_compile.metrics`` — never the compiler (``qc_compile.build``, ``export``,
``passes``, onnx-graphsurgeon): ``tests/test_import_graph.py`` checks it.

``Pipeline`` and ``RunResult`` are loaded on first use, so importing the package stays light.
"""

from __future__ import annotations

__all__ = ["Pipeline", "RunResult"]


def __getattr__(name: str):
    if name == "Pipeline":
        from qc_compile.runtime.pipeline import Pipeline

        return Pipeline
    if name == "RunResult":
        from qc_compile.runtime.result import RunResult

        return RunResult
    raise AttributeError(f"module 'qc_compile.runtime' has no attribute {name!r}")
