"""Parameters: one table for code, README, config files and the launch file; validation messages."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from mapany_ros.ros.params import BY_NAME, PARAMETERS, ParameterError, flatten, validate

ROOT = Path(__file__).resolve().parents[1]


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


def launch_module(monkeypatch):
    """config/../launch/mapany.launch.py with stand-ins for launch / launch_ros (not on PyPI)."""
    import importlib.util
    import sys
    import types

    def record(kind):
        class Action:
            def __init__(self, *args, **kwargs):
                self.kind, self.args, self.kwargs = kind, args, kwargs
        return Action

    fakes = {
        "launch": types.SimpleNamespace(LaunchDescription=record("LaunchDescription")),
        "launch.actions": types.SimpleNamespace(DeclareLaunchArgument=record("Declare"),
                                                OpaqueFunction=record("OpaqueFunction")),
        "launch.conditions": types.SimpleNamespace(IfCondition=record("IfCondition")),
        "launch.substitutions": types.SimpleNamespace(LaunchConfiguration=record("LaunchConfiguration")),
        "launch_ros.actions": types.SimpleNamespace(Node=record("Node")),
        "ament_index_python.packages": types.SimpleNamespace(get_package_share_directory=lambda p: str(ROOT)),
    }
    for name, module in fakes.items():
        monkeypatch.setitem(sys.modules, name, module)
    spec = importlib.util.spec_from_file_location("mapany_launch", ROOT / "launch" / "mapany.launch.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def launched_node(module, **arguments):
    conf = {"params_file": str(ROOT / "config" / "mapany.yaml"), "namespace": "", **arguments}
    context = type("Context", (), {"launch_configurations": conf})()
    (node,) = module._node(context)
    return node.kwargs


def test_launch_file_lets_the_params_file_win_unless_an_argument_is_given(monkeypatch):
    module = launch_module(monkeypatch)
    declared = {a.args[0] for a in module.generate_launch_description().args[0] if a.kind == "Declare"}
    assert {"params_file", "namespace", "backend", "cameras", "camera", "odom", "use_sim_time", "autostart",
            "rviz"} <= declared
    plain = launched_node(module)
    assert plain["parameters"] == [str(ROOT / "config" / "mapany.yaml")] and plain["remappings"] == []
    given = launched_node(module, backend="planesweep", use_sim_time="true", namespace="robot1")
    assert given["parameters"][1] == {"backend": "planesweep", "use_sim_time": True}
    assert given["namespace"] == "robot1"
    managed = launched_node(module, autostart="false")
    assert managed["parameters"][1] == {"autostart": False}


def test_launch_file_remaps_every_camera_and_odometry(monkeypatch):
    module = launch_module(monkeypatch)
    one = launched_node(module, camera="/my_camera", odom="/odometry/filtered")
    assert ("camera/image_raw", "/my_camera/image_raw") in one["remappings"]
    assert ("camera/image_raw/compressed", "/my_camera/image_raw/compressed") in one["remappings"]
    assert ("camera/camera_info", "/my_camera/camera_info") in one["remappings"]
    assert ("odom", "/odometry/filtered") in one["remappings"]
    two = launched_node(module, cameras="front,rear", front="/drivers/front/", rear="/drivers/rear")
    assert two["parameters"][1] == {"cameras": ["front", "rear"]}
    remapped = dict(two["remappings"])
    assert remapped["front/camera_info"] == "/drivers/front/camera_info"
    assert remapped["rear/image_raw"] == "/drivers/rear/image_raw"
    # Every remapped input is one the node subscribes to.
    inputs = {"image_raw", "image_raw/compressed", "camera_info", "depth_prior"}
    assert all(k.split("/", 1)[1] in inputs for k in remapped)


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


def test_rviz_config_shows_the_fused_map_and_only_topics_the_node_publishes():
    doc = yaml.safe_load((ROOT / "config" / "mapany.rviz").read_text())
    topics = {d["Name"]: d["Topic"] for d in doc["Visualization Manager"]["Displays"] if "Topic" in d}
    assert topics["Fused map"]["Value"] == "/map_points"
    assert topics["Fused map"]["Durability Policy"] == "Transient Local"  # the node latches it
    outputs = {"/map_points", "/points", "/path", "/camera/depth", "/camera/confidence"}
    assert {t["Value"] for t in topics.values()} <= outputs
