"""``--executor onnxruntime --device cuda`` (onnxruntime-gpu's CUDA provider, the ``ort-gpu`` extra).

CPU part (CI): without the CUDA provider the request is refused with one paragraph that names the provider and the
extra, through the CLI (exit 2, no traceback), ``Pipeline`` and the runner. GPU part (marked ``gpu``; skipped without
CUDA or without the provider): the trained qc-ref's FP8 Q/DQ graphs on the GPU through onnxruntime take the same
decisions as the torch executor running the same plan on the GPU, and the videos agree to >= 30 dB PSNR.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import onnxruntime as ort
import pytest
import torch

from compile_helpers import GEOMETRY, _ok, built, copy_of, run_cli
from qc_compile.errors import UserError

HAS_PROVIDER = "CUDAExecutionProvider" in ort.get_available_providers()
PROMPT = "a blue triangle moving left on a black background"


@pytest.mark.skipif(HAS_PROVIDER, reason="this onnxruntime has the CUDA provider")
def test_cuda_without_the_provider_is_a_clear_error() -> None:
    from qc_compile.runtime import Pipeline
    from qc_compile.runtime.runners.onnxruntime import OrtRunner

    work = copy_of(built("fp8_e4m3", "rtx:sm89"), "ort-cuda")
    code, out = run_cli("run", work, "--executor", "onnxruntime", "--device", "cuda", "--prompt", PROMPT,
                        "--steps", "2", "-o", work / "r")
    assert code == 2 and "Traceback" not in out, out
    for needle in ("CUDAExecutionProvider", "qc-compile[ort-gpu]", "pip uninstall -y onnxruntime", "--device cpu",
                   "optimizations stay off"):
        assert needle in out, (needle, out)
    assert len(out.strip().splitlines()) == 1  # one paragraph
    assert not (work / "r").exists()
    with pytest.raises(UserError, match="CUDAExecutionProvider"):
        Pipeline(work, executor="onnxruntime", device="cuda")
    with pytest.raises(UserError, match="CUDAExecutionProvider"):
        OrtRunner.from_workdir(work, "q", "rtx:sm89", device="cuda:0")


def test_providers_for_a_device() -> None:
    from qc_compile.onnx_utils import ort_providers

    assert ort_providers("cpu") == ["CPUExecutionProvider"]
    assert ort_providers("cuda:1") == [("CUDAExecutionProvider", {"device_id": 1}), "CPUExecutionProvider"]
    assert ort_providers("cuda")[0] == ("CUDAExecutionProvider", {"device_id": 0})


@pytest.fixture(scope="module")
def trained_fp8_work(tmp_path_factory) -> Path:
    """The shipped (trained) qc-ref at the tests' small geometry, FP8 W8A8 everywhere, Q/DQ graphs (no engines:
    TensorRT is not needed for onnxruntime)."""
    work = tmp_path_factory.mktemp("ort-gpu") / "work"
    _ok(["export", "qc-ref", "-o", work, "--quiet", *GEOMETRY])
    _ok(["calibrate", work, "--uniform", "fp8_e4m3", "--steps", "3", "--quiet"])
    _ok(["build", work, "--target", "trt", "--onnx-only", "--quiet"])
    return work


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.skipif(not HAS_PROVIDER, reason="needs onnxruntime-gpu (pip install 'qc-compile[ort-gpu]')")
def test_onnxruntime_cuda_matches_the_torch_executor(trained_fp8_work: Path) -> None:
    from qc_compile.metrics.fidelity import compare_videos
    from qc_compile.runtime import Pipeline
    from qc_compile.runtime.runners.onnxruntime import OrtRunner

    runs = {}
    for name in ("torch", "onnxruntime"):
        pipe = Pipeline(trained_fp8_work, executor=name, device="cuda")
        assert pipe.quantized
        runs[name] = pipe(PROMPT, policy="interval", overrides={"interval.interval": 2}, seed=3, steps=8,
                          reference=True)
    runner = OrtRunner.from_workdir(trained_fp8_work, "q", "trt", device="cuda")
    assert all(s.get_providers()[0] == "CUDAExecutionProvider" for v in runner.sessions.values() for s in v.values())
    t, o = runs["torch"], runs["onnxruntime"]
    dec = [{u: d["action"] for u, d in s["decisions"].items()} for s in t.trace()["steps"]]
    assert dec == [{u: d["action"] for u, d in s["decisions"].items()} for s in o.trace()["steps"]]
    assert 0 < t.compute_fraction < 1
    agree = compare_videos(t.videos.cpu(), o.videos.cpu())["psnr_db"]
    q_vs_fp = compare_videos(t.videos.cpu(), t.fp_videos.cpu())["psnr_db"]
    result = {"test": "onnxruntime-cuda vs torch-cuda, trained qc-ref FP8 W8A8, interval policy, 8 steps",
              "psnr_db": agree, "quantized_vs_fp_psnr_db": q_vs_fp, "compute_fraction": t.compute_fraction,
              "onnxruntime": ort.__version__, "gpu": torch.cuda.get_device_name()}
    print(json.dumps(result))
    if os.environ.get("OUT"):  # the GPU machine's result folder
        Path(os.environ["OUT"], "ort_cuda.json").write_text(json.dumps(result, indent=1))
    assert agree >= 30, agree
    assert q_vs_fp < agree
