"""Sampler, unit executors and step policies. Import as ``qc_compile.runtime``."""
