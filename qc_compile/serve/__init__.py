"""Serving a model or work dir behind Triton Inference Server (through PyTriton): ``qc-compile serve``.

* :mod:`.protocol` – the model's inputs and outputs and the checks every request passes (no Triton needed);
* :mod:`.engine`   – turns a dynamic batch of requests into pipeline runs (grouping, per-sample decisions);
* :mod:`.server`   – binds the engine to Triton: ports, queue, time-outs, verification before ready, draining;
* :mod:`.client`   – a small tritonclient wrapper (HTTP or gRPC) used by tests, tools/load_test.py and users.

Needs the ``serve`` extra (``pip install -e ".[serve]"``); only :mod:`.server` and :mod:`.client` import it.
"""
