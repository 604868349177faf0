"""Per-view pose refinement inside a window: make the views' depth maps agree (point-to-plane).

A feed-forward model's per-view poses carry a few centimetres of independent noise, while each
view's depth map is accurate in its own camera frame: consecutive keyframes would then step by the
noise of two views. Like DUSt3R's global alignment, the window's poses are refined so that every
view's points lie on its neighbours' surfaces: projective association into every overlapping view
(batched, :mod:`.multiview`), point-to-plane residuals with a Cauchy kernel, Gauss-Newton on all
views' 6-DoF corrections at once, each held to the model's pose by a prior. Directions the
geometry does not observe (a wall and the floor leave sliding along the wall free) keep the
model's values instead of drifting. How far a view had to move to agree is its disagreement: a
view that needed far more than the model's noise is rejected by the caller.

Views of one keyframe group taken by a calibrated rig are also held to each other by their
extrinsics (:class:`RigLink`). Cameras that look different ways share little of what they see,
so their pairs alone leave each camera's chain of views free to slide against the other's: with
loosely held poses, windows of a front and a left camera came out with the two chains 30-80 cm
apart at the same cost as the true poses.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy.spatial.transform import Rotation

from mapany_ros.core.backends.base import ViewPrediction
from mapany_ros.core.frames import Frame
from mapany_ros.core.geometry import invert, transform_points
from mapany_ros.core.placement.multiview import Association, ViewStack

#: A view's pose is refined only along directions where the data's information exceeds the prior's
#: by this factor and, unless the model's poses are no evidence of their own (see
#: ``refine_window_poses``), is at least this fraction of its best-observed direction's.
DEGENERACY_RATIO = 10.0
DEGENERACY_FRACTION = 0.05
#: A step that moves every sample's projection by less than this (coarse pixels) leaves it on the
#: pixel it fell on: the next step reuses the association (moved samples, the same surfaces).
#: Reassociating after every step instead changes nothing measurable and costs a projection and a
#: gather each time; never reassociating is not enough where the model's poses start far off.
REASSOCIATE_PX = 0.5
#: The steps between the first and the last ``FINE_STEPS`` (the large ones, whose association
#: changes anyway) associate only every ``COARSE_EVERY``-th sample of each view.
COARSE_EVERY = 2
FINE_STEPS = 2
#: Pairs with fewer associated points than this do not contribute.
MIN_PAIR_POINTS = 50
#: How well two cameras' extrinsics give the pose between them (a calibration's error), and how
#: much of the baseline a model's scale error may add.
RIG_SIGMA_M = 0.005
RIG_SIGMA_RAD = np.radians(0.3)
RIG_SCALE_SIGMA = 0.03
#: Without odometry the base's motion between two cameras' stamps is unknown: at most this fast.
RIG_MAX_SPEED_MPS = 2.0
RIG_MAX_TURN_RADPS = 1.5


@dataclass(frozen=True)
class RigLink:
    """Views ``a`` and ``b`` (indices into the window's views) of one keyframe group: camera b in
    camera a's frame, ``T_ab`` (metres), known to ``sigma_m`` / ``sigma_rad``."""

    a: int
    b: int
    T_ab: np.ndarray
    sigma_m: float
    sigma_rad: float


def rig_links(groups: Sequence[Sequence[Frame]]) -> list[RigLink]:
    """Links between the views of every group whose cameras have extrinsics: each camera to the
    group's first. With odometry on both frames the base's motion between their stamps is the
    odometry's; without, it is allowed for in the sigmas."""
    links: list[RigLink] = []
    start = 0
    for g in groups:
        for k in range(1, len(g)):
            a, b = g[0], g[k]
            if a.T_base_camera is None or b.T_base_camera is None or a.camera == b.camera:
                continue
            dt = abs(b.stamp_ns - a.stamp_ns) * 1e-9
            if a.T_world_camera is not None and b.T_world_camera is not None and a.T_world_base is not None:
                T_ab, move_m, move_rad = invert(a.T_world_camera) @ b.T_world_camera, 0.0, 0.0
            else:
                T_ab = invert(a.T_base_camera) @ b.T_base_camera
                move_m, move_rad = RIG_MAX_SPEED_MPS * dt, RIG_MAX_TURN_RADPS * dt
            baseline = float(np.linalg.norm(T_ab[:3, 3]))
            links.append(RigLink(start, start + k, T_ab, RIG_SIGMA_M + RIG_SCALE_SIGMA * baseline + move_m,
                                 RIG_SIGMA_RAD + move_rad))
        start += len(g)
    return links


def _adjoint(R: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Adjoints (..., 6, 6) of poses (R (..., 3, 3), t (..., 3)) in (rotation, translation) order:
    [[R, 0], [t^ R, R]]."""
    A = np.zeros((*R.shape[:-2], 6, 6))
    A[..., 0:3, 0:3] = R
    A[..., 3:6, 3:6] = R
    A[..., 3:6, 0:3] = _hat(t) @ R
    return A


def _add_links(H: np.ndarray, g: np.ndarray, T: np.ndarray, links: Sequence[tuple[int, int, np.ndarray, np.ndarray]]
               ) -> None:
    """Add the rig links (slot a, slot b, T_ab in window units, 6 information weights) at poses ``T``.

    With camera-local corrections, the current C = T_a^-1 T_b moves to exp(-xi_a) C exp(xi_b), so
    its error against the link is e0 + xi_b - Ad(C^-1) xi_a to first order."""
    for a, b, T_ab, info in links:
        cur = invert(T[a]) @ T[b]
        E = invert(T_ab) @ cur
        e0 = np.concatenate([Rotation.from_matrix(E[:3, :3]).as_rotvec(), E[:3, 3]])
        back = invert(cur)
        Ja = -_adjoint(back[:3, :3], back[:3, 3])
        L = np.diag(info)
        sa, sb = slice(6 * a, 6 * a + 6), slice(6 * b, 6 * b + 6)
        H[sa, sa] += Ja.T @ L @ Ja
        H[sa, sb] += Ja.T @ L
        H[sb, sa] += L @ Ja
        H[sb, sb] += L
        g[sa] += Ja.T @ (L @ e0)
        g[sb] += L @ e0


@dataclass
class Refinement:
    """Refined views and, per candidate, how far the model's pose had to move (Mahalanobis, 6 dof)."""

    views: list[ViewPrediction]
    correction_chi2: dict[int, float]
    #: With ``move_points=False``: per refined view, the 4x4 its ``points_world`` still owe
    #: (refined = transform @ as given), for whoever moves them anyway to apply in the same pass.
    point_transforms: dict[int, np.ndarray] = field(default_factory=dict)


#: Signs of the rows of _pair_blocks' per-sample Jacobian: its translation rows are computed negated.
_SIGNS = np.array([1.0, 1.0, 1.0, -1.0, -1.0, -1.0, 1.0])


def _pair_blocks(stack: ViewStack, T: np.ndarray, depth_sigma: float, kernel_threshold: float,
                 previous: Association | None = None, every: int = 1
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, Association]:
    """Per-pair 12x12 normal-equation blocks, 12-gradients and point counts at poses ``T`` (host arrays).

    ``every``: from every such sample only (a new association), sums and counts scaled up to stand
    for all samples.

    r = n . (T_j^-1 T_i p - Q) under camera-local perturbations of both poses. Only view j's half
    of the Jacobian is computed per sample: moving camera i by xi_i moves the points in camera j
    as moving camera j by -Ad(T_ji) xi_i would, so view i's half is that 6x6 map of view j's, and
    the pair's blocks follow from j's 6x6 sums (a quarter of the products per sample).
    """
    a = stack.associate(T, every) if previous is None else stack.moved(previous, T)
    Y, n = a.Y, a.normal  # (P, 3, S) in camera j
    # r, and its Cauchy weight over sigma^2: 1 / (1 + (r / (k sigma))^2) / sigma^2 = 1 / (sigma^2 + (r / k)^2).
    r = torch.sum(Y * n, 1).sub_(a.plane)
    w = torch.mul(a.Qz, depth_sigma).add_(1e-3).square_()  # sigma^2 (Qz > 0 wherever a sample counts)
    root_w = torch.where(a.planar, w.addcmul_(r, r, value=1.0 / kernel_threshold**2).rsqrt_(),
                         torch.zeros((), dtype=w.dtype, device=w.device))  # a product would keep a NaN
    # Per sample, weighted by sqrt(w): d r / d (w_j, v_j) = (n x Y, -n) and r itself, so that one batched
    # product gives the pair's 6x6 information and its gradient together. The translation rows are
    # +n here (one operation fewer); their sign is restored on the 7x7 sums.
    J = torch.empty(Y.shape[0], 7, Y.shape[2], dtype=Y.dtype, device=Y.device)
    torch.mul(n, root_w[:, None], out=J[:, 3:6])
    torch.mul(r, root_w, out=J[:, 6])
    _cross_into(J[:, 0:3], J[:, 3:6], Y)
    # The per-sample work ends in 7x7 sums per pair; the rest is small, on the host.
    H7 = torch.bmm(J, J.transpose(1, 2)).double().cpu().numpy() * (_SIGNS * (_SIGNS[:, None] * every))
    Hj, gj = np.ascontiguousarray(H7[:, 0:6, 0:6]), np.ascontiguousarray(H7[:, 0:6, 6])
    count = a.planar.sum(1).cpu().numpy() * every
    use = count >= MIN_PAIR_POINTS
    Hj *= use[:, None, None]
    gj *= use[:, None]
    # d r / d xi_i = d r / d xi_j . A, A = -Ad(T_ji) = -[[R, 0], [t^ R, R]] in (w, v) order.
    A = -_adjoint(a.R_ji.double().cpu().numpy(), a.t_ji.double().cpu().numpy())
    At = A.transpose(0, 2, 1)
    HA = Hj @ A
    Hb = np.empty((len(A), 12, 12))
    Hb[:, 0:6, 0:6] = At @ HA
    Hb[:, 0:6, 6:12] = At @ Hj
    Hb[:, 6:12, 0:6] = HA
    Hb[:, 6:12, 6:12] = Hj
    gb = np.concatenate([(At @ gj[..., None])[..., 0], gj], 1)
    return Hb, gb, count, a


def _hat(t: np.ndarray) -> np.ndarray:
    """Skew matrices (..., 3, 3) of vectors (..., 3): hat(t) x = t x x."""
    out = np.zeros((*t.shape[:-1], 3, 3))
    out[..., 0, 1], out[..., 0, 2], out[..., 1, 2] = -t[..., 2], t[..., 1], -t[..., 0]
    out[..., 1, 0], out[..., 2, 0], out[..., 2, 1] = t[..., 2], -t[..., 1], t[..., 0]
    return out


def _cross_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """a x b over dimension 1 (coordinates first) into ``out``, written out (on a CPU faster than ``torch.cross``)."""
    for k, (i, j) in enumerate(((1, 2), (2, 0), (0, 1))):
        o = out[:, k]
        torch.mul(a[:, i], b[:, j], out=o)
        o.addcmul_(a[:, j], b[:, i], value=-1.0)


def _assemble(stack: ViewStack, Hb: np.ndarray, gb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sum the pair blocks into the (6n x 6n) system of all views."""
    m = 6 * len(stack.candidates)
    six = np.arange(6)
    idx = np.concatenate([6 * stack.pairs[:, 0:1] + six, 6 * stack.pairs[:, 1:2] + six], axis=1)  # (P, 12)
    flat = (idx[:, :, None] * m + idx[:, None, :]).ravel()
    H = np.bincount(flat, weights=Hb.ravel(), minlength=m * m).reshape(m, m)
    g = np.bincount(idx.ravel(), weights=gb.ravel(), minlength=m)
    return H, g


def _observed_directions(H: np.ndarray, prior: np.ndarray, n: int, fraction: float) -> np.ndarray:
    """Basis (6n x k) of the per-view pose directions the geometry really observes.

    Each view's data block is whitened by the prior (so rotation and translation compare) and
    eigen-decomposed; directions whose information is small, next to the prior's or (``fraction``)
    to the view's best direction's, are left out. They carry mostly noise (a wall and the floor say
    nothing about sliding along the wall, yet noisy normals fake a little information there), so
    the model's values stand.
    """
    scale = 1.0 / np.sqrt(prior)
    six = np.arange(6)
    blocks = (6 * np.arange(n)[:, None, None] + six[:, None], 6 * np.arange(n)[:, None, None] + six)  # (n, 6, 6)
    evals, evecs = np.linalg.eigh(H[blocks] * np.outer(scale, scale))  # every view's block in one call
    keep = (evals > DEGENERACY_RATIO) & (evals > fraction * evals.max(axis=1, keepdims=True))  # (n, 6)
    B = np.zeros((6 * n, 6 * n))  # every view's whitened eigenvectors, block-diagonal
    B[blocks] = scale[:, None] * evecs
    return B[:, keep.ravel()]


def refine_window_poses(
    views: Sequence[ViewPrediction], stack: ViewStack, active: Sequence[int], *, prior_sigma_m: float,
    prior_sigma_rad: float, depth_sigma: float = 0.01, kernel_threshold: float = 2.0, iterations: int = 5,
    move_points: bool = True, links: Sequence[RigLink] = (), units: float = 1.0, poses_are_evidence: bool = True,
) -> Refinement:
    """Refine the ``active`` views' poses (points move with them); other views are returned as they are.

    ``stack`` holds the window's views (built with normals; its pairs are pruned to those that see
    each other). ``depth_sigma`` is the relative depth noise that whitens residuals before the
    kernel; ``prior_sigma_*`` is how far the model's own poses are trusted. ``move_points=False``
    leaves every view's full-resolution points where they were and returns what they owe in
    :attr:`Refinement.point_transforms` (placement moves them into the map in one pass).
    ``links``: views of one group held to their rig's geometry; ``units``: window units per metre.
    ``poses_are_evidence=False``: the model's poses lean towards priors it was given (odometry), so
    every direction the depth observes at all is refined, also those far weaker than the view's
    best one, which otherwise keep the model's values: for such a model, rotations kept that way
    carried half of the odometry's heading drift into the map.
    """
    out = list(views)
    slots = [a for a, i in enumerate(stack.candidates) if i in set(active)]
    if len(slots) < 2:
        return Refinement(out, {stack.candidates[a]: 0.0 for a in slots})
    n = len(stack.candidates)
    on = np.zeros(n, dtype=bool)
    on[slots] = True
    T = stack.T0.copy()
    prior = np.array([1 / prior_sigma_rad**2] * 3 + [1 / prior_sigma_m**2] * 3)
    P = np.tile(prior, n)
    xi = np.zeros(6 * n)  # accumulated corrections (camera-local), held to zero by the prior
    slot_of = {i: a for a, i in enumerate(stack.candidates)}
    rig = []
    for link in links:
        a, b = slot_of.get(link.a), slot_of.get(link.b)
        if a is not None and b is not None and on[a] and on[b]:
            T_ab = link.T_ab.copy()
            T_ab[:3, 3] *= units
            rig.append((a, b, T_ab, np.array([link.sigma_rad**-2] * 3 + [(link.sigma_m * units) ** -2] * 3)))
    assoc = None
    # How far (coarse pixels) a step moves the samples' projections at most, per unit of rotation and
    # of translation: below REASSOCIATE_PX they still fall on the pixels they fell on.
    focal = float(stack.K[:, 0, 0].max())
    z = stack.src[:, 2][stack.src_ok]
    near = float(z.kthvalue(max(1, len(z) // 10)).values) if len(z) else 1.0
    px_moved = np.inf
    every = 1
    for it in range(iterations):
        # The first step reads the association the view checks made (if they ran); the last ones use
        # every sample.
        was, every = every, COARSE_EVERY if 0 < it < iterations - FINE_STEPS else 1
        fixed = assoc is not None and px_moved < REASSOCIATE_PX and every == was
        Hb, gb, count, assoc = _pair_blocks(stack, T, depth_sigma, kernel_threshold, assoc if fixed else None, every)
        # Views that do not see each other now will not after a small correction.
        keep = count >= MIN_PAIR_POINTS // 2 if it == 0 else None
        if keep is not None and not keep.all():
            stack.keep_pairs(torch.as_tensor(keep, device=stack.device))
            Hb, gb, count = Hb[keep], gb[keep], count[keep]
            assoc = assoc.select(torch.as_tensor(keep, device=stack.device))
        use = on[stack.pairs[:, 0]] & on[stack.pairs[:, 1]]  # pairs of views being refined
        H, g = _assemble(stack, Hb * use[:, None, None], gb * use[:, None])
        _add_links(H, g, T, rig)
        B = _observed_directions(H, prior, n, DEGENERACY_FRACTION if poses_are_evidence else 0.0)
        g = g + P * xi
        y = np.linalg.solve(B.T @ (H + np.diag(P)) @ B, -(B.T @ g)) if B.shape[1] else np.zeros(0)
        step = B @ y
        xi += step
        steps = step.reshape(n, 6)[slots]
        px_moved = focal * float(np.max(np.linalg.norm(steps[:, :3], axis=1)
                                        + np.linalg.norm(steps[:, 3:], axis=1) / max(near, 1e-6)))
        move = np.tile(np.eye(4), (len(slots), 1, 1))
        move[:, :3, :3] = Rotation.from_rotvec(steps[:, :3]).as_matrix()  # one call for every view
        move[:, :3, 3] = steps[:, 3:]
        T[slots] = T[slots] @ move
        if np.abs(step).max() < 1e-4:
            break
    chi2 = {}
    owed = {}
    deltas = [invert(stack.T0[a]) @ T[a] for a in slots]
    turned = Rotation.from_matrix(np.stack([d[:3, :3] for d in deltas])).as_rotvec()
    for a, delta, rotvec in zip(slots, deltas, turned, strict=True):
        i = stack.candidates[a]
        e = np.concatenate([rotvec, delta[:3, 3]])
        chi2[i] = float(np.sum(e**2 * prior))
        view = views[i]
        move = T[a] @ invert(stack.T0[a])
        if move_points:
            out[i] = dataclasses.replace(view, points_world=transform_points(view.points_world, move),
                                         T_world_camera=T[a])
        else:
            out[i] = dataclasses.replace(view, T_world_camera=T[a])
            owed[i] = move
    return Refinement(out, chi2, owed)
