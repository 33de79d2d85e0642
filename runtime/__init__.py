"""Sampler, unit executors and step policies. Import as ``qc_compile.runtime``.

``Pipeline`` and ``RunResult`` (:mod:`qc_compile.runtime.api`) are loaded on first use, so importing the package
stays light.
"""

from __future__ import annotations

__all__ = ["Pipeline", "RunResult"]


def __getattr__(name: str):
    if name in __all__:
        from qc_compile.runtime import api

        return getattr(api, name)
    raise AttributeError(f"module 'qc_compile.runtime' has no attribute {name!r}")
