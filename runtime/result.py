"""The record of one run: videos, every decision, costs, and (with a reference) fidelity to the FP run."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from qc_compile.errors import UserError

METRICS_SCHEMA_VERSION = 1


@dataclass
class RunResult:
    """One run: the videos, every decision, and (with ``reference=True``) fidelity to the FP run."""

    prompts: list[str]
    videos: torch.Tensor  # (n, C, T, H, W) float32, CPU
    policy: str
    policy_config: dict
    seed: int
    settings: dict
    unit_names: tuple[str, ...]
    steps: list  # sampler StepRecords
    costs: dict
    seconds: float
    executor: str = "torch"
    fp_videos: torch.Tensor | None = None
    fp_seconds: float | None = None
    extra: dict = field(default_factory=dict)
    frame_upscale: int = 8  # nearest upscale of the written mp4s (small pixel-space videos); 1 for decoded frames
    strip_upscale: int = 4  # nearest upscale of the PNG frame strips (1 for full-size frames of a diffusers pipeline)

    @property
    def compute_fraction(self) -> float:
        from qc_compile.runtime.trace import compute_fractions

        return compute_fractions(self.steps, self.unit_names, self.costs)[0]

    @property
    def flop_fraction(self) -> float:
        from qc_compile.runtime.trace import compute_fractions

        return compute_fractions(self.steps, self.unit_names, self.costs)[1]

    def trace(self) -> dict:
        from qc_compile.runtime.trace import build_trace

        return build_trace(policy=self.policy_config, unit_names=self.unit_names, steps=self.steps,
                           settings=dict(self.settings, executor=self.executor), prompts=self.prompts,
                           costs=self.costs, seconds=self.seconds, extra=self.extra or None)

    def checker(self, videos: torch.Tensor | None = None) -> dict | None:
        """Caption-checker accuracy of ``videos`` (default: this run's) against the prompts; None if a prompt is not
        a shapes caption (the checker reads only qc-ref's domain)."""
        from qc_compile.metrics.caption_checker import score_videos

        try:
            s = score_videos(list(self.videos if videos is None else videos), self.prompts)
        except UserError:
            return None
        out = {k: s[k] for k in ("n", "color", "shape", "direction", "background", "all")}
        out["per_video"] = [r.all_ok for r in s["results"]]
        return out

    def metrics(self) -> dict:
        m: dict[str, Any] = {
            "schema_version": METRICS_SCHEMA_VERSION, "policy": self.policy, "executor": self.executor,
            "seed": self.seed, "steps": self.settings.get("steps"), "prompts": self.prompts,
            "compute_fraction": self.compute_fraction, "flop_fraction": self.flop_fraction,
            "seconds": round(self.seconds, 3), "seconds_per_video": round(self.seconds / max(1, len(self.prompts)), 3),
            "checker": self.checker(),
            "note": f"seconds are wall-clock of the {self.executor} run on this machine (device: "
                    f"{self.settings.get('device', 'cpu')}); compute_fraction counts block-unit evaluations, "
                    "flop_fraction block FLOPs.",
        }
        if self.fp_videos is not None:
            from qc_compile.metrics.fidelity import compare_videos

            per = []
            for k, (v, r) in enumerate(zip(self.videos, self.fp_videos)):
                c = compare_videos(v, r)
                per.append({"prompt": self.prompts[k], "psnr_db": c["psnr_db"], "ssim": c["ssim"]})
            fp_check = self.checker(self.fp_videos)
            ref = {
                "what": "FP run (policy none) of the same model, prompts, seed and settings",
                "fp_seconds": None if self.fp_seconds is None else round(self.fp_seconds, 3),
                "psnr_db": sum(p["psnr_db"] for p in per) / len(per),
                "ssim": sum(p["ssim"] for p in per) / len(per),
                "psnr_db_min": min(p["psnr_db"] for p in per),
                "per_video": per,
                "checker_fp": fp_check,
            }
            if fp_check is not None and m["checker"] is not None:
                ref["checker_drop_points"] = 100.0 * (fp_check["all"] - m["checker"]["all"])
            m["reference"] = ref
        return m

    def decode_with(self, decoder) -> None:
        """Replace latent videos (and the FP reference) by the VAE's frames in [-1, 1], written at full size."""
        frames = self.settings["frames"]
        self.videos = decoder.decode(self.videos, num_frames=frames, out_device="cpu").float().clamp(-1, 1)
        if self.fp_videos is not None:
            self.fp_videos = decoder.decode(self.fp_videos, num_frames=frames, out_device="cpu").float().clamp(-1, 1)
        H, W = self.videos.shape[-2:]
        self.frame_upscale = 2 if (H | W) % 2 else 1  # yuv420p needs even sizes
        self.extra["decoded"] = "latents decoded by the VAE before writing and comparing"

    def save(self, run_dir: str | Path) -> dict[str, Path]:
        """Write video(s) (.mp4 + PNG strip), trace.json, metrics.json and decisions.png into ``run_dir``."""
        from qc_compile.artifacts import write_json_atomic
        from qc_compile.runtime.trace import plot_decisions
        from qc_compile.video_io import write_mp4, write_png_strip

        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        paths: dict[str, Path] = {}
        fps = int(self.settings.get("fps", 8))
        for k, v in enumerate(self.videos):
            stem = "video" if len(self.videos) == 1 else f"video_{k}"
            paths[f"{stem}.mp4"] = write_mp4(run_dir / f"{stem}.mp4", v, fps=fps, upscale=self.frame_upscale)
            paths[f"{stem}.png"] = write_png_strip(run_dir / f"{stem}.png", v, upscale=self.strip_upscale)
        trace = self.trace()
        write_json_atomic(run_dir / "trace.json", trace)
        paths["trace.json"] = run_dir / "trace.json"
        write_json_atomic(run_dir / "metrics.json", self.metrics())
        paths["metrics.json"] = run_dir / "metrics.json"
        plot_decisions(trace, run_dir / "decisions.png")
        paths["decisions.png"] = run_dir / "decisions.png"
        return paths
