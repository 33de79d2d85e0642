"""qc-compile: compile video diffusion transformers into fast, deployable engines."""

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
