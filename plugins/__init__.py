"""Kernels and their bindings (torch custom ops with CPU references; TensorRT plugins)."""
