"""Parameters: one table for code, README, config files and the launch file; validation messages."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from mapany_ros.ros.params import BY_NAME, PARAMETERS, ParameterError, validate

ROOT = Path(__file__).resolve().parents[1]


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def params_file(name: str) -> dict:
    doc = yaml.safe_load((ROOT / "config" / name).read_text())
    return flatten(doc["/**"]["ros__parameters"])


def defaults() -> dict:
    return {p.name: p.default for p in PARAMETERS}


def test_every_parameter_is_in_the_readme_table_with_its_default():
    readme = (ROOT / "README.md").read_text()
    rows = {line.split("|")[1].strip().strip("`"): line for line in readme.splitlines()
            if line.startswith("| `")}
    for p in PARAMETERS:
        assert p.name in rows, f"README parameter table lacks {p.name}"
        assert p.description.split(" ")[0] in rows[p.name]
        if p.choices:
            assert all(c in rows[p.name] for c in p.choices)


def test_config_files_hold_valid_known_parameters():
    assert params_file("mapany.yaml") == defaults()
    demo = params_file("demo.yaml")
    assert set(demo) <= set(BY_NAME)
    config = validate({**defaults(), **demo})
    assert config["backend"] == "planesweep" and config.pipeline.use_odometry


def test_launch_file_parameters_and_remappings_exist_on_the_node():
    tree = ast.parse((ROOT / "launch" / "mapany.launch.py").read_text())
    node_call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "Node"
                     and any(k.arg == "executable" and ast.literal_eval(k.value) == "mapany_node" for k in n.keywords))
    kw = {k.arg: k.value for k in node_call.keywords}
    overrides = [d for d in kw["parameters"].elts if isinstance(d, ast.Dict)]
    for d in overrides:
        for key in d.keys:
            assert ast.literal_eval(key) in BY_NAME
    remapped = {ast.literal_eval(t.elts[0]) for t in kw["remappings"].elts}
    node_inputs = {f"{c}/image_raw" for c in BY_NAME["cameras"].default} | {
        f"{c}/camera_info" for c in BY_NAME["cameras"].default} | {"odom"}
    assert remapped <= node_inputs and remapped
    declared = {ast.literal_eval(c.args[0]) for c in ast.walk(tree)
                if isinstance(c, ast.Call) and getattr(c.func, "id", "") == "DeclareLaunchArgument"}
    assert {"params_file", "backend", "camera", "odom"} <= declared
    assert "config" in ast.unparse(tree) and "mapany.yaml" in ast.unparse(tree)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"window.overlap": 8}, "window.overlap"),
        ({"window.size": 1}, r"window.size = 1: must be in \[2"),
        ({"backend": "vggt"}, "backend = 'vggt': must be one of mapanything, planesweep"),
        ({"backend": "my pkg:Model"}, "package.module:ClassName"),
        ({"use_odometry": False, "window.overlap": 0}, "window.overlap: 2"),
        ({"backend": "pkg.mod:Model", "backend_options": "[1, 2]"}, "backend_options"),
        ({"backend": "pkg.mod:Model", "backend_options": "{a: [}"}, "not valid YAML"),
        ({"placement.robust_kernel": "l1"}, "placement.robust_kernel"),
        ({"tf.rate_hz": 0.0}, "tf.rate_hz"),
        ({"device": "tpu"}, "device"),
        ({"planesweep.min_depth_m": 20.0}, "min_depth_m"),
        ({"backend": "planesweep", "use_odometry": False}, "use_odometry: true"),
        ({"cameras": []}, "cameras"),
        ({"cameras": ["a", "a"]}, "distinct"),
        ({"map_frame": "/map"}, "map_frame"),
        ({"qos.reliability": "sometimes"}, "qos.reliability"),
        ({"placement.max_residual_m": -1.0}, "placement.max_residual_m"),
    ],
)
def test_invalid_values_are_rejected_with_a_message_naming_them(change, message):
    with pytest.raises(ParameterError, match=message):
        validate({**defaults(), **change})


def test_a_plugin_backend_gets_its_options_and_the_placement_its_parameters():
    config = validate({**defaults(), "backend": "my_models.vggt:VggtBackend",
                       "backend_options": "{checkpoint: /opt/vggt.pt, window: 12}",
                       "placement.view_sigma_m": 0.02, "odometry.sigma_rotation_deg_per_m": 2.0})
    assert config.backend_options == {"checkpoint": "/opt/vggt.pt", "window": 12}
    assert config.pipeline.placement.view_sigma_m == 0.02
    assert config.pipeline.placement.odom_sigma_deg_per_m == 2.0
    assert config.pipeline.placement.use_odometry


def test_every_range_is_consistent_with_its_default():
    for p in PARAMETERS:
        p.check(p.default)
        if p.low is not None:
            assert p.low <= p.high
