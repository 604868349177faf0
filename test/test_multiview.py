"""The window's views stacked for placement: coarse grids, their intrinsics and surface normals."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation
from scipy.stats import chi2

from mapany_ros.core.backends.base import ViewPrediction
from mapany_ros.core.camera_rays import plane_rays
from mapany_ros.core.frames import CameraModel, Frame
from mapany_ros.core.geometry import invert, make_pose, rotation_angle, transform_points
from mapany_ros.core.placement.multiview import MAX_WIDTH, ViewStack
from mapany_ros.core.placement.refine import RigLink, refine_window_poses, rig_links
from mapany_ros.core.placement.view_check import agreement_matrix, inconsistent_views
from mapany_ros.sim.scene import SyntheticScene, render_depth

pytestmark = pytest.mark.usefixtures("one_torch_thread")


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
    # The hole (rows 200-260, columns 300-380 at full size) and a ring around it are not trusted:
    # its rim is dropped as a depth edge (where flying pixels are), its normals one pixel further.
    assert not stack.ok[0, 49:66, 74:96].any() and stack.ok[0, 48, 73] and stack.ok[0, 66, 96]
    assert not stack.N_ok[0, 49:66, 74:96].any()


# --------------------------------------------------------------------------- distorted cameras

#: A view that had to move beyond this (chi-square, 6 dof, 99.9 %) to agree would be rejected by placement.
CHI2_REJECT = chi2.ppf(0.999, 6)


def scene_views(camera: CameraModel, times: list[float]) -> tuple[list[ViewPrediction], list[np.ndarray]]:
    """Exact views of the seed-0 room through ``camera`` (distortion included) and their true poses."""
    scene = SyntheticScene(0)
    rays, _ = plane_rays(camera)
    views, poses = [], []
    for t in times:
        T = scene.camera_pose(t)
        d = torch.as_tensor(render_depth(scene, T, camera))
        Pw = transform_points(rays * d[..., None], T)
        views.append(ViewPrediction(d, torch.ones_like(d), torch.isfinite(d), Pw,
                                    torch.zeros(*d.shape, 3, dtype=torch.uint8), T, camera.K, camera))
        poses.append(T)
    return views, poses


@pytest.mark.parametrize("model, D", [("plumb_bob", [-0.3, 0.08, 0.0, 0.0, 0.0]), ("equidistant", [-0.05, 0.01, 0, 0])])
def test_distorted_views_agree_and_refine_like_pinhole_ones(model: str, D: list[float]) -> None:
    """Projection goes through the distortion: exact distorted views agree with each other, and a
    perturbed one is refined back as a pinhole camera's would be. Read through their pinhole K,
    the same views disagree by decimetres."""
    K = np.array([[160.0, 0, 159.5], [0, 160.0, 119.5], [0, 0, 1]])  # 90 degrees across
    camera = CameraModel(320, 240, K, model, np.array(D))
    views, truth = scene_views(camera, [3.0 + 0.4 * i for i in range(5)])
    best = {}
    for label, vs in (("model", views), ("pinhole K", [dataclasses.replace(v, camera=None) for v in views])):
        stack = ViewStack(vs, range(5), 1000, normals=True)
        best[label] = np.nanmax(agreement_matrix(stack, stack.T0, tolerance=0.02), axis=1)
    assert best["model"].min() > 0.95 and best["pinhole K"].max() < 0.7, best
    stack = ViewStack(views, range(5), 1000, normals=True)
    assert inconsistent_views(stack, 0.85, tolerance=0.08) == []

    off = make_pose(Rotation.from_rotvec(np.radians(1.0) * np.array([0.3, 0.8, -0.5])).as_matrix(), [0.03, -0.02, 0.02])
    moved = list(views)
    moved[2] = dataclasses.replace(views[2], T_world_camera=truth[2] @ off)
    stack = ViewStack(moved, range(5), 1000, normals=True)
    ref = refine_window_poses(moved, stack, range(5), prior_sigma_m=0.05, prior_sigma_rad=np.radians(1.0))
    assert max(ref.correction_chi2.values()) < CHI2_REJECT, ref.correction_chi2
    for i in range(1, 5):  # every pose relative to the first, against the truth
        rel = invert(invert(ref.views[0].T_world_camera) @ ref.views[i].T_world_camera) @ invert(truth[0]) @ truth[i]
        err_m, err_deg = np.linalg.norm(rel[:3, 3]), np.degrees(rotation_angle(rel))
        if i == 2:  # started 4.1 cm and 1 degree off, held by its prior
            assert err_m < 0.015 and err_deg < 0.8, (i, err_m, err_deg)
        else:
            assert err_m < 0.006 and err_deg < 0.15, (i, err_m, err_deg)


def test_a_thinned_association_is_the_full_one_on_every_other_sample() -> None:
    """Refinement's cheaper middle steps read every second sample: the same projections and the
    same surfaces there. A sample that falls outside the other view (or behind it) is never seen."""
    camera = CameraModel(160, 120, np.array([[80.0, 0, 79.5], [0, 80.0, 59.5], [0, 0, 1]]), "plumb_bob", np.zeros(5))
    views, _ = scene_views(camera, [3.0 + 0.5 * i for i in range(4)])
    stack = ViewStack(views, range(4), 1000, normals=True)
    T = stack.T0.copy()
    T[1, :3, 3] += 0.02
    full, half = stack.associate(T), stack.associate(T, every=2)
    for name in ("Y", "Qz", "plane", "normal", "seen", "planar", "p"):
        torch.testing.assert_close(getattr(half, name), getattr(full, name)[..., ::2], msg=name)
    K = stack.K[stack.J].float()
    z = full.Y[:, 2]
    u = (K[:, 0, 0, None] * full.Y[:, 0] / z + K[:, 0, 2, None]).round()
    v = (K[:, 1, 1, None] * full.Y[:, 1] / z + K[:, 1, 2, None]).round()
    inside = (z > 0) & (u >= 0) & (u <= stack.W - 1) & (v >= 0) & (v <= stack.H - 1)
    assert (stack.W, stack.H) == (160, 120)
    assert full.seen.sum() > 0.5 * full.seen.numel() and (~inside).sum() > 1000
    assert not (full.seen & ~inside).any()


def _views_at(scene: SyntheticScene, camera: CameraModel, poses: list[np.ndarray]) -> list[ViewPrediction]:
    rays, _ = plane_rays(camera)
    out = []
    for T in poses:
        d = torch.as_tensor(render_depth(scene, T, camera))
        out.append(ViewPrediction(d, torch.ones_like(d), torch.isfinite(d), transform_points(rays * d[..., None], T),
                                  torch.zeros(*d.shape, 3, dtype=torch.uint8), T, camera.K, camera))
    return out


@pytest.mark.parametrize("linked", [True, False])
def test_a_rig_link_holds_cameras_that_see_nothing_in_common(linked: bool) -> None:
    """A front and a back camera, two keyframes: each camera's pair of views agrees with itself,
    but nothing ties the two cameras together except their extrinsics. Given 8 cm and 2 degrees
    between them that are not there, and poses held only loosely (as for a model that leans on
    its priors), the rig link brings the back camera back onto the front one's geometry; without
    it the error stays (the depth cannot see it)."""
    scene = SyntheticScene(0)
    K = np.array([[80.0, 0, 79.5], [0, 80.0, 59.5], [0, 0, 1]])
    camera = CameraModel(160, 120, K, "plumb_bob", np.zeros(5))
    T_front_back = make_pose(Rotation.from_euler("y", 180, degrees=True).as_matrix(), [0.05, 0.0, -0.3])
    front = [scene.camera_pose(t) for t in (3.0, 3.4)]
    truth = front + [T @ T_front_back for T in front]
    views = _views_at(scene, camera, truth)
    off = make_pose(Rotation.from_rotvec(np.radians(2.0) * np.array([0.2, 0.9, 0.3])).as_matrix(), [0.06, 0.02, -0.05])
    moved = views[:2] + [dataclasses.replace(v, T_world_camera=off @ v.T_world_camera) for v in views[2:]]
    links = [RigLink(a, a + 2, T_front_back, 0.005, np.radians(0.3)) for a in range(2)] if linked else []
    stack = ViewStack(moved, range(4), 1000, normals=True)
    ref = refine_window_poses(moved, stack, range(4), prior_sigma_m=0.2, prior_sigma_rad=np.radians(4.0), links=links)
    errors = []
    for i in (1, 2, 3):  # every pose relative to the first, against the truth
        rel = invert(invert(ref.views[0].T_world_camera) @ ref.views[i].T_world_camera) @ invert(truth[0]) @ truth[i]
        errors.append((np.linalg.norm(rel[:3, 3]), np.degrees(rotation_angle(rel))))
    assert errors[0][0] < 0.01 and errors[0][1] < 0.2, errors  # the front camera's own pair
    if linked:
        assert all(m < 0.015 and deg < 0.3 for m, deg in errors), errors
    else:
        assert all(m > 0.05 and deg > 1.5 for m, deg in errors[1:]), errors


def test_rig_links_take_the_base_motion_between_stamps_from_odometry_or_allow_for_it() -> None:
    """Each camera of a group is linked to the group's first: with odometry at both stamps the
    link is the odometry's motion composed with the extrinsics, without it the extrinsics alone,
    with the motion a fast robot could make between the stamps in the sigmas. A camera without an
    extrinsic, or the same camera twice, gives no link."""
    cam = CameraModel(8, 6, np.array([[8.0, 0, 3.5], [0, 8.0, 2.5], [0, 0, 1]]), "plumb_bob", np.zeros(5))
    image = np.zeros((6, 8, 3), np.uint8)
    E_front, E_left = make_pose(np.eye(3), [0.2, 0.0, 0.0]), make_pose(Rotation.from_euler("z", 90, degrees=True)
                                                                        .as_matrix(), [0.0, 0.3, 0.0])
    B0 = make_pose(np.eye(3), [1.0, 2.0, 0.0])
    B1 = make_pose(Rotation.from_euler("z", 3, degrees=True).as_matrix(), [1.02, 2.0, 0.0])  # 20 ms later

    def frame(name, stamp, E, B):
        odo = dict(T_world_base=B, T_world_camera=B @ E) if B is not None else {}
        return Frame(image, stamp, name, name, cam, T_base_camera=E, **odo)

    with_odometry = rig_links([[frame("front", 0, E_front, B0), frame("left", 20_000_000, E_left, B1)]])
    without = rig_links([[frame("front", 0, E_front, None), frame("left", 20_000_000, E_left, None)],
                         [frame("front", 10**8, E_front, None), frame("front", 10**8, E_front, None)],
                         [frame("front", 2 * 10**8, E_front, None), frame("left", 2 * 10**8, None, None)]])
    (a,) = with_odometry
    assert (a.a, a.b) == (0, 1)
    np.testing.assert_allclose(a.T_ab, invert(B0 @ E_front) @ B1 @ E_left, atol=1e-12)
    assert a.sigma_m < 0.02 and a.sigma_rad < np.radians(0.5)
    (b,) = without
    np.testing.assert_allclose(b.T_ab, invert(E_front) @ E_left, atol=1e-12)
    assert b.sigma_m >= 0.04 and b.sigma_rad >= 0.03  # 20 ms at up to 2 m/s and 1.5 rad/s
