"""`mapany-ros demo --loops`: drifting odometry and a simulated model, with and without loop closure.

A short version of the demo (1.5 loops at 5 Hz, 128 x 96) through the command's own entry point:
it must write its picture and figures, label the backend as simulated, and loop closure must beat
the same drive without it where the robot comes back - with the model simulator's errors that do
not average out (3 % scale bias, bending windows) and a poor wheel odometry (5 %, 5 deg/m).
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
from PIL import Image

from mapany_ros.commands import demo


@pytest.fixture(scope="module")
def result(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, str]:
    out = tmp_path_factory.mktemp("demo_loops")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert demo.main(["--loops", "1.5", "--out", str(out)]) == 0
    return out, json.loads((out / "metrics.json").read_text()), printed.getvalue()


def test_writes_a_labelled_picture_and_metrics(result) -> None:
    out, metrics, printed = result
    with Image.open(out / "demo_loops.png") as png:
        assert png.format == "PNG" and png.width >= 1200 and png.height >= 400
    assert (out / "demo_loops.png").stat().st_size > 50_000  # three panels of lines and points, not an empty canvas
    assert metrics["backend"].startswith("SIMULATED BACKEND")
    assert "no DDS" in metrics["how"]
    assert (metrics["image_size"], metrics["rate_hz"], metrics["loops"]) == ([128, 96], 5.0, 1.5)
    assert 18.0 < metrics["path_length_m"] < 24.0  # 1.5 rounds of the 14.3 m loop, keyframe to keyframe
    for key in ("odometry", "without_loop_closure", "with_loop_closure"):
        assert {"ate_m", "ate_sim3_m", "revisit"} <= set(metrics[key])
        assert set(metrics[key]["revisit"]) == {"pairs", "median_m", "p90_m"}
    assert "SIMULATED BACKEND" in printed and "placed, loop closure" in printed and "revisit" in printed


def test_loop_closure_beats_no_loop_closure_where_the_robot_returns(result) -> None:
    _, metrics, _ = result
    odo, off, on = metrics["odometry"], metrics["without_loop_closure"], metrics["with_loop_closure"]
    assert off["loops_closed"] == 0 and off["loop_candidates"] == 0
    assert on["loops_closed"] >= 2, on
    # Every run is scored on the second pass against the first: the same places, enough of them.
    for r in (odo, off, on):
        assert r["revisit"]["pairs"] >= 20
    # Placement alone already beats the odometry; closing loops removes most of what is left.
    assert off["revisit"]["median_m"] < 0.5 * odo["revisit"]["median_m"]
    assert on["revisit"]["median_m"] < 0.3 * off["revisit"]["median_m"], (on["revisit"], off["revisit"])
    assert on["revisit"]["p90_m"] < 0.5 * off["revisit"]["p90_m"]
    assert on["revisit"]["median_m"] < 0.05
    # The shape of the path follows (its scale is the odometry's, which no loop can correct).
    assert on["ate_sim3_m"] < off["ate_sim3_m"]
    # And the fused map lies closer to the scene's true surfaces.
    assert on["map"]["surface_error_median_m"] < off["map"]["surface_error_median_m"]


def test_options_default_per_demo() -> None:
    plain, loops = demo.parse_args([]), demo.parse_args(["--loops", "3"])
    assert (plain.loops, plain.width, plain.height, plain.rate, plain.out) == (None, 320, 240, 10.0, Path("out/demo"))
    assert (loops.loops, loops.width, loops.height, loops.rate, loops.out) == (3.0, 128, 96, 5.0,
                                                                                Path("out/demo_loops"))
    assert demo.parse_args(["--loops", "2", "--width", "64", "--out", "x"]).width == 64
    for bad in (["--loops", "0"], ["--loops", "2", "--bag", "b"], ["--loops", "2", "--threads", "0"]):
        with pytest.raises(SystemExit):
            demo.parse_args(bad)
