"""Calibration (installed as ``qc_compile.calib``): statistics over prompts and steps, TAP sample selection,
sensitivity and budgeted precision allocation (AIGQ), per-step activation schedules, smoothing/rotation search, VC
fitting and the precision predictor. It runs the sampler, so it may import ``qc_compile.runtime``, the models, the
plan and the plugins' formats; it never imports the CLI."""
