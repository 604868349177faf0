"""Depth metrics: known answers on hand-made maps, numpy and torch alike."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mapany_ros.core.geometry import make_pose
from mapany_ros.scoring.metrics import (
    DepthErrors,
    depth_errors,
    downsample_depth,
    gt_points,
    pixel_point_errors,
    surface_distances,
)


def plane_depth(K: np.ndarray, h: int, w: int, n: np.ndarray, d: float) -> np.ndarray:
    """z-depth of the camera-frame plane n . X = d at every pixel centre of K."""
    v, u = np.mgrid[0:h, 0:w].astype(np.float64)
    rays = np.stack([u, v, np.ones_like(u)], -1) @ np.linalg.inv(K).T
    return d / (rays @ n)


def K_for(w: int, h: int, f: float) -> np.ndarray:
    return np.array([[f, 0.0, (w - 1) / 2], [0.0, f, (h - 1) / 2], [0.0, 0.0, 1.0]])


def test_depth_errors_known_values() -> None:
    gt = np.full((4, 5), 2.0)
    pred = gt.copy()
    pred[0, :] = 2.4  # 20 % off on 5 pixels
    pred[1, :2] = 2.1  # 5 % off on 2 pixels
    valid = np.ones_like(gt, dtype=bool)
    valid[3] = False  # 5 pixels not predicted
    e = depth_errors(pred, valid, gt)
    assert isinstance(e, DepthErrors)
    assert e.n_compared == 15 and e.n_pixels == 20
    assert e.valid_fraction == pytest.approx(0.75)
    assert e.within_10pct == pytest.approx(10 / 15)
    assert e.median_abs_rel == pytest.approx(0.0)
    assert e.mean_abs_rel == pytest.approx((5 * 0.2 + 2 * 0.05) / 15)
    assert "within10" in str(e)


def test_depth_errors_skip_missing_ground_truth_and_accept_torch() -> None:
    gt = np.full((3, 3), 4.0)
    gt[0, 0] = np.nan
    gt[0, 1] = 0.0
    pred = torch.full((3, 3), 4.4)
    pred[2, 2] = float("nan")  # NaN prediction counts as invalid even if the mask says valid
    e = depth_errors(pred, torch.ones(3, 3, dtype=torch.bool), torch.as_tensor(gt))
    assert e.n_compared == 6
    assert e.valid_fraction == pytest.approx(8 / 9)
    assert e.median_abs_rel == pytest.approx(0.1, rel=1e-6)
    assert e.within_10pct == pytest.approx(0.0)  # exactly 10 % is not within
    none = depth_errors(np.full((2, 2), np.nan), None, np.ones((2, 2)))
    assert none.n_compared == 0 and np.isnan(none.median_abs_rel) and none.valid_fraction == 0.0
    with pytest.raises(ValueError, match="downsample_depth"):
        depth_errors(np.ones((2, 2)), None, np.ones((4, 4)))


def test_harmonic_downsample_is_exact_on_planes() -> None:
    """1/z is affine on a plane, so 2x2 inverse-depth means give the depth at the block centre."""
    Kf, Kh = K_for(64, 48, 50.0), K_for(32, 24, 25.0)
    n = np.array([0.1, -0.6, 0.8])
    full = plane_depth(Kf, 48, 64, n, 1.5)
    half = plane_depth(Kh, 24, 32, n, 1.5)
    assert np.all(full > 0)
    np.testing.assert_allclose(downsample_depth(full, 32, 24), half, rtol=1e-5)
    np.testing.assert_allclose(downsample_depth(torch.as_tensor(full), 32, 24), half, rtol=1e-5)
    # Nearest picks one of the four pixels: close, not exact.
    near = downsample_depth(full, 32, 24, mode="nearest")
    assert 1e-4 < np.max(np.abs(near / half - 1)) < 0.05
    same = downsample_depth(full, 64, 48)
    np.testing.assert_array_equal(same, full.astype(np.float32))


def test_downsample_marks_depth_edges_and_holes() -> None:
    d = np.full((8, 8), 2.0)
    d[:, 5:] = 4.0  # an edge inside the block of columns 4..5
    d[0, 0] = np.nan
    out = downsample_depth(d, 4, 4)
    assert np.isnan(out[0, 0])  # hole
    assert np.all(np.isnan(out[:, 2]))  # block spanning the edge
    np.testing.assert_allclose(out[1:, :2], 2.0)
    np.testing.assert_allclose(out[:, 3], 4.0)
    mn = downsample_depth(d, 4, 4, mode="min")
    np.testing.assert_allclose(mn[1:, 2], 2.0)  # nearest surface wins
    assert np.isnan(mn[0, 0])
    with pytest.raises(ValueError, match="mode"):
        downsample_depth(d, 4, 4, mode="mean")


def test_point_errors_measure_metres_along_the_ray() -> None:
    K = K_for(16, 12, 20.0)
    T = make_pose(np.eye(3), [1.0, 2.0, 3.0])
    gt = np.full((12, 16), 3.0)
    pts = gt_points(gt, K, T)
    np.testing.assert_allclose(pts[6, 7] - T[:3, 3], [3.0 * (7 - 7.5) / 20, 3.0 * (6 - 5.5) / 20, 3.0])
    valid = np.ones((12, 16), dtype=bool)
    np.testing.assert_allclose(pixel_point_errors(pts, valid, gt, K, T), 0.0, atol=1e-12)
    far = gt_points(gt * 1.1, K, T)
    err = pixel_point_errors(torch.as_tensor(far), torch.as_tensor(valid), gt, K, T)
    ray_len = np.linalg.norm((pts - T[:3, 3]).reshape(-1, 3), axis=1) / 3.0
    np.testing.assert_allclose(err, 0.3 * ray_len)
    valid[:6] = False
    assert len(pixel_point_errors(far, valid, gt, K, T)) == 6 * 16


def test_surface_distances_to_a_sampled_plane() -> None:
    xs, ys = np.meshgrid(np.linspace(-1, 1, 201), np.linspace(-1, 1, 201))
    plane = np.stack([xs, ys, np.zeros_like(xs)], -1)
    rng = np.random.default_rng(0)
    pts = np.concatenate([rng.uniform(-0.5, 0.5, (100, 2)), np.full((100, 1), 0.03)], axis=1)
    d = surface_distances(pts, plane)
    np.testing.assert_allclose(d, 0.03, atol=0.006)  # within half the 1 cm sample spacing
    with_nan = np.concatenate([pts, np.full((5, 3), np.nan)])
    assert len(surface_distances(with_nan, plane)) == 100
    assert len(surface_distances(np.full((3, 3), np.nan), plane)) == 0
    with pytest.raises(ValueError):
        surface_distances(pts, np.full((4, 3), np.nan))
