"""The model simulator's error knobs produce the errors they claim, measured against the scene's truth.

Every figure here is computed from what ``infer`` returned (taken back to the scene's frame with the
logged window frame) and the scene's own geometry, never from the simulator's internal draws alone.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr

from mapany_ros.core.frames import Frame
from mapany_ros.core.geometry import invert, rotation_angle
from mapany_ros.sim.model_simulator import ModelSimulator
from mapany_ros.sim.odometry import DriftingOdometry, OdometryErrors
from mapany_ros.sim.scene import SyntheticScene, make_camera_model

#: Every pose error off: what is left is the knob under test.
EXACT_POSES = dict(pose_sigma_m=0.0, pose_sigma_deg=0.0, bad_view_rate=0.0)


@pytest.fixture(scope="module")
def scene() -> SyntheticScene:
    return SyntheticScene(0)


def frames(n: int = 40, width: int = 64, height: int = 48, dt_s: float = 0.2, camera: str = "camera",
           offset_s: float = 0.0) -> list[Frame]:
    cam = make_camera_model(width, height)
    image = np.zeros((height, width, 3), np.uint8)
    return [Frame(image, int(round((i * dt_s + offset_s) * 1e9)), camera, f"{camera}_optical_frame", cam)
            for i in range(n)]


def world_poses(sim: ModelSimulator, call: int, prediction) -> list[np.ndarray]:
    return [sim.log.world_pose(call, v.T_world_camera) for v in prediction.views]


def pose_error(T_est: np.ndarray, T_true: np.ndarray) -> tuple[float, float]:
    """Translation (m) and rotation (deg) of the error between two poses."""
    E = invert(T_true) @ T_est
    return float(np.linalg.norm(E[:3, 3])), float(np.degrees(rotation_angle(E)))


def relative(poses: list[np.ndarray]) -> list[np.ndarray]:
    """Every pose relative to the first: the geometry a window frame cannot change."""
    return [invert(poses[0]) @ T for T in poses]


def true_depth(sim: ModelSimulator, frame: Frame) -> torch.Tensor:
    return torch.as_tensor(sim.true_depth(frame), dtype=torch.float64)


# --------------------------------------------------------------------------- defaults and streams


def test_each_knob_draws_from_its_own_stream_so_the_other_errors_stay_as_they_were(scene):
    fs = frames(16)
    base = ModelSimulator(scene=scene, noise_seed=5, bad_view_rate=0.5)
    knobs = ModelSimulator(scene=scene, noise_seed=5, bad_view_rate=0.5, flying_pixel_rate=0.3,
                           confidence_follows_error=True, medium_bad_view_rate=0.0)
    for w in range(3):
        a, b = base.infer(fs[w * 4:w * 4 + 6]), knobs.infer(fs[w * 4:w * 4 + 6])
        for va, vb in zip(a.views, b.views, strict=True):
            np.testing.assert_array_equal(va.T_world_camera, vb.T_world_camera)
            assert torch.equal(va.confidence, torch.ones_like(va.confidence))
            assert not torch.equal(vb.confidence, va.confidence)
    assert [(v.call, v.index) for v in base.log.bad_views] == [(v.call, v.index) for v in knobs.log.bad_views]
    assert base.log.used_priors == [False] * 3 and not base.log.medium_bad_views and not base.log.drifts


@pytest.mark.parametrize("options", [{"flying_pixel_rate": 1.5}, {"follow_priors": -0.1}, {"scale_bias": -1.0},
                                     {"extrinsics": {"left": [[1.0, 0.0], [0.0, 1.0]]}}])
def test_options_out_of_range_are_refused_with_the_name(scene, options):
    with pytest.raises(ValueError, match=next(iter(options))):
        ModelSimulator(scene=scene, **options)


# --------------------------------------------------------------------------- scale bias


def test_scale_bias_makes_every_window_that_much_larger(scene):
    fs = frames(40)
    plain = ModelSimulator(scene=scene, noise_seed=2)
    biased = ModelSimulator(scene=scene, noise_seed=2, scale_bias=0.05)
    fitted = []

    def depth_scale(pred, window) -> float:
        """The window's scale as its depth shows it against the truth (a fit, not the log)."""
        return float(np.median([(v.depth.double() / true_depth(plain, f)).median().item()
                                for v, f in zip(pred.views, window, strict=True)]))

    for w in range(30):
        window = fs[w:w + 4]
        ratio_a, ratio_b = depth_scale(plain.infer(window), window), depth_scale(biased.infer(window), window)
        assert ratio_b / ratio_a == pytest.approx(1.05, rel=1e-5)
        fitted.append(ratio_b)
    # The random per-window error (3 %) stays on top, but it no longer averages out to 1.
    mean_log = float(np.mean(np.log(fitted)))
    assert abs(mean_log - np.log(1.05)) < 0.015, np.exp(mean_log)
    assert np.std(np.log(fitted)) > 0.01


# --------------------------------------------------------------------------- drift


def test_drift_turns_and_moves_view_k_by_k_times_the_drift(scene):
    fs = frames(40)
    sim = ModelSimulator(scene=scene, noise_seed=3, drift_deg_per_view=1.0, drift_m_per_view=0.01, **EXACT_POSES)
    for w in range(4):
        window = fs[w * 8:w * 8 + 8]
        est = relative(world_poses(sim, w, sim.infer(window)))
        true = relative([sim.true_frame_pose(f) for f in window])
        for k in range(8):
            _, rot = pose_error(est[k], true[k])
            assert rot == pytest.approx(1.0 * k, abs=1e-4)
        # The positions bend: a straight drift direction plus a turn about view 0, growing with k.
        offsets = [np.linalg.norm(e[:3, 3] - t[:3, 3]) for e, t in zip(est, true, strict=True)]
        assert offsets[0] < 1e-9 and all(b > a for a, b in zip(offsets[1:], offsets[2:], strict=False)), offsets
    drifts = sim.log.drifts
    assert [d.call for d in drifts] == [0, 1, 2, 3]
    assert min(np.degrees(np.arccos(abs(a.axis @ b.axis))) for a, b in zip(drifts, drifts[1:], strict=False)) > 1.0


def test_drift_outgrows_the_per_view_noise_along_a_window(scene):
    fs = frames(60)
    sim = ModelSimulator(scene=scene, noise_seed=4, drift_deg_per_view=1.0, bad_view_rate=0.0)
    rot = np.zeros(8)
    for w in range(12):
        window = fs[w * 4:w * 4 + 8]
        est = relative(world_poses(sim, w, sim.infer(window)))
        true = relative([sim.true_frame_pose(f) for f in window])
        rot += [pose_error(e, t)[1] / 12 for e, t in zip(est, true, strict=True)]
    slope = np.polyfit(np.arange(8), rot, 1)[0]
    assert 0.8 < slope < 1.2, rot
    assert rot[7] > 6.0 and rot[1] < 2.0, rot


# --------------------------------------------------------------------------- medium bad views


def test_medium_bad_views_are_off_by_about_12_cm_and_4_deg_and_logged(scene):
    fs = frames(60)
    sim = ModelSimulator(scene=scene, noise_seed=5, medium_bad_view_rate=0.2, bad_view_rate=0.3)
    errors = {}
    for w in range(12):
        window = fs[w * 4:w * 4 + 8]
        for i, (est, f) in enumerate(zip(world_poses(sim, w, sim.infer(window)), window, strict=True)):
            errors[(w, i)] = pose_error(est, sim.true_frame_pose(f))
    medium = {(b.call, b.index) for b in sim.log.medium_bad_views}
    gross = {(b.call, b.index) for b in sim.log.bad_views}
    assert medium and gross and not medium & gross
    assert 0.1 <= len(medium) / len(errors) <= 0.3
    for key in medium:
        t, r = errors[key]
        assert 0.08 < t < 0.16 and 3.0 < r < 5.0, (key, t, r)
    assert all(b.translation_m == 0.12 and b.rotation_deg == pytest.approx(4.0) for b in sim.log.medium_bad_views)
    for key in gross:
        assert errors[key][0] > 0.2 and errors[key][1] > 8.0
    others = [errors[k] for k in errors if k not in medium | gross]
    assert max(t for t, _ in others) < 0.07 and max(r for _, r in others) < 1.6


# --------------------------------------------------------------------------- flying pixels


def test_flying_pixels_lie_between_foreground_and_background_at_depth_edges(scene):
    fs = frames(40, 128, 96)
    sim = ModelSimulator(scene=scene, noise_seed=6, flying_pixel_rate=0.3, depth_sigma=0.0)
    plain = ModelSimulator(scene=scene, noise_seed=6, depth_sigma=0.0)
    total = 0
    for w in range(3):
        window = fs[w * 12:w * 12 + 4]
        pred, ref = sim.infer(window), plain.infer(window)
        scale = sim.log.frames[w][0]
        for f, v, r in zip(window, pred.views, ref.views, strict=True):
            true = true_depth(sim, f)
            depth = v.depth.double() / scale
            flying = (depth - true).abs() > 1e-4 * true
            fg = -F.max_pool2d(-true[None, None], 3, stride=1, padding=1)[0, 0]
            bg = F.max_pool2d(true[None, None], 3, stride=1, padding=1)[0, 0]
            assert bool(((depth > fg) & (depth < bg))[flying].all())
            assert float((bg / fg)[flying].min()) > 1.1  # a real depth jump beside each of them
            assert 0.002 < flying.float().mean() < 0.05
            # Valid, with the confidence every other pixel has; the points fly with them.
            assert bool(v.valid[flying].all()) and torch.equal(v.confidence, r.confidence)
            moved = (v.points_world.double() - r.points_world.double()).norm(dim=-1) > 1e-3
            assert torch.equal(moved, flying)
            total += int(flying.sum())
    assert total == sum(n for _, _, n in sim.log.flying_pixels)


def test_flying_pixel_rate_is_the_fraction_of_edge_pixels_that_fly(scene):
    fs = frames(20, 128, 96)
    counts = {}
    for rate in (0.3, 1.0):
        sim = ModelSimulator(scene=scene, noise_seed=7, flying_pixel_rate=rate)
        sim.infer(fs[:6])
        counts[rate] = sum(n for _, _, n in sim.log.flying_pixels)
    assert 0.25 < counts[0.3] / counts[1.0] < 0.35, counts


# --------------------------------------------------------------------------- confidence


def test_confidence_follows_the_true_error_only_roughly(scene):
    fs = frames(40, 128, 96)
    sim = ModelSimulator(scene=scene, noise_seed=8, flying_pixel_rate=0.3, confidence_follows_error=True)
    errors, confidences = [], []
    for w in range(3):
        window = fs[w * 12:w * 12 + 4]
        pred = sim.infer(window)
        scale = sim.log.frames[w][0]
        for f, v in zip(window, pred.views, strict=True):
            true = true_depth(sim, f)
            errors.append(((v.depth.double() / scale - true).abs() / true).flatten().numpy())
            confidences.append(v.confidence.flatten().numpy())
            assert bool(v.valid.all()) and bool((v.confidence > 0).all())
    e, c = np.concatenate(errors), np.concatenate(confidences)
    rho = spearmanr(e, -c).correlation
    assert 0.1 < rho < 0.6, rho
    worst = e > np.quantile(e, 0.99)  # mostly flying pixels, 10 % to 100 % off
    assert np.median(c[worst]) < 0.5 * np.median(c)
    assert np.mean(c[worst] > np.median(c)) > 0.005  # ... yet some of them are confident


# --------------------------------------------------------------------------- pose priors


def frames_with_priors(scene: SyntheticScene, n: int = 8) -> list[Frame]:
    """Frames whose pose priors are a drifting odometry's, composed with the extrinsic."""
    odometry = DriftingOdometry(scene.base_pose, OdometryErrors(scale_error=0.05, yaw_drift_deg_per_m=5.0,
                                                                noise_m=0.01, noise_deg=0.5, seed=2))
    out = []
    for f in frames(n, dt_s=0.3):
        T_odom_base = odometry.pose(f.stamp_ns * 1e-9)
        f.T_world_base, f.T_world_camera = T_odom_base, T_odom_base @ scene.T_base_camera
        out.append(f)
    return out


def test_follow_priors_one_returns_the_priors_relative_geometry_in_its_own_frame(scene):
    fs = frames_with_priors(scene)
    sim = ModelSimulator(scene=scene, noise_seed=9, follow_priors=1.0, bad_view_rate=1.0, drift_deg_per_view=1.0)
    pred = sim.infer(fs)
    assert sim.log.used_priors == [True]
    est = relative(world_poses(sim, 0, pred))
    priors = relative([f.T_world_camera for f in fs])
    for e, p in zip(est, priors, strict=True):
        np.testing.assert_allclose(e, p, atol=1e-9)
    # ... in the simulator's own random frame and scale, not the priors' frame.
    assert np.linalg.norm(pred.views[0].T_world_camera[:3, 3] - fs[0].T_world_camera[:3, 3]) > 0.5
    # The depth is still the model's: the truth with its noise, whatever the priors say.
    ref = ModelSimulator(scene=scene, noise_seed=9, bad_view_rate=1.0, drift_deg_per_view=1.0).infer(fs)
    for v, r in zip(pred.views, ref.views, strict=True):
        assert torch.equal(v.depth, r.depth)


def test_follow_priors_zero_ignores_them_and_one_half_lands_between(scene):
    fs = frames_with_priors(scene)
    bare = [Frame(f.image, f.stamp_ns, f.camera, f.frame_id, f.camera_model) for f in fs]
    options = dict(scene=scene, noise_seed=10, drift_deg_per_view=1.5, bad_view_rate=0.0)
    ignoring = ModelSimulator(follow_priors=0.0, **options)
    without = ModelSimulator(**options).infer(bare)
    pred = ignoring.infer(fs)
    assert ignoring.log.used_priors == [False]
    for v, r in zip(pred.views, without.views, strict=True):
        np.testing.assert_array_equal(v.T_world_camera, r.T_world_camera)
    half = ModelSimulator(follow_priors=0.5, **options)
    est_half = relative(world_poses(half, 0, half.infer(fs)))
    est_none = relative(world_poses(ignoring, 0, pred))
    priors = relative([f.T_world_camera for f in fs])
    for k in range(1, len(fs)):
        to_prior_none, to_prior_half = pose_error(est_none[k], priors[k]), pose_error(est_half[k], priors[k])
        assert to_prior_half[1] == pytest.approx(0.5 * to_prior_none[1], rel=1e-6)
        assert to_prior_half[0] < 0.51 * to_prior_none[0] + 1e-9


def test_a_single_prior_gives_nothing_to_lean_on(scene):
    fs = frames_with_priors(scene, 4)
    for f in fs[1:]:
        f.T_world_camera = None
    sim = ModelSimulator(scene=scene, follow_priors=1.0)
    sim.infer(fs)
    assert sim.log.used_priors == [False]


# --------------------------------------------------------------------------- several cameras


def test_each_frame_is_rendered_from_its_own_camera(scene):
    rig = scene.rig("front", "left")
    front = frames(4, camera="front", offset_s=rig["front"].stamp_offset_s)
    left = frames(4, camera="left", offset_s=rig["left"].stamp_offset_s)
    window = [f for pair in zip(front, left, strict=True) for f in pair]
    sim = ModelSimulator(scene=scene, depth_sigma=0.0, extrinsics={c: r.T_base_camera for c, r in rig.items()},
                         **EXACT_POSES)
    pred = sim.infer(window)
    est = world_poses(sim, 0, pred)
    scale = sim.log.frames[0][0]
    for f, T, v in zip(window, est, pred.views, strict=True):
        T_true = scene.base_pose(f.stamp_ns * 1e-9) @ rig[f.camera].T_base_camera
        np.testing.assert_allclose(T, T_true, atol=1e-9)
        _, depth = scene.render(T_true, f.camera_model, supersample=1)
        np.testing.assert_allclose(v.depth.numpy() / scale, depth, rtol=1e-5)
    # The left camera looks about 90 degrees off the front one.
    assert pose_error(est[1], est[0])[1] == pytest.approx(90.0, abs=1.0)


def test_without_a_mapping_the_frames_own_extrinsic_is_the_camera(scene):
    T_left = scene.rig("front", "left")["left"].T_base_camera
    fs = frames(3, camera="left")
    for f in fs:
        f.T_base_camera = T_left
    sim = ModelSimulator(scene=scene, **EXACT_POSES)
    est = world_poses(sim, 0, sim.infer(fs))
    for f, T in zip(fs, est, strict=True):
        np.testing.assert_allclose(T, scene.base_pose(f.stamp_ns * 1e-9) @ T_left, atol=1e-9)
