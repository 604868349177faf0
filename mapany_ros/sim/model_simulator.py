"""A feed-forward model's errors on the synthetic scene's true geometry: the placement stage's adversary.

A real multi-view model answers every window in a frame of its own (anchored on a view it picks, at
a scale that is only roughly metric), with per-view pose noise, per-pixel depth noise and, now and
then, one view that is badly off. :class:`ModelSimulator` returns exactly that, built from ground
truth the test cannot smuggle through: it ignores every prior it is given (poses, depth), so a
placement stage that only passes priors through, or confuses frames, fails.

It is also a backend plugin (``backend: mapany_ros.sim.model_simulator:ModelSimulator``), built as any
third-party model is: the keyword ``device`` plus options, then ``infer(frames)``. Plugin authors can run
the placement scenarios with it beside their own backend.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy.spatial.transform import Rotation

from mapany_ros.core.backends.base import ViewPrediction, WindowPrediction
from mapany_ros.core.camera_rays import plane_rays
from mapany_ros.core.frames import Frame
from mapany_ros.core.geometry import make_pose
from mapany_ros.sim.scene import SyntheticScene, render_depth


@dataclass
class BadView:
    """One injected gross error: which call, which view of it, and the frame."""

    call: int
    index: int
    key: tuple[str, int]


@dataclass
class SimulatorLog:
    """What the simulator did, for tests to check the placement stage against."""

    #: Per call: the window frame as a similarity (scale, 4x4 world -> window rigid part).
    frames: list[tuple[float, np.ndarray]] = field(default_factory=list)
    bad_views: list[BadView] = field(default_factory=list)
    calls: list[list[tuple[str, int]]] = field(default_factory=list)


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


class ModelSimulator:
    """True geometry of :class:`SyntheticScene` ``seed`` with a real model's errors (see module doc).

    ``pose_sigma_m`` / ``pose_sigma_deg`` are the RMS translation and rotation error of each view,
    ``depth_sigma`` the RMS relative depth noise (smooth within the model's patches, as a ViT's),
    ``scale_sigma`` the log-normal per-window
    scale error of a metric model (a non-metric one gets an arbitrary scale in [0.3, 3]). With
    probability ``bad_view_rate`` a window has one view off by ``bad_view_m`` and ``bad_view_deg``.
    Frame stamps minus ``stamp_offset_ns`` are the scene's time.
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
    ) -> None:
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
        self.rng = np.random.default_rng(noise_seed)
        self.log = SimulatorLog()
        self._depth_cache: OrderedDict[tuple[int, int, int], np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def true_camera_pose(self, stamp_ns: int) -> np.ndarray:
        return self.scene.camera_pose((stamp_ns - self.stamp_offset_ns) * 1e-9)

    def _true_depth(self, frame: Frame) -> np.ndarray:
        key = (frame.stamp_ns, frame.width, frame.height)
        if key not in self._depth_cache:
            cam = frame.camera_model
            if (cam.width, cam.height) != (frame.width, frame.height):
                cam = cam.scaled(frame.width, frame.height)
            self._depth_cache[key] = render_depth(self.scene, self.true_camera_pose(frame.stamp_ns), cam)
            while len(self._depth_cache) > 256:
                self._depth_cache.popitem(last=False)
        return self._depth_cache[key]

    def infer(self, frames: Sequence[Frame]) -> WindowPrediction:
        with self._lock:
            time.sleep(self.delay_s)
            return self._infer(list(frames))

    def _infer(self, frames: list[Frame]) -> WindowPrediction:
        rng = self.rng
        call = len(self.log.calls)
        self.log.calls.append([f.key for f in frames])
        scale = float(np.exp(rng.normal(scale=self.scale_sigma))) if self.metric else float(
            np.exp(rng.uniform(np.log(0.3), np.log(3.0))))
        # The window frame: a random rigid placement of the (scaled) world.
        G = make_pose(Rotation.random(random_state=int(rng.integers(1 << 31))).as_matrix(), rng.normal(size=3) * 5)
        self.log.frames.append((scale, G))
        bad = int(rng.integers(len(frames))) if rng.uniform() < self.bad_view_rate else None
        views = []
        for i, frame in enumerate(frames):
            T = self.true_camera_pose(frame.stamp_ns)
            R = T[:3, :3] @ _random_rotation(rng, self.pose_sigma_rad)
            c = T[:3, 3] + rng.normal(scale=self.pose_sigma_m / np.sqrt(3.0), size=3)
            if i == bad:
                R = R @ Rotation.from_rotvec(_unit(rng) * self.bad_view_rad).as_matrix()
                c = c + _unit(rng) * self.bad_view_m
                self.log.bad_views.append(BadView(call, i, frame.key))
            T_window = make_pose(G[:3, :3] @ R, scale * (G[:3, :3] @ c) + G[:3, 3])
            depth_true = self._true_depth(frame)
            noise = 1.0 + self.depth_sigma * _patch_noise(rng, *depth_true.shape)
            depth = torch.as_tensor(depth_true * noise * scale, dtype=torch.float32, device=self.device)
            cam = frame.camera_model.scaled(frame.width, frame.height)
            K = cam.K
            rays, _ = plane_rays(cam, self.device)  # a distorted camera's output grid is its own grid
            Tt = torch.as_tensor(T_window, dtype=torch.float32, device=self.device)
            points = (rays * depth[..., None]) @ Tt[:3, :3].T + Tt[:3, 3]
            valid = torch.isfinite(depth) & (depth > 0)
            colors = torch.as_tensor(np.ascontiguousarray(frame.image), device=self.device)
            views.append(ViewPrediction(depth, torch.ones_like(depth), valid, points, colors, T_window, K))
        return WindowPrediction(views, metric_scale=scale, metric=self.metric)
