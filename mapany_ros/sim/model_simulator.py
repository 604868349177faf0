"""A feed-forward model's errors on the synthetic scene's true geometry: the placement stage's adversary.

A real multi-view model answers every window in a frame of its own (anchored on a view it picks, at
a scale that is only roughly metric), with per-view pose noise, per-pixel depth noise and, now and
then, one view that is badly off. :class:`ModelSimulator` returns exactly that, built from ground
truth the test cannot smuggle through: by default it ignores every prior it is given (poses, depth),
so a placement stage that only passes priors through, or confuses frames, fails.

Real models' errors do not average out, and the optional knobs add the ones that do not: a steady
scale bias, trajectories that bend across a window, medium bad views, flying pixels at depth edges,
confidence that only roughly follows the error, and outputs that lean towards the pose priors.

It is also a backend plugin (``backend: mapany_ros.sim.model_simulator:ModelSimulator``), built as any
third-party model is: the keyword ``device`` plus options, then ``infer(frames)``. Plugin authors can run
the placement scenarios with it beside their own backend.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from scipy.spatial.transform import Rotation

from mapany_ros.core.backends.base import ViewPrediction, WindowPrediction
from mapany_ros.core.camera_rays import plane_rays
from mapany_ros.core.frames import Frame
from mapany_ros.core.geometry import interpolate, invert, make_pose
from mapany_ros.sim.scene import SyntheticScene, render_depth


@dataclass
class BadView:
    """One injected pose error: which call, which view of it, the frame, and how far off it was put."""

    call: int
    index: int
    key: tuple[str, int]
    translation_m: float = 0.0
    rotation_deg: float = 0.0


@dataclass
class WindowDrift:
    """The drift of one call: view k is turned by k x ``deg_per_view`` about ``axis`` around view 0's
    centre and moved by k x ``m_per_view`` along ``direction`` (unit vectors in the scene's frame)."""

    call: int
    axis: np.ndarray
    direction: np.ndarray
    deg_per_view: float
    m_per_view: float


@dataclass
class SimulatorLog:
    """What the simulator did, for tests to check the placement stage against."""

    #: Per call: the window frame as a similarity (scale, 4x4 world -> window rigid part).
    frames: list[tuple[float, np.ndarray]] = field(default_factory=list)
    #: Gross bad views (``bad_view_*``).
    bad_views: list[BadView] = field(default_factory=list)
    calls: list[list[tuple[str, int]]] = field(default_factory=list)
    #: Medium bad views (``medium_bad_view_*``), apart from the gross ones.
    medium_bad_views: list[BadView] = field(default_factory=list)
    #: Per call with drift on: its drift.
    drifts: list[WindowDrift] = field(default_factory=list)
    #: Per call: whether pose priors pulled the output poses (``follow_priors`` > 0 and two or more priors).
    used_priors: list[bool] = field(default_factory=list)
    #: (call, view index, pixels) of every view that got flying pixels.
    flying_pixels: list[tuple[int, int, int]] = field(default_factory=list)

    def world_pose(self, call: int, T_window_camera: np.ndarray) -> np.ndarray:
        """A view's pose as call ``call`` returned it, taken back to the scene's frame in metres."""
        scale, G = self.frames[call]
        R = G[:3, :3].T @ T_window_camera[:3, :3]
        c = G[:3, :3].T @ (T_window_camera[:3, 3] - G[:3, 3]) / scale
        return make_pose(R, c)


def _random_rotation(rng: np.random.Generator, sigma_rad: float) -> np.ndarray:
    """Rotation by an isotropic random axis-angle vector with RMS angle ``sigma_rad``."""
    return Rotation.from_rotvec(rng.normal(scale=sigma_rad / np.sqrt(3.0), size=3)).as_matrix()


def _patch_noise(rng: np.random.Generator, height: int, width: int, patches: int = 37) -> np.ndarray:
    """Unit-RMS relative depth noise as a ViT-based model makes it: smooth within its patches.

    A field on the model's patch grid (37 patches across a 518-pixel-wide input, as MapAnything's
    DINOv2 encoder), bilinearly interpolated to the output grid, plus a fifth of it per pixel.
    """
    gh = max(2, round(patches * height / width))
    field = torch.as_tensor(rng.normal(size=(1, 1, gh, patches)), dtype=torch.float32)
    smooth = torch.nn.functional.interpolate(field, size=(height, width), mode="bilinear", align_corners=True)[0, 0]
    smooth = smooth.numpy() / max(float(smooth.std()), 1e-6)
    return np.sqrt(1 - 0.2**2) * smooth + 0.2 * rng.normal(size=(height, width))


def _unit(rng: np.random.Generator) -> np.ndarray:
    v = rng.normal(size=3)
    return v / np.linalg.norm(v)


def depth_edges(depth: torch.Tensor, min_jump: float = 0.1, contrast: float = 3.0) -> torch.Tensor:
    """(H, W) bool: the pixels on either side of a depth discontinuity (an occluding edge).

    A step between two neighbours is a discontinuity when it exceeds ``min_jump`` of the nearer
    depth and ``contrast`` times the steps beside it along the same line: a slanted floor (steps
    that grow smoothly) or a crease (a change of slope, no step) is not one.
    """
    edge = torch.zeros_like(depth, dtype=torch.bool)
    for d, e in ((depth, edge), (depth.T, edge.T)):  # along rows, then along columns (views share storage)
        step = (d[:, 1:] - d[:, :-1]).abs()
        beside = torch.zeros_like(step)
        beside[:, 1:] = step[:, :-1]
        beside[:, :-1] = torch.maximum(beside[:, :-1], step[:, 1:])
        jump = (step > min_jump * torch.minimum(d[:, 1:], d[:, :-1])) & (step > contrast * beside)
        e[:, 1:] |= jump
        e[:, :-1] |= jump
    return edge


def _neighbour_range(depth: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest (foreground) and farthest (background) depth of each pixel's 3x3 neighbourhood."""
    d = depth[None, None]
    fg = -F.max_pool2d(-d, 3, stride=1, padding=1)[0, 0]
    bg = F.max_pool2d(d, 3, stride=1, padding=1)[0, 0]
    return fg, bg


class ModelSimulator:
    """True geometry of :class:`SyntheticScene` ``seed`` with a real model's errors (see module doc).

    Always on (today's defaults):

    - ``scale_sigma``: log-normal per-window scale error of a metric model (a non-metric one gets an
      arbitrary scale in [0.3, 3]); every window also lands in a random rigid frame of its own.
    - ``pose_sigma_m`` / ``pose_sigma_deg``: RMS translation and rotation error of each view,
      independent per view.
    - ``depth_sigma``: RMS relative depth noise, smooth within the model's patches (as a ViT's).
    - ``bad_view_rate``: probability that a window has one view off by ``bad_view_m`` and
      ``bad_view_deg`` (a gross failure: a view matched to the wrong place); logged in ``log.bad_views``.

    Off unless set, each modelling an error of real models that does not average out:

    - ``scale_bias``: every window ``1 + scale_bias`` times too large on top of the random scale error
      (a model trained on data of another scale distribution is steadily off, not just noisy).
    - ``drift_deg_per_view`` / ``drift_m_per_view``: view k of a window turned by k x that angle about
      view 0's centre and moved k x that distance, in a random direction per window: the window's
      trajectory bends, as a real model's heading and position errors grow along a sequence.
    - ``medium_bad_view_rate``: probability per view of being off by ``medium_bad_view_m`` and
      ``medium_bad_view_deg`` (12 cm / 4 deg by default): the errors too small for an obvious gross
      failure and too large for noise; logged in ``log.medium_bad_views``.
    - ``flying_pixel_rate``: fraction of the pixels beside a depth discontinuity whose depth is
      interpolated between foreground and background, still valid, with ordinary confidence: a
      regression network smooths across occluding edges and does not flag it.
    - ``confidence_follows_error``: confidence ``2 / sqrt(1 + e / confidence_error_ref)`` times a
      log-normal factor ``exp(confidence_noise * N(0, 1))``, with ``e`` the pixel's true relative depth
      error (flying pixels included): it ranks pixels only roughly (rank correlation with the error
      about 0.25 at the defaults) and a high-error pixel sometimes has high confidence, as real
      models' confidence does. Off: confidence 1 everywhere.
    - ``follow_priors`` in [0, 1]: with ``T_world_camera`` priors on the frames, the output poses
      relative to the first view with a prior are pulled towards the priors' relative poses by this
      weight (0 ignores them, 1 returns the priors' relative geometry), still in the simulator's own
      window frame and scale; the depth stays the model's. As MapAnything leans on pose priors.
      Applied after every other pose error, which it shrinks by ``1 - follow_priors``; whether it
      acted is in ``log.used_priors``.

    The new errors draw from random streams of their own (seeded by ``noise_seed``), so switching one
    on leaves every other error exactly as it was. Each frame is rendered from its own camera: the
    extrinsic of ``frame.camera`` in ``extrinsics`` (camera name -> 4x4 base -> optical; the simulated
    world's truth), else the frame's own ``T_base_camera``, else the scene's single camera. Frame
    stamps minus ``stamp_offset_ns`` are the scene's time.
    """

    name = "model_simulator"
    needs_pose_priors = False

    def __init__(
        self,
        device: torch.device | str = "cpu",
        *,
        seed: int = 0,
        stamp_offset_ns: int = 0,
        metric: bool = True,
        scale_sigma: float = 0.03,
        pose_sigma_m: float = 0.02,
        pose_sigma_deg: float = 0.5,
        depth_sigma: float = 0.01,
        bad_view_rate: float = 0.1,
        bad_view_m: float = 0.3,
        bad_view_deg: float = 10.0,
        noise_seed: int = 1,
        delay_s: float = 0.0,
        scene: SyntheticScene | None = None,
        scale_bias: float = 0.0,
        drift_deg_per_view: float = 0.0,
        drift_m_per_view: float = 0.0,
        medium_bad_view_rate: float = 0.0,
        medium_bad_view_m: float = 0.12,
        medium_bad_view_deg: float = 4.0,
        flying_pixel_rate: float = 0.0,
        confidence_follows_error: bool = False,
        confidence_noise: float = 0.6,
        confidence_error_ref: float = 0.01,
        follow_priors: float = 0.0,
        extrinsics: Mapping[str, Sequence[Sequence[float]] | np.ndarray] | None = None,
    ) -> None:
        for name, value in (("bad_view_rate", bad_view_rate), ("medium_bad_view_rate", medium_bad_view_rate),
                            ("flying_pixel_rate", flying_pixel_rate), ("follow_priors", follow_priors)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        if scale_bias <= -1.0:
            raise ValueError(f"scale_bias must be > -1 (a window cannot have zero size), got {scale_bias}")
        if confidence_noise < 0.0 or confidence_error_ref <= 0.0:
            raise ValueError("need confidence_noise >= 0 and confidence_error_ref > 0")
        self.device = torch.device(device)
        self.scene = scene if scene is not None else SyntheticScene(seed)
        self.stamp_offset_ns = int(stamp_offset_ns)
        self.metric = metric
        self.scale_sigma = scale_sigma
        self.pose_sigma_m, self.pose_sigma_rad = pose_sigma_m, np.radians(pose_sigma_deg)
        self.depth_sigma = depth_sigma
        self.bad_view_rate = bad_view_rate
        self.bad_view_m, self.bad_view_rad = bad_view_m, np.radians(bad_view_deg)
        self.delay_s = delay_s
        self.scale_bias = float(scale_bias)
        self.drift_rad_per_view, self.drift_m_per_view = np.radians(drift_deg_per_view), float(drift_m_per_view)
        self.medium_bad_view_rate = float(medium_bad_view_rate)
        self.medium_bad_view_m, self.medium_bad_view_rad = float(medium_bad_view_m), np.radians(medium_bad_view_deg)
        self.flying_pixel_rate = float(flying_pixel_rate)
        self.confidence_follows_error = bool(confidence_follows_error)
        self.confidence_noise, self.confidence_error_ref = float(confidence_noise), float(confidence_error_ref)
        self.follow_priors = float(follow_priors)
        self.extrinsics: dict[str, np.ndarray] = {}
        for camera, T in (extrinsics or {}).items():
            T = np.asarray(T, dtype=np.float64)
            if T.shape != (4, 4):
                raise ValueError(f"extrinsics[{camera!r}] must be a 4x4 base -> optical transform, got {T.shape}")
            self.extrinsics[camera] = T
        self.rng = np.random.default_rng(noise_seed)
        self._drift_rng, self._medium_rng, self._flying_rng, self._confidence_rng = (
            np.random.default_rng([noise_seed, k]) for k in (1, 2, 3, 4))
        self.log = SimulatorLog()
        self._depth_cache: OrderedDict[tuple[str, int, int, int], np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def extrinsic(self, frame: Frame) -> np.ndarray:
        """The base -> optical transform the frame's camera really has in the simulated world."""
        if frame.camera in self.extrinsics:
            return self.extrinsics[frame.camera]
        return frame.T_base_camera if frame.T_base_camera is not None else self.scene.T_base_camera

    def true_camera_pose(self, stamp_ns: int, T_base_camera: np.ndarray | None = None) -> np.ndarray:
        """The camera's true pose at ``stamp_ns`` (default: the scene's single camera)."""
        T_bc = self.scene.T_base_camera if T_base_camera is None else T_base_camera
        return self.scene.base_pose((stamp_ns - self.stamp_offset_ns) * 1e-9) @ T_bc

    def true_frame_pose(self, frame: Frame) -> np.ndarray:
        """The true pose of the camera that took ``frame``, at its stamp."""
        return self.true_camera_pose(frame.stamp_ns, self.extrinsic(frame))

    def true_depth(self, frame: Frame) -> np.ndarray:
        """The frame's exact z-depth (H, W) at pixel centres, from its own camera."""
        key = (frame.camera, frame.stamp_ns, frame.width, frame.height)
        if key not in self._depth_cache:
            cam = frame.camera_model
            if (cam.width, cam.height) != (frame.width, frame.height):
                cam = cam.scaled(frame.width, frame.height)
            self._depth_cache[key] = render_depth(self.scene, self.true_frame_pose(frame), cam)
            while len(self._depth_cache) > 256:
                self._depth_cache.popitem(last=False)
        return self._depth_cache[key]

    def infer(self, frames: Sequence[Frame]) -> WindowPrediction:
        with self._lock:
            time.sleep(self.delay_s)
            return self._infer(list(frames))

    # ------------------------------------------------------------------ one window
    def _infer(self, frames: list[Frame]) -> WindowPrediction:
        rng = self.rng
        call = len(self.log.calls)
        self.log.calls.append([f.key for f in frames])
        scale = float(np.exp(rng.normal(scale=self.scale_sigma))) if self.metric else float(
            np.exp(rng.uniform(np.log(0.3), np.log(3.0))))
        scale *= 1.0 + self.scale_bias
        # The window frame: a random rigid placement of the (scaled) world.
        G = make_pose(Rotation.random(random_state=int(rng.integers(1 << 31))).as_matrix(), rng.normal(size=3) * 5)
        self.log.frames.append((scale, G))
        bad = int(rng.integers(len(frames))) if rng.uniform() < self.bad_view_rate else None
        truths = [self.true_frame_pose(f) for f in frames]
        bend = self._drift(call, truths[0][:3, 3])
        poses, depths = [], []
        for i, frame in enumerate(frames):
            T = bend(i, truths[i])
            R = T[:3, :3] @ _random_rotation(rng, self.pose_sigma_rad)
            c = T[:3, 3] + rng.normal(scale=self.pose_sigma_m / np.sqrt(3.0), size=3)
            if i == bad:
                R = R @ Rotation.from_rotvec(_unit(rng) * self.bad_view_rad).as_matrix()
                c = c + _unit(rng) * self.bad_view_m
                self.log.bad_views.append(BadView(call, i, frame.key, self.bad_view_m,
                                                  float(np.degrees(self.bad_view_rad))))
            elif self.medium_bad_view_rate > 0 and self._medium_rng.uniform() < self.medium_bad_view_rate:
                R = R @ Rotation.from_rotvec(_unit(self._medium_rng) * self.medium_bad_view_rad).as_matrix()
                c = c + _unit(self._medium_rng) * self.medium_bad_view_m
                self.log.medium_bad_views.append(BadView(call, i, frame.key, self.medium_bad_view_m,
                                                         float(np.degrees(self.medium_bad_view_rad))))
            poses.append(make_pose(R, c))
            depth_true = self.true_depth(frame)
            depths.append((depth_true, 1.0 + self.depth_sigma * _patch_noise(rng, *depth_true.shape)))
        self.log.used_priors.append(self._lean_on_priors(frames, poses))
        views = []
        for i, (frame, T, (depth_true, noise)) in enumerate(zip(frames, poses, depths, strict=True)):
            T_window = make_pose(G[:3, :3] @ T[:3, :3], scale * (G[:3, :3] @ T[:3, 3]) + G[:3, 3])
            # float64 until the end, so that with the knobs off the depth is bit for bit what it always was
            true = torch.as_tensor(depth_true, dtype=torch.float64, device=self.device)
            model = self._flying(call, i, true)  # the model's depth before its noise, in metres
            model = model * torch.as_tensor(noise, dtype=torch.float64, device=self.device)
            depth = (model * scale).float()
            cam = frame.camera_model.scaled(frame.width, frame.height)
            K = cam.K
            rays, _ = plane_rays(cam, self.device)  # a distorted camera's output grid is its own grid
            Tt = torch.as_tensor(T_window, dtype=torch.float32, device=self.device)
            points = (rays * depth[..., None]) @ Tt[:3, :3].T + Tt[:3, 3]
            valid = torch.isfinite(depth) & (depth > 0)
            colors = torch.as_tensor(np.ascontiguousarray(frame.image), device=self.device)
            confidence = self._confidence(model, true).float()
            views.append(ViewPrediction(depth, confidence, valid, points, colors, T_window, K))
        return WindowPrediction(views, metric_scale=scale, metric=self.metric,
                                pose_priors_used=self.log.used_priors[-1])

    def _drift(self, call: int, center: np.ndarray):
        """The window's bend: view index, true pose -> pose turned and moved by index x the drift."""
        if not (self.drift_rad_per_view or self.drift_m_per_view):
            return lambda k, T: T
        axis, direction = _unit(self._drift_rng), _unit(self._drift_rng)
        self.log.drifts.append(WindowDrift(call, axis, direction, float(np.degrees(self.drift_rad_per_view)),
                                           self.drift_m_per_view))

        def bend(k: int, T: np.ndarray) -> np.ndarray:
            Rk = Rotation.from_rotvec(axis * k * self.drift_rad_per_view).as_matrix()
            return make_pose(Rk @ T[:3, :3], center + Rk @ (T[:3, 3] - center) + k * self.drift_m_per_view * direction)

        return bend

    def _lean_on_priors(self, frames: list[Frame], poses: list[np.ndarray]) -> bool:
        """Pull ``poses`` (in place) towards the priors' geometry relative to the first view with a prior."""
        have = [i for i, f in enumerate(frames) if f.T_world_camera is not None]
        if self.follow_priors <= 0.0 or len(have) < 2:
            return False
        a = have[0]
        P_a_inv, M_a = invert(frames[a].T_world_camera), poses[a]
        M_a_inv = invert(M_a)
        for k in have[1:]:
            rel_model = M_a_inv @ poses[k]
            rel_prior = P_a_inv @ frames[k].T_world_camera
            poses[k] = M_a @ interpolate(rel_model, rel_prior, self.follow_priors)
        return True

    def _flying(self, call: int, index: int, true: torch.Tensor) -> torch.Tensor:
        """True depth with a fraction of the pixels at depth discontinuities put between fore- and background."""
        if self.flying_pixel_rate <= 0.0:
            return true
        edge = depth_edges(true)
        u = torch.as_tensor(self._flying_rng.uniform(size=(2, *true.shape)), dtype=true.dtype, device=true.device)
        flying = edge & (u[0] < self.flying_pixel_rate)
        fg, bg = _neighbour_range(true)
        self.log.flying_pixels.append((call, index, int(flying.sum())))
        return torch.where(flying, fg + (0.05 + 0.9 * u[1]) * (bg - fg), true)

    def _confidence(self, model: torch.Tensor, true: torch.Tensor) -> torch.Tensor:
        """Per-pixel confidence: 1, or decreasing with the true error times log-normal noise."""
        if not self.confidence_follows_error:
            return torch.ones_like(model)
        error = (model - true).abs() / true
        noise = torch.as_tensor(self._confidence_rng.normal(size=tuple(model.shape)), dtype=model.dtype,
                                device=model.device)
        return 2.0 * torch.rsqrt(1.0 + error / self.confidence_error_ref) * torch.exp(self.confidence_noise * noise)
