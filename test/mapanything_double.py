"""Test double for the upstream ``mapanything`` package that enforces its verified contract.

It stands in for ``mapanything.models.MapAnything`` and ``mapanything.utils.image.preprocess_inputs``
(installed into ``sys.modules`` by :func:`install`) and behaves like a model that *uses its priors*:

* ``preprocess_inputs`` does upstream's real geometry: one aspect bucket (long side 518, sides
  multiples of 14) from the mean aspect ratio, cover-resize, centre crop, K adjusted the way
  upstream does it (COLMAP scaling, then an integer crop), depth resized nearest, ray directions
  collapsed to a pinhole K. Float numpy images, which upstream silently corrupts, are refused.
* ``MapAnything.infer`` refuses what upstream refuses or crashes on (unknown keys, float64
  tensors, (B, h, w, 1) depth, poses without view 0, intrinsics + ray_directions, depth without
  calibration, fp16 autocast on CPU, concurrent calls) and returns upstream's keys, shapes and
  dtypes. What it predicts starts from the ground truth registered by the test
  (:meth:`MapAnythingDouble.register`, looked up by image content), ray-cast against a scene along
  the true rays of the camera (distortion included), and then trusts what it is given, as a model
  fed metric priors does:

  - ``camera_poses``: relative poses follow the *given* poses (made relative to view 0, as upstream
    does), not the truth; unposed views get their true pose relative to view 0;
  - ``depth_z``: depth follows the given depth (holes filled at the prior's scale);
  - ``intrinsics`` / ``ray_directions``: depth is what triangulation with that calibration gives,
    the true depth times f_given / f_true on the model grid (pinhole fit of rays), and the output
    rays are the given ones;
  - priors with ``is_metric_scale`` False give shape only: their scale is the model's own. Like
    upstream's ``infer``, a view without the flag counts as metric (it defaults it to True).

  The answer is expressed the way upstream does: anchored on view 0 *as predicted* with a random
  rigid offset, in metres when a metric prior was given, otherwise at a scale off by up to
  ``scale_error`` (a new one every call); masked pixels ZEROED.

An adapter that hands over inverted relative poses, a depth prior in millimetres or the K of
another resolution therefore gets wrong geometry back, and so does one that forgets masking, the
crop or the distortion.
"""

from __future__ import annotations

import hashlib
import sys
import threading
import time
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch
from scipy.spatial.transform import Rotation

from mapany_ros.core.backends.mapanything import MapAnythingBackend, MapAnythingConfig
from mapany_ros.core.frames import CameraModel

DINOV2_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
DINOV2_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
RESOLUTION_MAPPINGS_518 = {
    1.000: (518, 518),
    1.321: (518, 392),
    1.542: (518, 336),
    1.762: (518, 294),
    2.056: (518, 252),
    3.083: (518, 168),
    0.757: (392, 518),
    0.649: (336, 518),
    0.567: (294, 518),
    0.486: (252, 518),
}
ALLOWED_VIEW_KEYS = {
    "img",
    "data_norm_type",
    "depth_z",
    "ray_directions",
    "intrinsics",
    "camera_poses",
    "is_metric_scale",
    "true_shape",
    "idx",
    "instance",
}


# --------------------------------------------------------------------------------------------
# Ground truth: textbook camera models (independent of mapany_ros.core.camera_rays) and a scene


def project_normalized(
    x: np.ndarray, y: np.ndarray, model: str, D: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Forward ROS distortion of normalised coordinates, written straight from the OpenCV docs."""
    D = np.asarray(D, dtype=np.float64)
    if model == "equidistant":
        k = np.concatenate([D, np.zeros(4 - D.size)])
        r = np.hypot(x, y)
        th = np.arctan(r)
        thd = th * (1 + k[0] * th**2 + k[1] * th**4 + k[2] * th**6 + k[3] * th**8)
        f = np.divide(thd, r, out=np.ones_like(r), where=r > 1e-12)
        return x * f, y * f
    k = np.concatenate([D, np.zeros(8 - D.size)])
    k1, k2, p1, p2, k3, k4, k5, k6 = k
    r2 = x * x + y * y
    radial = (1 + k1 * r2 + k2 * r2**2 + k3 * r2**3) / (1 + k4 * r2 + k5 * r2**2 + k6 * r2**3)
    return (
        x * radial + 2 * p1 * x * y + p2 * (r2 + 2 * x * x),
        y * radial + p1 * (r2 + 2 * y * y) + 2 * p2 * x * y,
    )


def project_pixels(camera: CameraModel, X: np.ndarray) -> np.ndarray:
    """(N, 2) pixel coordinates of camera-frame points (N, 3) through K and the distortion."""
    x, y = X[:, 0] / X[:, 2], X[:, 1] / X[:, 2]
    if not camera.is_pinhole:
        x, y = project_normalized(x, y, camera.distortion_model, camera.D)
    K = camera.K
    return np.stack([K[0, 0] * x + K[0, 1] * y + K[0, 2], K[1, 1] * y + K[1, 2]], axis=-1)


def true_rays(camera: CameraModel, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Unit rays (N, 3) of pixel coordinates: Newton with a forward-difference Jacobian."""
    Kinv = np.linalg.inv(camera.K)
    xd = Kinv[0, 0] * u + Kinv[0, 1] * v + Kinv[0, 2]
    yd = Kinv[1, 1] * v + Kinv[1, 2]
    x, y = xd.copy(), yd.copy()
    if not camera.is_pinhole:
        h = 1e-8
        for _ in range(30):
            fx, fy = project_normalized(x, y, camera.distortion_model, camera.D)
            ax, ay = project_normalized(x + h, y, camera.distortion_model, camera.D)
            bx, by = project_normalized(x, y + h, camera.distortion_model, camera.D)
            j00, j10, j01, j11 = (ax - fx) / h, (ay - fy) / h, (bx - fx) / h, (by - fy) / h
            ex, ey = fx - xd, fy - yd
            det = j00 * j11 - j01 * j10
            dx, dy = (j11 * ex - j01 * ey) / det, (j00 * ey - j10 * ex) / det
            x, y = x - dx, y - dy
            if np.max(np.abs(dx) + np.abs(dy)) < 1e-14:
                break
    rays = np.stack([x, y, np.ones_like(x)], axis=-1)
    return rays / np.linalg.norm(rays, axis=-1, keepdims=True)


@dataclass
class PlaneScene:
    """Infinite planes ``n . X = d`` in the world frame; a ray hits the nearest one in front."""

    planes: list[tuple[np.ndarray, float]]

    @staticmethod
    def room() -> PlaneScene:
        """Back wall z = 6, floor y = 1.5, ceiling y = -2.5, side walls x = +-4 (OpenCV-like world)."""
        return PlaneScene(
            [
                (np.array([0.0, 0.0, 1.0]), 6.0),
                (np.array([0.0, 1.0, 0.0]), 1.5),
                (np.array([0.0, 1.0, 0.0]), -2.5),
                (np.array([1.0, 0.0, 0.0]), -4.0),
                (np.array([1.0, 0.0, 0.0]), 4.0),
            ]
        )

    def ray_distance(self, origin: np.ndarray, dirs: np.ndarray) -> np.ndarray:
        """Distance along unit rays ``dirs`` (N, 3) from ``origin`` to the first hit (inf if none)."""
        best = np.full(len(dirs), np.inf)
        for n, d in self.planes:
            denom = dirs @ n
            with np.errstate(divide="ignore", invalid="ignore"):
                t = (d - n @ origin) / denom
            t = np.where((np.abs(denom) > 1e-12) & (t > 1e-6), t, np.inf)
            best = np.minimum(best, t)
        return best

    def depth_z(self, camera: CameraModel, T_world_camera: np.ndarray) -> np.ndarray:
        """(H, W) z-depth of the camera's own pixel grid (NaN where no plane is hit)."""
        v, u = np.mgrid[0 : camera.height, 0 : camera.width].astype(np.float64)
        rays = true_rays(camera, u.ravel(), v.ravel())
        t = self.ray_distance(T_world_camera[:3, 3], rays @ T_world_camera[:3, :3].T)
        z = rays[:, 2] * t
        return np.where(np.isfinite(z), z, np.nan).reshape(camera.height, camera.width)


@dataclass
class _Truth:
    camera: CameraModel
    T_world_camera: np.ndarray


@dataclass
class _ModelGrid:
    """What preprocess_inputs did to one image: its truth and the model->input pixel map."""

    truth: _Truth
    A: np.ndarray  # 3x3, model pixel -> input pixel
    K_model: np.ndarray  # the true camera's K on the model grid


def _fingerprint(array: np.ndarray) -> str:
    array = np.ascontiguousarray(array)
    return hashlib.sha1(array.tobytes() + str(array.shape).encode() + str(array.dtype).encode()).hexdigest()


def _has_float64(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return value.dtype == torch.float64
    if isinstance(value, (tuple, list)):
        return any(_has_float64(v) for v in value)
    return False


# --------------------------------------------------------------------------------------------
# The double


@dataclass
class MapAnythingDouble:
    """Configurable prior-trusting model; one instance backs the fake modules installed by :func:`install`."""

    scene: PlaneScene = field(default_factory=PlaneScene.room)
    #: Without a metric prior the predicted scale is 1 + U(-scale_error, scale_error), new every call.
    scale_error: float = 0.05
    seed: int = 0
    #: Raise torch.cuda.OutOfMemoryError for calls with more views than this.
    oom_above: int | None = None
    #: What the model reports as ``metric_scaling_factor`` (upstream's scale head).
    metric_scaling_factor: float = 1.25
    delay_s: float = 0.0
    #: Masked pixels on the model grid: one in ``mask_period`` along a diagonal pattern.
    mask_period: int = 13

    def __post_init__(self) -> None:
        self.rng = np.random.default_rng(self.seed)
        self.truths: dict[str, _Truth] = {}
        self.grids: dict[str, _ModelGrid] = {}
        self.calls: list[dict[str, Any]] = []
        self.preprocess_calls: list[list[dict[str, Any]]] = []
        #: Per call: (scale, 4x4 rigid offset), X_pred = offset(scale * X) for X in view 0's believed camera frame.
        self.pred_frames: list[tuple[float, np.ndarray]] = []
        self._busy = threading.Lock()
        self._ray_cache: dict[tuple, tuple[CameraModel, np.ndarray, float]] = {}

    # -- registry -------------------------------------------------------------------------

    def register(self, image: np.ndarray, camera: CameraModel, T_world_camera: np.ndarray) -> None:
        """Declare the true camera and pose of an image: what infer starts from before its priors."""
        self.truths[_fingerprint(image)] = _Truth(camera, np.asarray(T_world_camera, dtype=np.float64))

    # -- mapanything.utils.image.preprocess_inputs ----------------------------------------

    def preprocess_inputs(
        self,
        input_views: list[dict[str, Any]],
        resize_mode: str = "fixed_mapping",
        size: Any = None,
        norm_type: str = "dinov2",
        patch_size: int = 14,
        resolution_set: int = 518,
        verbose: bool = False,
    ) -> list[dict[str, Any]]:
        assert resize_mode == "fixed_mapping" and resolution_set == 518 and norm_type == "dinov2"
        if not input_views:
            raise ValueError("input_views cannot be empty")
        self.preprocess_calls.append(input_views)
        sizes = []
        for i, view in enumerate(input_views):
            img = view["img"]
            if not isinstance(img, np.ndarray) or img.ndim != 3 or img.shape[2] != 3:
                raise ValueError(f"view {i}: img must be an (H, W, 3) array in this double")
            if img.dtype != np.uint8:
                raise AssertionError(f"view {i}: {img.dtype} image; upstream multiplies it by 255 (corrupt)")
            sizes.append((img.shape[1], img.shape[0]))
        aspect = float(np.mean([w / h for w, h in sizes]))
        tw, th = RESOLUTION_MAPPINGS_518[min(RESOLUTION_MAPPINGS_518, key=lambda k: abs(k - aspect))]
        out = []
        for i, view in enumerate(input_views):
            if "intrinsics" in view and "ray_directions" in view:
                raise ValueError(f"View {i} cannot have both 'intrinsics' and 'ray_directions'")
            img = view["img"]
            H, W = img.shape[:2]
            s = max(tw / W, th / H) + 1e-8
            Wr, Hr = int(np.floor(W * s)), int(np.floor(H * s))
            pil = PIL.Image.fromarray(img).resize((Wr, Hr), PIL.Image.LANCZOS if s < 1 else PIL.Image.BICUBIC)
            K = None
            if "intrinsics" in view:
                K = np.asarray(view["intrinsics"])
                if K.shape != (3, 3):
                    raise ValueError(f"Expected shape (3, 3) for intrinsics in view {i}, got {K.shape}")
            elif "ray_directions" in view:
                K = _pinhole_from_rays(np.asarray(view["ray_directions"])).astype(np.float32)
            if K is not None:
                left, top = (int(x) for x in np.round(0.5 * np.array([Wr - tw, Hr - th])))
            else:
                left, top = (Wr - tw) // 2, (Hr - th) // 2
            crop = np.asarray(pil)[top : top + th, left : left + tw]
            norm = (crop.astype(np.float32) / 255.0 - DINOV2_MEAN) / DINOV2_STD
            pv: dict[str, Any] = {
                "img": torch.from_numpy(np.ascontiguousarray(norm.transpose(2, 0, 1)))[None],
                "data_norm_type": [norm_type],
            }
            if "depth_z" in view:
                d = np.asarray(view["depth_z"])
                if d.ndim != 2:
                    raise ValueError(f"Expected shape (H, W) for depth_z in view {i}, got {d.shape}")
                ys = np.minimum((np.arange(Hr) * (H / Hr)).astype(int), H - 1)
                xs = np.minimum((np.arange(Wr) * (W / Wr)).astype(int), W - 1)
                pv["depth_z"] = torch.from_numpy(
                    np.ascontiguousarray(d[ys][:, xs][top : top + th, left : left + tw])
                )[None]
            if K is not None:
                pv["intrinsics"] = torch.from_numpy(_crop_K(K, s, (W, H), (Wr, Hr), left, top))[None]
            if "camera_poses" in view:
                poses = view["camera_poses"]
                pv["camera_poses"] = (
                    (torch.as_tensor(poses[0])[None], torch.as_tensor(poses[1])[None])
                    if isinstance(poses, tuple)
                    else torch.as_tensor(poses)[None]
                )
            for key, value in view.items():
                if key not in ("img", "depth_z", "intrinsics", "ray_directions", "camera_poses"):
                    pv[key] = value
            truth = self.truths.get(_fingerprint(img))
            if truth is None:  # e.g. a warm-up image: a camera at the origin with the given (or a default) K
                K0 = (
                    np.asarray(K, np.float64)
                    if K is not None
                    else np.array([[W, 0, W / 2], [0, W, H / 2], [0, 0, 1.0]])
                )
                truth = _Truth(CameraModel(W, H, K0), np.eye(4))
            K_model = _crop_K(truth.camera.K, s, (W, H), (Wr, Hr), left, top)
            self.grids[_fingerprint(pv["img"].numpy())] = _ModelGrid(
                truth, truth.camera.K @ np.linalg.inv(K_model), K_model
            )
            out.append(pv)
        return out

    # -- mapanything.models.MapAnything.infer ----------------------------------------------

    def infer(
        self, model: torch.nn.Module, views: list[dict[str, Any]], **kwargs: Any
    ) -> list[dict[str, Any]]:
        if not self._busy.acquire(blocking=False):
            raise AssertionError(
                "infer called concurrently on one model (it rewrites geometric_input_config)"
            )
        try:
            time.sleep(self.delay_s)
            return self._infer(model, views, **kwargs)
        finally:
            self._busy.release()

    def _infer(
        self,
        model: torch.nn.Module,
        views: list[dict[str, Any]],
        memory_efficient_inference: bool = True,
        minibatch_size: int | None = None,
        use_amp: bool = True,
        amp_dtype: str = "bf16",
        apply_mask: bool = True,
        mask_edges: bool = True,
        edge_normal_threshold: float = 5.0,
        edge_depth_threshold: float = 0.03,
        apply_confidence_mask: bool = False,
        confidence_percentile: float = 10,
        ignore_calibration_inputs: bool = False,
        ignore_depth_inputs: bool = False,
        ignore_pose_inputs: bool = False,
        ignore_depth_scale_inputs: bool = False,
        ignore_pose_scale_inputs: bool = False,
        use_multiview_confidence: bool = False,
        multiview_conf_depth_abs_thresh: float = 0.02,
        multiview_conf_depth_rel_thresh: float = 0.02,
    ) -> list[dict[str, Any]]:
        device = model.scale_token.device
        self.calls.append(
            {
                "views": views,
                "kwargs": dict(
                    memory_efficient_inference=memory_efficient_inference,
                    use_amp=use_amp,
                    amp_dtype=amp_dtype,
                    apply_mask=apply_mask,
                    mask_edges=mask_edges,
                    apply_confidence_mask=apply_confidence_mask,
                    confidence_percentile=confidence_percentile,
                ),
            }
        )
        if use_amp and device.type != "cuda":
            raise AssertionError("use_amp=True off CUDA silently becomes fp16 autocast")
        if self.oom_above is not None and len(views) > self.oom_above:
            raise torch.cuda.OutOfMemoryError(
                f"CUDA out of memory (double: {len(views)} > {self.oom_above} views)"
            )
        self._validate(views)
        h, w = views[0]["img"].shape[-2:]
        grids = []
        for i, view in enumerate(views):
            key = _fingerprint(view["img"].detach().cpu().numpy())
            if key not in self.grids:
                raise AssertionError(f"view {i}: img is not an output of preprocess_inputs")
            grids.append(self.grids[key])
        relative = _relative_poses(views, grids)
        # Predicted frame: anchored on view 0 as predicted, random rigid offset, metric only with metric priors.
        metric = any(_is_metric(v) and ("camera_poses" in v or "depth_z" in v) for v in views)
        scale = 1.0 if metric else 1.0 + self.scale_error * float(self.rng.uniform(-1.0, 1.0))
        offset = np.eye(4)
        offset[:3, :3] = Rotation.random(random_state=int(self.rng.integers(1 << 31))).as_matrix()
        offset[:3, 3] = self.rng.normal(size=3)
        self.pred_frames.append((scale, offset))
        v, u = np.mgrid[0:h, 0:w].astype(np.float64)
        pattern = (u // 9 + v // 7) % self.mask_period == 0
        outputs = []
        for view, grid, rel in zip(views, grids, relative):
            true_rays, true_focal = self._true_rays(grid, h, w)
            T = grid.truth.T_world_camera
            t = self.scene.ray_distance(T[:3, 3], true_rays.reshape(-1, 3) @ T[:3, :3].T).reshape(h, w)
            hit = np.isfinite(t)
            t = np.where(hit, t, 1.0)
            rays, focal_ratio = _believed_rays(view, grid, true_rays, true_focal)
            # Triangulation with known poses scales depth with the focal length it is told.
            depth = true_rays[..., 2] * t * focal_ratio
            if "depth_z" in view:
                depth = _follow_depth_prior(depth, view["depth_z"][0].double().cpu().numpy(), _is_metric(view))
            depth = depth * scale
            pts_cam = rays / rays[..., 2:3] * depth[..., None]
            R_pred = offset[:3, :3] @ rel[:3, :3]
            c_pred = offset[:3, 3] + scale * offset[:3, :3] @ rel[:3, 3]
            pts_world = pts_cam @ R_pred.T + c_pred
            non_ambiguous = hit & ~pattern
            conf = 1.0 + 5.0 / (1.0 + t)
            mask = non_ambiguous if apply_mask else None
            pose = np.eye(4)
            pose[:3, :3], pose[:3, 3] = R_pred, c_pred
            img = view["img"][0].numpy().transpose(1, 2, 0) * DINOV2_STD + DINOV2_MEAN
            out = {
                "pts3d": pts_world,
                "pts3d_cam": pts_cam,
                "ray_directions": rays,
                "depth_along_ray": np.linalg.norm(pts_cam, axis=-1)[..., None],
                "depth_z": depth[..., None],
                "cam_trans": c_pred,
                "cam_quats": Rotation.from_matrix(R_pred).as_quat(),
                "camera_poses": pose,
                "intrinsics": _pinhole_from_rays(rays),
                "metric_scaling_factor": np.array([self.metric_scaling_factor]),
                "conf": conf,
                "non_ambiguous_mask": non_ambiguous,
                "non_ambiguous_mask_logits": np.where(non_ambiguous, 8.0, -8.0),
                "img_no_norm": np.clip(img, 0, 1),
            }
            if mask is not None:
                for k in ("pts3d", "pts3d_cam", "depth_along_ray", "depth_z"):
                    out[k] = out[k] * mask[..., None]
                out["mask"] = mask[..., None]
            outputs.append(
                {
                    k: torch.as_tensor(np.asarray(val))[None].to(
                        device, torch.bool if np.asarray(val).dtype == bool else torch.float32
                    )
                    for k, val in out.items()
                }
            )
        return outputs

    def _true_rays(self, grid: _ModelGrid, h: int, w: int) -> tuple[np.ndarray, float]:
        """(h, w, 3) unit rays of the true camera through the model grid's pixels and the focal
        length of their pinhole fit (cached: same camera, same grid, the same rays)."""
        A = grid.A
        key = (id(grid.truth.camera), A.tobytes(), h, w)
        if key not in self._ray_cache:
            v, u = np.mgrid[0:h, 0:w].astype(np.float64)
            u_in = A[0, 0] * u + A[0, 1] * v + A[0, 2]
            v_in = A[1, 0] * u + A[1, 1] * v + A[1, 2]
            rays = true_rays(grid.truth.camera, u_in.ravel(), v_in.ravel()).reshape(h, w, 3)
            self._ray_cache[key] = (grid.truth.camera, rays, _focal(_pinhole_from_rays(rays)))
        _, rays, focal = self._ray_cache[key]
        return rays, focal

    @staticmethod
    def _validate(views: list[dict[str, Any]]) -> None:
        if not views:
            raise ValueError("At least one view must be provided")
        posed = []
        shape = None
        for i, view in enumerate(views):
            bad = set(view) - ALLOWED_VIEW_KEYS
            if bad:
                raise ValueError(f"View {i} contains invalid keys: {bad}")
            if not {"img", "data_norm_type"} <= set(view):
                raise ValueError(f"View {i} missing required keys")
            if "intrinsics" in view and "ray_directions" in view:
                raise ValueError(f"View {i} contains conflicting keys: intrinsics and ray_directions")
            if "depth_z" in view and not ("intrinsics" in view or "ray_directions" in view):
                raise ValueError(
                    f"View {i} depth constraint violation: depth_z needs intrinsics or ray_directions"
                )
            if "camera_poses" in view:
                posed.append(i)
            if any(_has_float64(v) for v in view.values()):
                raise RuntimeError(
                    "Index put requires the source and destination dtypes match (float64 input)"
                )
            img = view["img"]
            if (
                not isinstance(img, torch.Tensor)
                or img.dtype != torch.float32
                or img.ndim != 4
                or img.shape[:2] != (1, 3)
            ):
                raise TypeError(
                    f"View {i}: img must be a normalised (1, 3, h, w) float32 tensor from preprocess_inputs"
                )
            if shape is None:
                shape = tuple(img.shape[-2:])
            if tuple(img.shape[-2:]) != shape or shape[0] % 14 or shape[1] % 14:
                raise ValueError(f"View {i}: all views need one size, multiple of 14; got {tuple(img.shape)}")
            h, w = shape
            if "depth_z" in view and tuple(view["depth_z"].shape) != (1, h, w):
                raise RuntimeError(
                    f"View {i}: depth_z {tuple(view['depth_z'].shape)} crashes (needs (B, h, w))"
                )
            if "ray_directions" in view and tuple(view["ray_directions"].shape) != (1, h, w, 3):
                raise ValueError(f"View {i}: ray_directions must be (B, h, w, 3) at the model resolution")
            if "intrinsics" in view and tuple(view["intrinsics"].shape) != (1, 3, 3):
                raise ValueError(f"View {i}: intrinsics must be (B, 3, 3)")
            if "camera_poses" in view:
                p = view["camera_poses"]
                if not (isinstance(p, tuple) or tuple(p.shape) == (1, 4, 4)):
                    raise ValueError(f"View {i}: camera_poses must be (B, 4, 4) or (quats, trans)")
            if "is_metric_scale" in view:
                m = view["is_metric_scale"]
                if not isinstance(m, torch.Tensor) or m.dtype != torch.bool or tuple(m.shape) != (1,):
                    raise ValueError(f"View {i}: is_metric_scale must be torch.tensor([bool])")
        if posed and 0 not in posed:
            raise ValueError(
                f"Camera pose constraint violation: views {posed} have camera_poses but view 0 does not"
            )


def _is_metric(view: dict[str, Any]) -> bool:
    """Upstream's ``infer`` sets a missing ``is_metric_scale`` to True before the model sees it."""
    flag = view.get("is_metric_scale")
    return flag is None or bool(flag.reshape(-1)[0])


def _pose_matrix(poses: Any) -> np.ndarray:
    """Upstream's processed camera_poses, (B, 4, 4) or (quats xyzw, trans), as a float64 4x4."""
    if isinstance(poses, tuple):
        T = np.eye(4)
        T[:3, :3] = Rotation.from_quat(poses[0].reshape(-1, 4)[0].double().cpu().numpy()).as_matrix()
        T[:3, 3] = poses[1].reshape(-1, 3)[0].double().cpu().numpy()
        return T
    return poses.reshape(-1, 4, 4)[0].double().cpu().numpy()


def _relative_poses(views: list[dict[str, Any]], grids: list[_ModelGrid]) -> list[np.ndarray]:
    """Each view's pose in view 0's camera frame, in metres, as a model trusting its pose priors sees it.

    Posed views follow the given poses relative to the given view 0 (upstream's own conversion);
    unposed views get the truth relative to view 0. Poses with ``is_metric_scale`` False give only
    directions: their translations take the truth's mean length (the model's own scale).
    """
    T0_inv = np.linalg.inv(grids[0].truth.T_world_camera)
    truth = [T0_inv @ g.truth.T_world_camera for g in grids]
    posed = [i for i, v in enumerate(views) if "camera_poses" in v]
    if not posed:
        return truth
    P0_inv = np.linalg.inv(_pose_matrix(views[0]["camera_poses"]))
    relative = list(truth)
    for i in posed:
        relative[i] = P0_inv @ _pose_matrix(views[i]["camera_poses"])
    if not all(_is_metric(views[i]) for i in posed):
        given = [np.linalg.norm(relative[i][:3, 3]) for i in posed]
        true = [np.linalg.norm(truth[i][:3, 3]) for i in posed]
        if max(given) > 0:
            factor = np.mean([n for n in true if n > 0]) / np.mean([n for n in given if n > 0])
            for i in posed:
                relative[i][:3, 3] *= factor
    return relative


def _believed_rays(
    view: dict[str, Any], grid: _ModelGrid, rays: np.ndarray, true_focal: float
) -> tuple[np.ndarray, float]:
    """The unit rays the model works with and f_given / f_true (1 when it gets no calibration).

    K is compared with the true K of the model grid, ray directions with the pinhole fit of the
    true rays: like with like, so right calibration gives exactly the true depth.
    """
    h, w = rays.shape[:2]
    if "intrinsics" in view:
        K = view["intrinsics"][0].double().cpu().numpy()
        v, u = np.mgrid[0:h, 0:w].astype(np.float64)
        given = np.stack([u, v, np.ones_like(u)], axis=-1) @ np.linalg.inv(K).T
        return given / np.linalg.norm(given, axis=-1, keepdims=True), _focal(K) / _focal(grid.K_model)
    if "ray_directions" in view:
        given = view["ray_directions"][0].double().cpu().numpy()
        given = given / np.linalg.norm(given, axis=-1, keepdims=True)
        return given, _focal(_pinhole_from_rays(given)) / true_focal
    return rays, 1.0


def _follow_depth_prior(depth: np.ndarray, prior: np.ndarray, metric: bool) -> np.ndarray:
    """Depth that follows the prior where it has values and fills its holes at the prior's scale.

    A prior with ``is_metric_scale`` False gives only shape: it is first brought to the model's scale.
    """
    given = np.isfinite(prior) & (prior > 0)
    if not given.any():
        return depth
    if not metric:
        prior = prior * np.median(depth[given] / prior[given])
    return np.where(given, prior, depth * np.median(prior[given] / depth[given]))


def _focal(K: np.ndarray) -> float:
    return float(np.sqrt(K[0, 0] * K[1, 1]))


def _crop_K(
    K: np.ndarray, s: float, size: tuple[int, int], resized: tuple[int, int], left: int, top: int
) -> np.ndarray:
    """Upstream's K update: COLMAP-convention scaling by ``s`` centred on the floored resize (the
    fractional 0.5 * (W * s - floor(W * s)) shift), then the integer crop."""
    K = np.array(K, copy=True)
    Kc = K.astype(np.float64).copy()
    Kc[:2, 2] += 0.5
    Kc[:2, :] *= s
    Kc[:2, 2] -= 0.5 * (np.asarray(size) * s - np.asarray(resized))
    Kc[:2, 2] -= 0.5
    Kc[0, 2] -= left
    Kc[1, 2] -= top
    return Kc.astype(K.dtype)


def _pinhole_from_rays(rays: np.ndarray) -> np.ndarray:
    """Least-squares pinhole K of (h, w, 3) rays, as upstream recovers it (loses distortion)."""
    h, w = rays.shape[:2]
    v, u = np.mgrid[0:h, 0:w].astype(np.float64)
    x = (rays[..., 0] / rays[..., 2]).ravel()
    y = (rays[..., 1] / rays[..., 2]).ravel()
    fx, cx = np.linalg.lstsq(np.stack([x, np.ones_like(x)], 1), u.ravel(), rcond=None)[0]
    fy, cy = np.linalg.lstsq(np.stack([y, np.ones_like(y)], 1), v.ravel(), rcond=None)[0]
    return np.array([[fx, 0, cx], [0, fy, cy], [0, 0, 1]])


# --------------------------------------------------------------------------------------------
# Fake modules, checkpoint and hub


class FakeMapAnything(torch.nn.Module):
    """Stand-in for mapanything.models.MapAnything; the installed subclass carries ``double``."""

    double: MapAnythingDouble
    constructed: list[dict[str, Any]] = []

    def __init__(
        self,
        name: str,
        encoder_config: dict,
        info_sharing_config: dict,
        pred_head_config: dict,
        geometric_input_config: dict,
        fusion_norm_layer: Any = None,
        pretrained_checkpoint_path: str | None = None,
        load_specific_pretrained_submodules: bool = False,
        specific_pretrained_submodules: list | None = None,
        torch_hub_force_reload: bool = False,
        use_register_tokens_from_encoder: bool = False,
        info_sharing_mlp_layer_str: str = "mlp",
    ) -> None:
        super().__init__()
        config = dict(
            encoder_config=encoder_config,
            info_sharing_config=info_sharing_config,
            pred_head_config=pred_head_config,
            geometric_input_config=geometric_input_config,
            pretrained_checkpoint_path=pretrained_checkpoint_path,
        )
        _refuse_pickles(config)
        type(self).constructed.append(config)
        if encoder_config.get("uses_torch_hub", False):
            # What uniception does: always through torch.hub, weights unless torch_hub_pretrained=False.
            self.encoder = torch.hub.load(
                "facebookresearch/dinov2",
                "dinov2_vits14",
                force_reload=torch_hub_force_reload,
                pretrained=encoder_config.get("torch_hub_pretrained", True),
            )
        else:
            self.encoder = torch.nn.Linear(2, 2)
        self.head = torch.nn.Linear(4, 4)
        self.scale_token = torch.nn.Parameter(torch.zeros(8))
        self.geometric_input_config = dict(geometric_input_config)

    @classmethod
    def from_pretrained(cls, name_or_path: str, **kwargs: Any) -> FakeMapAnything:
        """Local directory with config.json + model.safetensors, or a hub id (no network here)."""
        import json

        from safetensors.torch import load_file

        path = Path(name_or_path)
        if not path.is_dir():
            raise OSError(f"{name_or_path} is not a local directory and the hub cannot be reached")
        for name in ("config.json", "model.safetensors"):
            if not (path / name).is_file():
                raise FileNotFoundError(f"{path / name} missing")
        model = cls(**json.loads((path / "config.json").read_text()))
        model.load_state_dict(load_file(str(path / "model.safetensors")), strict=False)
        return model

    def infer(self, views: list[dict[str, Any]], **kwargs: Any) -> list[dict[str, Any]]:
        return self.double.infer(self, views, **kwargs)


def _refuse_pickles(value: Any, where: str = "config") -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            if k == "pretrained_checkpoint_path" and v is not None:
                raise AssertionError(f"{where}.{k}={v!r} would be torch.load-ed (unpickled)")
            _refuse_pickles(v, f"{where}.{k}")


def model_config(pickle_path: str | None = "/nonexistent/encoder.pth") -> dict[str, Any]:
    """An upstream-shaped config.json; one sub-config names a pickle the adapter must drop."""
    return {
        "name": "mapanything",
        "encoder_config": {
            "encoder_str": "dinov2",
            "name": "dinov2_small",
            "data_norm_type": "dinov2",
            "size": "small",
            "with_registers": False,
            "uses_torch_hub": True,
            "pretrained_checkpoint_path": pickle_path,
        },
        "info_sharing_config": {
            "model_type": "alternating_attention",
            "module_args": {"depth": 4, "dim": 384, "pretrained_checkpoint_path": pickle_path},
        },
        "pred_head_config": {"type": "dpt+pose", "feature_head": {"feature_dim": 64}},
        "geometric_input_config": {"overall_prob": 0.0},
        "pretrained_checkpoint_path": None,
        "torch_hub_force_reload": False,
        "use_register_tokens_from_encoder": True,
        "info_sharing_mlp_layer_str": "mlp",
    }


def state_dict() -> dict[str, torch.Tensor]:
    """Weights matching FakeMapAnything with a torch-hub encoder (distinct values to check loading)."""
    return {
        "encoder.weight": torch.full((2, 2), 0.5),
        "encoder.bias": torch.full((2,), -0.5),
        "head.weight": torch.eye(4) * 3,
        "head.bias": torch.arange(4.0),
        "scale_token": torch.arange(8.0) / 8,
    }


def write_model_dir(path: Path, config: dict[str, Any] | None = None) -> Path:
    """config.json + model.safetensors for FakeMapAnything."""
    import json

    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config or model_config()))
    save_file(state_dict(), str(path / "model.safetensors"))
    return path


HUBCONF = '''"""Fake facebookresearch/dinov2 hub code for tests: no weights may be downloaded."""
dependencies = ["torch"]


def dinov2_vits14(pretrained=True, **kwargs):
    if pretrained:
        raise RuntimeError("dinov2_vits14(pretrained=True) would download DINOv2 weights")
    import torch

    return torch.nn.Linear(2, 2)
'''


def write_fake_dinov2_hub(hub_dir: Path) -> Path:
    """$TORCH_HOME/hub/facebookresearch_dinov2_main with a hubconf that refuses weights."""
    repo = hub_dir / "facebookresearch_dinov2_main"
    repo.mkdir(parents=True, exist_ok=True)
    (repo / "hubconf.py").write_text(HUBCONF)
    return repo


def install(monkeypatch: Any, double: MapAnythingDouble) -> type[FakeMapAnything]:
    """Put fake ``mapanything`` modules backed by ``double`` into sys.modules (undone by monkeypatch)."""
    cls = type("MapAnything", (FakeMapAnything,), {"double": double, "constructed": []})
    pkg = types.ModuleType("mapanything")
    models = types.ModuleType("mapanything.models")
    utils = types.ModuleType("mapanything.utils")
    image = types.ModuleType("mapanything.utils.image")
    models.MapAnything = cls
    image.preprocess_inputs = double.preprocess_inputs
    pkg.models, pkg.utils, utils.image = models, utils, image
    for name, module in (
        ("mapanything", pkg),
        ("mapanything.models", models),
        ("mapanything.utils", utils),
        ("mapanything.utils.image", image),
    ):
        monkeypatch.setitem(sys.modules, name, module)
    return cls


# --------------------------------------------------------------------------------------------
# Set-up shared by the adapter tests


@dataclass
class DoubleEnv:
    """The installed double, its model class, an offline cache and a safetensors model directory."""

    double: MapAnythingDouble
    cls: type[FakeMapAnything]
    cache: Path
    model_dir: Path
    tmp: Path


def double_env(tmp_path: Path, monkeypatch: Any, request: Any, double: MapAnythingDouble) -> DoubleEnv:
    """Install ``double``, write the model and the DINOv2 hub code, forbid the network.

    Loading the backend sets TORCH_HOME, HF_HUB_OFFLINE and torch's hub dir; they are restored
    after the test (``request`` is the test's pytest request).
    """
    cls = install(monkeypatch, double)
    cache = tmp_path / "cache"
    write_fake_dinov2_hub(cache / "torch" / "hub")
    model_dir = write_model_dir(tmp_path / "model")
    for var in ("TORCH_HOME", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    old_hub = torch.hub.get_dir()
    request.addfinalizer(lambda: torch.hub.set_dir(old_hub))

    def no_network(*args: Any, **kwargs: Any) -> None:
        raise AssertionError(f"network access during load: {args}")

    monkeypatch.setattr(torch.hub, "urlopen", no_network)
    return DoubleEnv(double, cls, cache, model_dir, tmp_path)


def make_backend(env: DoubleEnv, **overrides: Any) -> MapAnythingBackend:
    """A CPU MapAnythingBackend on the double's model directory, without warm-up unless asked."""
    fields: dict[str, Any] = dict(
        model_path=str(env.model_dir), cache_dir=str(env.cache), device="cpu", warmup=False
    )
    fields.update(overrides)
    return MapAnythingBackend(MapAnythingConfig(**fields))
