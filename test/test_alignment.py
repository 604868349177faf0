"""Similarity maths of the placement stage: rotation repair, Sim(3) poses and weighted fits."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from mapany_ros.core.alignment import Sim3, orthonormalize, rigidify, weighted_similarity
from mapany_ros.core.geometry import is_rigid, make_pose


def random_pose(rng: np.random.Generator, spread: float = 2.0) -> np.ndarray:
    return make_pose(
        Rotation.random(random_state=int(rng.integers(1 << 31))).as_matrix(), rng.normal(size=3) * spread
    )


def random_sim3(rng: np.random.Generator, scale: float) -> Sim3:
    return Sim3(
        Rotation.random(random_state=int(rng.integers(1 << 31))).as_matrix(), rng.normal(size=3) * 5, scale
    )


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
def test_weighted_similarity_recovers_a_sim3_and_a_rigid_fit_keeps_scale_one(scale):
    rng = np.random.default_rng(3)
    truth = random_sim3(rng, scale)
    src = rng.normal(size=(50, 3)) * 2.0
    dst = truth.apply_points(src)
    fit = weighted_similarity(src, dst, rng.uniform(0.5, 2.0, 50))
    assert np.allclose(fit.matrix(), truth.matrix(), atol=1e-9) and fit.scale == pytest.approx(scale)
    rigid = weighted_similarity(src, dst, scale=1.0)
    assert rigid.scale == 1.0 and np.allclose(rigid.R, truth.R, atol=1e-9)


def test_weights_decide_which_points_the_fit_follows():
    rng = np.random.default_rng(4)
    src = rng.normal(size=(40, 3))
    dst = src + [1.0, 0.0, 0.0]
    dst[:10] += [0.0, 3.0, 0.0]  # a quarter of the points moved elsewhere
    w = np.r_[np.zeros(10), np.ones(30)]
    fit = weighted_similarity(src, dst, w, scale=1.0)
    assert np.allclose(fit.R, np.eye(3), atol=1e-9) and np.allclose(fit.t, [1.0, 0.0, 0.0], atol=1e-9)
