"""Keyframes without odometry: chosen by what the cameras see, with the default parameters.

The images are rendered from the synthetic scene (textured, shaded: what a camera delivers), so the
visual motion measured here is what the node sees. Motions the selector must handle: a known image
shift, turning in place (slow and fast), driving forward (slow, normal, fast), standing still with
sensor noise and exposure changes, bland frames, two cameras; and a whole drive through the pipeline
against a real model's errors.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.spatial.transform import Rotation

from mapany_ros.core.frames import Frame
from mapany_ros.core.geometry import invert, make_pose, rotation_angle
from mapany_ros.core.keyframes import KeyframeSelector
from mapany_ros.core.pipeline import PipelineConfig
from mapany_ros.core.visual_motion import ViewTracker
from mapany_ros.ros.params import PARAMETERS, validate
from mapany_ros.scoring.trajectory import ate, path_length, step_errors
from mapany_ros.sim.drive import drive
from mapany_ros.sim.model_simulator import ModelSimulator
from mapany_ros.sim.scene import SyntheticScene, make_camera_model

CAM = make_camera_model(160, 120)
RATE_HZ = 10.0
DEFAULTS = KeyframeSelector()  # the node's defaults, checked against params.py below


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def scene(one_torch_thread) -> SyntheticScene:
    return SyntheticScene(0)


def test_selector_defaults_are_the_node_defaults():
    values = {p.name: p.default for p in PARAMETERS}
    cfg = validate({**values, "use_odometry": False}).pipeline
    assert (cfg.min_translation_m, cfg.min_rotation_deg, cfg.min_parallax_deg, cfg.max_interval_s,
            cfg.min_interval_s) == (DEFAULTS.min_translation_m, DEFAULTS.min_rotation_deg, DEFAULTS.min_parallax_deg,
                                    DEFAULTS.max_interval_s, DEFAULTS.min_interval_s)


def render(scene: SyntheticScene, T_world_camera: np.ndarray, cam=CAM, noise: float = 0.0, gain: float = 1.0,
           offset: float = 0.0, seed: int = 0) -> np.ndarray:
    """An rgb8 image as a driver delivers it (contiguous, read-only), with optional noise and exposure change."""
    rgb = scene.render(T_world_camera, cam)[0].astype(np.float32) * gain + offset
    if noise:
        rgb += np.random.default_rng(seed).normal(scale=noise, size=rgb.shape)
    out = np.ascontiguousarray(np.clip(np.round(rgb), 0, 255).astype(np.uint8))
    out.flags.writeable = False
    return out


def motion(key: np.ndarray, now: np.ndarray, cam=CAM):
    tracker = ViewTracker()
    assert tracker.measure(key, cam, 0) is None  # no keyframe yet
    tracker.promote()
    return tracker.measure(now, cam, 100_000_000)


def camera_at(scene: SyntheticScene, T_world_base: np.ndarray) -> np.ndarray:
    return T_world_base @ scene.T_base_camera


# --------------------------------------------------------------------------- the measure


def smooth_texture(height: int, width: int) -> np.ndarray:
    g = torch.Generator().manual_seed(0)
    out = torch.zeros(height, width)
    for cell in (64, 16, 4):
        field = torch.rand(1, 1, height // cell + 3, width // cell + 3, generator=g)
        out += F.interpolate(field, size=(height + 3 * cell, width + 3 * cell), mode="bicubic",
                             align_corners=False)[0, 0, :height, :width]
    grey = (out / out.max() * 255).clamp(0, 255).to(torch.uint8).numpy()
    return np.repeat(grey[..., None], 3, axis=2)


@pytest.mark.parametrize("dx, dy", [(16, 0), (0, 8), (24, -16), (4, 2)])
def test_a_known_image_shift_is_measured_at_any_resolution(dx, dy):
    """The same content shifted by a known amount, at 640x480 and 320x240: the same fraction of the width."""
    shifts = []
    for width, height in ((640, 480), (320, 240)):
        s = width / 640
        ddx, ddy = int(dx * s), int(dy * s)
        big = smooth_texture(height + 100, width + 100)
        cam = make_camera_model(width, height)
        a = np.ascontiguousarray(big[40 : 40 + height, 40 : 40 + width])
        b = np.ascontiguousarray(big[40 + ddy : 40 + ddy + height, 40 + ddx : 40 + ddx + width])
        m = motion(a, b, cam)
        expected = math.hypot(ddx, ddy) / width
        assert m.tracked > 0.9
        assert abs(m.shift - expected) < 0.02 / 80, (m.shift, expected)  # 1/50 of a working pixel
        # A uniform shift is nearly a turn: the rotation that explains it, and little parallax.
        turn = math.degrees(math.atan(math.hypot(ddx, ddy) / cam.K[0, 0]))
        assert 0.8 * turn <= m.rotation_deg <= 1.05 * turn
        assert m.parallax_deg < 0.15 * turn + 0.05
        shifts.append(m.shift)
    assert shifts[0] == pytest.approx(shifts[1], abs=0.01 / 80)


@pytest.mark.parametrize("axis", ["y", "x", "z"])  # optical frame: yaw, pitch, roll
@pytest.mark.parametrize("degrees", [3.0, 8.0])
def test_turning_in_place_is_rotation_without_parallax(scene, axis, degrees):
    T0 = scene.camera_pose(0.0)
    T1 = T0 @ make_pose(Rotation.from_euler(axis, degrees, degrees=True).as_matrix(), np.zeros(3))
    m = motion(render(scene, T0), render(scene, T1))
    assert abs(m.rotation_deg - degrees) < 0.3, m
    assert m.parallax_deg < 0.25, m


def test_forward_motion_is_parallax_growing_with_distance(scene):
    T0 = scene.camera_pose(0.0)
    key = render(scene, T0)
    parallax = []
    for d in (0.05, 0.1, 0.2, 0.3):
        m = motion(key, render(scene, T0 @ make_pose(np.eye(3), [0.0, 0.0, d])))
        assert m.rotation_deg < 0.5, (d, m)
        parallax.append(m.parallax_deg)
    assert all(b > 1.3 * a for a, b in zip(parallax, parallax[1:], strict=False)), parallax
    assert parallax[0] < DEFAULTS.min_parallax_deg < parallax[-1], parallax


def test_standing_still_with_sensor_noise_and_exposure_changes_is_no_motion(scene):
    T = scene.camera_pose(0.0)
    key = render(scene, T, noise=2.0, seed=1)
    for gain, offset, seed in ((1.0, 0.0, 2), (1.25, 10.0, 3), (0.7, -5.0, 4)):
        m = motion(key, render(scene, T, noise=2.0, gain=gain, offset=offset, seed=seed))
        assert m.tracked > 0.9, m
        assert m.rotation_deg < 0.1 and m.parallax_deg < 0.1, (gain, m)


def test_a_textureless_image_gives_no_measure(scene):
    blank = np.full((CAM.height, CAM.width, 3), 128, np.uint8)
    tracker = ViewTracker()
    tracker.measure(blank, CAM, 0)
    tracker.promote()
    assert tracker.measure(blank, CAM, 100_000_000) is None
    # A textured keyframe followed by a blank image (lights out): nothing of it is found any more.
    lost = motion(render(scene, scene.camera_pose(0.0)), blank)
    assert lost.tracked == 0.0 and math.isnan(lost.parallax_deg)


# --------------------------------------------------------------------------- the selector on motions


def select(scene: SyntheticScene, base_poses, cameras: dict[str, np.ndarray] | None = None, *, noise: float = 0.0,
           blank: tuple[str, ...] = (), selector: KeyframeSelector | None = None) -> tuple[list[int], KeyframeSelector]:
    """Indices of the groups the (default) selector keeps, one group per base pose at RATE_HZ.

    ``cameras``: name -> T_base_camera (default the scene's one camera); ``blank`` cameras see nothing.
    """
    cameras = cameras or {"camera": scene.T_base_camera}
    sel = selector or KeyframeSelector()
    keys = []
    for i, T_base in enumerate(base_poses):
        stamp = int(round(i / RATE_HZ * 1e9))
        group = []
        for name, T_bc in cameras.items():
            image = np.full((CAM.height, CAM.width, 3), 90, np.uint8) if name in blank else render(
                scene, T_base @ T_bc, noise=noise, seed=i)
            group.append(Frame(image, stamp, name, f"{name}_optical", CAM))
        if sel.consider(stamp, None, group):
            keys.append(i)
    return keys, sel


def steps(poses, keys):
    """(translation m, rotation deg) between consecutive keyframes."""
    out = []
    for a, b in zip(keys, keys[1:], strict=False):
        rel = invert(poses[a]) @ poses[b]
        out.append((float(np.linalg.norm(rel[:3, 3])), float(np.degrees(rotation_angle(rel)))))
    return np.array(out)


def straight(scene: SyntheticScene, speed: float, seconds: float) -> list[np.ndarray]:
    """Driving straight ahead from the start of the scene's loop (clear of every object)."""
    T0 = scene.base_pose(0.0)
    poses = [T0 @ make_pose(np.eye(3), [speed * i / RATE_HZ, 0.0, 0.0]) for i in range(int(seconds * RATE_HZ) + 1)]
    cams = np.stack([(T @ scene.T_base_camera)[:3, 3] for T in poses])
    assert scene.surface_distance(cams).min() > 0.3, "the straight drive must stay clear of the scene"
    return poses


def test_standing_still_makes_keyframes_only_at_the_max_interval(scene):
    T = scene.base_pose(0.0)
    keys, _ = select(scene, [T] * 50, noise=2.0)  # 5 s, a fresh noise pattern on every frame
    assert keys == [0, 10, 20, 30, 40]


@pytest.mark.parametrize("dps", [30.0, 120.0])
def test_turning_in_place_makes_a_keyframe_every_min_rotation(scene, dps):
    T0 = scene.base_pose(0.0)
    n = int(round(90.0 / dps * RATE_HZ)) + 1  # a quarter turn
    poses = [T0 @ make_pose(Rotation.from_euler("z", dps * i / RATE_HZ, degrees=True).as_matrix(), np.zeros(3))
             for i in range(n)]
    keys, _ = select(scene, poses)
    per_frame = dps / RATE_HZ
    turned = steps(poses, keys)[:, 1]
    # Never more than the threshold (plus the frame that crossed it) between keyframes ...
    assert turned.max() <= DEFAULTS.min_rotation_deg + per_frame + 1e-6, turned
    if per_frame < DEFAULTS.min_rotation_deg / 2:  # ... and, turning slowly, not every frame either.
        assert turned.min() >= DEFAULTS.min_rotation_deg / 2, turned


@pytest.mark.parametrize("speed", [0.05, 0.5, 2.0])
def test_driving_forward_makes_keyframes_by_parallax(scene, speed):
    poses = straight(scene, speed, min(2.0, 1.0 / speed))
    keys, _ = select(scene, poses)
    moved = steps(poses, keys)[:, 0]
    dt = np.diff(keys) / RATE_HZ
    assert dt.max() <= DEFAULTS.max_interval_s + 1e-9
    per_frame = speed / RATE_HZ
    # Indoors (walls 1-4 m away) a 1 deg median parallax is about 0.1 m of forward motion.
    assert moved.max() <= max(0.25, per_frame + 1e-9), moved
    if speed * DEFAULTS.max_interval_s > 0.25:  # moving fast enough that parallax, not time, decides
        assert moved.min() >= min(0.05, per_frame - 1e-9), moved


def test_a_bland_view_leaves_the_decision_to_time(scene):
    """All cameras bland (a white wall, a covered lens): no measure, one keyframe per max interval."""
    poses = straight(scene, 0.5, 2.0)
    keys, sel = select(scene, poses, blank=("camera",))
    assert keys == [0, 10, 20]
    assert sel.last_motion["camera"] is None


def test_every_camera_of_the_group_counts(scene):
    """Two cameras, the first one bland: the second one's view still decides."""
    look_left = make_pose(Rotation.from_euler("z", 90, degrees=True).as_matrix(), np.zeros(3)) @ scene.T_base_camera
    poses = straight(scene, 0.5, 2.0)
    keys, _ = select(scene, poses, {"front": scene.T_base_camera, "left": look_left}, blank=("front",))
    assert len(keys) > 3 + 2, keys  # more than the three max-interval keyframes of 2 s
    assert steps(poses, keys)[:, 0].max() <= 0.25


def test_separation_without_odometry_counts_the_visual_motion(scene):
    """Thinning keeps keyframes evenly spread in view change, not only in time."""
    driving = straight(scene, 0.5, 2.0)
    keys, sel = select(scene, driving + [driving[-1]] * 25)  # drive 2 s, then stand 2.5 s
    stamps = [int(round(i / RATE_HZ * 1e9)) for i in keys]

    def sep(a: int, b: int) -> float:
        return sel.separation(stamps[a], None, stamps[b], None)

    moving = [j for j, k in enumerate(keys) if 0 < k < len(driving)]
    standing = [j for j, k in enumerate(keys) if k >= len(driving)]
    assert len(moving) >= 5 and len(standing) == 2, keys
    assert all(sep(j - 1, j) >= 1.0 for j in moving)  # each one a keyframe's worth of view change
    assert sep(0, 2) == pytest.approx(sep(0, 1) + sep(1, 2))  # summed along the way
    assert sep(moving[0], moving[-1]) > (keys[moving[-1]] - keys[moving[0]]) / RATE_HZ / DEFAULTS.max_interval_s
    for j in standing:  # standing still only time counts
        assert sep(j - 1, j) == pytest.approx((keys[j] - keys[j - 1]) / RATE_HZ / DEFAULTS.max_interval_s)


def test_the_rate_cap_holds_for_visual_keyframes(scene):
    poses = straight(scene, 2.0, 0.5)
    keys, _ = select(scene, poses, selector=KeyframeSelector(min_interval_s=0.25))
    assert np.diff(keys).min() >= 3  # 0.3 s at 10 Hz: never two within 0.25 s


# --------------------------------------------------------------------------- the drive, against a real model's errors


def default_config(**overrides) -> dict:
    """The node's default parameters without odometry, as PipelineConfig keywords (offline: nothing thinned)."""
    values = {p.name: p.default for p in PARAMETERS}
    cfg = validate({**values, "use_odometry": False}).pipeline
    # The rig (``cameras``) is drive()'s own: it names the cameras it renders.
    return {**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(PipelineConfig) if f.name != "cameras"},
            "thin_keyframes": False, **overrides}


def test_without_odometry_default_keyframes_give_a_metric_continuous_map(scene):
    """9.6 m at 0.5 m/s, no odometry, default parameters, a metric model with 2 cm / 0.5 deg per view,
    3 % per window scale error and bad views: ATE <= 1 % of the path, scale within 2 %, no step off
    by more than 8 cm. Keyframes come from the rendered images alone."""
    sim = ModelSimulator(scene=scene, metric=True, noise_seed=1)
    run = drive(scene, sim, loops=9.6 / scene.trajectory.loop_length_m, rate_hz=RATE_HZ, render=True,
                **default_config())
    stamps, truth = run.stamps, run.truth()
    est = [run.base_poses[s] for s in stamps]
    length = path_length(truth)
    rmse, _ = ate(est, truth, stamps)
    _, scale = ate(est, truth, stamps, with_scale=True)
    worst = step_errors(est, truth, stamps).max()
    assert 9.0 < length < 9.8
    spacing = np.linalg.norm(np.diff(np.stack([T[:3, 3] for T in truth]), axis=0), axis=1)
    assert spacing.max() <= 0.3, spacing.max()  # by motion: a keyframe at least every 0.3 m (time alone: 0.5 m)
    assert len(stamps) >= 35
    assert rmse <= 0.01 * length, f"ATE {rmse:.3f} m over {length:.1f} m"
    assert abs(scale - 1.0) <= 0.02, f"scale off by {abs(scale - 1) * 100:.1f} %"
    assert worst <= 0.08, f"a step is off by {worst * 100:.1f} cm"
    s = run.pipeline.stats
    assert s.chain_breaks == 0 and s.windows_failed == 0
