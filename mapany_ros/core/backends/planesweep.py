"""Classical calibrated multi-view stereo: plane sweep with ZNCC, no learned weights.

Why it exists: it needs nothing but poses and intrinsics, so it runs anywhere (CPU or CUDA)
and gives a metric, trustworthy baseline against which learned backends are judged. It
needs a pose prior on every frame (odometry plus the base->camera extrinsic).

Per reference frame: sweep fronto-parallel planes uniformly in inverse depth, warp the
nearest neighbour views onto each plane (one homography per plane, ``grid_sample``), score
with zero-mean normalised cross-correlation over a small window (box filters), keep the
mean of the best neighbours (robust to occlusion), take the winner with a parabolic
sub-plane fit, and rate it by how much it beats the best rival away from it. Then keep
only pixels whose depth is confirmed by enough other views' depth maps.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from mapany_ros.core.backends.base import BackendError, ViewPrediction, WindowPrediction, resolve_device
from mapany_ros.core.frames import Frame
from mapany_ros.core.geometry import backproject, invert, is_rigid, pixel_rays

_LUMA = (0.299, 0.587, 0.114)
_EPS = 1e-6  # variance floor (intensities in [0, 1]) so flat patches give ZNCC ~ 0, not NaN
_ENABLE_HINT = (
    "plane sweep needs a pose prior (odometry + the base->camera extrinsic) and pinhole intrinsics "
    "on every frame: set use_odometry: true, make sure the odometry TF and the camera's /tf_static "
    "extrinsic are published, and that CameraInfo is available"
)


@dataclass
class _Image:
    """One pyramid level of a frame, ready for matching."""

    gray: torch.Tensor  # (1, 1, h, w) float32 luminance in [0, 1]
    mean: torch.Tensor  # (h, w) local window mean of gray
    std: torch.Tensor  # (h, w) local window standard deviation of gray
    neg_inv_std: torch.Tensor  # (h, w) -1 / sqrt(variance + eps), for the ZNCC denominator
    K: np.ndarray  # (3, 3) float64 intrinsics of this level

    @property
    def h(self) -> int:
        return int(self.gray.shape[-2])

    @property
    def w(self) -> int:
        return int(self.gray.shape[-1])


@dataclass
class _View:
    """A frame at the working resolution (level 0) and, for coarse-to-fine, half of it (level 1)."""

    levels: list[_Image]
    colors: torch.Tensor  # (h, w, 3) uint8 at level 0
    T_wc: np.ndarray  # (4, 4) float64 camera-to-world

    @property
    def center(self) -> np.ndarray:
        return self.T_wc[:3, 3]


@dataclass
class _Sweep:
    """Best depth of one reference view and how much to trust it."""

    depth: torch.Tensor  # (h, w) float32, NaN where out of range or unmatched
    confidence: torch.Tensor  # (h, w) float32 in [0, 1]
    zncc: torch.Tensor  # (h, w) float32 best aggregated correlation


class PlaneSweepBackend:
    """Plane-sweep multi-view stereo over a window of posed frames (see module docstring)."""

    name = "planesweep"
    needs_pose_priors = True

    def __init__(
        self,
        device: str | torch.device = "cpu",
        num_planes: int = 48,
        min_depth_m: float = 0.5,
        max_depth_m: float = 10.0,
        downscale: float = 2.0,
        num_neighbors: int = 4,
        *,
        window: int = 7,
        best_k: int = 2,
        coarse_to_fine: bool = False,
        refine_hypotheses: int = 7,
        min_baseline_m: float = 0.02,
        max_view_angle_deg: float = 60.0,
        min_confidence: float = 0.05,
        min_zncc: float = 0.6,
        min_texture: float = 0.01,
        consistency_rel: float = 0.03,
        min_consistent_views: int = 2,
        fuse_consistent: bool = True,
        plane_chunk: int | None = None,
    ) -> None:
        """Validate settings and pick the device; there are no weights to load.

        ``downscale`` divides the input resolution (2 runs 640x480 at 320x240). The sweep
        tests ``num_planes`` depths uniform in 1/z over [``min_depth_m``, ``max_depth_m``];
        the parabolic fit and the fusion of consistent views make the result far finer than
        the plane spacing, so 48 planes do as well as 64 on the synthetic benchmark. Each
        plane's cost is the mean of the ``best_k`` best of ``num_neighbors`` views. With
        ``coarse_to_fine`` planes are swept at half the working resolution and each pixel
        then tests ``refine_hypotheses`` inverse depths half a plane apart around the coarse
        winner at full working resolution: about 2x faster, with somewhat fewer valid pixels.
        ``min_texture`` is the least local intensity deviation (0..1 scale) worth matching;
        ``consistency_rel`` is the relative depth agreement another view's depth map must
        show, ``min_consistent_views`` how many must, and ``fuse_consistent`` averages the
        agreeing depths. ``plane_chunk`` (hypotheses per batch) defaults to what suits the
        device: small on CPU (cache), large on CUDA.
        """
        self.device = resolve_device(device)
        self.num_planes = num_planes
        self.min_depth_m = _float("min_depth_m", min_depth_m)
        self.max_depth_m = _float("max_depth_m", max_depth_m)
        self.downscale = _float("downscale", downscale)
        self.num_neighbors = num_neighbors
        self.window = window
        self.best_k = best_k
        self.coarse_to_fine = bool(coarse_to_fine)
        self.refine_hypotheses = refine_hypotheses
        self.min_baseline_m = _float("min_baseline_m", min_baseline_m)
        self.max_view_angle_deg = _float("max_view_angle_deg", max_view_angle_deg)
        self.min_confidence = _float("min_confidence", min_confidence)
        self.min_zncc = _float("min_zncc", min_zncc)
        self.min_texture = _float("min_texture", min_texture)
        self.consistency_rel = _float("consistency_rel", consistency_rel)
        self.min_consistent_views = min_consistent_views
        self.fuse_consistent = bool(fuse_consistent)
        # Small chunks keep a CPU's working set in cache; a GPU wants big launches.
        self.plane_chunk = (
            plane_chunk if plane_chunk is not None else (2 if self.device.type == "cpu" else 32)
        )
        self._validate()
        self._count_cache: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self._buffer: torch.Tensor | None = None

    def _validate(self) -> None:
        """Reject settings that cannot work, naming the setting and the accepted range."""
        _check(
            _is_int(self.num_planes) and self.num_planes >= 3,
            f"num_planes must be an int >= 3, got {self.num_planes!r}",
        )
        _check(
            0.0 < self.min_depth_m < self.max_depth_m < math.inf,
            f"need 0 < min_depth_m < max_depth_m < inf, got {self.min_depth_m}, {self.max_depth_m}",
        )
        _check(self.downscale >= 1.0, f"downscale must be >= 1 (1 = full resolution), got {self.downscale}")
        _check(
            _is_int(self.num_neighbors) and self.num_neighbors >= 1,
            f"num_neighbors must be an int >= 1, got {self.num_neighbors!r}",
        )
        _check(
            _is_int(self.window) and self.window >= 3 and self.window % 2 == 1,
            f"window must be an odd int >= 3, got {self.window!r}",
        )
        _check(_is_int(self.best_k) and self.best_k >= 1, f"best_k must be an int >= 1, got {self.best_k!r}")
        _check(
            _is_int(self.refine_hypotheses)
            and self.refine_hypotheses >= 3
            and self.refine_hypotheses % 2 == 1,
            f"refine_hypotheses must be an odd int >= 3, got {self.refine_hypotheses!r}",
        )
        _check(self.min_baseline_m >= 0.0, f"min_baseline_m must be >= 0, got {self.min_baseline_m}")
        _check(
            0.0 < self.max_view_angle_deg <= 180.0,
            f"max_view_angle_deg must be in (0, 180], got {self.max_view_angle_deg}",
        )
        _check(
            0.0 <= self.min_confidence < 1.0, f"min_confidence must be in [0, 1), got {self.min_confidence}"
        )
        _check(-1.0 <= self.min_zncc < 1.0, f"min_zncc must be in [-1, 1), got {self.min_zncc}")
        _check(self.min_texture >= 0.0, f"min_texture must be >= 0, got {self.min_texture}")
        _check(
            0.0 < self.consistency_rel < 1.0, f"consistency_rel must be in (0, 1), got {self.consistency_rel}"
        )
        _check(
            _is_int(self.min_consistent_views) and self.min_consistent_views >= 0,
            f"min_consistent_views must be an int >= 0, got {self.min_consistent_views!r}",
        )
        _check(
            _is_int(self.plane_chunk) and self.plane_chunk >= 1,
            f"plane_chunk must be an int >= 1, got {self.plane_chunk!r}",
        )

    # ------------------------------------------------------------------ public

    def infer(self, frames: Sequence[Frame]) -> WindowPrediction:
        """Depth, confidence and world points for every frame of the window."""
        self._check_frames(frames)
        t0 = time.perf_counter()
        with torch.inference_mode():
            views = [self._prepare(f) for f in frames]
            t1 = time.perf_counter()
            sweeps = [self._sweep_view(i, views) for i in range(len(views))]
            self._sync()
            t2 = time.perf_counter()
            depths = [self._prefilter(s, v.levels[0]) for s, v in zip(sweeps, views)]
            valid, depths = self._consistency(views, depths)
            preds = [self._prediction(v, d, s, m) for v, d, s, m in zip(views, depths, sweeps, valid)]
            self._sync()
            t3 = time.perf_counter()
        self._buffer = None  # do not hold scratch memory between windows
        timings = {"prepare": t1 - t0, "sweep": t2 - t1, "filter": t3 - t2, "total": t3 - t0}
        return WindowPrediction(views=preds, metric_scale=1.0, timings_s=timings)

    def working_size(self, width: int, height: int) -> tuple[int, int]:
        """(w, h) of the output grid for an input image of ``width`` x ``height``."""
        return max(2, int(round(width / self.downscale))), max(2, int(round(height / self.downscale)))

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # ------------------------------------------------------------------ input

    @staticmethod
    def _check_frames(frames: Sequence[Frame]) -> None:
        """Refuse input plane sweep cannot use, saying how to provide it."""
        if len(frames) == 0:
            raise BackendError("plane sweep got an empty window")
        for f in frames:
            T = f.T_world_camera
            if T is None:
                raise BackendError(f"frame {f.key} has no T_world_camera; {_ENABLE_HINT}")
            if not is_rigid(np.asarray(T, dtype=np.float64), tol=1e-5):
                raise BackendError(f"frame {f.key} has a T_world_camera that is not a finite rigid transform")
            cm = f.camera_model
            if (
                cm is None
                or cm.K is None
                or not np.all(np.isfinite(cm.K))
                or cm.K[0, 0] <= 0
                or cm.K[1, 1] <= 0
            ):
                raise BackendError(f"frame {f.key} has no valid intrinsics; {_ENABLE_HINT}")
            if not cm.is_pinhole:
                raise BackendError(
                    f"frame {f.key} has non-zero '{cm.distortion_model}' distortion; plane sweep only "
                    "handles pinhole images (undistortion is out of its scope): publish rectified images "
                    "(e.g. image_proc's image_rect) with their zero-distortion CameraInfo"
                )
            if f.image.ndim != 3 or f.image.shape[2] != 3:
                raise BackendError(f"frame {f.key} image must be (H, W, 3) RGB, got shape {f.image.shape}")
            if (f.width, f.height) != (cm.width, cm.height):
                raise BackendError(
                    f"frame {f.key} is {f.width}x{f.height} but its CameraInfo says {cm.width}x{cm.height}"
                )

    def _prepare(self, frame: Frame) -> _View:
        """Resize to the working grid (and half of it), to luminance, with window statistics."""
        w, h = self.working_size(frame.width, frame.height)
        image = np.ascontiguousarray(frame.image)
        # A frame read from a bag is a read-only view of the message: torch wants a writable array.
        img = torch.as_tensor(image if image.flags.writeable else image.copy(), device=self.device)
        rgb = _resize(img.permute(2, 0, 1)[None].float(), h, w)
        colors = rgb[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8)
        luma = torch.tensor(_LUMA, device=self.device).view(1, 3, 1, 1)
        gray = (rgb * luma).sum(dim=1, keepdim=True) / 255.0
        levels = [self._image(gray, frame.camera_model.scaled(w, h).K)]
        if self.coarse_to_fine:
            hc, wc = max(2, h // 2), max(2, w // 2)
            levels.append(self._image(_resize(gray, hc, wc), frame.camera_model.scaled(wc, hc).K))
        return _View(levels, colors, np.asarray(frame.T_world_camera, dtype=np.float64))

    def _image(self, gray: torch.Tensor, K: np.ndarray) -> _Image:
        g = gray[0, 0]
        mean = self._box(g)
        var = (self._box(g * g) - mean * mean).clamp_min(0.0)
        return _Image(gray.contiguous(), mean, var.sqrt(), -(var + _EPS).rsqrt(), K)

    def _box(self, x: torch.Tensor) -> torch.Tensor:
        """Mean over the ``window`` x ``window`` neighbourhood, in-image pixels only."""
        r = self.window // 2
        h, w = x.shape[-2:]
        return self._box_sum(F.pad(x, (r, r, r, r))) / self._counts(h, w)[0]

    def _box_sum(self, x: torch.Tensor) -> torch.Tensor:
        """Window sums of an input carrying a zero border of window // 2 (output loses the border).

        Shifted sums by binary doubling: several times faster than ``avg_pool2d`` on CPU.
        """
        return _window_sum(_window_sum(x, self.window, -2), self.window, -1)

    def _zero_border_buffer(self, shape: tuple[int, ...]) -> torch.Tensor:
        """A reused buffer whose border stays zero (callers only write its interior)."""
        if self._buffer is None or tuple(self._buffer.shape) != shape:
            self._buffer = torch.zeros(shape, device=self.device)
        return self._buffer

    def _counts(self, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(n, eps * n^2): in-image pixels in each pixel's window, and the matching ZNCC epsilon."""
        if (h, w) not in self._count_cache:
            r = self.window // 2
            n = self._box_sum(F.pad(torch.ones((h, w), device=self.device), (r, r, r, r)))
            self._count_cache[(h, w)] = (n, _EPS * n * n)
        return self._count_cache[(h, w)]

    # ------------------------------------------------------------------ matching

    def _neighbors(self, i: int, views: list[_View]) -> list[int]:
        """The nearest views by camera centre that give parallax and look the same way."""
        ref = views[i]
        cos_max = math.cos(math.radians(self.max_view_angle_deg))
        cands = []
        for j, v in enumerate(views):
            if j == i:
                continue
            dist = float(np.linalg.norm(v.center - ref.center))
            if dist < self.min_baseline_m or float(ref.T_wc[:3, 2] @ v.T_wc[:3, 2]) < cos_max:
                continue
            cands.append((dist, j))
        return [j for _, j in sorted(cands)[: self.num_neighbors]]

    def _inverse_depths(self) -> torch.Tensor:
        """Plane inverse depths, near to far, uniform in 1/z."""
        return torch.linspace(
            1.0 / self.min_depth_m, 1.0 / self.max_depth_m, self.num_planes, device=self.device
        )

    def _sweep_view(self, i: int, views: list[_View]) -> _Sweep:
        """Depth of view ``i``: a plane sweep, then (coarse-to-fine) a per-pixel refinement."""
        ref = views[i]
        nbrs = [views[j] for j in self._neighbors(i, views)]
        h, w = ref.levels[0].h, ref.levels[0].w
        if not nbrs:
            nan = torch.full((h, w), float("nan"), device=self.device)
            return _Sweep(nan, torch.zeros_like(nan), torch.zeros_like(nan))
        inv_z = self._inverse_depths()
        lv = 1 if self.coarse_to_fine else 0
        cost = self._cost(ref, nbrs, lv, inv_z.view(-1, 1, 1))
        iz, ok, confidence, best = self._winner(cost, inv_z)
        if self.coarse_to_fine:
            iz, ok_f, best = self._refine(ref, nbrs, _upsample(iz, h, w), abs(float(inv_z[1] - inv_z[0])))
            ok = (_upsample(ok.float(), h, w) > 0.999) & ok_f
            confidence = _upsample(confidence, h, w)
        depth = torch.where(ok & (iz > 0), 1.0 / iz.clamp_min(1e-9), torch.full_like(iz, float("nan")))
        return _Sweep(depth, confidence, 1.0 - best)

    def _cost(self, ref: _View, nbrs: list[_View], lv: int, inv_z: torch.Tensor) -> torch.Tensor:
        """(P, h, w) aggregated cost of inverse depths ``inv_z``: (P, 1, 1) planes or (P, h, w) per pixel.

        Processed ``plane_chunk`` hypotheses at a time to bound memory; per hypothesis the
        mean cost of the ``best_k`` neighbours that match best (the others may be occluded).
        """
        r = ref.levels[lv]
        warps = [self._plane_warp(r, n.levels[lv], invert(n.T_wc) @ ref.T_wc) for n in nbrs]
        k = min(self.best_k, len(nbrs))
        chunks = []
        for p0 in range(0, inv_z.shape[0], self.plane_chunk):
            hyp = inv_z[p0 : p0 + self.plane_chunk]
            costs = [self._zncc_cost(r, n.levels[lv], A, b, hyp) for n, (A, b) in zip(nbrs, warps)]
            chunks.append(_mean_of_smallest(costs, k))
        return torch.cat(chunks)

    def _plane_warp(self, ref: _Image, nbr: _Image, T_nr: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, b) such that the neighbour's sampling grid for inverse depth s is X[:2] / X[2], X = A + b s.

        x_n ~ K_n (R z K_r^-1 x_r + t) = z (H_inf x_r + K_n t / z); folding ``grid_sample``'s
        [-1, 1] normalisation into the first two rows leaves one fused multiply-add per
        plane. A is (h, w, 3) for every reference pixel, b (3,).
        """
        N = np.array([[2.0 / (nbr.w - 1), 0.0, -1.0], [0.0, 2.0 / (nbr.h - 1), -1.0], [0.0, 0.0, 1.0]])
        M = torch.as_tensor(N @ nbr.K @ T_nr[:3, :3], dtype=torch.float32, device=self.device)
        rays = pixel_rays(ref.K, ref.h, ref.w, self.device)  # (h, w, 3), z = 1
        b = torch.as_tensor(N @ nbr.K @ T_nr[:3, 3], dtype=torch.float32, device=self.device)
        return rays @ M.T, b

    def _zncc_cost(
        self, ref: _Image, nbr: _Image, A: torch.Tensor, b: torch.Tensor, inv_z: torch.Tensor
    ) -> torch.Tensor:
        """(P, h, w) cost 1 - ZNCC of the neighbour warped by each hypothesis.

        Outside the neighbour image the warp reads zeros, a flat patch that correlates with
        nothing (cost 1), so a neighbour that does not see a pixel cannot vote for a depth.
        """
        P, h, w = inv_z.shape[0], ref.h, ref.w
        X = torch.addcmul(A[None], b.view(1, 1, 1, 3), inv_z[..., None])  # (P, h, w, 3)
        grid = X[..., :2] * X[..., 2:].clamp_min(1e-6).reciprocal_()  # behind the camera -> far outside
        warped = F.grid_sample(
            nbr.gray, grid.view(1, P * h, w, 2), mode="bilinear", padding_mode="zeros", align_corners=True
        ).view(P, h, w)
        r = self.window // 2
        buf = self._zero_border_buffer((max(P, self.plane_chunk), 3, h + 2 * r, w + 2 * r))[:P]
        inner = buf[..., r : r + h, r : r + w]
        inner[:, 0] = warped
        torch.mul(warped, warped, out=inner[:, 1])
        torch.mul(warped, ref.gray[0, 0], out=inner[:, 2])
        sums = self._box_sum(buf)
        s0, s1, s2 = sums[:, 0], sums[:, 1], sums[:, 2]
        n, eps_n2 = self._counts(h, w)
        # ZNCC = (S_wr - mean_r S_w) / (sqrt(n S_ww - S_w^2) * std_r), all sums over the window.
        num = s2.sub_(s0 * ref.mean)
        den = s1.mul_(n).sub_(s0.mul_(s0)).clamp_min_(0.0).add_(eps_n2).rsqrt_()
        return num.mul_(den).mul_(ref.neg_inv_std).add_(1.0)

    def _winner(self, cost: torch.Tensor, inv_z: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Winner-take-all over planes with a sub-plane parabola in 1/z, and a peak-ratio confidence.

        Returns (inverse depth, inside-the-range mask, confidence, best cost); confidence is
        1 - best / best rival more than two planes away, near 0 for ambiguous matches.
        """
        D = cost.shape[0]
        best, idx, offset = _parabolic_min(cost)
        step = (inv_z[-1] - inv_z[0]) / (D - 1)
        iz = inv_z[idx] + offset * step
        inside = (idx > 0) & (idx < D - 1)
        planes = torch.arange(D, device=cost.device).view(D, 1, 1)
        rival = torch.where((planes - idx[None]).abs() > 2, cost, torch.full_like(cost, 2.0)).amin(dim=0)
        confidence = (1.0 - best / rival.clamp_min(1e-6)).clamp(0.0, 1.0)
        return iz, inside, confidence, best

    def _refine(
        self, ref: _View, nbrs: list[_View], iz0: torch.Tensor, step: float
    ) -> tuple[torch.Tensor, ...]:
        """Per-pixel search, half a plane apart, around the upsampled coarse inverse depth ``iz0``.

        Returns (inverse depth, minimum-inside-the-search mask, best cost) at level 0.
        """
        n = self.refine_hypotheses
        offsets = (torch.arange(n, device=self.device, dtype=torch.float32) - (n - 1) / 2) * (0.5 * step)
        cost = self._cost(ref, nbrs, 0, iz0[None] + offsets.view(n, 1, 1))
        best, idx, offset = _parabolic_min(cost)
        iz = iz0 + (offsets[idx] + offset * 0.5 * step)
        return iz, (idx > 0) & (idx < n - 1), best

    # ------------------------------------------------------------------ filtering

    def _prefilter(self, s: _Sweep, img: _Image) -> torch.Tensor:
        """Depth with unreliable matches (weak texture, correlation or margin) set to NaN."""
        ok = (s.confidence >= self.min_confidence) & (s.zncc >= self.min_zncc) & (img.std >= self.min_texture)
        return torch.where(ok, s.depth, torch.full_like(s.depth, float("nan")))

    def _consistency(
        self, views: list[_View], depths: list[torch.Tensor]
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(valid, depth) per view: valid = confirmed within ``consistency_rel`` by enough other
        depth maps; with ``fuse_consistent`` the depth is averaged with the confirming ones."""
        valid, fused = [], []
        # A short window (e.g. flushed when input stops) cannot offer more confirmations than it has views.
        needed = min(self.min_consistent_views, len(views) - 1)
        for i, (v, d) in enumerate(zip(views, depths)):
            finite = torch.isfinite(d)
            if needed == 0:
                valid.append(finite)
                fused.append(d)
                continue
            votes = torch.zeros_like(d)
            ratio_sum = torch.ones_like(d)  # the view's own estimate, ratio 1
            pts = pixel_rays(v.levels[0].K, d.shape[0], d.shape[1], self.device) * d[..., None]  # camera i
            for j, o in enumerate(views):
                if j != i:
                    agree, ratio = self._agrees(pts, v.T_wc, o, depths[j])
                    votes += agree
                    ratio_sum += torch.where(agree, ratio, torch.zeros_like(ratio))
            valid.append(finite & (votes >= needed))
            fused.append(d * ratio_sum / (votes + 1.0) if self.fuse_consistent else d)
        return valid, fused

    def _agrees(
        self, pts_i: torch.Tensor, T_wi: np.ndarray, other: _View, depth_o: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Whether each point of view i lands where the other view's depth map puts a surface at
        the same depth, and that depth over the point's (the other view's opinion of scale).

        The ratio moves the point along the other view's ray; for the small disagreements
        that pass it is, to first order, the same correction along view i's ray.
        """
        T_oi = torch.as_tensor(invert(other.T_wc) @ T_wi, dtype=torch.float32, device=self.device)
        X = pts_i @ T_oi[:3, :3].T + T_oi[:3, 3]
        z = X[..., 2]
        img = other.levels[0]
        Ko = torch.as_tensor(img.K, dtype=torch.float32, device=self.device)
        z_safe = torch.where(z > 1e-6, z, torch.ones_like(z))
        u = Ko[0, 0] * X[..., 0] / z_safe + Ko[0, 2]
        v = Ko[1, 1] * X[..., 1] / z_safe + Ko[1, 2]
        grid = torch.stack([u * (2.0 / (img.w - 1)) - 1.0, v * (2.0 / (img.h - 1)) - 1.0], dim=-1)
        d_o = F.grid_sample(
            depth_o[None, None], grid[None], mode="nearest", padding_mode="zeros", align_corners=True
        )[0, 0]
        ratio = d_o / z_safe
        return (z > 1e-6) & ((ratio - 1.0).abs() <= self.consistency_rel), ratio

    def _prediction(self, v: _View, depth: torch.Tensor, s: _Sweep, valid: torch.Tensor) -> ViewPrediction:
        depth = torch.where(valid, depth, torch.full_like(depth, float("nan"))).float()
        K = v.levels[0].K
        return ViewPrediction(
            depth=depth,
            confidence=torch.nan_to_num(s.confidence, nan=0.0).float(),
            valid=valid,
            points_world=backproject(depth, K, v.T_wc),
            colors=v.colors,
            T_world_camera=v.T_wc.copy(),
            K=K.copy(),
        )


def _resize(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Area-average (integer factors) or antialiased bilinear resize, pixel-centre aligned."""
    H, W = x.shape[-2:]
    if (H, W) == (h, w):
        return x
    if H % h == 0 and W % w == 0:
        return F.interpolate(x, size=(h, w), mode="area")
    return F.interpolate(x, size=(h, w), mode="bilinear", antialias=True, align_corners=False)


def _upsample(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Bilinear, pixel-centre aligned upsampling of a (h', w') map."""
    return F.interpolate(x[None, None].float(), size=(h, w), mode="bilinear", align_corners=False)[0, 0]


def _parabolic_min(cost: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(best cost, index, sub-sample offset in [-0.5, 0.5]) of a parabola through the minimum."""
    n = cost.shape[0]
    best, idx = cost.min(dim=0)
    lo = cost.gather(0, (idx - 1).clamp(min=0)[None])[0]
    hi = cost.gather(0, (idx + 1).clamp(max=n - 1)[None])[0]
    curv = lo - 2.0 * best + hi
    offset = torch.where(curv > 1e-9, 0.5 * (lo - hi) / curv.clamp_min(1e-9), torch.zeros_like(best))
    return best, idx, offset.clamp(-0.5, 0.5)


def _window_sum(x: torch.Tensor, k: int, dim: int) -> torch.Tensor:
    """Sums of ``k`` consecutive entries along ``dim`` (length n - k + 1), by binary doubling."""
    out_len = x.shape[dim] - k + 1
    terms = []
    pos, width, power = 0, 1, x  # power[i] = sum of x[i : i + width]
    while k:
        if k & 1:
            terms.append(power.narrow(dim, pos, out_len))
            pos += width
        k >>= 1
        if k:
            n = power.shape[dim] - width
            power = power.narrow(dim, 0, n) + power.narrow(dim, width, n)
            width *= 2
    if len(terms) == 1:
        return terms[0].contiguous()
    result = terms[0] + terms[1]
    for term in terms[2:]:
        result += term
    return result


def _mean_of_smallest(costs: list[torch.Tensor], k: int) -> torch.Tensor:
    """Elementwise mean of the ``k`` smallest of the neighbours' costs: the views that see best.

    A partial bubble sort with elementwise min/max over the few neighbours, several times
    faster on CPU than ``topk`` over a stacked leading dimension.
    """
    rows = list(costs)
    n = len(rows)
    k = min(k, n)
    for t in range(k if k < n else 0):  # pass t moves the t-th smallest to rows[t]
        for a in range(n - 1, t, -1):
            low = torch.minimum(rows[a - 1], rows[a])
            if t < k - 1:  # the last pass only needs the minimum
                rows[a] = torch.maximum(rows[a - 1], rows[a])
            rows[a - 1] = low
    total = rows[0].clone()
    for row in rows[1:k]:
        total += row
    return total.div_(k)


def _is_int(x: object) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _float(name: str, x: object) -> float:
    """``x`` as a finite-or-infinite float, or a ValueError naming the setting."""
    try:
        value = float(x)  # type: ignore[arg-type]
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be a number, got {x!r}") from exc
    if math.isnan(value):
        raise ValueError(f"{name} must not be NaN")
    return value


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)
