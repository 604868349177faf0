"""Where each submap sits in the map: a robust rigid fit of its keyframes' corrected poses.

A submap keeps its voxels in its own frame; every keyframe fused into it keeps its pose in that
frame. When the pose graph corrects keyframes, each corrected keyframe says where the submap should
now be. A few probe points per keyframe (its camera centre and four points at its median depth,
spread over the image) are fitted rigidly, all submaps at once (batched Kabsch, a few Cauchy
reweightings): the submap follows what most of its keyframes say, an odd keyframe does not drag it.
Probes at the keyframes' depth weigh a rotation by the lever arm its surfaces actually have.
"""

from __future__ import annotations

from collections.abc import Hashable

import numpy as np

#: Cauchy scale of the robust fit: a keyframe whose probes miss the rigid fit by this much weighs one half.
ROBUST_SCALE_M = 0.05
_ITERATIONS = 3
#: Probe points per keyframe (camera centre + four at the median depth).
PROBES = 5


def probe_points(median_depth: float) -> np.ndarray:
    """(PROBES, 3) camera-frame probes: the centre and a square at ``median_depth`` across the view."""
    d = median_depth
    return np.array([[0.0, 0.0, 0.0], [-0.5 * d, -0.5 * d, d], [0.5 * d, -0.5 * d, d], [-0.5 * d, 0.5 * d, d],
                     [0.5 * d, 0.5 * d, d]])


def transform(T: np.ndarray, P: np.ndarray) -> np.ndarray:
    """(n, p, 3) points ``P`` under the (n, 4, 4) transforms ``T``."""
    return P @ T[:, :3, :3].transpose(0, 2, 1) + T[:, None, :3, 3]


def fit_rigid(X: np.ndarray, Y: np.ndarray, group: np.ndarray, m: int) -> np.ndarray:
    """(m, 4, 4) rigid transforms A_g minimising the robust sum of |A_g X - Y|^2 over each group's rows.

    ``X``, ``Y`` (r, p, 3) are corresponding probe points (submap frame, map frame) and ``group`` (r,)
    the submap row of each keyframe, in 0 .. m-1; every group must have a row.
    """
    r, p, _ = X.shape
    w = np.ones(r)
    A = np.tile(np.eye(4), (m, 1, 1))
    for _ in range(_ITERATIONS):
        total = np.bincount(group, w, m) * p
        cx = np.stack([np.bincount(group, w * X[..., k].sum(1), m) for k in range(3)], 1) / total[:, None]
        cy = np.stack([np.bincount(group, w * Y[..., k].sum(1), m) for k in range(3)], 1) / total[:, None]
        Xc, Yc = X - cx[group][:, None], Y - cy[group][:, None]
        H = np.zeros((m, 3, 3))
        np.add.at(H, group, np.einsum("r,rpi,rpj->rij", w, Xc, Yc))
        U, _, Vt = np.linalg.svd(H)
        V = Vt.transpose(0, 2, 1)
        flip = np.ones((m, 3))
        flip[:, 2] = np.sign(np.linalg.det(V @ U.transpose(0, 2, 1)))
        R = (V * flip[:, None, :]) @ U.transpose(0, 2, 1)
        A[:, :3, :3] = R
        A[:, :3, 3] = cy - np.einsum("mij,mj->mi", R, cx)
        miss = np.sqrt(np.mean(np.sum((transform(A[group], X) - Y) ** 2, axis=-1), axis=1))
        w = 1.0 / (1.0 + (miss / ROBUST_SCALE_M) ** 2)
    return A


class KeyframeTable:
    """Per keyframe: its submap, its probes in the submap frame, its latest and its reference map pose.

    Rows live in numpy arrays that double when full, so a correction of thousands of keyframes is a
    handful of vectorised operations. Rows of dropped submaps are recycled.
    """

    _ARRAYS = (("submap", (), -1), ("probes", (PROBES, 3), 0.0), ("local", (PROBES, 3), 0.0),
               ("T_now", (4, 4), 0.0), ("T_ref", (4, 4), 0.0))

    def __init__(self) -> None:
        self.rows: dict[Hashable, int] = {}
        self._free: list[int] = []
        self._used = 0  # rows ever handed out: [0, _used)
        self.submap = np.zeros(0, np.int64)  # submap of each row (-1: free)
        self.probes = np.zeros((0, PROBES, 3))  # probe points in the submap frame
        self.local = np.zeros((0, PROBES, 3))  # the same in the camera frame
        self.T_now = np.zeros((0, 4, 4))  # latest map pose
        self.T_ref = np.zeros((0, 4, 4))  # the pose a move is measured from (see VoxelMap.update_pose)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def nbytes(self) -> int:
        return sum(getattr(self, name).nbytes for name, _, _ in self._ARRAYS)

    def add(self, key: Hashable, submap: int, T_submap_camera: np.ndarray, T_map_camera: np.ndarray,
            local_probes: np.ndarray) -> int:
        if self._free:
            row = self._free.pop()
        else:
            if self._used == len(self.submap):
                capacity = max(64, 2 * self._used)
                for name, shape, fill in self._ARRAYS:
                    old = getattr(self, name)
                    new = np.full((capacity, *shape), fill, dtype=old.dtype)
                    new[: len(old)] = old
                    setattr(self, name, new)
            row = self._used
            self._used += 1
        self.rows[key] = row
        self.submap[row] = submap
        self.local[row] = local_probes
        self.probes[row] = transform(T_submap_camera[None], local_probes[None])[0]
        self.T_now[row] = T_map_camera
        self.T_ref[row] = T_map_camera
        return row

    def drop_submaps(self, submaps: set[int]) -> None:
        """Forget the keyframes of ``submaps`` (whose voxels are all gone)."""
        gone = np.flatnonzero(np.isin(self.submap[: self._used], list(submaps)))
        if gone.size == 0:
            return
        self.submap[gone] = -1
        gone_set = set(gone.tolist())
        for key in [k for k, row in self.rows.items() if row in gone_set]:
            del self.rows[key]
        self._free.extend(gone.tolist())

    def fit(self, submaps: np.ndarray) -> np.ndarray:
        """(len(submaps), 4, 4) anchors of the (sorted, unique) ``submaps`` from their keyframes' latest
        poses; identity for a submap without keyframes."""
        out = np.tile(np.eye(4), (len(submaps), 1, 1))
        ids = self.submap[: self._used]
        live = np.flatnonzero(np.isin(ids, submaps))
        if live.size == 0:
            return out
        group = np.searchsorted(submaps, ids[live])
        used, compact = np.unique(group, return_inverse=True)
        Y = transform(self.T_now[live], self.local[live])
        out[used] = fit_rigid(self.probes[live], Y, compact, len(used))
        return out
