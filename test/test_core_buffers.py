"""Odometry buffer, camera sync, keyframe selection and sliding windows (no ROS, no GPU)."""

import numpy as np
import pytest
from core_fakes import base_pose, frame
from scipy.spatial.transform import Rotation

from mapany_ros.core.geometry import make_pose, rotation_angle
from mapany_ros.core.keyframes import KeyframeSelector
from mapany_ros.core.odometry import Lookup, OdometryBuffer
from mapany_ros.core.sync import FrameSync
from mapany_ros.core.windows import PendingKeyframes


def test_odometry_interpolates_translation_and_rotation():
    buf = OdometryBuffer(max_gap_s=0.5)
    R1 = Rotation.from_euler("z", 90, degrees=True).as_matrix()
    buf.add(1_000_000_000, make_pose(np.eye(3), [0, 0, 0]))
    buf.add(1_200_000_000, make_pose(R1, [2, 0, 0]))
    status, T = buf.lookup(1_050_000_000)
    assert status is Lookup.OK
    np.testing.assert_allclose(T[:3, 3], [0.5, 0, 0], atol=1e-9)
    assert np.degrees(rotation_angle(T)) == pytest.approx(22.5)


def test_odometry_never_extrapolates_and_refuses_gaps():
    buf = OdometryBuffer(max_gap_s=0.1)
    buf.add(0, base_pose(0))
    buf.add(500_000_000, base_pose(1))
    assert buf.lookup(600_000_000)[0] is Lookup.WAIT
    assert buf.lookup(250_000_000)[0] is Lookup.GAP
    buf.add(1_000_000_000, base_pose(2))
    assert buf.lookup(-1)[0] is Lookup.TOO_OLD
    assert buf.lookup(500_000_000)[0] is Lookup.OK


def test_odometry_rejects_nan_and_non_rigid():
    buf = OdometryBuffer()
    bad = base_pose(0)
    bad[0, 3] = np.nan
    with pytest.raises(ValueError):
        buf.add(0, bad)
    with pytest.raises(ValueError):
        buf.add(0, np.diag([2.0, 1, 1, 1]))
    assert len(buf) == 0


def test_sync_groups_cameras_and_drops_unmatched():
    sync = FrameSync(("left", "right"), tolerance_s=0.01)
    assert sync.push(frame(1.0, "left")) == []
    assert sync.push(frame(1.5, "left")) == []
    groups = sync.push(frame(1.503, "right"))  # 1.0 left can never be matched
    assert [[f.camera for f in g] for g in groups] == [["left", "right"]]
    assert groups[0][0].stamp_ns == 1_500_000_000
    assert sync.dropped == 1


def test_keyframes_by_motion_rotation_and_interval():
    sel = KeyframeSelector(min_translation_m=0.5, min_rotation_deg=20, max_interval_s=2.0, min_interval_s=0.05)
    assert sel.consider(0, base_pose(0))
    assert not sel.consider(100_000_000, base_pose(0.2))
    assert sel.consider(200_000_000, base_pose(0.6))
    turned = make_pose(Rotation.from_euler("z", 25, degrees=True).as_matrix(), [0.6, 0, 0])
    assert sel.consider(300_000_000, turned)
    assert not sel.consider(310_000_000, base_pose(5))  # rate cap
    assert sel.consider(2_400_000_000, turned)  # max interval while standing still
    sel_nopose = KeyframeSelector(max_interval_s=1.0)
    assert sel_nopose.consider(0, None)
    assert not sel_nopose.consider(500_000_000, None)
    assert sel_nopose.consider(1_000_000_000, None)


def test_keyframes_are_cut_into_windows_as_they_arrive():
    pending = PendingKeyframes(size=5, overlap=2, max_windows=4, separation=_time_gap)
    for i in range(7):
        assert pending.push([frame(i * 0.1)]) == []
    # The first window has no context: five new groups; every next one three (5 - overlap 2).
    assert pending.windows_ready == 1 and pending.uncut == 2
    assert [g[0].stamp_ns for g in pending.take()] == [int(round(t * 1e9)) for t in (0.0, 0.1, 0.2, 0.3, 0.4)]
    pending.push([frame(0.7)])
    assert pending.windows_ready == 1 and pending.uncut == 0
    pending.push([frame(0.8)])
    pending.cut()  # too old to wait for more: a partial window of one group
    assert [len(pending.take()) for _ in range(2)] == [3, 1]
    assert len(pending) == 0 and pending.take() == []


def test_falling_behind_thins_the_uncut_keyframes_evenly_and_keeps_the_newest():
    pending = PendingKeyframes(size=4, overlap=1, max_windows=1, separation=_time_gap)
    for t in (0.0, 0.1, 0.2, 0.3):
        pending.push([frame(t)])
    assert pending.windows_ready == 1  # the backend is busy: the queue is full from here on
    stamps = [0.4, 0.5, 0.55, 0.7, 0.8]
    skipped = [g[0].stamp_ns for t in stamps for g in pending.push([frame(t)])]
    assert pending.uncut == 3 and skipped  # one window's worth (4 - 1), no more
    # 0.5 goes first (0.4 -> 0.55 is the smallest gap it leaves), then 0.4 (0.3 -> 0.55); the newest
    # always stays.
    assert skipped == [int(0.5e9), int(0.4e9)]
    assert len(pending.take()) == 4  # the cut window kept all its views
    held = [g[0].stamp_ns for g in pending.take()]  # cut as soon as the queue had room
    assert len(held) == 3 and held[-1] == int(0.8e9) and held[0] >= int(0.4e9)


def _time_gap(a, b) -> float:
    return abs(b[0].stamp_ns - a[0].stamp_ns) * 1e-9


def test_window_arguments_are_validated():
    with pytest.raises(ValueError, match="overlap"):
        PendingKeyframes(size=4, overlap=4, max_windows=2, separation=_time_gap)
    with pytest.raises(ValueError, match="size"):
        PendingKeyframes(size=1, overlap=0, max_windows=2, separation=_time_gap)
    with pytest.raises(ValueError, match="max_windows"):
        PendingKeyframes(size=4, overlap=1, max_windows=0, separation=_time_gap)


# ---------------------------------------------------------------------------- a camera going silent


def stream(sync: FrameSync, t_from: float, t_to: float, cameras: tuple[str, ...]) -> list[list]:
    """Frames of ``cameras`` at 10 Hz, in arrival order; the groups they complete."""
    groups = []
    for i in range(round((t_to - t_from) * 10)):
        for cam in cameras:
            groups += sync.push(frame(round(t_from + 0.1 * i, 3), cam))
    return groups


def test_a_silent_camera_is_left_out_after_the_timeout_and_rejoins():
    sync = FrameSync(("left", "right"), tolerance_s=0.01, camera_timeout_s=1.0)
    groups = stream(sync, 0.0, 2.0, ("left", "right"))
    assert [[f.camera for f in g] for g in groups] == [["left", "right"]] * 20
    silent = stream(sync, 2.0, 2.95, ("left",))
    assert silent == [] and sync.missing() == []  # within the timeout: the left frames wait for the right
    silent += stream(sync, 3.0, 12.0, ("left",))  # the right camera is silent for 10 s
    assert sync.missing() == ["right"]
    # Groups go on with the left camera alone, the frames that waited included, in stamp order.
    assert all([f.camera for f in g] == ["left"] for g in silent)
    assert [g[0].stamp_ns for g in silent] == [round((2.0 + 0.1 * i) * 1e9) for i in range(100)]
    back = stream(sync, 12.0, 14.0, ("left", "right"))
    assert sync.missing() == []
    kinds = [[f.camera for f in g] for g in back]
    assert kinds[-10:] == [["left", "right"]] * 10  # it joins again
    lefts = [g[0].stamp_ns for g in groups + silent + back]
    assert lefts == sorted(set(lefts)) and len(lefts) == 140  # no left frame lost or repeated


def test_a_camera_that_never_starts_does_not_hold_up_the_others():
    sync = FrameSync(("front", "rear"), tolerance_s=0.01, camera_timeout_s=0.5)
    groups = stream(sync, 0.0, 3.0, ("front",))
    assert sync.missing() == ["rear"]
    assert [g[0].stamp_ns for g in groups] == [round(0.1e9 * i) for i in range(30)]


def test_without_a_timeout_groups_wait_for_every_camera_with_bounded_queues():
    sync = FrameSync(("left", "right"), tolerance_s=0.01, queue_size=10, camera_timeout_s=0.0)
    assert stream(sync, 0.0, 5.0, ("left",)) == [] and sync.missing() == []
    assert sync.dropped == 40
    groups = stream(sync, 5.0, 5.5, ("left", "right"))
    assert len(groups) == 5 and all(len(g) == 2 for g in groups)


# ---------------------------------------------------------------------------- odometry covariance


def ros_covariance(xyz: tuple[float, float, float], rpy: tuple[float, float, float]) -> np.ndarray:
    """A nav_msgs/Odometry pose covariance (x, y, z, rotX, rotY, rotZ) with these variances, as 6x6."""
    return np.diag([*xyz, *rpy]).astype(float)


def test_odometry_buffer_carries_the_covariance_to_the_image_stamp():
    buf = OdometryBuffer(max_gap_s=0.2)
    buf.add(0, base_pose(0.0), ros_covariance((0.01, 0.02, 0.0), (0.0, 0.0, 0.001)))
    buf.add(100_000_000, base_pose(0.1), ros_covariance((0.03, 0.04, 0.0), (0.0, 0.0, 0.003)))
    buf.add(200_000_000, base_pose(0.2))  # a sample without covariance
    np.testing.assert_allclose(buf.covariance(25_000_000), ros_covariance((0.015, 0.025, 0.0), (0, 0, 0.0015)))
    np.testing.assert_allclose(buf.covariance(100_000_000), ros_covariance((0.03, 0.04, 0.0), (0, 0, 0.003)))
    assert buf.covariance(150_000_000) is None and buf.covariance(300_000_000) is None
    with pytest.raises(ValueError):
        buf.add(300_000_000, base_pose(0.3), np.full((6, 6), np.nan))


def test_between_sigmas_from_growing_covariance_are_the_growth_in_the_body_frame():
    from mapany_ros.core.odometry import odometry_between_sigmas

    fallback = np.array([0.01, 0.01, 0.01, 0.05, 0.05, 0.05])
    a = ros_covariance((0.010, 0.002, 0.001), (0.0004, 0.0004, 0.0010))
    b = ros_covariance((0.019, 0.006, 0.002), (0.0008, 0.0005, 0.0026))  # dead reckoning: everything grew
    yaw90 = make_pose(Rotation.from_euler("z", 90, degrees=True).as_matrix(), [1.0, 2.0, 0.0])
    sigmas = odometry_between_sigmas(a, b, yaw90, fallback)
    # Facing +y, the robot's x axis is the odometry frame's y (and its y the frame's x): the growth
    # along the frame's y (0.004) is the body's forward variance.
    np.testing.assert_allclose(sigmas[3:], np.sqrt([0.004, 0.009, 0.001]), rtol=1e-9)
    np.testing.assert_allclose(sigmas[:3], np.sqrt([0.0001, 0.0004, 0.0016]), rtol=1e-9)  # rot first
    straight = odometry_between_sigmas(a, b, base_pose(1.0), fallback)
    np.testing.assert_allclose(straight[3:], np.sqrt([0.009, 0.004, 0.001]), rtol=1e-9)


def test_between_sigmas_from_constant_covariance_add_both_and_unset_falls_back():
    from mapany_ros.core.odometry import MIN_SIGMA_ROTATION_RAD, MIN_SIGMA_TRANSLATION_M, odometry_between_sigmas

    fallback = np.array([0.01, 0.01, 0.01, 0.05, 0.05, 0.05])
    # A driver's constant covariance (diff_drive_controller style): each pose uncertain by itself.
    c = ros_covariance((0.001, 0.001, 1e-6), (1e-6, 1e-6, 0.03))
    sigmas = odometry_between_sigmas(c, c.copy(), base_pose(0.5), fallback)
    np.testing.assert_allclose(sigmas, np.maximum(np.sqrt(2 * np.diag(c)[[3, 4, 5, 0, 1, 2]]),
                                                  [MIN_SIGMA_ROTATION_RAD] * 3 + [MIN_SIGMA_TRANSLATION_M] * 3))
    assert sigmas[0] == MIN_SIGMA_ROTATION_RAD and sigmas[5] == MIN_SIGMA_TRANSLATION_M  # floored, never 0
    unknown = c.copy()
    unknown[3, 3] = -1.0  # REP 145: unknown
    for bad in (None, np.zeros((6, 6)), unknown, np.full((6, 6), np.inf)):
        np.testing.assert_array_equal(odometry_between_sigmas(bad, c, base_pose(0.5), fallback), fallback)
        np.testing.assert_array_equal(odometry_between_sigmas(c, bad, base_pose(0.5), fallback), fallback)
