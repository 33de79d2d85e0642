"""qc-compile: compile video diffusion transformers into fast, deployable engines.

This package is the compiler and the CLI: ``cli`` / ``commands`` (one module per verb), ``models`` (STDiT3, the
unit vocabulary, model-family adapters), ``export``, ``passes`` (graph passes, graph -> graph), ``build``, ``plan``
(the one data model), ``workdir`` / manifest (the artifacts and their verification), ``metrics``. The other
top-level folders install beneath it: ``qc_compile.calib`` (calib/), ``qc_compile.runtime`` (runtime/),
``qc_compile.plugins`` (plugins/). Imports flow cli -> {export, calib, build, runtime}; calib -> runtime;
runtime -> plugins; plugins imports nothing of ours but its formats.
"""

__version__ = "0.1.0"


def enable(pipe, work=None, policy="quantcache", **kwargs):
    """Run a diffusers video pipeline's transformer through qc-compile's step policies (see
    :mod:`qc_compile.diffusers_enable`); ``disable(pipe)`` undoes it."""
    from qc_compile.diffusers_enable import enable as _enable

    return _enable(pipe, work, policy, **kwargs)


def disable(pipe):
    """Undo :func:`enable`; returns the sessions (their decision records stay readable)."""
    from qc_compile.diffusers_enable import disable as _disable

    return _disable(pipe)
