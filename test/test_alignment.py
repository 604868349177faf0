"""Re-anchoring maths: which transform each prior configuration yields, and that it is the right one."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from mapany_ros.core.alignment import Sim3, align_window, mean_rotation, orthonormalize, rigidify
from mapany_ros.core.geometry import invert, is_rigid, make_pose


def random_pose(rng: np.random.Generator, spread: float = 2.0) -> np.ndarray:
    return make_pose(
        Rotation.random(random_state=int(rng.integers(1 << 31))).as_matrix(), rng.normal(size=3) * spread
    )


def random_sim3(rng: np.random.Generator, scale: float) -> Sim3:
    return Sim3(
        Rotation.random(random_state=int(rng.integers(1 << 31))).as_matrix(), rng.normal(size=3) * 5, scale
    )


def predicted_from_world(world: list[np.ndarray], world_from_pred: Sim3) -> list[np.ndarray]:
    """Poses as a model would report them in its own frame, given the true world->pred map."""
    inv = Sim3(
        world_from_pred.R.T,
        -world_from_pred.R.T @ world_from_pred.t / world_from_pred.scale,
        1.0 / world_from_pred.scale,
    )
    return [inv.apply_pose(T) for T in world]


def test_orthonormalize_and_rigidify_repair_noisy_rotations():
    rng = np.random.default_rng(0)
    R = Rotation.random(random_state=1).as_matrix()
    noisy = R + rng.normal(scale=1e-3, size=(3, 3))
    Rn = orthonormalize(noisy)
    assert np.allclose(Rn @ Rn.T, np.eye(3), atol=1e-12) and np.isclose(np.linalg.det(Rn), 1.0)
    assert np.allclose(Rn, R, atol=5e-3)
    T = make_pose(noisy, [1, 2, 3])
    T[3] = [1e-4, 0, 0, 1.001]
    assert is_rigid(rigidify(T), tol=1e-9) and np.allclose(rigidify(T)[:3, 3], [1, 2, 3])


def test_mean_rotation_of_identical_rotations_is_that_rotation():
    R = Rotation.from_euler("xyz", [0.3, -0.2, 1.0]).as_matrix()
    assert np.allclose(mean_rotation([R, R, R]), R, atol=1e-12)


def test_sim3_apply_pose_matches_matrix_form():
    rng = np.random.default_rng(1)
    sim = random_sim3(rng, 1.7)
    T = random_pose(rng)
    out = sim.apply_pose(T)
    assert is_rigid(out)
    assert np.allclose(out[:3, 3], sim.apply_points(T[:3, 3]))
    assert np.allclose(out[:3, :3], sim.R @ T[:3, :3])
    X = rng.normal(size=(5, 3))
    Xh = np.c_[X, np.ones(5)] @ sim.matrix().T
    assert np.allclose(Xh[:, :3], sim.apply_points(X))


@pytest.mark.parametrize("scale", [0.5, 1.0, 2.3])
def test_umeyama_recovers_sim3_from_spread_centres(scale):
    rng = np.random.default_rng(2)
    world = [random_pose(rng) for _ in range(5)]
    truth = random_sim3(rng, scale)
    pred = predicted_from_world(world, truth)
    al = align_window(pred, world)
    assert al.method == "umeyama" and al.num_anchors == 5
    assert al.residual_m < 1e-9 and al.rotation_residual_rad < 1e-7
    assert np.isclose(al.transform.scale, scale)
    for Tp, Tw in zip(pred, world, strict=True):
        assert np.allclose(al.transform.apply_pose(Tp), Tw, atol=1e-9)


def test_collinear_centres_take_rotation_from_orientations():
    rng = np.random.default_rng(3)
    R = Rotation.from_euler("z", 0.4).as_matrix()
    world = [make_pose(R, [x, 0.0, 0.0]) for x in (0.0, 1.0, 2.0, 3.0)]
    truth = random_sim3(rng, 1.4)
    pred = predicted_from_world(world, truth)
    al = align_window(pred, world)
    assert al.method == "rotation_mean"  # Umeyama cannot see the roll about the line
    assert np.isclose(al.transform.scale, 1.4)
    for Tp, Tw in zip(pred, world, strict=True):
        assert np.allclose(al.transform.apply_pose(Tp), Tw, atol=1e-9)


def test_two_views_fix_scale_from_their_baseline():
    rng = np.random.default_rng(4)
    world = [random_pose(rng), random_pose(rng)]
    truth = random_sim3(rng, 0.7)
    pred = predicted_from_world(world, truth)
    al = align_window(pred, [world[0], world[1]])
    assert np.isclose(al.transform.scale, 0.7)
    assert np.allclose(al.transform.apply_pose(pred[1]), world[1], atol=1e-9)


def test_single_prior_is_the_view_anchor():
    rng = np.random.default_rng(5)
    world = [random_pose(rng) for _ in range(3)]
    pred = [random_pose(rng) for _ in range(3)]
    al = align_window(pred, [None, world[1], None])
    assert al.method == "anchor" and al.transform.scale == 1.0 and al.residual_m < 1e-12
    expected = world[1] @ invert(pred[1])  # T_world_pred = T_prior * inv(T_pred)
    assert np.allclose(al.transform.matrix(), expected, atol=1e-9)


def test_scale_hint_applies_only_where_centres_cannot_fix_scale():
    rng = np.random.default_rng(9)
    world = [random_pose(rng) for _ in range(4)]
    pred = predicted_from_world(world, random_sim3(rng, 1.8))
    one = align_window(pred, [world[0], None, None, None], scale_hint=1.8)
    assert one.transform.scale == 1.8 and np.allclose(one.transform.apply_pose(pred[2]), world[2], atol=1e-9)
    many = align_window(pred, world, scale_hint=5.0)
    assert np.isclose(many.transform.scale, 1.8)


def test_small_baseline_keeps_model_scale():
    rng = np.random.default_rng(6)
    world = [make_pose(np.eye(3), rng.normal(size=3) * 0.005) for _ in range(4)]
    truth = random_sim3(rng, 1.0)
    pred = predicted_from_world(world, truth)
    pred = [make_pose(T[:3, :3], T[:3, 3] * 3.0) for T in pred]  # scale noise in a tiny spread
    al = align_window(pred, world, min_baseline_m=0.05)
    assert al.transform.scale == 1.0 and al.method == "rotation_mean"


def test_without_scale_fit_the_transform_is_rigid():
    rng = np.random.default_rng(7)
    world = [random_pose(rng) for _ in range(4)]
    pred = predicted_from_world(world, random_sim3(rng, 2.0))
    al = align_window(pred, world, with_scale=False)
    assert al.transform.scale == 1.0 and al.residual_m > 0.5


def test_no_targets_is_identity_and_bad_prior_shows_in_residual():
    rng = np.random.default_rng(8)
    pred = [random_pose(rng) for _ in range(4)]
    al = align_window(pred, [None] * 4)
    assert al.method == "none" and np.allclose(al.transform.matrix(), np.eye(4))
    world = [random_pose(rng) for _ in range(5)]
    pred = predicted_from_world(world, random_sim3(rng, 1.0))
    bad = [T.copy() for T in world]
    bad[2][:3, 3] += [1.5, 0, 0]
    assert align_window(pred, bad).residual_m > 0.3
    with pytest.raises(ValueError):
        align_window(pred, world[:2])
