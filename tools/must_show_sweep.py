"""Issue 12's must-show sweep: every row on the same held-out captions and noise seeds, one table and one Pareto plot.

Rows come from several work dirs (a plan is per work dir). One task per (tier, prompt and seed) runs every row group
of the tier on that video, so its FP reference is computed once per tier; the tasks go to one pool of worker
processes in priority order (tier 1: the must-show rows; tier 2: VC, DMPQ and guard; tier 3: extra rows and peers; tier 4: the FP8 plan's
schedule at equal average bits: the plan's own high steps without caching, and the same number of high steps moved
to the least-changing steps (``reversed``) or spread evenly (``uniform``), or none, with and without quantcache;
calib/schedule_controls.py builds them and the table says which steps each ran high and at how many bits),
each worker keeping one pipeline per work dir:

    python tools/must_show_sweep.py --bf16 W_BF16 --fp8 W_FP8 --aigq W_AIGQ [--aigq-vc W_AIGQ_VC] --device cuda \
        --jobs 12 --seeds 0,1000 --deadline-s 240 -o bench/results/methods_qc_ref_h200

``W_BF16`` is a work dir calibrated with ``--uniform bf16 --srap-thresholds`` (no quantization; its plan carries the
calibrated SRAP thresholds, chosen by their measured cost or never pruning, with the reason in its provenance), ``W_FP8`` one with ``--uniform fp8``, ``W_AIGQ`` one with ``--method aigq``,
``W_AIGQ_VC`` (the VC / DMPQ rows) one with ``--method aigq --vc --predictor``. Peers run on the FP model
at their published defaults; the rows of a work dir not given are listed as not run. Writes sweep.json / sweep.md / pareto.png (rewritten as each row group completes, so a
run cut short leaves a usable table), runs/<row>/ (trace, metrics, decision map of the first video), worst/<row>/
(trace and decision map of the row's lowest-PSNR video), and the three lowest-PSNR videos of every row in the table's
notes. With ``--deadline-s`` the sweep stops taking new tasks at that many seconds; sweep.json's ``cut`` lists the
row groups it did not finish (lowest priority first to go), and those with some videos done get rows named
"(partial: n/N videos)" over those videos.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

PEERS_MUST = ("teacache", "fora", "fbcache", "pab")
PEERS_EXTRA = ("dbcache", "tdc", "interval")
PREFIX = {"bf16": "", "fp8": "FP8 plan: ", "aigq": "AIGQ plan: ", "aigq_vc": "AIGQ+VC/DMPQ plan: ", "fp": ""}
# (tier, work dir key, policies), in priority order; a group's rows run in one task per (prompt, seed)
UNITS: tuple[tuple[int, str, tuple[str, ...]], ...] = (
    (1, "bf16", ("none", "hlc", "quantcache")),
    (1, "fp8", ("none", "quantcache")),
    (1, "aigq", ("quantcache",)),
    (1, "fp", PEERS_MUST),
    (2, "aigq_vc", ("hlc+aigq", "hlc+aigq+vc", "hlc+dmpq", "quantcache+vc")),
    (2, "bf16", ("hlc+guard", "quantcache+guard", "hlc~plain")),
    (2, "fp8", ("quantcache~plain",)),
    (3, "bf16", ("srap", "hlc+aigq")),
    (3, "fp8", ("hlc+aigq",)),
    (3, "aigq", ("none", "hlc+aigq")),
    (3, "fp", PEERS_EXTRA),
    # equal average bits (issue 12 item 2): the FP8 plan's schedule (the plan's placement without caching, then the
    # same number of high steps placed otherwise, with and without caching); last, so a deadline cuts them first
    (4, "fp8", ("schedule", "schedule@reversed", "schedule@uniform", "quantcache@reversed", "quantcache@uniform",
                "quantcache@none")),
)
# policy@placement: the policy run on the work dir's plan with its schedule replaced (calib/schedule_controls.py)
PLACEMENT_NAME = {"reversed": "schedule moved: reversed", "uniform": "schedule moved: uniform",
                  "none": "no high steps"}
# policy~variant: the policy with these overrides (controls for a changed default)
VARIANTS = {"plain": ({"hlc.extrapolate": 0.0, "hlc.delta1": 0.1, "hlc.delta2": 0.1},
                      "plain reuse, delta 0.1: the default before hlc.extrapolate")}


def label(key: str, policy: str) -> str:
    """The table's name of a row (``policy@placement``: the plan's schedule replaced by that control)."""
    policy, _, variant = policy.partition("~")
    if variant:
        return f"{label(key, policy)} ({VARIANTS[variant][1]})"
    policy, _, placement = policy.partition("@")
    prefix = PREFIX[key]
    if placement:
        prefix = f"{prefix.rstrip(': ')} ({PLACEMENT_NAME[placement]}): "
    if key != "fp" and key != "bf16" and policy == "none":
        return prefix + "only (no caching)"
    if key != "fp" and policy == "schedule":
        return prefix + "schedule only (no caching)"
    return prefix + policy


def schedule_controls(work: str | Path, steps: int | None) -> dict:
    """The equal-bits controls of a work dir's plan: ``{"plan" | placement: {"schedule", "high_steps", "bits"}}`` and
    where the reversed ranking came from; ``bits``: the mean weight/activation bits of a full-compute run over
    ``steps`` (the plan's length when None)."""
    from qc_compile.calib import schedule_controls as sc
    from qc_compile.plan import load_plan

    plan = load_plan(Path(work) / "plan.json")
    out: dict = {}
    for name, sched in [("plan", list(plan.schedule)), *sc.control_schedules(plan).items()]:
        out[name] = {"schedule": sched, "high_steps": [i for i, v in enumerate(sched) if v != "default"],
                     "bits": sc.schedule_bits(plan, sched, steps).to_dict()}
    out["ranking"] = ("the plan's recorded per-step residual change (lowest first)" if sc.recorded_redundancy(plan)
                      else "none recorded: the middle steps")
    return out


def config_for(key: str, policy: str, controls: dict | None):
    """The SweepConfig of a row: ``policy@placement`` overrides the schedule of every component that reads one."""
    from qc_compile.runtime.policies import expand
    from qc_compile.runtime.sweep import SweepConfig

    base, _, variant = policy.partition("~")
    if variant:
        return SweepConfig(label(key, policy), base, dict(VARIANTS[variant][0]))
    base, _, placement = policy.partition("@")
    if not placement:
        return SweepConfig(label(key, policy), policy)
    sched = controls[placement]["schedule"]
    _, names = expand(base)
    ov = {k: list(sched) for k, comp in (("aigq.schedule", "aigq"), ("schedule.steps", "schedule")) if comp in names}
    if not ov:
        raise ValueError(f"{policy}: {base} reads no schedule")
    return SweepConfig(label(key, policy), base, ov)


def run_bits(plan, trace: dict) -> dict:
    """Executed precision of one run: mean weight/activation bits over its computed linear evaluations and the share
    of computed block-unit evaluations that ran a non-default variant."""
    from qc_compile.calib import schedule_controls as sc
    from qc_compile.models.units import is_block

    ev = sc.executed_evaluations(trace["steps"], trace["units"])
    blocks = sum(k for (u, _), k in ev.items() if is_block(u))
    high = sum(k for (u, v), k in ev.items() if is_block(u) and v != "default")
    return {"avg_bits": sc.average_bits(plan, ev).to_dict(), "high_share": high / blocks if blocks else None}


def safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_.=" else "_" for ch in name)


def units_for(works: dict) -> list[tuple[int, str, tuple[str, ...]]]:
    """The units whose work dir was given (``fp`` always is: the FP model)."""
    return [u for u in UNITS if works.get(u[1]) is not None]


def tier_task(items: list) -> dict:
    """One video (prompt, seed) under every row group of a tier, in a worker: ``{unit: per-config results}``, or
    ``{unit: "Error: message"}`` for a group that raised (the others still run)."""
    from qc_compile.runtime import sweep as S

    out: dict = {}
    for u, kw, cfgs, prompts, seed, steps in items:
        try:
            pipe = S.worker_pipeline(kw)
            out[u] = S._task(pipe, cfgs, prompts, seed, steps, None, True)
            plan = getattr(pipe, "plan", None)
            if plan is not None and getattr(pipe, "quantized", False):  # the executed bits, from each run's trace
                for c in out[u]:
                    if c.get("trace"):
                        bits = run_bits(plan, c["trace"])
                        for r in c["records"]:
                            r.update(bits)
        except Exception as e:  # noqa: BLE001 - reported in the table; the other groups go on
            out[u] = f"{type(e).__name__}: {e}"
    return out


def add_bits(rows: list, videos: list) -> None:
    """Each row's mean executed bits and high share over its videos (rows of a plan's work dir)."""
    for r in rows:
        name = r.get("row", r["config"])
        vs = [v for v in videos if v["config"] == name and v.get("avg_bits")]
        if vs:
            r["avg_bits"] = {k: sum(v["avg_bits"][k] for v in vs) / len(vs) for k in ("weight", "activation", "mean")}
            hs = [v["high_share"] for v in vs if v.get("high_share") is not None]
            r["high_share"] = sum(hs) / len(hs) if hs else None


def _bits_cell(r: dict) -> str:
    b = r.get("avg_bits")
    return "—" if not b else f"{b['weight']:.2f} / {b['activation']:.2f}"


def _high_cell(r: dict) -> str:
    h = r.get("high_share")
    return "—" if h is None else f"{100 * h:.1f}"


def controls_notes(meta: dict) -> list[str]:
    """What the schedule rows are: each placement's high steps and its nominal average bits."""
    lines = []
    for key, c in (meta.get("schedule_controls") or {}).items():
        if "error" in c:
            lines += [f"Schedule controls of the {PREFIX[key].rstrip(': ')}: not built ({c['error']}).", ""]
            continue
        steps = meta.get("steps") or len(c["plan"]["schedule"])
        lines += [
            f"**Schedule placement at equal average bits** ({PREFIX[key].rstrip(': ')}; rows named "
            f"'{label(key, 'schedule')}' and '{PREFIX[key].rstrip(': ')} (...)'): the same plan (formats, variants, "
            "calibrated thresholds), its per-step schedule replaced; high = the plan's `high` variant on block units "
            "(embed and final always run default). 'only (no caching)' runs policy none: every step at the default "
            f"formats, i.e. the `none` placement without caching. Nominal bits: mean over linear evaluations of a "
            f"full-compute run of {steps} steps; the table's 'executed bits' column counts what each run computed "
            "(caching skips units; quantcache's post-skip coupling runs a recompute after a long skip high).", "",
            "| placement | high steps | nominal bits W / A | rows |", "|---|---|---:|---|"]
        for name in ("plan", "reversed", "uniform", "none"):
            if name not in c:
                continue
            b = c[name]["bits"]
            rows = ([label(key, "schedule"), label(key, "quantcache")] if name == "plan" else
                    [label(key, "none"), label(key, "quantcache@none")] if name == "none" else
                    [label(key, f"schedule@{name}"), label(key, f"quantcache@{name}")])
            how = {"plan": "the plan's (largest residual change)", "reversed": f"reversed: {c['ranking']}",
                   "uniform": "evenly spaced", "none": "none"}[name]
            lines.append(f"| {how} | {', '.join(map(str, c[name]['high_steps'])) or '—'} | {b['weight']:.2f} / "
                         f"{b['activation']:.2f} | {'; '.join(rows)} |")
        lines.append("")
    return lines


def write_outputs(out: Path, meta: dict, rows: list, videos: list, worst: dict, cut: list) -> dict:
    """sweep.json / sweep.md / pareto.png from the rows finished so far (in UNITS order)."""
    from qc_compile.artifacts import atomic_write, write_json_atomic
    from qc_compile.runtime.sweep import plot_pareto, to_markdown

    worst3 = {}
    for r in rows:
        vs = sorted((v for v in videos if v["config"] == r["config"]), key=lambda v: v["psnr_db"])
        worst3[r["config"]] = [{k: v[k] for k in ("prompt", "seed", "psnr_db")} for v in vs[:3]]
    result = dict(meta, rows=rows, videos=videos, worst=worst3, cut=cut,
                  seconds=round(time.perf_counter() - meta.pop("_start", time.perf_counter()), 1))
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "sweep.json", result)
    notes = []
    if cut:
        notes += ["**Cut by the time limit** (not in the table): " + "; ".join(
            f"{c['config']} ({c['calls_done']}/{c['calls']} videos)" for c in cut), ""]
    if result.get("failed"):
        notes += ["**Failed** (not in the table): " + "; ".join(f"{k}: {v}" for k, v in result["failed"].items()), ""]
    if result.get("not_run"):
        notes += ["Not run (work dir not given, or above --max-tier): " + ", ".join(result["not_run"]), ""]
    notes += controls_notes(result)
    notes += ["Worst cases (lowest PSNR per row; decision map of the worst video under worst/<row>/, of the first "
              "video under runs/<row>/):", ""]
    notes += [f"- {k}: " + "; ".join(f"{w['psnr_db']:.1f} dB seed {w['seed']} '{w['prompt']}'" for w in ws)
              for k, ws in worst3.items() if ws and ws[0]["psnr_db"] < 99]
    cols = [("executed bits W / A", _bits_cell), ("high % of computed", _high_cell)] if any(
        r.get("avg_bits") for r in rows) else []
    md = to_markdown(result, title="Issue 12 must-show sweep on qc-ref", notes=notes, columns=cols)
    with atomic_write(out / "sweep.md", "w") as f:
        f.write(md)
    if rows:
        plot_pareto(result, out / "pareto.png", title="qc-ref: quality vs compute (issue 12)")
    return result


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bf16", default=None)
    ap.add_argument("--fp8", default=None)
    ap.add_argument("--aigq", default=None)
    ap.add_argument("--aigq-vc", default=None, help="work dir calibrated with --method aigq --vc --predictor")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--caption-seed", type=int, default=20261122)
    ap.add_argument("--seeds", default="0,1000")
    ap.add_argument("--steps", type=int, default=None, help="sampling steps (model default: 30)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--jobs", type=int, default=1, help="worker processes (spawned when the device is CUDA; they "
                                                        "share the GPU)")
    ap.add_argument("--max-tier", type=int, default=4, help="run the tiers up to this one (1: must-show rows only; "
                                                            "4: also the schedule placement rows)")
    ap.add_argument("--deadline-s", type=float, default=None, help="take no new task after this many seconds; "
                                                                   "unfinished row groups are listed as cut")
    ap.add_argument("--commit", default=None)
    ap.add_argument("-o", "--output", required=True, type=Path)
    args = ap.parse_args(argv)

    from qc_compile.artifacts import write_json_atomic
    from qc_compile.data.shapes import sample_captions
    from qc_compile.runtime.sweep import SweepConfig, aggregate
    from qc_compile.runtime.trace import plot_decisions

    start = time.perf_counter()
    works = {"bf16": args.bf16, "fp8": args.fp8, "aigq": args.aigq, "aigq_vc": args.aigq_vc, "fp": "qc-ref"}
    units = [u for u in units_for(works) if u[0] <= args.max_tier]
    skipped = [label(k, p) for t, k, ps in UNITS if t > args.max_tier or works.get(k) is None for p in ps]
    prompts = [c.text() for c in sample_captions(args.prompts, seed=args.caption_seed)]
    seeds = [int(s) for s in args.seeds.split(",")]
    calls = [([p], s + k) for s in seeds for k, p in enumerate(prompts)]
    commit = args.commit or subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                           text=True).stdout.strip()
    meta = {"schema_version": 1, "prompts": prompts, "seeds": seeds, "batch": False, "model": "qc-ref",
            "device": args.device, "device_name": None, "steps": args.steps, "caption_seed": args.caption_seed,
            "commit": commit, "date": time.strftime("%Y-%m-%d"), "jobs": args.jobs, "not_run": skipped}

    def kwargs(key: str) -> dict:
        return (dict(model="qc-ref", device=args.device) if key == "fp"
                else dict(work_dir=works[key], device=args.device))

    controls: dict[str, dict] = {}
    for key in {k for _, k, ps in units if any("@" in p for p in ps)}:
        try:
            controls[key] = schedule_controls(works[key], args.steps)
        except Exception as e:  # noqa: BLE001 - a plan without a schedule costs its control rows, not the sweep
            controls[key] = {"error": f"{type(e).__name__}: {e}"}
    meta["schedule_controls"] = controls
    failed: dict[int, str] = {}
    unit_cfgs = []
    for u, (_, k, ps) in enumerate(units):
        if "error" in controls.get(k, {}) and any("@" in p for p in ps):
            failed[u] = controls[k]["error"]
            unit_cfgs.append([SweepConfig(label(k, p), p) for p in ps])
            continue
        unit_cfgs.append([config_for(k, p, controls.get(k)) for p in ps])
    tiers = sorted({t for t, _, _ in units})
    tasks = [(t, i) for t in tiers for i in range(len(calls))]  # priority order
    payload = [[(u, kwargs(units[u][1]), unit_cfgs[u], calls[i][0], calls[i][1], args.steps)
                for u in range(len(units)) if units[u][0] == t and u not in failed] for t, i in tasks]
    tasks = [t for t, p in zip(tasks, payload) if p]
    payload = [p for p in payload if p]
    done: dict[int, dict[int, list]] = {u: {} for u in range(len(units))}
    rows_of: dict[int, list] = {}
    videos_of: dict[int, list] = {}
    worst_seen: set[str] = set()
    print(f"{len(units)} row groups x {len(calls)} videos = {len(tasks)} tasks on {args.jobs} worker(s); "
          f"deadline {args.deadline_s} s", flush=True)

    def finish_unit(u: int) -> None:
        res = [done[u][i] for i in range(len(calls))]
        rows, recs = aggregate(unit_cfgs[u], res, args.output)
        add_bits(rows, recs)
        for j, cfg in enumerate(unit_cfgs[u]):  # the worst video's trace and decision map
            k_worst = min(range(len(calls)), key=lambda i: min(r["psnr_db"] for r in res[i][j]["records"]))
            if cfg.policy != "none" and cfg.label not in worst_seen:
                worst_seen.add(cfg.label)
                d = args.output / "worst" / safe(cfg.label)
                write_json_atomic(d / "trace.json", res[k_worst][j]["trace"])
                plot_decisions(res[k_worst][j]["trace"], d / "decisions.png")
        if meta["steps"] is None:
            meta["steps"] = res[0][0]["metrics"].get("steps")
        rows_of[u], videos_of[u] = rows, recs
        for i in range(len(calls)):  # traces are kept only until the unit is written
            for c in done[u][i]:
                c["trace"] = c["metrics"] = None
        print(f"[{time.perf_counter() - start:.0f} s] tier {units[u][0]} {PREFIX[units[u][1]] or units[u][1] + ': '}"
              f"{', '.join(units[u][2])}: done", flush=True)
        emit()

    def emit(cut: list | None = None) -> dict:
        order = sorted(rows_of, key=lambda u: UNITS.index(units[u]))
        rows = [r for u in order for r in rows_of[u]]
        order_rows = [label(k, p) for _, k, ps in UNITS for p in ps]
        rows.sort(key=lambda r: order_rows.index(r.get("row", r["config"])))
        return write_outputs(args.output, dict(meta, _start=start), rows, [v for u in order for v in videos_of[u]],
                             {}, cut or [])

    def on_result(u: int, i: int, res: list | str) -> None:
        if isinstance(res, str):  # one row group's error costs that group, not the sweep
            if u not in failed:
                failed[u] = res
                print(f"[{time.perf_counter() - start:.0f} s] FAILED {', '.join(c.label for c in unit_cfgs[u])}: "
                      f"{failed[u]}", flush=True)
            return
        if u in failed:
            return
        done[u][i] = res
        if len(done[u]) == len(calls):
            finish_unit(u)

    def expired() -> bool:
        return args.deadline_s is not None and time.perf_counter() - start > args.deadline_s

    if args.jobs > 1:
        import multiprocessing
        from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

        ctx = multiprocessing.get_context("spawn" if args.device.startswith("cuda") else None)
        pool = ProcessPoolExecutor(args.jobs, mp_context=ctx)
        futs = {pool.submit(tier_task, p): t for t, p in enumerate(payload)}
        pending = set(futs)
        while pending:
            left = None if args.deadline_s is None else max(0.0, args.deadline_s - (time.perf_counter() - start))
            fin, pending = wait(pending, timeout=left, return_when=FIRST_COMPLETED)
            for f in fin:
                err = f.exception()
                res = {it[0]: f"{type(err).__name__}: {err}" for it in payload[futs[f]]} if err else f.result()
                for u, r in sorted(res.items()):
                    on_result(u, tasks[futs[f]][1], r)
            if expired() and pending:
                break
        procs = list((pool._processes or {}).values())
        for p in procs:  # cut: stop the running tasks too
            p.terminate()
        pool.shutdown(wait=False, cancel_futures=True)
        for p in procs:  # reaped before the results are written (a killed worker exits at once)
            p.join(10)
    else:
        for t, p in enumerate(payload):
            if expired():
                break
            for u, r in sorted(tier_task([it for it in p if it[0] not in failed]).items()):
                on_result(u, tasks[t][1], r)
    cut = [{"config": c.label, "tier": units[u][0], "calls_done": len(done[u]), "calls": len(calls)}
           for u in range(len(units)) if u not in rows_of and u not in failed for c in unit_cfgs[u]]
    meta["failed"] = {c.label: failed[u] for u in failed for c in unit_cfgs[u]}
    for u in range(len(units)):  # a cut group's finished videos still make a row, named as partial
        if u in rows_of or u in failed or not done[u]:
            continue
        n = len(done[u])
        cfgs = [SweepConfig(f"{c.label} (partial: {n}/{len(calls)} videos)", c.policy, c.overrides)
                for c in unit_cfgs[u]]
        rows, recs = aggregate(cfgs, [done[u][i] for i in sorted(done[u])], args.output)
        for r, c in zip(rows, unit_cfgs[u]):
            r["row"], r["partial"] = c.label, True
        add_bits(rows, recs)
        rows_of[u], videos_of[u] = rows, recs
    if args.device.startswith("cuda"):
        import torch

        meta["device_name"] = torch.cuda.get_device_name()
    else:
        meta["device_name"] = "CPU"
    result = emit(cut)
    if cut:
        print("CUT by --deadline-s (lowest priority last): " + ", ".join(
            f"{c['config']} ({c['calls_done']}/{c['calls']})" for c in cut), flush=True)
    if failed:
        print("FAILED: " + "; ".join(f"{k}: {v}" for k, v in meta["failed"].items()), flush=True)
    if skipped:
        print("not run: " + ", ".join(skipped), flush=True)
    print((args.output / "sweep.md").read_text())
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
