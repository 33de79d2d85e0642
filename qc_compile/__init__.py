"""qc-compile: compile video diffusion transformers into fast, deployable engines.

This package is the compiler and the CLI: ``cli`` / ``commands`` (one module per verb), ``models`` (STDiT3, the
unit vocabulary, model-family adapters), ``export``, ``passes`` (graph passes, graph -> graph), ``build``, ``plan``
(the one data model), ``workdir`` / manifest (the artifacts and their verification), ``metrics``. The other
top-level folders install beneath it: ``qc_compile.calib`` (calib/), ``qc_compile.runtime`` (runtime/),
``qc_compile.plugins`` (plugins/). Imports flow cli -> {export, calib, build, runtime}; calib -> runtime;
runtime -> plugins; plugins imports nothing of ours but its formats.
"""

__version__ = "0.1.0"
