"""tools/peers_wan.py on a tiny random qc-ref-wan folder (CPU): every family of peers runs unmodified beside ours."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

from test_qc_ref_wan import _tiny_folder  # noqa: E402

from qc_compile.models import qc_ref_wan as qrw  # noqa: E402

ONE_EACH = ("FBCache thr=0.2|TaylorSeer default|TaylorSeer Wan attn\\+ffn interval=5|MagCache thr=0.06|PAB spatial=2|"
            "FasterCache|SeaCache thr=0.25|F1B0 thr=0.08|qc-compile")


@pytest.mark.slow
def test_peers_tool_runs_every_family_on_a_tiny_model(tmp_path):
    import peers_wan

    folder = _tiny_folder(tmp_path, qrw.SamplingDefaults(frames=4, height=16, width=16, steps=12, cfg=3.0),
                          num_layers=3)
    out = tmp_path / "peers.json"
    rc = peers_wan.main(["--checkpoint", str(folder), "--device", "cpu", "--n", "1", "--batch", "1", "--repeats", "1",
                         "--json", str(out), "--plot", str(tmp_path / "peers.png"), "--only", ONE_EACH,
                         "--ours", "hlc,pab"])
    assert rc == 0
    res = json.loads(out.read_text())
    rows = {r["label"]: r for r in res["rows"]}
    errors = {k: r["error"] for k, r in rows.items() if "error" in r}
    assert not errors, errors
    expected = ["diffusers FBCache thr=0.2", "diffusers TaylorSeer default patterns interval=5",
                "diffusers TaylorSeer Wan attn+ffn interval=5", "diffusers MagCache thr=0.06",
                "diffusers PAB spatial=2", "diffusers FasterCache", "qc-compile hlc", "qc-compile pab"]
    assert set(expected) <= set(rows)
    # diffusers' TaylorSeer default patterns hook no Wan module (documented in the tool): nothing skipped
    assert rows["diffusers TaylorSeer default patterns interval=5"]["linear_mac_fraction"] == 1.0
    for label in expected:
        if label.startswith("diffusers TaylorSeer default"):
            continue
        r = rows[label]
        assert 0.0 < r["linear_mac_fraction"] < 1.0, label  # the method skipped work on this model
        assert r["repeat_max_abs_dev"] == 0.0, label  # no state leaks from one generation into the next
        assert r["psnr_db"] > 20 and 0 < r["ssim"] <= 1
    assert 0 < rows["qc-compile hlc"]["compute_fraction"] < 1
    try:
        import cache_dit  # noqa: F401
        assert 0.0 < rows["cache-dit DBCache F1B0 thr=0.08"]["linear_mac_fraction"] < 1.0
    except ImportError:
        assert any("cache-dit" in n for n in res["notes"])
    assert (tmp_path / "peers.png").is_file() and out.with_suffix(".md").is_file()
    assert "quantization peers" in " ".join(res["notes"])  # CUDA-only rows are said to be skipped, not silently
    # qc-compile's own FP8 (every block linear W8A8 on the qc:: kernels; their reference on the CPU): all the block
    # work still done, the video close to bf16's but not equal, no state between generations
    ours = rows[peers_wan.OURS_FP8_LABEL]
    assert ours["linear_mac_fraction"] == 1.0 and ours["repeat_max_abs_dev"] == 0.0
    assert 20 < ours["psnr_db"] < 100


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_quantization_peers_on_cuda(tmp_path):
    """torchao FP8 and ModelOpt FP8 rows run (where installed) and stay close to the bf16 baseline."""
    import peers_wan

    if not (peers_wan._version("torchao") or peers_wan._version("modelopt")):
        pytest.skip("neither torchao nor nvidia-modelopt is installed")
    folder = _tiny_folder(tmp_path, qrw.SamplingDefaults(frames=16, height=32, width=32, steps=8, cfg=3.0),
                          num_layers=3, num_attention_heads=2, attention_head_dim=32)
    out = tmp_path / "q.json"
    assert peers_wan.main(["--checkpoint", str(folder), "--device", "cuda", "--n", "2", "--batch", "2",
                           "--families", "quant", "--json", str(out)]) == 0
    rows = [r for r in json.loads(out.read_text())["rows"] if r["family"] == "quant"]
    assert rows and all("error" not in r for r in rows), rows
    assert all(r["psnr_db"] > 20 for r in rows), rows


class _BrokenFinder:
    """Makes importing ``prefix`` fail the way a library built for another torch/CUDA does (not an ImportError)."""

    def __init__(self, *prefixes: str) -> None:
        self.prefixes = prefixes

    def find_spec(self, name, path=None, target=None):
        if any(name == p or name.startswith(p + ".") for p in self.prefixes):
            raise RuntimeError(f"{name}: undefined symbol in the extension")
        return None


def test_quantization_peers_whose_library_fails_to_import_are_skipped_rows(monkeypatch):
    """torchao / ModelOpt that cannot be imported (missing, or broken: any exception) give a skipped row with the
    reason, never end the sweep; the peers' rows need CUDA, so the loaded model only claims a CUDA device."""
    import types

    import peers_wan

    for mod in list(sys.modules):
        if mod.split(".")[0] in ("torchao", "modelopt"):
            monkeypatch.delitem(sys.modules, mod)
    monkeypatch.setattr(sys, "meta_path", [_BrokenFinder("torchao", "modelopt"), *sys.meta_path])
    loaded = types.SimpleNamespace(device=torch.device("cuda"))
    methods, notes, skipped = peers_wan.quant_methods(loaded, None)
    assert [m.label for m in methods] == [peers_wan.OURS_FP8_LABEL]  # ours needs neither library
    assert [r["label"] for r in skipped] == [peers_wan.AO_LABEL, peers_wan.MO_LABEL]
    assert all("RuntimeError" in r["skipped"] and r["family"] == "quant" for r in skipped)
    assert len(notes) == 2
    md = peers_wan.to_markdown({"device_name": "x", "dtype": "bf16", "commit": "c", "captions": {"n": 1,
                               "caption_seed": 1}, "steps": 2, "torch": "t", "diffusers": "d", "measures": "m",
                               "rows": skipped, "notes": notes})
    assert md.count("| skipped: torchao.quantization not importable") == 1 and "| skipped: modelopt" in md


def test_quant_swap_back_ignores_a_copy_never_installed():
    import types

    import peers_wan

    loaded = types.SimpleNamespace(transformer="original")
    peers_wan._unswap(loaded, None)  # apply failed before installing its copy
    assert loaded.transformer == "original"
    old = peers_wan._swap(loaded, "quantized")
    peers_wan._unswap(loaded, old)
    assert loaded.transformer == "original"


def test_budget_skips_rows_with_a_reason_and_json_is_written_as_rows_finish(tmp_path, monkeypatch):
    """--budget-s: rows that would end past the budget are recorded as skipped (the table and plot still come
    out); the JSON is rewritten after the baseline and every row, so a run that is killed keeps its rows."""
    import peers_wan

    folder = _tiny_folder(tmp_path, qrw.SamplingDefaults(frames=2, height=8, width=8, steps=2, cfg=3.0),
                          num_layers=1)
    out = tmp_path / "p.json"
    seen: list[tuple[bool, int]] = []
    real_run = peers_wan.run

    def spy(args, on_row=None):
        def wrapped(res):
            on_row(res)
            seen.append((json.loads(out.read_text())["complete"], len(json.loads(out.read_text())["rows"])))
        return real_run(args, on_row=wrapped)
    monkeypatch.setattr(peers_wan, "run", spy)
    assert peers_wan.main(["--checkpoint", str(folder), "--device", "cpu", "--n", "1", "--batch", "1",
                           "--repeats", "1", "--families", "qc-compile,cache-dit", "--ours", "hlc,pab",
                           "--budget-s", "0", "--json", str(out), "--plot", str(tmp_path / "p.png")]) == 0
    res = json.loads(out.read_text())
    assert res["complete"] is True and seen[0] == (False, 1)  # the baseline was saved before any row ran
    rows = {r["label"]: r for r in res["rows"]}
    for label in ("qc-compile hlc", "qc-compile pab"):
        assert "budget" in rows[label]["skipped"] and "psnr_db" not in rows[label]
    assert rows["baseline (no cache)"]["seconds"] > 0
    md = out.with_suffix(".md").read_text()
    assert "| qc-compile hlc | qc-compile | skipped: not run" in md
    assert (tmp_path / "p.png").is_file()
    # an incomplete result (a killed run) re-renders with --from-json and says so
    res["complete"] = False
    out.write_text(json.dumps(res))
    assert peers_wan.main(["--from-json", str(out), "--md", str(tmp_path / "again.md")]) == 0
    assert "Incomplete run" in (tmp_path / "again.md").read_text()


def test_baselines_are_retimed_and_ratios_divide_by_the_faster_timing(monkeypatch):
    """A baseline slowed at the start (e.g. a build beside it) must not flatter the rows: after every row both
    baselines are timed again and each row's time ratio divides by the faster of the two timings."""
    import peers_wan

    again = {False: 0.5, True: 2.0}  # separate CFG was slow at the start, batched CFG got slower later
    monkeypatch.setattr(peers_wan, "_timed", lambda loaded, caps, args, batched, videos, before=None:
                        (again[batched], 0.0))
    base = {False: {"seconds": 1.0, "videos": None}, True: {"seconds": 0.8, "videos": None}}
    rows = [{"label": "baseline (no cache)", "family": "baseline", "seconds": 1.0, "time_ratio": 1.0},
            {"label": "a", "family": "diffusers", "seconds": 0.4, "time_ratio": 0.4, "cfg_batched": False},
            {"label": "b", "family": "cache-dit", "seconds": 0.6, "time_ratio": 0.75, "cfg_batched": True},
            {"label": "c", "family": "diffusers", "skipped": "not run"}]
    res: dict = {}
    peers_wan.retime_baselines(None, [], None, base, rows, res)
    assert rows[0]["seconds"] == 0.5 and rows[1]["time_ratio"] == pytest.approx(0.8)
    assert rows[2]["time_ratio"] == pytest.approx(0.75)
    assert "time_ratio" not in rows[3]
    assert res["baseline_seconds"]["separate_cfg"] == {"start": 1.0, "end": 0.5}
    assert res["baseline_batched_cfg_seconds"] == 0.8


def test_ours_config_adds_rows_with_their_overrides_and_refuses_a_bad_one(capsys):
    import peers_wan

    m = peers_wan.ours_methods(["hlc"], {"hlc": {"hlc.delta1": "0.2", "hlc.delta2": "0.2"}})
    assert [x.label for x in m] == ["qc-compile hlc hlc.delta1=0.2 hlc.delta2=0.2"]
    with pytest.raises(SystemExit) as e:
        peers_wan.main(["--ours-config", "hlc delta1"])
    assert e.value.code == 2 and "--ours-config 'hlc delta1'" in capsys.readouterr().err

