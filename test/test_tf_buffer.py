"""The time-indexed transform tree: static and moving edges, chains at a stamp, bounds, sampling."""

from __future__ import annotations

import numpy as np
from scipy.spatial.transform import Rotation

from mapany_ros.core.geometry import invert, make_pose
from mapany_ros.core.odometry import Lookup
from mapany_ros.core.tf_buffer import ChainSampler, TransformBuffer

S = 10**9
#: base_link -> pan_link (static) -> [pan joint, moving] -> head -> camera_link (static) -> optical (static).
T_BASE_PAN = make_pose(np.eye(3), [0.1, 0.0, 0.6])
T_HEAD_LINK = make_pose(np.eye(3), [0.05, 0.02, 0.08])  # the camera sits off the pan axis
T_LINK_OPTICAL = make_pose(Rotation.from_euler("xyz", [-90, 0, -90], degrees=True).as_matrix(), [0, 0, 0])


def pan(angle: float) -> np.ndarray:
    return make_pose(Rotation.from_euler("z", angle).as_matrix(), [0.0, 0.0, 0.0])


def angle_at(t_s: float) -> float:
    return 0.8 * t_s  # a head panning at 0.8 rad/s


def truth(t_s: float) -> np.ndarray:
    return T_BASE_PAN @ pan(angle_at(t_s)) @ T_HEAD_LINK @ T_LINK_OPTICAL


def head_tree(buffer_s: float = 10.0) -> TransformBuffer:
    buf = TransformBuffer(buffer_s=buffer_s, max_gap_s=0.25, tolerance_s=0.005)
    buf.add("base_link", "pan_link", 0, T_BASE_PAN, static=True)
    buf.add("head", "camera_link", 0, T_HEAD_LINK, static=True)
    buf.add("camera_link", "camera_optical_frame", 0, T_LINK_OPTICAL, static=True)
    return buf


def test_a_static_chain_composes_across_intermediate_links_and_inverts():
    buf = head_tree()
    buf.add("pan_link", "head", 0, pan(0.3), static=True)
    status, T = buf.lookup("base_link", "camera_optical_frame", 123)
    assert status is Lookup.OK
    np.testing.assert_allclose(T, T_BASE_PAN @ pan(0.3) @ T_HEAD_LINK @ T_LINK_OPTICAL, atol=1e-12)
    status, T_back = buf.lookup("camera_optical_frame", "base_link", 5)
    np.testing.assert_allclose(T_back, invert(T), atol=1e-12)
    # Siblings: camera_link seen from pan_link goes up to their common ancestor and down again.
    status, T_sib = buf.lookup("pan_link", "camera_link", 0)
    np.testing.assert_allclose(T_sib, pan(0.3) @ T_HEAD_LINK, atol=1e-12)
    assert buf.lookup("base_link", "elsewhere", 0)[0] is Lookup.WAIT  # not connected (yet)


def test_a_moving_edge_in_the_chain_is_interpolated_at_the_stamp():
    buf = head_tree()
    for i in range(21):  # joint states at 20 Hz for 1 s
        t = i * 0.05
        buf.add("pan_link", "head", int(t * S), pan(angle_at(t)))
    rng = np.random.default_rng(0)
    for t in rng.uniform(0.0, 1.0, 25):
        status, T = buf.lookup("base_link", "camera_optical_frame", int(t * S))
        assert status is Lookup.OK
        np.testing.assert_allclose(T, truth(t), atol=1e-9)  # slerp is exact for a constant-rate pan


def test_never_extrapolates_beyond_the_tolerance_and_refuses_gaps():
    buf = head_tree()
    for t in (1.0, 1.1, 1.2, 1.6, 1.7):  # joint states stop for 0.4 s between 1.2 and 1.6
        buf.add("pan_link", "head", int(t * S), pan(angle_at(t)))
    status, T = buf.lookup("base_link", "camera_optical_frame", int(1.703 * S))  # 3 ms late: within 5 ms
    assert status is Lookup.OK
    np.testing.assert_allclose(T, truth(1.7), atol=1e-12)
    assert buf.lookup("base_link", "camera_optical_frame", int(1.71 * S)) == (Lookup.WAIT, None)
    assert buf.lookup("base_link", "camera_optical_frame", int(0.99 * S)) == (Lookup.TOO_OLD, None)
    assert buf.lookup("base_link", "camera_optical_frame", int(1.4 * S)) == (Lookup.GAP, None)


def test_moving_history_is_bounded_per_edge_static_edges_stay():
    buf = head_tree(buffer_s=2.0)
    for i in range(1001):  # 10 s at 100 Hz
        buf.add("pan_link", "head", i * S // 100, pan(angle_at(i / 100)))
    kept = buf.stamps_between("head", None, 10 * S)
    assert kept[-1] == 10 * S and kept[0] >= 8 * S and len(kept) <= 201
    assert buf.lookup("base_link", "camera_optical_frame", int(7.5 * S))[0] is Lookup.TOO_OLD
    assert buf.lookup("base_link", "camera_optical_frame", int(9.5 * S))[0] is Lookup.OK
    capped = TransformBuffer(buffer_s=3600.0, max_samples=50)
    for i in range(200):
        capped.add("odom", "base_link", i * S // 10, make_pose(np.eye(3), [i, 0, 0]))
    assert len(capped.stamps_between("base_link", None, 100 * S)) == 50


def test_a_stamp_jumping_back_clears_moving_history_only():
    buf = head_tree()
    for t in (5.0, 5.1):
        buf.add("pan_link", "head", int(t * S), pan(angle_at(t)))
    generation = buf.generation
    buf.add("pan_link", "head", int(5.05 * S), pan(angle_at(5.05)))  # late, not a restart
    assert buf.generation == generation
    buf.add("pan_link", "head", int(1.0 * S), pan(angle_at(1.0)))  # the bag looped
    assert buf.generation == generation + 1
    assert buf.stamps_between("head", None, 10 * S) == [S]
    assert buf.is_static("camera_link") and buf.lookup("head", "camera_optical_frame", 0)[0] is Lookup.OK


def test_bad_transforms_and_cycles_are_refused_or_harmless():
    buf = TransformBuffer()
    for parent, child, T in (("a", "a", np.eye(4)), ("", "b", np.eye(4)), ("a", "b", np.diag([2.0, 1, 1, 1]))):
        try:
            buf.add(parent, child, 0, T)
        except ValueError:
            continue
        raise AssertionError(f"{parent!r} -> {child!r} accepted")
    buf.add("a", "b", 0, np.eye(4), static=True)
    buf.add("b", "a", 0, np.eye(4), static=True)  # a cycle: lookups end, they do not hang
    assert buf.lookup("a", "c", 0)[0] is Lookup.WAIT


def test_chain_sampler_gives_each_stamp_once_in_order_when_every_moving_edge_covers_it():
    buf = head_tree()
    buf.add("odom", "base_link", 0, np.eye(4))  # an unrelated edge does not matter
    sampler = ChainSampler("base_link", "camera_optical_frame")
    assert sampler.update(buf).static is None  # pan_link -> head unknown: not connected yet
    buf.add("pan_link", "head", 0, pan(0.0), static=True)
    first = sampler.update(buf)
    np.testing.assert_allclose(first.static, truth(0.0), atol=1e-12)
    assert sampler.update(buf).static is None  # unchanged: not handed over again
    # The head starts to move; a second moving joint (a tilt under the pan) publishes at other stamps.
    buf.add("head", "tilt", 0, np.eye(4), static=True)
    got = []
    for i in range(1, 11):
        buf.add("pan_link", "head", i * S // 10, pan(angle_at(i / 10)))
        buf.add("tilt", "camera_link", i * S // 10 + S // 20, T_HEAD_LINK)  # 50 ms later than the pan
        update = sampler.update(buf)
        assert update.static is None
        got += update.samples
    stamps = [s for s, _ in got]
    assert stamps == sorted(set(stamps))  # each once, in order
    # Every pan and tilt stamp that both edges cover (the first pan one precedes the tilt's history),
    # and nothing beyond the newest pan stamp.
    assert stamps == sorted({i * S // 10 for i in range(2, 11)} | {i * S // 10 + S // 20 for i in range(1, 10)})
    for s, T in got:
        np.testing.assert_allclose(T, truth(s / S), atol=1e-9)
