"""qc-compile: compile video diffusion transformers into fast, deployable engines."""

__version__ = "0.1.0"
