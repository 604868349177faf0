"""How far a camera's view moved since the last keyframe, from its images alone (keyframes without odometry).

Without odometry the images are the only evidence that the robot moved. Each image is reduced to a
small grey level by area averaging (about ``WORK_WIDTH`` pixels across: 1/8 of a 640-pixel image),
and a grid of the keyframe's textured patches is tracked into it by pyramidal inverse-compositional
Lucas-Kanade, every patch at once, with each patch's brightness and contrast normalised (auto
exposure). Tracking starts where each patch is predicted to be (where it was last found plus its
image velocity), so a fast turn stays within the tracker's reach. Through the camera's own rays
(distortion included) the tracks become bearings, and three numbers say how the view changed:

- ``rotation_deg``: the rotation that best maps the keyframe's bearings onto the current ones (a
  robust Kabsch fit). Turning in place gives image motion but no parallax; the model still needs
  keyframes as the view turns away (each must overlap the next), so rotation counts, against the
  same ``keyframe.min_rotation_deg`` as odometry's rotation. (A sideways slide along a flat wall
  looks like a turn and is counted as one: the view changes the same way.)
- ``parallax_deg``: the median angle by which the tracks moved once that rotation is removed: what
  translation does (forward motion's expansion, nearer things sliding past farther ones), the
  angle the model triangulates depth with. An angle is the same for any resolution and any lens.
- ``tracked``: the fraction of the keyframe's patches still found; a view that changed too much to
  follow (a fast turn, something passing close in front) has moved.

A frame too bland to track (fewer than ``MIN_TRACKS`` textured patches) gives no measure, so only
time decides there. It runs in the input callbacks, so it stays on the CPU (the image is on the
host, and ~100 patches cost more to move to a GPU than to track) and on the calling thread: the
tracking is about a hundred small torch ops, none of them big enough for torch to split across its
worker threads (no batched matmul), and the image reduction, the per-patch bookkeeping and the
3 x 3 fits are numpy. On a loaded 2-core machine one parallel region costs milliseconds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from mapany_ros.core.camera_rays import pixel_rays
from mapany_ros.core.frames import CameraModel

#: Width (pixels) of the grey level the patches are tracked on.
WORK_WIDTH = 80
#: Pyramid levels above the working one (each half the size), for motions larger than a patch.
COARSE_LEVELS = 2
#: Patches are (2 r + 1)^2 pixels at every level.
PATCH_RADIUS = 3
#: Patches across the image (rows follow the aspect ratio).
GRID_COLUMNS = 12
#: Lucas-Kanade iterations per level, coarsest first.
ITERATIONS = (2, 2, 3)
#: Least mean squared gradient (grey level in [0, 1] per working pixel) along a patch's weaker
#: direction: below it the patch cannot be located (a bland wall, a dark frame).
MIN_TEXTURE = (1.0 / 255.0) ** 2
#: A patch is lost when its RMS difference to the keyframe's (after brightness and contrast
#: normalisation) exceeds this fraction of the keyframe patch's contrast.
MAX_RESIDUAL = 0.7
#: Fewer textured patches than this: the motion is unknown.
MIN_TRACKS = 8


@dataclass(frozen=True)
class ViewMotion:
    """One camera's view change between its keyframe and the current image (NaN: too few tracks)."""

    rotation_deg: float
    parallax_deg: float
    #: Median image motion of the tracks, as a fraction of the image width (for logs and tests).
    shift: float
    #: Fraction of the keyframe's textured patches still found.
    tracked: float
    #: Patches still found.
    tracks: int


@dataclass
class _Pyramid:
    levels: list[torch.Tensor]  # (1, 1, h, w) grey levels in [0, 1], finest (working) first
    factor: int  # working pixel = factor x factor image pixels
    shape: tuple[int, int]  # the image's (height, width)

    @property
    def size(self) -> tuple[int, int]:
        """(height, width) of the working level."""
        return int(self.levels[0].shape[2]), int(self.levels[0].shape[3])


@dataclass
class _Keyframe:
    """The keyframe's patches at every pyramid level (stacked, finest first), ready for
    inverse-compositional updates.

    Displacements are kept in grid_sample units of each level, so one iteration is a shifted sample
    and one product with the descent images (inverse Hessian x zero-mean template gradients); these
    are zero-mean, so a patch's brightness offset drops out without being subtracted.
    """

    points: torch.Tensor  # (N, 2) patch centres, working-level pixels (x, y)
    bearings: np.ndarray  # (N, 3) unit rays of the centres
    grid: torch.Tensor  # (L, N, P, 2) grid_sample coordinates of the patches at zero displacement
    to_grid: torch.Tensor  # (L, 2) a displacement in the level's pixels -> grid_sample units
    template: torch.Tensor  # (L, N, P) zero-mean patches
    descent: torch.Tensor  # (L, N, 2, P) patch -> update (grid units)
    neg_descent_template: torch.Tensor  # (L, N, 2) minus descent x template
    contrast: torch.Tensor  # (L, N) RMS of the template


def working_image(image: np.ndarray) -> tuple[np.ndarray, int]:
    """The image as a small float32 grey level in [0, 1] (mean of factor x factor pixels), and the factor.

    Rows are summed first (whole contiguous rows at a time), then channels and columns of the small
    result; numpy reads the message's read-only buffer without a copy. A right / bottom remainder
    of fewer than ``factor`` pixels is left out.
    """
    h, w = image.shape[:2]
    c = 1 if image.ndim == 2 else image.shape[2]
    k = max(1, round(w / WORK_WIDTH))
    h0, w0 = h // k, w // k
    if h0 < 2 or w0 < 2:
        raise ValueError(f"image {w}x{h} is too small to track")
    rows = image[: h0 * k].reshape(h0, k, w * c).sum(1, dtype=np.uint16 if k <= 257 else np.uint32)
    grey = rows[:, : w0 * k * c].reshape(h0, w0, k * c).sum(2, dtype=np.uint32)
    return grey.astype(np.float32) * np.float32(1.0 / (255.0 * k * k * c)), k


def _pyramid(image: np.ndarray) -> _Pyramid:
    """The working grey level and up to ``COARSE_LEVELS`` halvings (2 x 2 means)."""
    grey, k = working_image(image)
    levels = [grey]
    for _ in range(COARSE_LEVELS):
        h, w = levels[-1].shape
        if min(h, w) < 4 * (2 * PATCH_RADIUS + 1):
            break
        lv = levels[-1][: h // 2 * 2, : w // 2 * 2]
        levels.append(0.25 * ((lv[0::2, 0::2] + lv[1::2, 0::2]) + (lv[0::2, 1::2] + lv[1::2, 1::2])))
    return _Pyramid([torch.from_numpy(lv)[None, None] for lv in levels], k, (int(image.shape[0]), int(image.shape[1])))


def _offsets(radius: int) -> torch.Tensor:
    r = torch.arange(-radius, radius + 1, dtype=torch.float32)
    yy, xx = torch.meshgrid(r, r, indexing="ij")
    return torch.stack([xx.reshape(-1), yy.reshape(-1)], dim=1)  # (P, 2), row-major


def _grid_scale(h: int, w: int) -> torch.Tensor:
    """Pixel -> grid_sample coordinates (align_corners): multiply, then subtract 1."""
    return torch.tensor([2.0 / max(w - 1, 1), 2.0 / max(h - 1, 1)])


def _sample(image: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """(1, C, h, w) sampled bilinearly (border padding) at ``grid`` (1, N, P, 2): (C, N, P)."""
    return torch.grid_sampler(image, grid, 0, 1, True)[0]


def _rotation_and_parallax(before: np.ndarray, after: np.ndarray) -> tuple[float, float]:
    """Rotation (deg) mapping unit bearings ``before`` onto ``after`` (Kabsch, refitted on the tracks
    it explains), and the median angle (deg) it leaves unexplained: parallax."""
    keep = np.ones(len(before), dtype=bool)
    for _ in range(2):
        U, _, Vt = np.linalg.svd(after[keep].T @ before[keep])
        R = U @ np.diag([1.0, 1.0, float(np.sign(np.linalg.det(U @ Vt)))]) @ Vt
        chord = np.linalg.norm(after - before @ R.T, axis=1)
        median = float(np.partition(chord, len(chord) // 2)[len(chord) // 2])
        keep = chord <= 3.0 * median + 1e-9
    axis = np.array([R[2, 1] - R[1, 2], R[0, 2] - R[2, 0], R[1, 0] - R[0, 1]])  # 2 sin(angle) x unit axis
    angle = math.degrees(math.atan2(0.5 * float(np.linalg.norm(axis)), 0.5 * (float(np.trace(R)) - 1.0)))
    return angle, math.degrees(2.0 * math.asin(min(1.0, 0.5 * median)))


_PATCH = _offsets(PATCH_RADIUS)
_PATCH_AND_RIM = _offsets(PATCH_RADIUS + 1)  # one pixel more around, for the template's gradients


def _patch_structure(levels: list[torch.Tensor], points: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Every level's zero-mean patches around ``points`` (working pixels) and their zero-mean gradients.

    Returns (template, to_grid, gx, gy, hxx, hxy, hyy): template and gradients (L * N, P), the
    levels' pixel -> grid scales (L, 2), and the structure tensor entries (L * N,). Patches are
    sampled with one pixel of rim for central differences; everything is done component by
    component, never as a batched matmul, so each op stays below torch's parallel grain size and
    runs on the calling thread (see the module doc).
    """
    n, p, side = len(points), _PATCH.shape[0], 2 * PATCH_RADIUS + 3
    to_grid = torch.stack([_grid_scale(*level.shape[2:]) for level in levels])  # (L, 2)
    patches = []
    for lv, level in enumerate(levels):
        centres = (points + 0.5) * 2.0**-lv - 0.5  # level pixels
        patches.append(_sample(level, ((centres[:, None] + _PATCH_AND_RIM) * to_grid[lv] - 1.0)[None])[0])
    big = torch.cat(patches).view(len(levels) * n, side, side)
    t = big[:, 1:-1, 1:-1].reshape(-1, p)
    gx = 0.5 * (big[:, 1:-1, 2:] - big[:, 1:-1, :-2]).reshape(-1, p)
    gy = 0.5 * (big[:, 2:, 1:-1] - big[:, :-2, 1:-1]).reshape(-1, p)
    t, gx, gy = t - t.mean(1, keepdim=True), gx - gx.mean(1, keepdim=True), gy - gy.mean(1, keepdim=True)
    return t, to_grid, gx, gy, (gx * gx).sum(1), (gx * gy).sum(1), (gy * gy).sum(1)


class ViewTracker:
    """One camera: its keyframe's patches, and where they were last found.

    ``measure`` tracks the keyframe's patches into a new image; ``promote`` makes the image last
    measured the keyframe (its pyramid is kept, so a new keyframe costs no second reduction).
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._key: _Keyframe | None = None
        self._last: _Pyramid | None = None
        self._camera: CameraModel | None = None
        self._rays: torch.Tensor | None = None  # (1, 4, h0, w0): unit ray and validity per working pixel
        self._shift: np.ndarray | None = None  # (N, 2) last displacement of each patch, working pixels
        self._velocity = np.zeros(2, np.float32)  # median image velocity, working pixels per second
        self._track_velocity: np.ndarray | None = None  # (N, 2) per patch
        self._stamp_ns: int | None = None

    # ------------------------------------------------------------------ camera rays
    def _ray_map(self, camera: CameraModel, pyr: _Pyramid) -> None:
        """Unit rays of the working pixels' centres through the camera model (once per camera model)."""
        h0, w0 = pyr.size
        cam = self._camera
        same = cam is not None and (cam is camera or (
            cam.width == camera.width and cam.height == camera.height and np.array_equal(cam.K, camera.K)
            and cam.distortion_model == camera.distortion_model and np.array_equal(cam.D, camera.D)))
        if same and self._rays is not None and tuple(self._rays.shape[2:]) == (h0, w0):
            return
        k = pyr.factor
        # The camera model's K is for its own size; the image may be a resampled one.
        model = camera if (camera.width, camera.height) == (pyr.shape[1], pyr.shape[0]) else camera.scaled(
            pyr.shape[1], pyr.shape[0])
        v, u = torch.meshgrid(torch.arange(h0, dtype=torch.float64), torch.arange(w0, dtype=torch.float64),
                              indexing="ij")
        rays, valid = pixel_rays(model, (u + 0.5) * k - 0.5, (v + 0.5) * k - 0.5)
        self._rays = torch.cat([rays.permute(2, 0, 1), valid[None].double()]).float()[None]
        self._camera = camera

    def _bearings(self, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Unit rays (N, 3) at sub-pixel working positions (float32), and whether each is valid."""
        assert self._rays is not None
        h, w = self._rays.shape[2:]
        grid = (torch.from_numpy(points) * _grid_scale(h, w) - 1.0)[None, None]
        s = _sample(self._rays, grid)[:, 0].T.numpy().astype(np.float64)  # (N, 4)
        rays = s[:, :3] / np.maximum(np.linalg.norm(s[:, :3], axis=1, keepdims=True), 1e-9)
        return rays, s[:, 3] > 0.999

    # ------------------------------------------------------------------ keyframe
    def promote(self) -> None:
        """The image last measured becomes the keyframe: its textured grid patches are the new templates."""
        pyr = self._last
        if pyr is None:
            return
        h0, w0 = pyr.size
        rows = max(2, round(GRID_COLUMNS * h0 / w0))
        margin = PATCH_RADIUS + 1.0
        gy, gx = np.meshgrid(np.linspace(margin, h0 - 1 - margin, rows, dtype=np.float32),
                             np.linspace(margin, w0 - 1 - margin, GRID_COLUMNS, dtype=np.float32), indexing="ij")
        points = np.stack([gx.reshape(-1), gy.reshape(-1)], axis=1)
        # Patches with texture at the working level (where they are finally located), and a valid ray.
        bearings, ok = self._bearings(points)
        hxx, hxy, hyy = (h.numpy() for h in _patch_structure(pyr.levels[:1], torch.from_numpy(points))[4:])
        half_trace = 0.5 * (hxx + hyy)
        weak = half_trace - np.sqrt(np.maximum(half_trace**2 - (hxx * hyy - hxy * hxy), 0.0))
        keep = np.flatnonzero(ok & (weak / _PATCH.shape[0] >= MIN_TEXTURE))
        points = torch.from_numpy(points[keep])
        n, n_lv, p = len(points), len(pyr.levels), _PATCH.shape[0]
        template, to_grid, gx, gy, hxx, hxy, hyy = _patch_structure(pyr.levels, points)
        # A little damping: a patch without structure at a coarse level just stays put there.
        damping = 1e-2 * MIN_TEXTURE * p
        hxx, hyy = hxx + damping, hyy + damping
        inv_det = 1.0 / (hxx * hyy - hxy * hxy)
        dx = (hyy * inv_det)[:, None] * gx - (hxy * inv_det)[:, None] * gy  # inverse Hessian x gradients
        dy = (hxx * inv_det)[:, None] * gy - (hxy * inv_det)[:, None] * gx
        descent = torch.stack([dx, dy], 1).view(n_lv, n, 2, p) * to_grid[:, None, :, None]
        template = template.view(n_lv, n, p)
        scale = torch.tensor([2.0**-lv for lv in range(n_lv)])
        centres = (points[None] + 0.5) * scale[:, None, None] - 0.5  # (L, N, 2) level pixels
        grid = (centres[:, :, None] + _PATCH) * to_grid[:, None, None] - 1.0
        contrast = torch.linalg.vector_norm(template, dim=2) * p**-0.5
        self._key = _Keyframe(points, bearings[keep], grid, to_grid, template, descent,
                              -(descent * template[:, :, None, :]).sum(3), contrast)
        self._shift = np.zeros((n, 2), np.float32)
        self._track_velocity = np.tile(self._velocity, (n, 1))

    # ------------------------------------------------------------------ tracking
    def measure(self, image: np.ndarray, camera: CameraModel, stamp_ns: int) -> ViewMotion | None:
        """Track the keyframe's patches into ``image``; None without a keyframe, with too little texture,
        or for an image too small to hold a patch."""
        if min(image.shape[:2]) < 4 * PATCH_RADIUS:
            return None
        pyr = _pyramid(image)
        if self._last is not None and (pyr.shape != self._last.shape or len(pyr.levels) != len(self._last.levels)):
            self.reset()  # the camera's resolution changed: start over
        self._ray_map(camera, pyr)
        self._last = pyr
        key = self._key
        if key is None or len(key.points) < MIN_TRACKS:
            self._stamp_ns = stamp_ns
            return None
        assert self._shift is not None and self._track_velocity is not None
        dt = 0.0 if self._stamp_ns is None else max(0.0, (stamp_ns - self._stamp_ns) * 1e-9)
        n, p, top = len(key.points), _PATCH.shape[0], len(pyr.levels) - 1
        predicted = torch.from_numpy(self._shift + self._track_velocity * np.float32(dt))
        d = (predicted * (2.0**-top * key.to_grid[top])).view(1, n, 1, 2)  # grid units
        for lv in range(top, -1, -1):
            image_lv, grid = pyr.levels[lv], key.grid[lv : lv + 1]
            s = _sample(image_lv, grid + d).view(n, 1, p)
            rms = torch.linalg.vector_norm(s - s.mean(2, keepdim=True), dim=2).mul_(p**-0.5).clamp_min_(1e-6)
            gain = (key.contrast[lv, :, None] / rms).clamp_(0.2, 5.0)  # contrast as the keyframe's
            descent, offset = key.descent[lv] * gain[:, :, None], key.neg_descent_template[lv]
            for it in range(ITERATIONS[len(ITERATIONS) - 1 - lv]):
                if it > 0:
                    s = _sample(image_lv, grid + d).view(n, 1, p)
                d = d - ((descent * s).sum(2) + offset).view(1, n, 1, 2)
            if lv > 0:
                d = d * (2.0 * key.to_grid[lv - 1] / key.to_grid[lv])
        s = s.view(n, p)
        error = (s - s.mean(1, keepdim=True)) * gain - key.template[0]  # at the last iterate
        residual = (torch.linalg.vector_norm(error, dim=1) * p**-0.5 / key.contrast[0].clamp_min(1e-6)).numpy()
        # The few numbers per patch from here on are numpy (see the module doc).
        shift = (d.view(n, 2) / key.to_grid[0]).numpy()  # working pixels
        h0, w0 = pyr.size
        pos = key.points.numpy() + shift
        inside = (pos[:, 0] >= 0) & (pos[:, 0] <= w0 - 1) & (pos[:, 1] >= 0) & (pos[:, 1] <= h0 - 1)
        bearings, ok = self._bearings(np.clip(pos, 0.0, [w0 - 1.0, h0 - 1.0]).astype(np.float32))
        good = inside & ok & (residual <= MAX_RESIDUAL) & np.isfinite(shift).all(1)
        n_good = int(good.sum())
        self._update_prediction(shift, good, dt, stamp_ns)
        tracked = n_good / n
        if n_good < MIN_TRACKS:
            return ViewMotion(math.nan, math.nan, math.nan, tracked, n_good)
        rotation_deg, parallax_deg = _rotation_and_parallax(key.bearings[good], bearings[good])
        pixel_shift = float(np.median(np.linalg.norm(shift[good], axis=1))) / w0
        return ViewMotion(rotation_deg, parallax_deg, pixel_shift, tracked, n_good)

    def _update_prediction(self, shift: np.ndarray, good: np.ndarray, dt: float, stamp_ns: int) -> None:
        """Keep where each patch was found (lost ones: where the others moved) and how fast it moves."""
        assert self._shift is not None and self._track_velocity is not None
        if good.any():
            new = np.where(good[:, None], shift, np.median(shift[good], axis=0)).astype(np.float32)
            if dt > 0:
                velocity = (new - self._shift) / np.float32(dt)
                self._velocity = np.median(velocity[good], axis=0).astype(np.float32)
                self._track_velocity = np.where(good[:, None], velocity, self._velocity).astype(np.float32)
            self._shift = new
        self._stamp_ns = stamp_ns
