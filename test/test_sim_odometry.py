"""The simulated wheel odometry's errors: drift per metre, presets, and slips at their time."""

from __future__ import annotations

import numpy as np
import pytest

from mapany_ros.core.geometry import invert, rotation_angle
from mapany_ros.scoring.trajectory import path_length
from mapany_ros.sim.odometry import DriftingOdometry, OdometryErrors
from mapany_ros.sim.scene import SyntheticTrajectory


@pytest.fixture(scope="module")
def trajectory() -> SyntheticTrajectory:
    return SyntheticTrajectory()


def yaw_deg(T: np.ndarray) -> float:
    return float(np.degrees(np.arctan2(T[1, 0], T[0, 0])))


def step(poses, t0: float, t1: float) -> np.ndarray:
    return invert(poses(t0)) @ poses(t1)


def test_a_slip_jumps_once_at_its_time_and_the_error_stays(trajectory):
    errors = OdometryErrors(slips=[(3.0, 0.2, 10.0)])
    odom = DriftingOdometry(trajectory.base_pose, errors)
    assert not errors.exact
    # Before the slip the odometry is the truth.
    np.testing.assert_allclose(odom.pose(2.95), trajectory.base_pose(2.95), atol=1e-9)
    # Across it, the motion is the true motion plus the jump: 20 cm forward and 10 degrees.
    E = invert(step(trajectory.base_pose, 2.9, 3.1)) @ step(odom.pose, 2.9, 3.1)
    assert np.linalg.norm(E[:3, 3]) == pytest.approx(0.2, abs=0.01)
    assert np.degrees(rotation_angle(E)) == pytest.approx(10.0, abs=0.01)
    # Afterwards the increments are true again: the jump happened once and the error is kept.
    E = invert(step(trajectory.base_pose, 3.1, 8.0)) @ step(odom.pose, 3.1, 8.0)
    np.testing.assert_allclose(E, np.eye(4), atol=1e-9)
    drift = invert(trajectory.base_pose(8.0)) @ odom.pose(8.0)
    assert np.degrees(rotation_angle(drift)) == pytest.approx(10.0, abs=0.01)


def test_slips_at_several_times_each_happen_once_and_in_order(trajectory):
    errors = OdometryErrors(slips=[(5.0, 0.0, -20.0), (2.0, -0.3, 0.0)])
    assert errors.slips == ((2.0, -0.3, 0.0), (5.0, 0.0, -20.0))
    odom = DriftingOdometry(trajectory.base_pose, errors)
    before, between, after = (invert(trajectory.base_pose(t)) @ odom.pose(t) for t in (1.9, 3.0, 6.0))
    np.testing.assert_allclose(before, np.eye(4), atol=1e-9)
    assert np.linalg.norm(between[:3, 3]) == pytest.approx(0.3, abs=0.01) and abs(yaw_deg(between)) < 1e-6
    assert yaw_deg(after) == pytest.approx(-20.0, abs=0.01)


def test_a_slip_is_three_numbers():
    with pytest.raises(ValueError, match="time_s, translation_m, yaw_deg"):
        OdometryErrors(slips=[(1.0, 0.2)])


@pytest.mark.parametrize(("preset", "scale", "deg_per_m"), [(OdometryErrors.good, 0.01, 0.5),
                                                            (OdometryErrors.poor, 0.05, 5.0)])
def test_presets_drift_as_they_say(trajectory, preset, scale, deg_per_m):
    errors = preset(seed=3)
    odom = DriftingOdometry(trajectory.base_pose, errors)
    times = np.arange(0.0, 20.0, 0.05)
    true_len = path_length([trajectory.base_pose(t) for t in times])
    odom_len = path_length([odom.pose(t) for t in times])
    assert odom_len / true_len - 1.0 == pytest.approx(scale, abs=0.2 * scale + 0.002)
    heading = yaw_deg(invert(trajectory.base_pose(times[-1])) @ odom.pose(times[-1]))
    assert heading == pytest.approx(deg_per_m * true_len, rel=0.25)


def test_good_preset_takes_overrides():
    errors = OdometryErrors.good(slips=[(1.0, 0.1, 0.0)])
    assert errors.scale_error == 0.01 and errors.yaw_drift_deg_per_m == 0.5 and errors.slips == ((1.0, 0.1, 0.0),)
