"""Statistics collection: the FP model through the sampler over a calibration prompt set, per linear and per step.

Why a separate pass: every later stage (TAP sample choice, AIGQ sensitivity, the activation schedule, smoothing, the
DMPQ predictor, VC) reads *these* numbers instead of re-running sampling. Everything is kept **per sample**, where a
sample is (prompt, step), and per CFG branch (row ``b < n`` = cond, ``b >= n`` = null):

* per linear input: per-channel |x| max ``(2, K)``, |x| max, p99 and p99.9 of |x| (``(2,)`` each);
* per block unit: input/output/residual L2 norms, ⟨in, out⟩ (SRAP's cosine, :mod:`qc_compile.calib.srap`),
  Γ = ||out − in||₁ / ||in||₁ (6Bit's input-to-output change), and
  the relative L1 change of the residual since the previous step (AIGQ's step-redundancy signal);
* the latent before and after the step (so a run can resume, and VC/TAP/sensitivity can replay any sample).

Streaming: one safetensors shard per (prompt batch, step) under ``OUT/shards/``, each written atomically, and
``OUT/index.json`` (settings, sha256 of every finished shard) rewritten after each shard. A rerun with the same
settings verifies and skips finished shards and resumes a batch from its last finished latent; a rerun with other
settings refuses (``fresh=True`` starts over), so statistics of two settings never mix.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

from qc_compile.errors import UserError
from qc_compile.models.units import block_units
from qc_compile.runtime.generation import GenerationSettings

INDEX_SCHEMA = 1
PCT_SAMPLE = 1 << 16  # |x| elements sampled per row for the percentiles (exact below this)
PERCENTILES = (99.0, 99.9)


@dataclass(frozen=True)
class Captions:
    """Caption features of the prompt set, CFG halves separate: cond ``y`` (P, 1, L, Cy), ``mask`` (P, L),
    null ``y_null`` (P, 1, L, Cy). ``labels``: the prompt texts (or descriptions of synthetic features)."""

    y: torch.Tensor
    mask: torch.Tensor
    y_null: torch.Tensor
    labels: tuple[str, ...]

    def take(self, idx: Sequence[int]) -> "Captions":
        i = torch.as_tensor(list(idx), dtype=torch.long)
        return Captions(self.y[i], self.mask[i], self.y_null[i], tuple(self.labels[k] for k in idx))


def text_captions(loaded, prompts: Sequence[str]) -> Captions:
    y, mask = loaded.encode_prompts(list(prompts))
    return Captions(y.float(), mask.bool(), loaded.null_captions(len(prompts)).to(y.device), tuple(prompts))


def random_captions(loaded, n: int, seed: int = 0, length: int | None = None) -> Captions:
    """Synthetic caption features for models fed by an external T5 (Open-Sora): N(0, 1), full mask. For speed and
    memory measurements only: the statistics of a random-weight model on random captions say nothing about quality."""
    c = loaded.config
    L = length or c.model_max_length
    g = torch.Generator().manual_seed(seed)
    dev = loaded.model.x_embedder.proj.weight.device
    y = torch.randn(n, 1, L, c.caption_channels, generator=g).to(dev)
    return Captions(y, torch.ones(n, L, dtype=torch.bool, device=dev), loaded.null_captions(n).to(dev),
                    tuple(f"random caption features #{k}" for k in range(n)))


@dataclass(frozen=True)
class CollectSettings(GenerationSettings):
    """The generation settings of the calibration runs, plus how many prompts run per batch."""

    batch_size: int = 8

    def digest(self, labels: Sequence[str], weights: str) -> str:
        blob = json.dumps({"s": self.__dict__, "labels": list(labels), "weights": weights}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()


def _row_percentiles(a: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """(B, M) |x| rows -> (B, len(PERCENTILES)) by kthvalue on at most PCT_SAMPLE sampled elements per row."""
    B, M = a.shape
    if M > PCT_SAMPLE:
        idx = torch.randint(M, (PCT_SAMPLE,), generator=gen).to(a.device)
        a = a[:, idx]
        M = PCT_SAMPLE
    out = []
    for p in PERCENTILES:
        k = max(1, min(M, math.ceil(p / 100.0 * M)))
        out.append(a.kthvalue(k, dim=1).values)
    return torch.stack(out, 1)


class StepHooks:
    """Forward hooks gathering one step's per-row statistics on the device (one host copy per step)."""

    def __init__(self, model: nn.Module, seed: int = 0) -> None:
        from qc_compile.models.stdit3 import STDiT3Block

        self.model = model
        self.linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        unit_of = {id(model.block(u)): u for u in block_units(model.unit_names())}
        self.blocks = [(unit_of[id(m)], m) for _, m in model.named_modules() if isinstance(m, STDiT3Block)]
        self.cur: dict[str, torch.Tensor] = {}
        self.prev_res: dict[str, torch.Tensor] = {}
        self._gen = torch.Generator().manual_seed(seed)
        self._handles: list = []

    def _lin_hook(self, name: str):
        def hook(mod, args):
            x = args[0].detach()
            a = x.float().abs().reshape(x.shape[0], -1, x.shape[-1])
            B = a.shape[0]
            self.cur[f"lin/{name}/ch_amax"] = a.amax(1)
            flat = a.reshape(B, -1)
            self.cur[f"lin/{name}/amax"] = flat.amax(1)
            pct = _row_percentiles(flat, self._gen)
            self.cur[f"lin/{name}/p99"] = pct[:, 0]
            self.cur[f"lin/{name}/p999"] = pct[:, 1]
        return hook

    def _blk_hook(self, unit: str):
        def hook(mod, args, kwargs, out):
            x = args[0].detach().float()
            o = out.detach().float()
            r = o - x
            B = x.shape[0]
            xf, of, rf = x.reshape(B, -1), o.reshape(B, -1), r.reshape(B, -1)
            self.cur[f"blk/{unit}/in_norm"] = xf.norm(dim=1)
            self.cur[f"blk/{unit}/out_norm"] = of.norm(dim=1)
            self.cur[f"blk/{unit}/res_norm"] = rf.norm(dim=1)
            self.cur[f"blk/{unit}/res_l1"] = rf.abs().sum(1)
            self.cur[f"blk/{unit}/in_l1"] = xf.abs().sum(1)
            self.cur[f"blk/{unit}/dot_in_out"] = (xf * of).sum(1)  # SRAP's cosine: dot / (in_norm * out_norm)
            prev = self.prev_res.get(unit)
            if prev is not None and prev.shape == rf.shape:
                ch = (rf - prev).abs().sum(1) / prev.abs().sum(1).clamp_min(1e-12)
            else:
                ch = torch.full((B,), float("nan"), device=x.device)
            self.cur[f"blk/{unit}/res_change"] = ch
            self.prev_res[unit] = rf.clone()
        return hook

    def __enter__(self) -> "StepHooks":
        for n, m in self.linears:
            self._handles.append(m.register_forward_pre_hook(self._lin_hook(n)))
        for u, m in self.blocks:
            self._handles.append(m.register_forward_hook(self._blk_hook(u), with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def take(self) -> dict[str, torch.Tensor]:
        out = {k: v.float().cpu().contiguous() for k, v in self.cur.items()}
        self.cur = {}
        return out


def shard_name(batch: int, step: int) -> str:
    return f"b{batch:03d}_s{step:03d}"


def collect(loaded, captions: Captions, settings: CollectSettings, out_dir: str | Path, *, weights_id: str,
            fresh: bool = False, progress: bool = True,
            on_shard: Callable[[str], None] | None = None) -> "StatsStore":
    """Run (or resume) the statistics pass; returns the store. ``on_shard`` is called after each shard is written
    (tests use it to interrupt a run)."""
    from safetensors.torch import load_file, save
    from tqdm.auto import tqdm

    from qc_compile.artifacts import sha256_file, write_bytes_atomic, write_json_atomic
    from qc_compile.models.stdit3 import Geometry
    from qc_compile.runtime.generation import torch_executor
    from qc_compile.runtime.protocols import Conditioning
    from qc_compile.runtime.sampler import RFlowSampler, SamplerConfig, noise
    from qc_compile.runtime.schedule import step_sizes

    out = Path(out_dir)
    shards = out / "shards"
    index_path = out / "index.json"
    P = len(captions.labels)
    digest = settings.digest(captions.labels, weights_id)
    index = None
    if index_path.is_file() and not fresh:
        index = json.loads(index_path.read_text())
        if index.get("digest") != digest:
            raise UserError(f"{out}: holds calibration statistics of other settings (prompts, steps, seed, size or "
                            "weights differ). Re-run with --fresh to discard them, or use another work dir.")
    if index is None:
        if out.exists():
            shutil.rmtree(shards, ignore_errors=True)
        c = loaded.config
        sampler = RFlowSampler(SamplerConfig(num_steps=settings.steps, cfg_scale=settings.cfg,
                                             use_timestep_transform=c.use_timestep_transform, shift=settings.shift))
        ts = sampler.timesteps(height=settings.height, width=settings.width, num_frames=settings.frames)
        bs = max(1, settings.batch_size)
        index = {"schema_version": INDEX_SCHEMA, "digest": digest, "settings": settings.__dict__,
                 "labels": list(captions.labels), "timesteps": ts, "dts": step_sizes(ts, sampler.config.num_timesteps),
                 "batches": [list(range(i, min(P, i + bs))) for i in range(0, P, bs)], "shards": {}}
    shards.mkdir(parents=True, exist_ok=True)
    # verify finished shards (a damaged one is recomputed with everything after it in its batch)
    for name, sha in list(index["shards"].items()):
        p = shards / f"{name}.safetensors"
        if not p.is_file() or sha256_file(p) != sha:
            b = int(name[1:4])
            for k in [k for k in index["shards"] if int(k[1:4]) == b and int(k[6:]) >= int(name[6:])]:
                index["shards"].pop(k, None)
    write_json_atomic(index_path, index)
    g = Geometry.for_model(loaded.config, settings.frames, settings.height, settings.width)
    dev = loaded.model.x_embedder.proj.weight.device
    ts, dts = index["timesteps"], index["dts"]
    S = len(ts)
    todo = sum(1 for b in range(len(index["batches"])) for s in range(S) if shard_name(b, s) not in index["shards"])
    bar = tqdm(total=todo, desc="calibration statistics", unit="step", disable=not progress, leave=False)
    executor = torch_executor(loaded.model, g)
    with torch.no_grad(), StepHooks(loaded.model, seed=settings.seed) as hooks:
        for b, members in enumerate(index["batches"]):
            done = [s for s in range(S) if shard_name(b, s) in index["shards"]]
            first = 0
            while first in done:
                first += 1
            if first == S:
                continue
            n = len(members)
            cap = captions.take(members)
            if first == 0:
                shape = (loaded.config.in_channels, g.frames, g.height, g.width)
                z = torch.stack([noise(shape, settings.seed + k) for k in members]).to(dev)
            else:
                z = load_file(str(shards / f"{shard_name(b, first - 1)}.safetensors"))["z_out"].to(dev)
            cond = Conditioning(y=torch.cat([cap.y, cap.y_null]).to(dev), mask=torch.cat([cap.mask, cap.mask]).to(dev),
                                fps=torch.full((2 * n,), float(settings.fps), device=dev))
            executor.reset()
            hooks.prev_res.clear()
            if first > 0:  # the residual-change signal needs the previous step's residuals: replay that step
                zp = load_file(str(shards / f"{shard_name(b, first - 1)}.safetensors"))["z_in"].to(dev)
                executor.step(torch.cat([zp, zp]), torch.full((2 * n,), ts[first - 1], device=dev), cond, {})
                hooks.take()
            for s in range(first, S):
                z_in = z.clone()
                v, _ = executor.step(torch.cat([z, z]), torch.full((2 * n,), ts[s], device=dev), cond, {})
                v = v[:, : z.shape[1]].float()
                vc, vu = v.chunk(2)
                vcfg = vu + settings.cfg * (vc - vu)
                z = z + vcfg * dts[s]
                t = hooks.take()
                t["z_in"] = z_in.float().cpu().contiguous()
                t["z_out"] = z.float().cpu().contiguous()
                t["v"] = vcfg.float().cpu().contiguous()
                name = shard_name(b, s)
                sha = write_bytes_atomic(shards / f"{name}.safetensors", save(t))
                index["shards"][name] = sha
                write_json_atomic(index_path, index)
                bar.update(1)
                if on_shard is not None:
                    on_shard(name)
    bar.close()
    return StatsStore(out)


class StatsStore:
    """Read access to a finished statistics pass: per-sample arrays indexed [prompt, step] (cond branch unless
    ``branch='null'`` or ``'both'``), shards loaded lazily and cached."""

    def __init__(self, out_dir: str | Path) -> None:
        out = Path(out_dir)
        self.dir = out
        self.index = json.loads((out / "index.json").read_text())
        self.timesteps: list[float] = self.index["timesteps"]
        self.dts: list[float] = self.index["dts"]
        self.labels: list[str] = self.index["labels"]
        self.num_steps = len(self.timesteps)
        self.num_prompts = len(self.labels)
        missing = [shard_name(b, s) for b in range(len(self.index["batches"])) for s in range(self.num_steps)
                   if shard_name(b, s) not in self.index["shards"]]
        if missing:
            raise UserError(f"{out}: statistics are incomplete ({len(missing)} step shard(s) missing, e.g. "
                            f"{missing[0]}); re-run the calibration to resume.")
        self._where = {p: (b, i) for b, members in enumerate(self.index["batches"]) for i, p in enumerate(members)}
        self._cache: dict[tuple[int, int], dict[str, torch.Tensor]] = {}

    def shard(self, batch: int, step: int) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        key = (batch, step)
        if key not in self._cache:
            if len(self._cache) > 256:
                self._cache.clear()
            self._cache[key] = load_file(str(self.dir / "shards" / f"{shard_name(batch, step)}.safetensors"))
        return self._cache[key]

    def batch_size(self, batch: int) -> int:
        return len(self.index["batches"][batch])

    def sample(self, prompt: int, step: int, key: str, branch: str = "cond") -> torch.Tensor:
        b, i = self._where[prompt]
        t = self.shard(b, step)[key]
        if key in ("z_in", "z_out", "v"):
            return t[i]
        n = self.batch_size(b)
        if branch == "both":
            return torch.stack([t[i], t[n + i]])
        return t[i if branch == "cond" else n + i]

    def grid(self, key: str, branch: str = "cond") -> torch.Tensor:
        """(prompts, steps, ...) of one per-row statistic."""
        return torch.stack([torch.stack([self.sample(p, s, key, branch) for s in range(self.num_steps)])
                            for p in range(self.num_prompts)])

    def linear_names(self) -> list[str]:
        keys = self.shard(0, 0).keys()
        return [k[4:-6] for k in keys if k.startswith("lin/") and k.endswith("/amax")]

    def block_units(self) -> list[str]:
        keys = self.shard(0, 0).keys()
        return [k[4:-8] for k in keys if k.startswith("blk/") and k.endswith("/in_norm")]
