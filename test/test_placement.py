"""Placement with a real model's errors: every window, from its own frame into one map.

The backend is :class:`model_simulator.ModelSimulator`: true geometry in a random frame per window,
per-window scale error, per-view pose noise, smooth depth noise and one badly wrong view in about
ten windows. It ignores every prior it gets, so nothing here passes by passing priors through.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from core_fakes import RecordingBackend
from scipy.spatial.transform import Rotation

from mapany_ros.bench.accuracy import camera_rig, medium_bad_views
from mapany_ros.core.alignment import Sim3, robust_similarity
from mapany_ros.core.backends.base import ViewPrediction, WindowPrediction
from mapany_ros.core.frames import Frame
from mapany_ros.core.geometry import backproject, invert, make_pose, rotation_angle
from mapany_ros.core.placement import PlacementConfig, PlacementStatus, TransformSmoother, WindowPlacer
from mapany_ros.core.placement.overlap_chain import R_BODY_OPTICAL
from mapany_ros.scoring.trajectory import ate, path_length, step_errors
from mapany_ros.sim.drive import drive
from mapany_ros.sim.model_simulator import ModelSimulator
from mapany_ros.sim.odometry import DriftingOdometry, OdometryErrors
from mapany_ros.sim.scene import SyntheticScene, make_camera_model


@pytest.fixture(scope="module")
def scene() -> SyntheticScene:
    return SyntheticScene(0)


def assert_bad_views_rejected(run, sim: ModelSimulator) -> None:
    """Every bad view the simulator put into a window is rejected there. Calls are matched to
    windows by their frames: loop verifications call the backend too (and reject on their own)."""
    assert sim.log.bad_views, "the scenario injected no bad view"
    windows = {tuple(f.key for f in r.frames): r for r in run.results if r.frames}
    missed, checked = [], 0
    for b in sim.log.bad_views:
        r = windows.get(tuple(sim.log.calls[b.call]))
        if r is None:
            continue
        checked += 1
        if b.index not in r.placement.rejected_views:
            missed.append((b.call, b.index))
    assert checked, "no bad view fell into a window"
    assert not missed, f"bad views kept: {missed}"


def assert_continuous(run, errors: np.ndarray) -> None:
    """No jump where windows meet: the steps that cross a window boundary are no worse than the
    ones inside a window, which only carry the model's own per-view noise.

    The simulator gives every view 2 cm RMS of independent pose error; where geometry cannot
    correct it (a camera seeing only a wall and the floor cannot be slid along the wall) a step
    between two views keeps sqrt(2) x that, so a rare step beyond 5 cm is the model's, not a jump.
    """
    stamps = run.stamps
    crossing = np.array([run.window_of[a] != run.window_of[b] for a, b in zip(stamps, stamps[1:], strict=False)])
    assert np.mean(errors > 0.05) <= 0.01, f"{np.sum(errors > 0.05)} of {len(errors)} steps off by more than 5 cm"
    assert errors.max() <= 0.08, f"a step is off by {errors.max() * 100:.1f} cm"
    assert np.sqrt(np.mean(errors[crossing] ** 2)) <= 1.5 * np.sqrt(np.mean(errors[~crossing] ** 2)) + 0.005


# --------------------------------------------------------------------------- without odometry


def test_without_odometry_two_loops_stay_metric_and_continuous(scene):
    sim = ModelSimulator(scene=scene, metric=True, noise_seed=1)
    run = drive(scene, sim, every_frame_keyframe=True)
    stamps, truth = run.stamps, run.truth()
    est = [run.base_poses[s] for s in stamps]
    rmse, _ = ate(est, truth, stamps)
    _, scale = ate(est, truth, stamps, with_scale=True)
    length = path_length(truth)
    assert length > 20.0 and len(stamps) > 250
    assert rmse <= 0.015 * length, f"ATE {rmse:.3f} m over {length:.1f} m"
    assert abs(scale - 1.0) <= 0.02, f"scale off by {abs(scale - 1) * 100:.1f} %"
    assert_continuous(run, step_errors(est, truth, stamps))
    assert_bad_views_rejected(run, sim)
    s = run.pipeline.stats
    assert s.chain_breaks == 0 and s.windows_failed == 0
    assert len(stamps) >= s.keyframes - s.views_rejected - 1


def test_without_odometry_non_metric_windows_chain_with_one_scale(scene):
    sim = ModelSimulator(scene=scene, metric=False, noise_seed=2)
    run = drive(scene, sim, loops=1.0, every_frame_keyframe=True)
    stamps, truth = run.stamps, run.truth()
    est = [run.base_poses[s] for s in stamps]
    rmse, scale = ate(est, truth, stamps, with_scale=True)
    assert rmse <= 0.015 * path_length(truth)
    # Arbitrary window scales (0.3x .. 3x) come out as one map scale: the first window's.
    first = sim.log.frames[0][0]
    assert abs(scale * first - 1.0) < 0.05, (scale, first)
    assert run.pipeline.stats.chain_breaks == 0


def test_slow_backend_skips_keyframes_but_never_breaks_the_chain(scene):
    # A backend slow enough that skipping comes from its time, not from placement's: at 0.4 s a
    # window, placement's own tens of milliseconds decided whether a 21st keyframe was skipped.
    sim = ModelSimulator(scene=scene, metric=True, noise_seed=3, delay_s=0.5)
    run = drive(scene, sim, loops=0.5, pace=4.0, every_frame_keyframe=True, queue_size=1)
    s = run.pipeline.stats
    assert s.keyframes_skipped > 20, s
    assert s.chain_breaks == 0 and s.windows_failed == 0
    windows = [r for r in run.results if r.frames]  # loop closures carry corrections only
    placed_before: set = set()
    for result in windows:
        keys = [f.key for f in result.frames]
        if placed_before:  # every window after the first starts from placed keyframes
            assert result.window.n_context == 2 and keys[0] in placed_before and keys[1] in placed_before
        placed_before |= {f.key for f, ok in zip(result.frames, result.placement.accepted, strict=True) if ok}
    # Skipping makes windows sparser, so the map is somewhat worse than at full rate (0.4 % there),
    # but it stays one map: a break would put the two halves metres apart.
    stamps, truth = run.stamps, run.truth()
    est = [run.base_poses[s] for s in stamps]
    assert ate(est, truth, stamps)[0] <= 0.03 * path_length(truth)


def test_a_window_that_cannot_attach_is_rejected_then_the_map_continues_from_its_last_pose():
    cam = make_camera_model(64, 48)
    placer = WindowPlacer(PlacementConfig(use_odometry=False, refine_poses=False, view_consistency=0),
                          lambda c: None)
    frames = [Frame(np.zeros((48, 64, 3), np.uint8), i, "camera", "cam", cam) for i in range(6)]

    def window(poses, depth=2.0):
        views = []
        for T in poses:
            d = torch.full((48, 64), depth)
            views.append(ViewPrediction(d, torch.ones_like(d), torch.ones_like(d, dtype=torch.bool),
                                        backproject(d, cam.K, T), torch.zeros(48, 64, 3, dtype=torch.uint8), T, cam.K))
        return WindowPrediction(views)

    step = [make_pose(np.eye(3), [0.1 * i, 0, 0]) for i in range(6)]
    first = placer.place([[f] for f in frames[:3]], 0, window(step[:3]))
    assert first.status is PlacementStatus.STARTED
    last_placed = first.prediction.views[2].T_world_camera
    # The next windows see the shared frame at half the depth: their overlap cannot fit.
    broken = [[frames[1]], [frames[2]], [frames[3]]]
    second = placer.place(broken[:], 2, window(step[1:4], depth=1.0))
    assert second.status is PlacementStatus.REJECTED and not any(second.accepted)
    third = placer.place(broken[:], 2, window(step[1:4], depth=1.0))
    assert third.status is PlacementStatus.RELOCALISED and placer.stats.chain_breaks == 1
    # Continued from the newest placed pose of the shared frame, not restarted at the origin.
    np.testing.assert_allclose(third.prediction.views[1].T_world_camera, last_placed, atol=1e-6)


@pytest.mark.parametrize("with_extrinsic", [True, False])
def test_without_odometry_the_map_is_rep103_at_the_first_keyframe(with_extrinsic):
    T_base_cam = make_pose(R_BODY_OPTICAL @ Rotation.from_euler("x", -5, degrees=True).as_matrix(), [0.3, 0, 0.5])
    placer = WindowPlacer(PlacementConfig(use_odometry=False), lambda c: T_base_cam if with_extrinsic else None)
    backend = RecordingBackend()
    cam = make_camera_model(32, 24)
    G = make_pose(Rotation.random(random_state=4).as_matrix(), [3.0, -1.0, 2.0])  # the model's own frame
    frames = [Frame(np.zeros((24, 32, 3), np.uint8), i, "camera", "cam", cam,
                    T_world_camera=G @ make_pose(np.eye(3), [0, 0, 0.1 * i])) for i in range(3)]
    pred = backend.infer(frames)
    for f in frames:
        f.T_world_camera = None
    placed = placer.place([[f] for f in frames], 0, pred)
    T_map_cam0 = placed.prediction.views[0].T_world_camera
    expected = T_base_cam if with_extrinsic else make_pose(R_BODY_OPTICAL, np.zeros(3))
    np.testing.assert_allclose(T_map_cam0, expected, atol=1e-6)
    # The camera looks along map +x (forward), and map z is up.
    forward = placed.prediction.views[2].T_world_camera[:3, 3] - T_map_cam0[:3, 3]
    assert forward[0] > 0.19 and abs(forward[1]) < 1e-6


# --------------------------------------------------------------------------- with odometry


def test_drifting_odometry_is_corrected_by_the_model(scene):
    errors = OdometryErrors(scale_error=0.05, yaw_drift_deg_per_m=5.0, noise_m=0.005, noise_deg=0.2, seed=5)
    odometry = DriftingOdometry(scene.base_pose, errors)
    sim = ModelSimulator(scene=scene, metric=True, noise_seed=4)
    run = drive(scene, sim, odometry=odometry, rate_hz=10.0)
    stamps, truth = run.stamps, run.truth()
    est = [run.base_poses[s] for s in stamps]
    odo = [odometry.pose(s * 1e-9) for s in stamps]
    ate_est, ate_odo = ate(est, truth, stamps)[0], ate(odo, truth, stamps)[0]
    assert ate_est <= 0.5 * ate_odo, f"path ATE {ate_est:.3f} m vs odometry {ate_odo:.3f} m"
    # map -> odom is the drift: compared with the truth, not with identity. Its translation alone
    # says little (a small yaw error moves it by the odometry's distance from its origin): what it
    # must get right is where it puts the robot, and the drift's rotation.
    t_end = stamps[-1] * 1e-9
    T_true = scene.base_pose(t_end) @ invert(odometry.pose(t_end))
    T_est = run.results[-1].T_map_odom
    T_odom_base = odometry.pose(t_end)
    robot_err = np.linalg.norm((T_est @ T_odom_base)[:3, 3] - scene.base_pose(t_end)[:3, 3])
    odometry_err = np.linalg.norm(T_odom_base[:3, 3] - scene.base_pose(t_end)[:3, 3])
    assert robot_err < 0.1 * odometry_err, (robot_err, odometry_err)
    assert np.degrees(rotation_angle(invert(T_true) @ T_est)) < 0.5 * np.degrees(rotation_angle(T_true))
    assert_bad_views_rejected(run, sim)


def test_exact_odometry_and_a_backend_that_agrees_leave_the_map_on_odometry():
    """A regression test of frame handling: extrinsic, odometry and window frames composed right
    give zero correction; swapping base and camera, or inverting a pose anywhere, does not."""
    backend = RecordingBackend()
    cam = make_camera_model(32, 24)
    T_base_cam = make_pose(R_BODY_OPTICAL, [0.2, 0.0, 0.5])
    placer = WindowPlacer(PlacementConfig(use_odometry=True), lambda c: T_base_cam)
    groups = []
    for i in range(6):
        T_odom_base = make_pose(Rotation.from_euler("z", 4 * i, degrees=True).as_matrix(), [0.1 * i, 0.02 * i, 0])
        groups.append([Frame(np.zeros((24, 32, 3), np.uint8), i, "camera", "cam", cam,
                             T_world_camera=T_odom_base @ T_base_cam, T_world_base=T_odom_base)])
    frames = [g[0] for g in groups]
    G = make_pose(Rotation.random(random_state=7).as_matrix(), [1.0, 2.0, 3.0])
    pred = backend.infer([Frame(f.image, f.stamp_ns, f.camera, f.frame_id, cam, T_world_camera=G @ f.T_world_camera)
                          for f in frames])
    placed = placer.place(groups, 0, pred)
    assert placed.status is PlacementStatus.PLACED and all(placed.accepted)
    np.testing.assert_allclose(placed.T_map_odom, np.eye(4), atol=1e-6)
    for f, v in zip(frames, placed.prediction.views, strict=True):
        np.testing.assert_allclose(v.T_world_camera, f.T_world_camera, atol=1e-6)


def test_a_window_far_from_odometry_is_rejected_and_the_graph_keeps_its_keyframes():
    backend = RecordingBackend()
    cam = make_camera_model(32, 24)
    placer = WindowPlacer(PlacementConfig(use_odometry=True, max_residual_m=0.2, refine_poses=False,
                                          view_consistency=0), lambda c: np.eye(4))
    groups = [[Frame(np.zeros((24, 32, 3), np.uint8), i, "camera", "cam", cam,
                     T_world_camera=make_pose(np.eye(3), [0.2 * i, 0, 0]),
                     T_world_base=make_pose(np.eye(3), [0.2 * i, 0, 0]))] for i in range(5)]
    # The model says the robot went twice as far as odometry: 0.4 m off at the end of the window.
    pred = backend.infer([Frame(g[0].image, i, "camera", "cam", cam,
                                T_world_camera=make_pose(np.eye(3), [0.4 * i, 0, 0])) for i, g in enumerate(groups)])
    placed = placer.place(groups, 0, pred)
    assert placed.status is PlacementStatus.REJECTED and "odometry" in placed.message
    assert placer.stats.windows_rejected == 1


def test_metric_views_a_thousand_times_too_deep_are_rejected_even_when_consistent():
    """Depth in millimetres read as metres: views still agree with each other (everything is far
    away, parallax vanishes), so only plausibility catches it."""
    backend = RecordingBackend()
    cam = make_camera_model(32, 24)
    placer = WindowPlacer(PlacementConfig(use_odometry=True), lambda c: np.eye(4))
    groups = [[Frame(np.zeros((24, 32, 3), np.uint8), i, "camera", "cam", cam,
                     T_world_camera=make_pose(np.eye(3), [0.1 * i, 0, 0]),
                     T_world_base=make_pose(np.eye(3), [0.1 * i, 0, 0]))] for i in range(4)]
    pred = backend.infer([g[0] for g in groups])
    for v in pred.views:
        v.depth, v.points_world = v.depth * 1000, v.points_world * 1000
    placed = placer.place(groups, 0, pred)
    assert not any(placed.accepted) and sorted(placed.rejected_views) == [0, 1, 2, 3]


# --------------------------------------------------------------------------- pieces


def test_robust_similarity_ignores_a_third_of_gross_outliers():
    rng = np.random.default_rng(0)
    truth = Sim3(Rotation.random(random_state=1).as_matrix(), np.array([1.0, -2.0, 0.5]), 1.3)
    src = rng.uniform(-2, 2, size=(600, 3))
    dst = truth.apply_points(src) + rng.normal(scale=0.005, size=src.shape)
    dst[:200] += rng.uniform(-1, 1, size=(200, 3))
    fit = robust_similarity(src, dst, np.full(600, 0.01))
    assert abs(fit.transform.scale - 1.3) < 2e-3
    np.testing.assert_allclose(fit.transform.R, truth.R, atol=2e-3)
    assert np.mean(fit.weights[:200] < 0.1) > 0.9 and np.mean(fit.weights[200:] > 0.5) > 0.9


def test_transform_smoother_takes_the_first_value_then_glides_without_jumps():
    smoother = TransformSmoother(time_constant_s=0.5)
    assert smoother.value(0.0) is None
    smoother.set_target(np.eye(4))
    np.testing.assert_allclose(smoother.value(0.0), np.eye(4))
    target = make_pose(Rotation.from_euler("z", 10, degrees=True).as_matrix(), [0.3, 0, 0])
    smoother.set_target(target)
    previous = np.eye(4)
    for k in range(1, 61):  # 3 s at 20 Hz
        T = smoother.value(0.05 * k)
        assert np.linalg.norm(T[:3, 3] - previous[:3, 3]) < 0.035
        previous = T
    np.testing.assert_allclose(previous, target, atol=2e-3)


# --------------------------------------------------------------------------- errors that do not average out


def odometry_ate(run, odometry) -> tuple[float, float]:
    stamps, truth = run.stamps, run.truth()
    est = [run.base_poses[s] for s in stamps]
    odo = [odometry.pose(s * 1e-9) for s in stamps]
    return ate(est, truth, stamps)[0], ate(odo, truth, stamps)[0]


def test_good_odometry_is_never_made_worse(scene):
    """1 %, 0.5 deg/m wheel odometry with the default parameters (which assume far worse): the model
    must add to it, never take from it."""
    odometry = DriftingOdometry(scene.base_pose, OdometryErrors.good(seed=5, noise_m=0.002, noise_deg=0.05))
    run = drive(scene, ModelSimulator(scene=scene, metric=True, noise_seed=4), odometry=odometry, rate_hz=10.0,
                loops=1.0)
    ate_est, ate_odo = odometry_ate(run, odometry)
    assert ate_est <= ate_odo, f"path ATE {ate_est:.3f} m vs good odometry {ate_odo:.3f} m"


@pytest.mark.parametrize("preset", ["good", "poor"])
def test_a_30_cm_wheel_slip_is_corrected_and_named(scene, preset):
    """One 30 cm jump of the odometry: the path must not take it (the model's views carry the
    robot across), and /diagnostics must say so by name."""
    errors = getattr(OdometryErrors, preset)(seed=5, slips=((10.0, 0.3, 0.0),))
    odometry = DriftingOdometry(scene.base_pose, errors)
    run = drive(scene, ModelSimulator(scene=scene, metric=True, noise_seed=4), odometry=odometry, rate_hz=10.0,
                loops=0.5)
    stamps, truth = run.stamps, run.truth()
    steps = step_errors([run.base_poses[s] for s in stamps], truth, stamps)
    t = np.array(stamps[1:]) * 1e-9
    across = steps[(t > 9.5) & (t < 11.0)]
    # The path takes none of the 30 cm: what is left is the model's own step noise (2 cm / 0.5 deg
    # per view alone makes the largest of ~20 steps 5-6 cm).
    assert across.max() <= 0.08, f"the path jumped by {across.max() * 100:.1f} cm at the slip"
    assert run.pipeline.stats.odometry_slips >= 1
    assert any(a * 1e-9 < 10.0 <= b * 1e-9 + 0.05 and m > 0.2 for r in run.results for a, b, m in r.placement.slips)


def test_a_model_that_leans_on_its_pose_priors_still_corrects_drifting_odometry(scene):
    """MapAnything is fed the odometry and its poses follow it: placement must take from the window
    only what the geometry adds, and still cut the odometry's error to 30 %."""
    odometry = DriftingOdometry(scene.base_pose, OdometryErrors.poor(seed=5))
    sim = ModelSimulator(scene=scene, metric=True, noise_seed=4, follow_priors=0.5)
    run = drive(scene, sim, odometry=odometry, rate_hz=10.0, loops=1.0)
    windows = {tuple(f.key for f in r.frames) for r in run.results if r.frames}
    used = [u for call, u in zip(sim.log.calls, sim.log.used_priors, strict=True) if tuple(call) in windows]
    assert used and all(used)
    # Loop verification shows the model no prior: it would pull the model towards the drift.
    assert not any(u for call, u in zip(sim.log.calls, sim.log.used_priors, strict=True) if tuple(call) not in windows)
    ate_est, ate_odo = odometry_ate(run, odometry)
    assert ate_est <= 0.3 * ate_odo, f"path ATE {ate_est:.3f} m vs odometry {ate_odo:.3f} m"


def test_medium_bad_views_flying_pixels_and_rough_confidence_without_odometry():
    """Errors too small to be obvious: 12 cm / 4 deg views, flying pixels at every depth edge,
    confidence that only roughly follows the error; default parameters, no odometry (the scenario
    of ``make bench``). Every medium bad view is rejected, or placed within 3 cm of where it belongs."""
    r = medium_bad_views()
    assert r["ate_m"] <= 0.01 * r["path_m"], r
    assert r["chain_breaks"] == 0
    assert r["bad_views"] > 0 and r["fine"] >= 0.9 * r["bad_views"], r


def test_a_steady_scale_bias_is_the_maps_without_odometry_and_corrected_with_it(scene):
    """5 % too large in every window: without odometry the map takes the model's scale (nothing
    else is metric); with odometry, the odometry's."""
    biased = dict(metric=True, noise_seed=1, scale_bias=0.05)
    run = drive(scene, ModelSimulator(scene=scene, **biased), loops=1.0)
    stamps, truth = run.stamps, run.truth()
    _, scale = ate([run.base_poses[s] for s in stamps], truth, stamps, with_scale=True)
    assert abs(1.0 / scale - 1.05) <= 0.02, f"map scale {1 / scale:.3f}, the model's is 1.05"
    odometry = DriftingOdometry(scene.base_pose, OdometryErrors.good(seed=5))
    run = drive(scene, ModelSimulator(scene=scene, **biased), odometry=odometry, rate_hz=10.0, loops=1.0)
    stamps, truth = run.stamps, run.truth()
    _, scale = ate([run.base_poses[s] for s in stamps], truth, stamps, with_scale=True)
    assert abs(1.0 / scale - 1.0) <= 0.02, f"map scale {1 / scale:.3f} with 1 % odometry"


@pytest.mark.parametrize(("errors", "model_bias"), [
    (OdometryErrors.poor(seed=5), 0.0), (OdometryErrors.good(seed=5), 0.0), (OdometryErrors.good(seed=5), 0.05)])
def test_the_models_scale_against_the_odometrys_is_reported(scene, errors, model_bias):
    """Which of the two is off cannot be told from the data; their steady ratio can, and it is
    reported (a wheel radius that is off, or a biased model), while the map keeps the odometry's."""
    odometry = DriftingOdometry(scene.base_pose, errors)
    sim = ModelSimulator(scene=scene, metric=True, noise_seed=4, scale_bias=model_bias)
    run = drive(scene, sim, odometry=odometry, rate_hz=10.0, loops=0.5)
    windows = {tuple(f.key for f in r.frames) for r in run.results if r.frames}
    # The model's scale over the windows it really gave (3 % random per window on top of its bias).
    model = np.exp(np.mean([np.log(s) for call, (s, _) in zip(sim.log.calls, sim.log.frames, strict=True)
                            if tuple(call) in windows]))
    expected = model / (1 + errors.scale_error)
    status = run.pipeline.status()
    ratio, sigma = status["model_scale_vs_odometry"], status["model_scale_sigma"]
    print(f"model / odometry scale {ratio:.4f} +- {sigma:.4f}, truly {expected:.4f}")
    # 8 windows of 6 steps of 15 cm, with 2 cm of noise per view: a few per cent, and it says so.
    assert 0 < sigma < 0.03
    assert abs(np.log(ratio / expected)) <= 3 * sigma, (ratio, sigma, expected)


@pytest.mark.parametrize("follow_priors", [0.0, 0.5], ids=["own poses", "poses leaning on the odometry"])
def test_a_camera_rigs_baseline_makes_the_map_metric_against_a_miscalibrated_odometry(follow_priors: float):
    """Front and left camera 36 cm apart, odometry 5 % long with 5 deg/m of heading drift: the
    calibrated distance between the cameras measures the odometry's scale, and the fused map comes
    out as good as the model's own depth fused at the true poses (issue target: within 1.25x).
    Also when the model's poses lean halfway towards that odometry, as MapAnything's lean on the
    pose priors it is fed: its steps are then 2.5 % long and bent by half the drift, and only its
    depth (refinement, with the two cameras held together by their extrinsics) says otherwise."""
    r = camera_rig(OdometryErrors.poor(seed=5), follow_priors=follow_priors)
    (mm, m90), (dm, d90) = r["map"], r["model_depth"]
    odometry, sigma, truly = r["odometry_scale"]
    print(f"map {mm * 100:.2f} / {m90 * 100:.2f} cm, model's own depth {dm * 100:.2f} / {d90 * 100:.2f} cm, "
          f"map scale {r['map_scale']:.4f}, odometry scale {odometry:.4f} +- {sigma:.4f}")
    assert mm <= 1.25 * dm and m90 <= 1.25 * d90
    assert abs(r["map_scale"] - 1.0) <= 0.02
    assert 0 < sigma < 0.02 and abs(np.log(odometry / truly)) <= 3 * sigma


def test_with_a_rig_a_biased_model_is_caught_and_the_map_stays_true(scene):
    """Good odometry (1 % long) and a model 5 % too large: with one camera the two cannot be told
    apart (the map keeps the odometry's scale, see above); with a rig (here three cameras) the
    odometry is measured as 1 % long, and both the path and the map's depth are true to within 2 %."""
    rig = scene.rig("front", "left", "right")
    odometry = DriftingOdometry(scene.base_pose, OdometryErrors.good(seed=5))
    run = drive(scene, ModelSimulator(scene=scene, metric=True, noise_seed=1, scale_bias=0.05), odometry=odometry,
                cameras=rig, rate_hz=10.0, loops=1.0)
    stamps, truth = run.stamps, run.truth()
    _, scale = ate([run.base_poses[s] for s in stamps], truth, stamps, with_scale=True)
    status = run.pipeline.status()
    print(f"map scale {1 / scale:.4f}; odometry {status['odometry_scale']:.4f} +- "
          f"{status['odometry_scale_sigma']:.4f}; model / odometry {status['model_scale_vs_odometry']:.4f}")
    assert abs(1.0 / scale - 1.0) <= 0.02, f"map scale {1 / scale:.3f}"
    assert abs(status["odometry_scale"] - 1.01) <= max(0.015, 3 * status["odometry_scale_sigma"])
    # The depth went out in the map's metres: the model's 5 % are taken out of it too.
    depth_scale = [r.placement.scale * r.prediction.metric_scale for r in run.results if any(r.placement.accepted)]
    assert abs(float(np.exp(np.median(np.log(depth_scale)))) - 1.0) <= 0.02


def test_without_rig_scale_the_map_keeps_the_odometrys_scale(scene):
    """``placement.rig_scale: false`` (extrinsics the user does not trust for scale): the same rig
    on odometry 5 % long gives a map 5 % large, as with one camera, and no odometry scale."""
    rig = scene.rig("front", "left")
    odometry = DriftingOdometry(scene.base_pose, OdometryErrors.poor(seed=5))
    run = drive(scene, ModelSimulator(scene=scene, metric=True, noise_seed=4), odometry=odometry, cameras=rig,
                rate_hz=10.0, loops=0.5, placement=PlacementConfig(rig_scale=False))
    stamps, truth = run.stamps, run.truth()
    _, scale = ate([run.base_poses[s] for s in stamps], truth, stamps, with_scale=True)
    assert abs(1.0 / scale - 1.05) <= 0.02, f"map scale {1 / scale:.3f}, the odometry's is 1.05"
    assert run.pipeline.status()["odometry_scale"] == 0.0


def test_the_odometrys_measured_scale_is_the_robots_kept_by_a_new_map_and_in_the_map_folder(scene, tmp_path):
    """A rig measured the odometry 5 % long. That is the robot's wheel calibration, not the map's: a
    new map (~/reset, an input restart) applies it from its first window, and so does a node started
    in the saved map folder, where map.yaml holds it; unless rig scale is off for that node."""
    import yaml

    from mapany_ros.core.map_folder import read_keyframes

    rig = scene.rig("front", "left")
    odometry = DriftingOdometry(scene.base_pose, OdometryErrors.poor(seed=5))
    run = drive(scene, ModelSimulator(scene=scene, metric=True, noise_seed=4), odometry=odometry, cameras=rig,
                rate_hz=10.0, loops=0.5)
    status = run.pipeline.status()
    measured, sigma = status["odometry_scale"], status["odometry_scale_sigma"]
    assert abs(np.log(measured / 1.05)) <= max(0.01, 3 * sigma), (measured, sigma)
    run.pipeline.save_map(tmp_path / "map")
    info = yaml.safe_load((tmp_path / "map" / "map.yaml").read_text())
    assert info["odometry_scale"]["ratio"] == pytest.approx(measured, abs=1e-4)
    saved = read_keyframes(tmp_path / "map")

    placer = run.pipeline.placer
    placer.reset()
    assert placer.graph.odometry_scale == pytest.approx(measured, abs=1e-4)
    extrinsic = run.pipeline.extrinsic
    started = WindowPlacer(PlacementConfig(use_odometry=True), extrinsic)
    started.load(saved)
    assert started.graph.odometry_scale == pytest.approx(measured, abs=1e-4)
    assert started.saved_keyframes().odometry_calibration == saved.odometry_calibration  # saved again as loaded
    untrusted = WindowPlacer(PlacementConfig(use_odometry=True, rig_scale=False), extrinsic)
    untrusted.load(saved)
    assert untrusted.graph.odometry_scale == 1.0

    # A folder no rig measured has no entry; a broken entry is named.
    del info["odometry_scale"]
    (tmp_path / "map" / "map.yaml").write_text(yaml.safe_dump(info))
    assert read_keyframes(tmp_path / "map").odometry_calibration is None
    info["odometry_scale"] = {"ratio": 1.05, "log_scale": "long"}
    (tmp_path / "map" / "map.yaml").write_text(yaml.safe_dump(info))
    with pytest.raises(ValueError, match="odometry_scale"):
        read_keyframes(tmp_path / "map")


def test_the_scale_filter_learns_the_odometrys_scale_only_from_a_rig():
    """Exact measurements of a model 4 % large against odometry 5 % long: without a rig the filter
    learns their ratio and keeps the odometry's scale; with one it learns both, and the window's
    scale is in true metres once enough rig windows measured the odometry."""
    from mapany_ros.core.placement.scale import MIN_RIG_WINDOWS, ScaleFilter, ScaleMeasurement

    model, odometry = np.log(1.04), np.log(1.05)
    steps = ScaleMeasurement(odometry - model, 0.02**2)  # odometry metres per window unit
    rig = ScaleMeasurement(-model, 0.02**2)  # true metres per window unit
    alone = ScaleFilter(0.03)
    for _ in range(50):
        alone.update(steps, True, alone.estimate(steps, True))
    assert alone.odometry_scale() is None and alone.odometry_log_scale == 0.0
    assert alone.estimate(steps, True) == pytest.approx(np.exp(odometry - model), rel=1e-3)
    both = ScaleFilter(0.03)
    for k in range(50):
        if k < MIN_RIG_WINDOWS:
            assert both.odometry_scale() is None
        both.update(steps, True, both.estimate(steps, True, rig), rig)
    ratio, sigma = both.odometry_scale()
    assert ratio == pytest.approx(1.05, rel=3 * sigma) and sigma < 0.01
    assert both.estimate(steps, True, rig) == pytest.approx(np.exp(-model), rel=0.01)
    assert both.estimate(None, True) == pytest.approx(np.exp(-model), rel=0.01)  # the bias, in true metres
    assert both.estimate(steps, False, rig) == pytest.approx(np.exp(-model), rel=0.01)  # non-metric: measured


def test_a_window_that_bends_is_straightened_without_odometry(scene):
    """Heading and position drift growing across every window (0.3 deg, 1 cm per view)."""
    sim = ModelSimulator(scene=scene, metric=True, noise_seed=1, drift_deg_per_view=0.3, drift_m_per_view=0.01)
    run = drive(scene, sim, loops=1.0)
    stamps, truth = run.stamps, run.truth()
    rmse, _ = ate([run.base_poses[s] for s in stamps], truth, stamps)
    assert rmse <= 0.01 * path_length(truth), f"ATE {rmse:.3f} m over {path_length(truth):.1f} m"


def test_non_metric_windows_are_checked_in_their_own_units(scene):
    """A model of arbitrary scale (0.3x .. 3x per window) with odometry: the view checks work in
    each window's own units, so good views are kept and bad ones rejected as with a metric model."""
    odometry = DriftingOdometry(scene.base_pose, OdometryErrors.poor(seed=5))
    sim = ModelSimulator(scene=scene, metric=False, noise_seed=4)
    run = drive(scene, sim, odometry=odometry, rate_hz=10.0, loops=1.0)
    s = run.pipeline.stats
    views = sum(len(r.frames) for r in run.results if r.frames)
    assert s.windows_rejected == 0
    assert s.views_rejected <= 0.05 * views, f"{s.views_rejected} of {views} views rejected"
    ate_est, ate_odo = odometry_ate(run, odometry)
    assert ate_est <= 0.3 * ate_odo


@pytest.mark.parametrize("names", [("front", "left"), ("front", "left", "right")])
def test_several_cameras_stamped_apart_are_each_placed_and_corrected(scene, names):
    """A rig whose cameras are stamped 4 ms apart, on a robot turning up to 28 deg/s: every camera's
    views are placed where that camera was, and every correction reaches all the cameras of a group
    (not only the first one's, which left ghost walls of the others in the fused map)."""
    rig = scene.rig(*names)
    odometry = DriftingOdometry(scene.base_pose, OdometryErrors.poor(seed=5))
    sim = ModelSimulator(scene=scene, metric=True, noise_seed=4,
                         extrinsics={n: c.T_base_camera for n, c in rig.items()})
    run = drive(scene, sim, odometry=odometry, rate_hz=10.0, loops=0.5, cameras=rig)
    stamps, truth = run.stamps, run.truth()
    odo = [odometry.pose(s * 1e-9) for s in stamps]
    # Half a loop: the odometry has not drifted far yet, and the map takes its 5 % scale error.
    assert ate([run.base_poses[s] for s in stamps], truth, stamps)[0] <= 0.6 * ate(odo, truth, stamps)[0]
    finals: dict[tuple[str, int], np.ndarray] = {}
    for r in run.results:
        for f, v, out in zip(r.frames, r.prediction.views, r.output_mask, strict=True):
            if out:
                finals[f.key] = v.T_world_camera
        groups = {g[0].stamp_ns: [f.key for f in g] for g in r.window.groups}
        for stamp in r.placement.corrections:
            placed = [k for k in groups.get(stamp, []) if k in finals]
            assert all(k in r.placement.view_corrections for k in placed), (stamp, placed)
        finals.update({k: T for k, T in r.placement.view_corrections.items() if k in finals})
    assert {k[0] for k in finals} == set(names)
    # Each camera's final poses against where that camera truly was at its own stamp, after one
    # rigid fit of all of them: no camera may sit off the others.
    keys = sorted(finals)
    est = np.stack([finals[k][:3, 3] for k in keys])
    true = np.stack([scene.camera_pose(k[1] * 1e-9, rig[k[0]].T_base_camera)[:3, 3] for k in keys])
    fit = robust_similarity(est, true, np.full(len(keys), 0.05), fit_scale=False)
    err = np.linalg.norm(fit.transform.apply_points(est) - true, axis=1)
    by_camera = {n: float(np.median(err[[k[0] == n for k in keys]])) for n in names}
    assert max(by_camera.values()) <= 0.1, by_camera
    assert max(by_camera.values()) <= 1.5 * min(by_camera.values()) + 0.01, by_camera


def test_the_odometrys_own_covariance_sets_the_graphs_noise_when_given():
    """odometry.use_covariance: a dead-reckoning covariance that grows by (2 cm)^2 between two
    keyframes gives a 2 cm step sigma; without covariance the odometry.sigma_* model stands."""
    from mapany_ros.core.placement.pose_graph import GraphConfig, PoseGraph

    graph = PoseGraph(GraphConfig())
    a, b = make_pose(np.eye(3), [0.0, 0, 0]), make_pose(np.eye(3), [1.0, 0, 0])
    cov_a, cov_b = np.diag([1e-4] * 3 + [1e-4] * 3), np.diag([1e-4 + 4e-4] * 3 + [1e-4 + 4e-4] * 3)
    graph.add_keyframe(0, a, cov_a)
    graph.add_keyframe(1, b, cov_b)
    sigmas = graph.odometry_sigmas(invert(a) @ b, 0, 1)
    np.testing.assert_allclose(sigmas, [0.02] * 6, rtol=1e-6)
    plain = PoseGraph(GraphConfig())
    plain.add_keyframe(0, a)
    plain.add_keyframe(1, b)
    np.testing.assert_allclose(plain.odometry_sigmas(invert(a) @ b, 0, 1)[3:], [0.05] * 3)


def test_an_exception_inside_placement_leaves_it_whole(scene, monkeypatch):
    """A failure in the middle of placing a window (here the graph's local check, once) fails that
    window only: the placer is not left half updated, and the next windows place as if it never ran."""
    from mapany_ros.core.placement.pose_graph import PoseGraph

    odometry = DriftingOdometry(scene.base_pose, OdometryErrors.poor(seed=5))
    check = PoseGraph.check_window
    calls = {"n": 0}

    def fails_once(self, observations):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("placement failure on purpose")
        return check(self, observations)

    monkeypatch.setattr(PoseGraph, "check_window", fails_once)
    run = drive(scene, ModelSimulator(scene=scene, metric=True, noise_seed=4), odometry=odometry, rate_hz=10.0,
                loops=0.5, raise_errors=False)
    assert [str(e) for e in run.errors] == ["placement failure on purpose"]
    s = run.pipeline.stats
    assert calls["n"] > 5 and s.windows_failed == 1, s
    assert s.windows_done >= calls["n"] - 1
    ate_est, ate_odo = odometry_ate(run, odometry)
    assert ate_est <= ate_odo
    placer = run.pipeline.placer
    # every keyframe the graph knows is indexed, and every placed keyframe is in the graph
    assert all(placer.index.by_kid.get(k) is not None for k in placer.graph.keyframes)
    assert all(placer.graph.has(placer.index.get(g).kid) for g in placer.context(16))
