"""Per-pixel viewing rays of ROS camera models, distortion included (vectorised torch, float64).

Backends that accept ray directions (MapAnything) need the true ray of every pixel of a distorted
camera, which K alone cannot give. The ROS models are defined forward (normalised point ->
distorted point), so rays come from inverting them numerically: Newton iterations on all pixels at
once, with a forward-projection residual check that marks pixels where the model is not invertible
(beyond the fold of a strong radial polynomial, or behind a fisheye's 90 degree limit) as invalid.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import numpy as np
import torch

from mapany_ros.core.frames import CameraModel

#: ROS distortion models whose coefficients are ``[k1, k2, p1, p2, k3, (k4, k5, k6)]``.
_RADTAN_MODELS = ("plumb_bob", "rational_polynomial")
#: Pixel tolerance of the forward-projection check that marks a pixel's ray valid.
RAY_TOLERANCE_PX = 1e-3


def _coefficients(model: str, D: np.ndarray) -> tuple[float, ...]:
    """D padded to the model's full length (ROS drivers often send 4 or 5 of 8 values).

    Python floats on purpose: ``np.float64 + tensor`` lets numpy convert the whole tensor to an
    array first, which made every call ~100x slower.
    """
    D = np.asarray(D, dtype=np.float64).reshape(-1)
    if model in _RADTAN_MODELS:
        n = 8
    elif model == "equidistant":
        n = 4
    else:
        raise ValueError(
            f"unsupported distortion model {model!r} with non-zero D; "
            "use plumb_bob, rational_polynomial or equidistant"
        )
    if D.size > n:
        raise ValueError(f"{model} takes at most {n} coefficients, got {D.size}")
    return tuple(float(v) for v in np.concatenate([D, np.zeros(n - D.size)]))


def distort(x: torch.Tensor, y: torch.Tensor, model: str, D: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward ROS/OpenCV distortion of normalised image coordinates (z = 1 plane)."""
    c = _coefficients(model, D)
    r2 = x * x + y * y
    if model == "equidistant":
        k1, k2, k3, k4 = c
        r = torch.sqrt(r2)
        theta = torch.atan(r)
        t2 = theta * theta
        theta_d = theta * (1 + t2 * (k1 + t2 * (k2 + t2 * (k3 + t2 * k4))))
        ratio = torch.where(r > 1e-12, theta_d / r.clamp_min(1e-12), torch.ones_like(r))
        return x * ratio, y * ratio
    k1, k2, p1, p2, k3, k4, k5, k6 = c
    radial = (1 + r2 * (k1 + r2 * (k2 + r2 * k3))) / (1 + r2 * (k4 + r2 * (k5 + r2 * k6)))
    xd = x * radial + 2 * p1 * x * y + p2 * (r2 + 2 * x * x)
    yd = y * radial + p1 * (r2 + 2 * y * y) + 2 * p2 * x * y
    return xd, yd


def _undistort_equidistant(
    xd: torch.Tensor, yd: torch.Tensor, c: tuple[float, ...], iterations: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit rays of a fisheye: invert theta_d(theta) per pixel (1-D Newton, monotone model)."""
    k1, k2, k3, k4 = c
    theta_d = torch.sqrt(xd * xd + yd * yd)
    theta = theta_d.clone()
    for _ in range(iterations):
        t2 = theta * theta
        f = theta * (1 + t2 * (k1 + t2 * (k2 + t2 * (k3 + t2 * k4)))) - theta_d
        df = 1 + t2 * (3 * k1 + t2 * (5 * k2 + t2 * (7 * k3 + t2 * 9 * k4)))
        theta = (theta - f / torch.where(df.abs() > 1e-12, df, torch.full_like(df, 1e-12))).clamp(0, np.pi)
    t2 = theta * theta
    residual = (theta * (1 + t2 * (k1 + t2 * (k2 + t2 * (k3 + t2 * k4)))) - theta_d).abs()
    df = 1 + t2 * (3 * k1 + t2 * (5 * k2 + t2 * (7 * k3 + t2 * 9 * k4)))
    scale = torch.where(theta_d > 1e-12, torch.sin(theta) / theta_d.clamp_min(1e-12), torch.ones_like(theta))
    rays = torch.stack([xd * scale, yd * scale, torch.cos(theta)], dim=-1)
    # In front of the camera (z-depth defined) and on the monotone branch of theta_d(theta).
    ok = (df > 0) & (theta < np.pi / 2 - 1e-3)
    return rays, ok & (residual < 1e-9)


def _jacobian(x: torch.Tensor, y: torch.Tensor, model: str, D: np.ndarray, h: float = 1e-7):
    """Central-difference Jacobian entries (dxd/dx, dxd/dy, dyd/dx, dyd/dy) of :func:`distort`."""
    xp, yp = distort(x + h, y, model, D)
    xm, ym = distort(x - h, y, model, D)
    a, c = (xp - xm) / (2 * h), (yp - ym) / (2 * h)
    xp, yp = distort(x, y + h, model, D)
    xm, ym = distort(x, y - h, model, D)
    b, d = (xp - xm) / (2 * h), (yp - ym) / (2 * h)
    return a, b, c, d


def _undistort_radtan(
    xd: torch.Tensor, yd: torch.Tensor, model: str, D: np.ndarray, iterations: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plane rays of a radial-tangential camera: damped 2-D Newton on the still-moving pixels."""
    shape = xd.shape
    xd, yd = xd.reshape(-1), yd.reshape(-1)
    x, y = xd.clone(), yd.clone()
    active = torch.arange(x.numel(), device=x.device)
    for _ in range(iterations):
        if active.numel() == 0:
            break
        xa, ya = x[active], y[active]
        fx, fy = distort(xa, ya, model, D)
        ex, ey = fx - xd[active], fy - yd[active]
        a, b, c, d = _jacobian(xa, ya, model, D)
        det = a * d - b * c
        det = torch.where(det.abs() > 1e-12, det, torch.full_like(det, 1e-12))
        dx = (d * ex - b * ey) / det
        dy = (a * ey - c * ex) / det
        # Damped step: never jump further than the current radius, which keeps the iteration
        # on the branch that contains the principal point.
        step = torch.sqrt(dx * dx + dy * dy)
        limit = 0.5 * (1 + torch.sqrt(xa * xa + ya * ya))
        damp = torch.where(step > limit, limit / step.clamp_min(1e-300), torch.ones_like(step))
        x[active], y[active] = xa - damp * dx, ya - damp * dy
        active = active[(damp * step) > 1e-15]
    # Jacobian determinant > 0 keeps pixels inside the fold of the radial polynomial.
    a, b, c, d = _jacobian(x, y, model, D)
    ok = (a * d - b * c) > 0
    rays = torch.stack([x, y, torch.ones_like(x)], dim=-1)
    return rays.reshape(*shape, 3), ok.reshape(shape)


def pixel_rays(
    camera: CameraModel, u: torch.Tensor, v: torch.Tensor, iterations: int = 20
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit camera-frame rays (..., 3) float64 of pixel coordinates ``u, v`` and their validity.

    Pixel coordinates follow OpenCV (integer = pixel centre). ``valid`` is False where the
    distortion model cannot be inverted (forward-projection error above ``RAY_TOLERANCE_PX``)
    or the ray does not point in front of the camera; those rays are still finite.
    """
    u = torch.as_tensor(u, dtype=torch.float64)
    v = torch.as_tensor(v, dtype=torch.float64, device=u.device)
    Kinv = torch.as_tensor(np.linalg.inv(camera.K), dtype=torch.float64, device=u.device)
    xd = Kinv[0, 0] * u + Kinv[0, 1] * v + Kinv[0, 2]
    yd = Kinv[1, 0] * u + Kinv[1, 1] * v + Kinv[1, 2]
    if camera.is_pinhole:
        rays = torch.stack([xd, yd, torch.ones_like(xd)], dim=-1)
        valid = torch.ones_like(xd, dtype=torch.bool)
    else:
        model = camera.distortion_model
        if model == "equidistant":
            rays, valid = _undistort_equidistant(xd, yd, _coefficients(model, camera.D), iterations)
        else:
            rays, valid = _undistort_radtan(xd, yd, model, camera.D, iterations)
        # Forward-project the solution and compare in pixels: the only trustworthy validity test.
        z = rays[..., 2]
        zs = torch.where(z > 1e-9, z, torch.ones_like(z))
        px, py = distort(rays[..., 0] / zs, rays[..., 1] / zs, model, camera.D)
        K = camera.K.tolist()  # Python floats: see _coefficients
        err_u = (K[0][0] * px + K[0][1] * py + K[0][2]) - u
        err_v = (K[1][1] * py + K[1][2]) - v
        err = torch.sqrt(err_u * err_u + err_v * err_v)
        finite = torch.isfinite(rays).all(-1) & (torch.linalg.norm(rays, dim=-1) > 0)
        valid = valid & finite & (z > 1e-9) & (err < RAY_TOLERANCE_PX)
        # Invalid pixels keep a finite stand-in (the optical axis) so no NaN reaches a network.
        rays = torch.where(finite[..., None], rays, rays.new_tensor([0.0, 0.0, 1.0]))
    rays = rays / torch.linalg.norm(rays, dim=-1, keepdim=True)
    return rays, valid


def grid_rays(camera: CameraModel, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(H, W, 3) unit rays and (H, W) validity for every pixel of the camera's own image."""
    v, u = torch.meshgrid(
        torch.arange(camera.height, dtype=torch.float64),
        torch.arange(camera.width, dtype=torch.float64),
        indexing="ij",
    )
    rays, valid = pixel_rays(camera, u, v)
    return rays.to(device), valid.to(device)


#: Ray grids kept by :func:`plane_rays` (a handful of cameras x strides x devices).
_CACHE_SIZE = 32
_cache: OrderedDict[tuple, tuple[torch.Tensor, torch.Tensor, float]] = OrderedDict()
_cache_lock = threading.Lock()


def _model_key(camera: CameraModel) -> tuple:
    D = () if camera.is_pinhole else tuple(np.asarray(camera.D, dtype=np.float64).reshape(-1).tolist())
    return camera.width, camera.height, camera.K.tobytes(), camera.distortion_model if D else "", D


def _plane_grid(camera: CameraModel, stride: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Rays with z = 1 (float32, CPU), validity and the largest valid squared radius on the z = 1 plane."""
    v, u = torch.meshgrid(
        torch.arange(0, camera.height, stride, dtype=torch.float64),
        torch.arange(0, camera.width, stride, dtype=torch.float64),
        indexing="ij",
    )
    if camera.is_pinhole:
        Kinv = np.linalg.inv(camera.K).tolist()
        x = Kinv[0][0] * u + Kinv[0][1] * v + Kinv[0][2]
        y = Kinv[1][0] * u + Kinv[1][1] * v + Kinv[1][2]
        return torch.stack([x, y, torch.ones_like(x)], -1).float(), torch.ones_like(x, dtype=torch.bool), float("inf")
    unit, valid = pixel_rays(camera, u, v)
    z = unit[..., 2:3]
    valid = valid & (z[..., 0] > 1e-6)
    rays = torch.where(valid[..., None], unit / z.clamp_min(1e-6), torch.zeros_like(unit))
    rays[..., 2] = 1.0
    # The whole image's reach on the z = 1 plane: a projection beyond it would fold back onto the image.
    r2 = rays[..., 0] ** 2 + rays[..., 1] ** 2
    r2_max = float(r2[valid].max()) if bool(valid.any()) else 0.0
    return rays.float(), valid, r2_max


def plane_rays(camera: CameraModel, device: torch.device | str = "cpu", stride: int = 1
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(h, w, 3) float32 rays scaled to z = 1 and (h, w) validity for every ``stride``-th pixel of ``camera``.

    A z-depth d at a pixel is the camera-frame point ``ray * d``, distortion included. Cached per
    camera model, stride and device (the Newton inversion of a distorted model runs once), so a
    pinhole camera costs a lookup and a distorted one no more after its first image.
    """
    rays, valid, _ = _cached(camera, torch.device(device), stride)
    return rays, valid


def _cached(camera: CameraModel, device: torch.device, stride: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    key = (*_model_key(camera), stride, str(device))
    with _cache_lock:
        hit = _cache.get(key)
        if hit is not None:
            _cache.move_to_end(key)
            return hit
    rays, valid, r2_max = _plane_grid(camera, stride)
    entry = (rays.to(device), valid.to(device), r2_max)
    with _cache_lock:
        _cache[key] = entry
        while len(_cache) > _CACHE_SIZE:
            _cache.popitem(last=False)
    return entry


def image_reach(camera: CameraModel) -> float:
    """Largest squared radius on the z = 1 plane of a valid pixel of ``camera`` (inf for a pinhole)."""
    return _cached(camera, torch.device("cpu"), 1)[2]


def project(points: torch.Tensor, camera: CameraModel) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pixel coordinates (u, v) of camera-frame ``points`` (..., 3) through the camera's distortion, and
    whether each lands in front of the camera within the image's reach.

    Outside the reach of the image (the z = 1 radius of its farthest valid pixel) a radial polynomial
    folds back, which would put a point behind the image's edge onto a pixel inside it: those points
    are marked not ok. ``u, v`` are float32 pixel coordinates (integer = pixel centre); the caller
    checks the image bounds.
    """
    z = points[..., 2]
    zs = z.clamp_min(1e-6)
    x, y = points[..., 0] / zs, points[..., 1] / zs
    ok = z > 1e-6
    if not camera.is_pinhole:
        ok = ok & (x * x + y * y <= image_reach(camera) * 1.0001)
        x, y = distort(x, y, camera.distortion_model, camera.D)
    K = camera.K.tolist()
    return K[0][0] * x + K[0][1] * y + K[0][2], K[1][1] * y + K[1][2], ok
