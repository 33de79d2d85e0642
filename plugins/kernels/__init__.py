"""Triton kernels (sm_90) behind the ``qc::`` ops: fused producers, quantized GEMMs, cache statistics.

Importing this package needs Triton; :mod:`qc_compile.plugins.ops` registers :mod:`.dispatch` on the CUDA key
when it can and falls back to the reference implementations otherwise.
"""
