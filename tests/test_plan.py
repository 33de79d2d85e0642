"""The plan: JSON Schema + semantic validation (errors name the field), round trip with a sidecar, variants."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest

from qc_compile.errors import UserError
from qc_compile.plan import (DEFAULT_VARIANT, LinearPlan, Plan, act_scale_for, load_plan, plan_schema, save_plan,
                             uniform_plan, validate_schema)
from qc_compile.workdir import WorkDir, read_model_info


@pytest.fixture(scope="module")
def info():
    from compile_helpers import exported

    return read_model_info(WorkDir(exported()))


@pytest.fixture
def plan(info):
    ranges = {li["name"]: {"amax": 2.0 + i * 0.01} for i, li in enumerate(info.linears())}
    p, kept = uniform_plan(info, "fp8_e4m3", ranges, provenance={"created": "now", "command": "test",
                                                                 "tool_versions": {}})
    assert not kept
    return p


def _lins(info):
    return {li["name"]: li for li in info.linears()}


def test_uniform_plan_covers_every_linear(info, plan):
    assert set(plan.linears) == set(_lins(info))
    assert {e.weight for e in plan.linears.values()} == {"fp8_e4m3"}
    e = plan.linears["spatial_blocks.0.attn.qkv"]
    assert e.unit == "spatial_0" and e.act_scale == pytest.approx(e.act_amax / 448.0)
    int4, kept = uniform_plan(info, "int4_b128", {n: {"amax": 1.0} for n in _lins(info)})
    # weight-only; y_proj.fc1 has K = 64 (caption channels) < 128, so it stays bf16
    assert kept == ["y_embedder.y_proj.fc1"]
    assert int4.linears["spatial_blocks.0.mlp.fc2"].activation == "bf16"


def test_uniform_plan_blocks_only_keeps_embed_and_final_bf16(info):
    """calibrate's default: the embed and final units' linears stay bf16, every block linear takes the format."""
    from qc_compile.models.units import is_block

    ranges = {n: {"amax": 1.0} for n in _lins(info)}
    p, kept = uniform_plan(info, "fp8_e4m3", ranges, blocks_only=True)
    outside = sorted(n for n, e in p.linears.items() if not is_block(e.unit))
    assert outside and sorted(kept) == outside  # e.g. t_embedder.mlp.0, final_layer.linear
    assert "final_layer.linear" in kept and any(n.startswith("t_embedder") for n in kept)
    for n, e in p.linears.items():
        want = "bf16" if n in kept else "fp8_e4m3"
        assert (e.weight, e.activation) == (want, want), n
        assert (e.act_scale is None) == (n in kept), n


def test_round_trip_with_sidecar_and_variants(tmp_path, info, plan):
    import shutil

    work = tmp_path / "w"
    shutil.copytree(info.path.parent, work, ignore=shutil.ignore_patterns("onnx"))
    s = np.linspace(0.5, 2.0, 128).astype(np.float32)
    kv_names = [n for n in plan.linears if n.endswith("cross_attn.kv_linear")]
    for n in kv_names:
        plan.linears[n].smoothing = {"tensor": "smooth.kv"}
    plan.linears["final_layer.linear"].smoothing = [1.5] * 128
    plan.linears["spatial_blocks.0.mlp.fc2"].rotation = 64
    plan.tensors["smooth.kv"] = s
    plan.variants["w8a16"] = {"spatial_blocks.*": {"activation": "bf16"}}
    plan.schedule = ["default", "w8a16", "default"]
    plan.cache_policy = {"name": "hlc", "params": {"threshold": 0.1}}
    sha = save_plan(plan, work / "plan.json")
    assert (work / "plan.safetensors").is_file() and len(sha) == 64
    loaded = load_plan(work / "plan.json", model_info=read_model_info(WorkDir(work)))
    assert loaded.to_dict() == plan.to_dict()
    np.testing.assert_array_equal(loaded.smoothing_vector(kv_names[0]), s)
    assert loaded.used_variants() == [DEFAULT_VARIANT, "w8a16"]
    v = loaded.resolve("w8a16")
    assert v["spatial_blocks.1.attn.qkv"].activation == "bf16" and v["spatial_blocks.1.attn.qkv"].act_scale is None
    assert v["temporal_blocks.1.attn.qkv"].activation == "fp8_e4m3"
    assert loaded.units_touched() >= {"embed", "final"}
    # the sidecar is checked by sha256
    (work / "plan.safetensors").write_bytes((work / "plan.safetensors").read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(UserError, match="sha256"):
        load_plan(work / "plan.json")


def test_schema_file_is_valid_json_schema():
    import jsonschema

    jsonschema.Draft202012Validator.check_schema(plan_schema())


@pytest.mark.parametrize("mutate,field", [
    (lambda d: d["linears"]["spatial_blocks.0.attn.qkv"].update(weight="fp6"),
     "linears/spatial_blocks.0.attn.qkv/weight"),
    (lambda d: d["linears"]["final_layer.linear"].update(activation="int4"), "linears/final_layer.linear/activation"),
    (lambda d: d["linears"]["final_layer.linear"].update(act_scale=-1.0), "linears/final_layer.linear/act_scale"),
    (lambda d: d["linears"]["final_layer.linear"].update(extra=1), "linears/final_layer.linear"),
    (lambda d: d.update(schedule="default"), "schedule"),
    (lambda d: d.update(target="gpu"), "target"),
    (lambda d: d["model"].update(config_sha256="abc"), "model/config_sha256"),
    (lambda d: d.pop("provenance"), "<root>"),
])
def test_schema_errors_name_the_field(plan, mutate, field):
    d = copy.deepcopy(plan.to_dict())
    mutate(d)
    with pytest.raises(UserError) as e:
        validate_schema(d, "plan.json")
    assert f"field {field}" in str(e.value)


def _semantic_error(info, plan, mutate) -> str:
    d = copy.deepcopy(plan.to_dict())
    mutate(d)
    p = Plan.from_dict(d, plan.tensors)
    from qc_compile.plan import validate

    with pytest.raises(UserError) as e:
        validate(p, linears=_lins(info), model_name=info.name, config_sha256=info.config_sha256)
    return str(e.value)


def test_semantic_errors(info, plan):
    msg = _semantic_error(info, plan, lambda d: d["linears"].pop("temporal_blocks.2.mlp.fc1"))
    assert "missing 1 linear" in msg and "temporal_blocks.2.mlp.fc1" in msg
    msg = _semantic_error(info, plan, lambda d: d["linears"].update(
        {"spatial_blocks.9.attn.qkv": dict(d["linears"]["spatial_blocks.0.attn.qkv"])}))
    assert "linears/spatial_blocks.9.attn.qkv" in msg and "no such linear" in msg
    msg = _semantic_error(info, plan, lambda d: d["linears"]["spatial_blocks.0.attn.qkv"].update(unit="spatial_1"))
    assert "unit" in msg
    msg = _semantic_error(info, plan, lambda d: d["linears"]["y_embedder.y_proj.fc1"].update(weight="int4_b128"))
    assert "y_embedder.y_proj.fc1/weight" in msg and "block 128" in msg
    msg = _semantic_error(info, plan, lambda d: d["linears"]["final_layer.linear"].update(
        activation="nvfp4", act_scale=0.1))
    assert "dynamic" in msg
    msg = _semantic_error(info, plan, lambda d: d["linears"]["final_layer.linear"].update(act_scale=None))
    assert "static positive scale" in msg
    msg = _semantic_error(info, plan, lambda d: d["linears"]["spatial_blocks.0.mlp.fc2"].update(rotation=48))
    assert "rotation" in msg
    msg = _semantic_error(info, plan, lambda d: d["linears"]["final_layer.linear"].update(smoothing=[1.0] * 3))
    assert "smoothing" in msg
    msg = _semantic_error(info, plan, lambda d: d["linears"]["spatial_blocks.0.cross_attn.kv_linear"].update(
        smoothing=[2.0] * 128))
    assert "y_proj.fc2" in msg  # one kv_linear smoothing alone cannot be folded into the shared caption
    msg = _semantic_error(info, plan, lambda d: d.update(schedule=["default", "fast"]))
    assert "schedule/1" in msg
    msg = _semantic_error(info, plan, lambda d: d["variants"].update({"v": {"nothing.*": {"activation": "bf16"}}}))
    assert "variants/v/nothing.*" in msg
    msg = _semantic_error(info, plan, lambda d: d["model"].update(name="opensora-v1.2"))
    assert "another work dir" in msg


def test_load_plan_errors(tmp_path, info, plan):
    with pytest.raises(UserError, match="plan not found"):
        load_plan(tmp_path / "plan.json")
    (tmp_path / "plan.json").write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        load_plan(tmp_path / "plan.json")
    d = plan.to_dict()
    d["schema_version"] = 99
    (tmp_path / "plan.json").write_text(json.dumps(d))
    with pytest.raises(UserError, match="schema_version"):
        load_plan(tmp_path / "plan.json")


def test_act_scale_for():
    assert act_scale_for("bf16", 3.0) is None
    assert act_scale_for("nvfp4", 3.0) == "dynamic"
    assert act_scale_for("int8", 127.0) == pytest.approx(1.0)
    assert LinearPlan("final", activation="nvfp4", act_amax=6 * 448.0).global_scale == pytest.approx(1.0)
