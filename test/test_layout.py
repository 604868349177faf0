"""The package's rooms and the one-way imports between them.

The runtime is ``core`` (ROS-free) and ``ros`` (the thin rclpy layer). The simulated world
(``sim``), scoring (``scoring``), the commands (``commands``) and the benchmarks (``bench``) use it;
it never imports them, and ``core`` imports neither rclpy nor message types.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "mapany_ros"
RUNTIME = ("core", "ros")
AROUND = ("sim", "scoring", "commands", "bench")
ROS_MODULES = ("rclpy", "sensor_msgs", "geometry_msgs", "nav_msgs", "std_msgs", "tf2_msgs", "diagnostic_msgs",
               "std_srvs", "builtin_interfaces", "lifecycle_msgs", "rosgraph_msgs")


def imports(path: Path) -> set[str]:
    """Every module a file imports, at any depth (function-level imports included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def room_files(room: str) -> list[Path]:
    return sorted((PACKAGE / room).rglob("*.py"))


def test_the_package_has_exactly_these_rooms():
    rooms = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    assert rooms == set(RUNTIME + AROUND)


@pytest.mark.parametrize("room", RUNTIME)
def test_the_runtime_imports_nothing_around_it(room):
    offenders = {}
    for path in room_files(room):
        bad = {m for m in imports(path) if m.split(".")[:2] in ([["mapany_ros", r] for r in AROUND])}
        if bad:
            offenders[str(path.relative_to(PACKAGE))] = sorted(bad)
    assert not offenders


def test_core_imports_neither_rclpy_nor_messages():
    offenders = {}
    for path in room_files("core"):
        bad = {m for m in imports(path) if m.split(".")[0] in ROS_MODULES or m.startswith("mapany_ros.ros")}
        if bad:
            offenders[str(path.relative_to(PACKAGE))] = sorted(bad)
    assert not offenders


def test_the_layout_test_sees_imports():
    """The checks above can fail: a file that imports the simulated world is seen as doing so."""
    source = PACKAGE / "sim" / "drive.py"
    assert "mapany_ros.sim.odometry" in imports(source)
    assert "mapany_ros.core.pipeline" in imports(source)
