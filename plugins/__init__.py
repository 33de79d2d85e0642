"""Kernels and their bindings (installed as ``qc_compile.plugins``): low-bit formats and their codecs, Triton/CUDA
kernels, torch custom ops with CPU reference implementations, and TensorRT plugins (IPluginV3). It imports nothing
of ours but its own formats, so the runtime and the compiler can both depend on it."""
