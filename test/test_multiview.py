"""The window's views stacked for placement: coarse grids, their intrinsics and surface normals."""

from __future__ import annotations

import numpy as np
import torch
from scipy.spatial.transform import Rotation

from mapany_ros.core.backends.base import ViewPrediction
from mapany_ros.core.geometry import make_pose
from mapany_ros.core.placement.multiview import MAX_WIDTH, ViewStack


def plane_view(width: int, height: int, T_world_camera: np.ndarray, normal_cam: np.ndarray, distance: float,
               hole: tuple[slice, slice] | None = None) -> tuple[ViewPrediction, np.ndarray]:
    """A camera looking at the plane n . X = -distance (camera frame); returns the view and K."""
    f = 0.8 * width
    K = np.array([[f, 0, (width - 1) / 2], [0, f, (height - 1) / 2], [0, 0, 1]])
    v, u = np.mgrid[0:height, 0:width].astype(np.float64)
    rays = np.stack([(u - K[0, 2]) / f, (v - K[1, 2]) / f, np.ones_like(u)], -1)
    depth = -distance / (rays @ normal_cam)
    X = rays * depth[..., None]
    Xw = X @ T_world_camera[:3, :3].T + T_world_camera[:3, 3]
    valid = np.ones((height, width), bool)
    if hole is not None:
        valid[hole] = False
    d = torch.tensor(np.where(valid, depth, np.nan), dtype=torch.float32)
    view = ViewPrediction(depth=d, confidence=torch.ones_like(d), valid=torch.tensor(valid),
                          points_world=torch.tensor(Xw, dtype=torch.float32),
                          colors=torch.zeros(height, width, 3, dtype=torch.uint8), T_world_camera=T_world_camera, K=K)
    return view, K


def test_coarse_grids_keep_points_on_their_pixels_and_normals_on_the_plane():
    n_cam = np.array([0.3, -0.2, -1.0])
    n_cam /= np.linalg.norm(n_cam)  # facing the camera
    T_a = make_pose(Rotation.from_euler("xyz", [10, -20, 35], degrees=True).as_matrix(), [4.0, -2.0, 1.5])
    T_b = make_pose(Rotation.from_euler("xyz", [-5, 15, 80], degrees=True).as_matrix(), [-1.0, 3.0, 0.2])
    big, _ = plane_view(4 * MAX_WIDTH - 3, 3 * MAX_WIDTH, T_a, n_cam, 3.0, hole=(slice(200, 260), slice(300, 380)))
    small, K_small = plane_view(MAX_WIDTH - 10, 100, T_b, n_cam, 2.0)
    stack = ViewStack([big, small], [0, 1], samples=500, normals=True)

    assert (stack.H, stack.W) == (120, 159)  # the big view pooled 4x4 (its partial last column dropped)
    np.testing.assert_allclose(stack.K[1].numpy(), K_small)  # already narrow enough: unchanged
    for a, (h, w) in enumerate([(120, 159), (100, MAX_WIDTH - 10)]):
        ok, P, K = stack.ok[a, :h, :w], stack.P[a, :h, :w].double(), stack.K[a]
        assert not stack.ok[a, h:].any() and not stack.ok[a, :, w:].any()  # padding is invalid
        # Every coarse point projects onto its own coarse pixel with the coarse K.
        v, u = torch.nonzero(ok, as_tuple=True)
        p = P[v, u]
        assert torch.all((K[0, 0] * p[:, 0] / p[:, 2] + K[0, 2] - u).abs() < 0.05)
        assert torch.all((K[1, 1] * p[:, 1] / p[:, 2] + K[1, 2] - v).abs() < 0.05)
        # and lies on the plane, in the view's own camera frame.
        distance = 3.0 if a == 0 else 2.0
        assert torch.all((p @ torch.tensor(n_cam) + distance).abs() < 1e-3)
        # Normals are trustworthy inside, face the camera and are the plane's.
        good = stack.N_ok[a, :h, :w]
        assert good.float().mean() > 0.85
        assert torch.all(stack.N[a, :h, :w][good].double() @ torch.tensor(n_cam) > np.cos(np.radians(0.5)))
    # The hole (rows 200-260, columns 300-380 at full size) and a ring around it are not trusted.
    assert not stack.ok[0, 50:65, 75:95].any() and stack.ok[0, 49, 74] and stack.ok[0, 65, 95]
    assert not stack.N_ok[0, 49:66, 74:96].any()
