"""TensorRT plugin wrappers: the Python-level logic without TensorRT, and creator/plugin objects with TensorRT-RTX.

Nothing here builds a network or parses ONNX with a plugin node (TensorRT-RTX 1.7 aborts the process on that);
objects are created in a subprocess so that a crash inside the bindings fails one test instead of the run.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from qc_compile.plugins import cache_stats as CS
from qc_compile.plugins import formats as F
from qc_compile.plugins import trt_plugins as T


def test_names_namespace_version():
    assert T.PLUGIN_NAMES == ("RotateQuantFP8", "FP8Linear", "CacheStatsApply")
    assert T.PLUGIN_NAMESPACE == T.ONNX_DOMAIN == "qc" and T.PLUGIN_VERSION == "1"
    assert T.NUM_CACHE_STATS == CS.NUM_STATS


def test_docstring_documents_every_attribute():
    for plugin, spec in T.SPECS.items():
        assert plugin in T.__doc__
        for a in spec:
            assert f"``{a.name}`` INT" in T.__doc__


def test_validate_defaults_and_errors():
    assert T.validate_attrs("RotateQuantFP8", {}) == {"block": 0, "prologue": 0}
    assert T.validate_attrs("FP8Linear", {"has_bias": np.int32(0)}) == {"has_bias": 0, "out_dtype": 2}
    for plugin, attrs in [
        ("RotateQuantFP8", {"block": 48}), ("RotateQuantFP8", {"prologue": 3}), ("RotateQuantFP8", {"blk": 64}),
        ("FP8Linear", {"out_dtype": 7}), ("FP8Linear", {"has_bias": True}), ("FP8Linear", {"has_bias": 0.5}),
        ("CacheStatsApply", {"mode": -1}), ("Nope", {}),
    ]:
        with pytest.raises(ValueError):
            T.validate_attrs(plugin, attrs)


@pytest.mark.parametrize("plugin,attrs", [
    ("RotateQuantFP8", {"block": 128, "prologue": 2}), ("FP8Linear", {"has_bias": 0, "out_dtype": 1}),
    ("CacheStatsApply", {"mode": 0}),
])
def test_field_round_trip(plugin, attrs):
    fields = T.serialize_fields(plugin, attrs)
    assert all(a.dtype == np.int32 and a.shape == (1,) for _, a in fields)
    assert T.deserialize_fields(plugin, dict(fields)) == T.validate_attrs(plugin, attrs)
    raw = {n: a.tobytes() for n, a in fields}  # as bytes, the way a serialized engine stores them
    assert T.deserialize_fields(plugin, raw) == T.validate_attrs(plugin, attrs)


def test_output_shapes_and_dtypes():
    assert T.output_shapes("RotateQuantFP8", {"prologue": 2}, [[2, 77, 1152], [2, 1, 1152], [2, 1, 1152]]) == [
        [2, 77, 1152], [2, 77, 1]]
    assert T.output_dtypes("RotateQuantFP8", {}, ["bfloat16"]) == ["fp8", "float32"]
    assert T.output_shapes("FP8Linear", {}, [[2, 77, 1152], [2, 77, 1], [3456, 1152], [3456], [3456]]) == [
        [2, 77, 3456]]
    assert T.output_dtypes("FP8Linear", {"has_bias": 0, "out_dtype": 0}, ["fp8", "float32", "fp8", "float32"]) == [
        "float32"]
    assert T.output_shapes("CacheStatsApply", {"mode": 2}, [[2, 10, 64], [2, 10, 64]]) == [[2, 10, 64], [2, 10]]
    assert T.output_dtypes("CacheStatsApply", {"mode": 0}, ["float16", "float16"]) == ["float16", "float32"]
    with pytest.raises(ValueError):  # wrong input count for the attributes
        T.output_shapes("FP8Linear", {"has_bias": 1}, [[4, 8], [4, 1], [16, 8], [16]])
    with pytest.raises(ValueError):
        T.output_shapes("RotateQuantFP8", {"prologue": 2}, [[77, 1152], [1, 1152], [1, 1152]])


def test_output_shapes_use_const_for_new_dims():
    made = []
    out = T.output_shapes("RotateQuantFP8", {}, [["B", "T", "K"]], const=lambda v: made.append(v) or f"c{v}")
    assert out == [["B", "T", "K"], ["B", "T", "c1"]] and made == [1]


def test_supported_dtypes():
    lin = {"has_bias": 1, "out_dtype": 2}
    assert T.supported_dtypes("FP8Linear", lin, 0, []) == ("fp8",)
    assert T.supported_dtypes("FP8Linear", lin, 1, ["fp8"]) == ("float32",)
    assert T.supported_dtypes("FP8Linear", lin, 5, ["fp8", "float32", "fp8", "float32", "bfloat16"]) == ("bfloat16",)
    assert T.supported_dtypes("CacheStatsApply", {"mode": 1}, 2, ["float16", "float16"]) == ("float16",)
    assert T.supported_dtypes("RotateQuantFP8", {}, 1, ["bfloat16"]) == ("fp8",)
    assert T.supported_dtypes("RotateQuantFP8", {}, 2, ["bfloat16"]) == ("float32",)


def test_cuda_array_interface():
    cai, view = T.cuda_array_interface(1 << 20, (2, 3), "bfloat16")
    assert cai["typestr"] == "<i2" and cai["shape"] == (2, 3) and cai["data"] == (1 << 20, False) and view == "bfloat16"
    with pytest.raises(ValueError):
        T.cuda_array_interface(0, (1,), "float64")


def test_run_torch_matches_ops_on_cpu():
    """The enqueue computation (minus the pointer wrapping) equals the torch ops it stands for."""
    qc = torch.ops.qc
    x = torch.randn(2, 9, 128).to(torch.bfloat16)
    sh, sc = torch.randn(2, 1, 128), torch.randn(2, 1, 128) * 0.2
    q, s = T.run_torch("RotateQuantFP8", {"block": 64, "prologue": 2}, [x, sh, sc])
    q2, s2 = qc.modulate_quant_fp8(x, sh, sc, 64)
    assert torch.equal(q.view(torch.uint8), q2.view(torch.uint8)) and torch.equal(s, s2)
    q, s = T.run_torch("RotateQuantFP8", {"block": 0, "prologue": 1}, [x])
    assert torch.equal(s, qc.gelu_rotate_quant_fp8(x, 0)[1])
    wq, ws = F.quantize_fp8_per_channel(torch.randn(32, 128))
    bias = torch.randn(32)
    (y,) = T.run_torch("FP8Linear", {"has_bias": 1, "out_dtype": 0}, [q, s, wq, ws, bias])
    assert y.dtype == torch.float32 and torch.equal(y, qc.fp8_linear(q, s, wq, ws, bias, torch.float32))
    c = torch.randn_like(x)
    cases = ((0, [x, c], (x, c, None)), (1, [x, c, x * 2], (x, c, x * 2)), (2, [x, x * 2], (x, None, x * 2)))
    for mode, ins, ref in cases:
        y, st = T.run_torch("CacheStatsApply", {"mode": mode}, ins)
        y2, st2 = qc.cache_stats_apply(*ref)
        assert torch.equal(y, y2) and torch.equal(st, st2)


_TRT_SCRIPT = textwrap.dedent("""
    import numpy as np
    from qc_compile.plugins import trt_plugins as T
    trt = T.load_tensorrt()
    Plugin, Creator = T.build_trt_classes(trt)
    for name, attrs in (("RotateQuantFP8", {"block": 128, "prologue": 1}), ("FP8Linear", {"has_bias": 0}),
                        ("CacheStatsApply", {"mode": 2})):
        c = Creator(name)
        assert c.name == name and c.plugin_namespace == "qc" and c.plugin_version == "1"
        arrays = T.serialize_fields(name, attrs)  # kept alive: PluginField points into them
        fc = trt.PluginFieldCollection([trt.PluginField(n, a, trt.PluginFieldType.INT32) for n, a in arrays])
        p = c.create_plugin("node", fc, trt.TensorRTPhase.BUILD)
        assert p.attrs == T.validate_attrs(name, attrs), p.attrs
        back = {f.name: np.array(f.data) for f in p.get_fields_to_serialize()}
        assert T.deserialize_fields(name, back) == p.attrs
        assert p.clone().attrs == p.attrs and p.num_outputs == T.num_outputs(name)
    p = Creator("RotateQuantFP8").create_plugin("n", trt.PluginFieldCollection([]), trt.TensorRTPhase.BUILD)
    assert p.get_output_data_types([trt.bfloat16]) == [trt.fp8, trt.float32]
    creators = T.register_plugins(trt)
    reg = trt.get_plugin_registry()
    for name in T.PLUGIN_NAMES:
        assert reg.get_creator(name, "1", "qc") is not None, name
    print("OK", trt.__name__)
""")


def test_plugin_objects_with_installed_tensorrt():
    if T.load_tensorrt() is None:
        pytest.skip("neither tensorrt nor tensorrt_rtx is installed")
    r = subprocess.run([sys.executable, "-c", _TRT_SCRIPT], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "OK" in r.stdout, r.stdout + r.stderr
