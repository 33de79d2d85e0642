"""Open-Sora 1.2 rectified-flow timesteps (RFLOW): base schedule and resolution/length transform.

Convention: x_t = (1 - t/1000)·x0 + (t/1000)·ε, t = 1000 is pure noise; the model predicts v ≈ x0 - ε.
"""

from __future__ import annotations

import math


def base_timesteps(num_steps: int, num_timesteps: int = 1000) -> list[float]:
    """t_i = (1 - i/N)·num_timesteps for i = 0..N-1 (zero is not in the list)."""
    if num_steps < 1:
        raise ValueError("num_steps must be >= 1")
    return [(1.0 - i / num_steps) * num_timesteps for i in range(num_steps)]


def transform_ratio(height: int, width: int, num_frames: int, scale: float = 1.0) -> float:
    """√(H·W/512²)·√F'·scale with F' = 1 for images, else ⌊frames/17⌋·5 (Open-Sora's latent-frame proxy)."""
    frames = 1 if num_frames == 1 else (num_frames // 17) * 5
    return math.sqrt(height * width / 512 ** 2) * math.sqrt(frames) * scale


def timestep_transform(t: float, ratio: float, num_timesteps: int = 1000) -> float:
    """τ' = ratio·τ / (1 + (ratio - 1)·τ): shifts the schedule toward noise for larger videos."""
    tau = t / num_timesteps
    return num_timesteps * ratio * tau / (1 + (ratio - 1) * tau)


def sampling_timesteps(num_steps: int, *, height: int, width: int, num_frames: int, use_transform: bool = True,
                       num_timesteps: int = 1000, scale: float = 1.0) -> list[float]:
    ts = base_timesteps(num_steps, num_timesteps)
    if not use_transform:
        return ts
    r = transform_ratio(height, width, num_frames, scale)
    if r <= 0:
        raise ValueError(f"timestep transform ratio is {r} for {num_frames} frames of {height}x{width}; Open-Sora's "
                         "transform needs at least 17 frames (or 1); sample without the transform.")
    return [timestep_transform(t, r, num_timesteps) for t in ts]


def step_sizes(timesteps: list[float], num_timesteps: int = 1000) -> list[float]:
    """dt_i = (t_i - t_{i+1})/1000; the last step goes straight to zero."""
    nxt = timesteps[1:] + [0.0]
    return [(a - b) / num_timesteps for a, b in zip(timesteps, nxt)]
