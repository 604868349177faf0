"""A window's views stacked for batched pairwise projection (view checks and pose refinement).

Both questions placement asks inside a window - does this view agree with its neighbours, and
which small pose corrections make them agree - project a sparse sample of every view's points
into every other view and read that view's depth there. Doing it for all ordered pairs at once,
in a few large tensor operations on the prediction's device, keeps the cost independent of the
number of kernel launches (a window of 16 views has 240 pairs). Views of different sizes are
padded to one size. Projection uses the pinhole K of each view (a distorted grid projects
approximately, which the tolerances absorb).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from mapany_ros.core.alignment import rigidify
from mapany_ros.core.backends.base import ViewPrediction
from mapany_ros.core.geometry import invert


def sample_grid(valid: torch.Tensor, samples: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column indices of valid pixels on a regular grid of about ``samples`` pixels."""
    h, w = valid.shape
    stride = max(1, int(np.sqrt(h * w / max(samples, 1))))
    sub = valid[stride // 2 :: stride, stride // 2 :: stride]
    rows, cols = torch.nonzero(sub, as_tuple=True)
    return rows * stride + stride // 2, cols * stride + stride // 2


def camera_points(view: ViewPrediction) -> torch.Tensor:
    """(h, w, 3) points in the view's own camera frame (exact for distorted grids too)."""
    T = torch.as_tensor(invert(rigidify(view.T_world_camera)), dtype=torch.float32, device=view.depth.device)
    return view.points_world @ T[:3, :3].T + T[:3, 3]


def surface_normals(P: torch.Tensor, ok: torch.Tensor, radius: int = 1
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Smoothed points (h, w, 3), unit normals (h, w, 3) facing the camera, and where both are trustworthy.

    Differences across ``2 * radius`` pixels of points averaged over a (2r + 1)^2 neighbourhood,
    so per-pixel depth noise does not turn them. Untrustworthy: next to an invalid pixel or a depth
    jump, on a crease (neighbouring normals disagree), or at the image border.
    """
    r, k = radius, 2 * radius + 1
    d = P[..., 2]
    okf = ok.float()[None, None]
    count = F.avg_pool2d(okf, k, stride=1, padding=r)[0, 0]
    Pz = torch.where(ok[..., None], P, torch.zeros_like(P)).permute(2, 0, 1)[None]
    M = (F.avg_pool2d(Pz, k, stride=1, padding=r)[0] / count.clamp_min(1e-6)).permute(1, 2, 0).contiguous()
    d_max = F.max_pool2d(torch.where(ok, d, torch.zeros_like(d))[None, None], k, stride=1, padding=r)[0, 0]
    d_min = -F.max_pool2d(torch.where(ok, -d, torch.full_like(d, -1e9))[None, None], k, stride=1, padding=r)[0, 0]
    dx = torch.zeros_like(M)
    dy = torch.zeros_like(M)
    dx[:, r:-r] = M[:, 2 * r :] - M[:, : -2 * r]
    dy[r:-r] = M[2 * r :] - M[: -2 * r]
    n = torch.cross(dx, dy, dim=-1)
    n = n / n.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    n = torch.where((n * P).sum(-1, keepdim=True) > 0, -n, n)
    n_mean = F.avg_pool2d(n.permute(2, 0, 1)[None], 3, stride=1, padding=1)[0].permute(1, 2, 0).contiguous()
    border = torch.zeros_like(ok)
    border[r + 1 : -r - 1, r + 1 : -r - 1] = True
    good = ok & (count > 0.999) & (d_max - d_min < 0.1 * d) & (n_mean.norm(dim=-1) > 0.97) & border
    return M, n, good


#: Views are judged on a grid at most this wide: a few thousand samples per view need no more, and
#: the cost then does not grow with the backend's output resolution.
MAX_WIDTH = 160


def _coarse_grid(view: ViewPrediction, max_width: int) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """Camera-frame points, validity and K of the view on a grid at most ``max_width`` wide.

    Blocks of pixels are averaged (only blocks that are valid throughout stay valid), and K follows
    the block grid (pixel-centre convention).
    """
    ok = view.valid & torch.isfinite(view.depth) & (view.depth > 0)
    P = torch.where(ok[..., None], camera_points(view), torch.zeros(3, device=ok.device))
    f = max(1, -(-view.width // max_width))
    if f == 1:
        return P, ok, np.asarray(view.K, dtype=np.float64)
    count = F.avg_pool2d(ok.float()[None, None], f, stride=f)[0, 0]
    mean = F.avg_pool2d(P.permute(2, 0, 1)[None], f, stride=f)[0].permute(1, 2, 0).contiguous()
    mean = mean / count[..., None].clamp_min(1e-6)
    K = np.asarray(view.K, dtype=np.float64).copy()
    K[:2, :2] /= f
    K[:2, 2] = (K[:2, 2] + 0.5) / f - 0.5
    return mean, count > 0.999, K


@dataclass
class Association:
    """View i's sampled points seen from view j, for every ordered pair (P pairs x S samples)."""

    Y: torch.Tensor  # (P, S, 3) points of view i in camera j
    Q: torch.Tensor  # (P, S, 3) camera-j point at the pixel they fall on
    normal: torch.Tensor  # (P, S, 3) camera-j normal there
    seen: torch.Tensor  # (P, S) inside view j, on a valid pixel of both views
    planar: torch.Tensor  # (P, S) seen, and view j's normal there is trustworthy


class ViewStack:
    """Padded per-view tensors and every ordered pair of the ``candidates`` (indices into ``views``).

    With ``normals``, points where a normal is trustworthy are replaced by their neighbourhood mean
    (``smooth_radius``): per-pixel depth noise then neither turns the normals nor the residuals.
    """

    def __init__(self, views: Sequence[ViewPrediction], candidates: Sequence[int], samples: int = 1500,
                 normals: bool = False, smooth_radius: int = 1, max_width: int = MAX_WIDTH) -> None:
        self.candidates = list(candidates)
        grids = [_coarse_grid(views[i], max_width) for i in self.candidates]
        self.device = grids[0][0].device
        n = len(grids)
        H, W = max(g[0].shape[0] for g in grids), max(g[0].shape[1] for g in grids)
        self.H, self.W = H, W
        self.P = torch.zeros(n, H, W, 3, device=self.device)
        self.ok = torch.zeros(n, H, W, dtype=torch.bool, device=self.device)
        self.N = torch.zeros(n, H, W, 3, device=self.device)
        self.N_ok = torch.zeros(n, H, W, dtype=torch.bool, device=self.device)
        self.size = torch.tensor([[g[0].shape[1], g[0].shape[0]] for g in grids], device=self.device)
        self.K = torch.as_tensor(np.stack([g[2] for g in grids]), dtype=torch.float64, device=self.device)
        self.T0 = np.stack([rigidify(views[i].T_world_camera) for i in self.candidates])
        src = []
        for a, (P, ok, _) in enumerate(grids):
            h, w = ok.shape
            self.P[a, :h, :w] = P
            self.ok[a, :h, :w] = ok
            if normals:
                M, nrm, good = surface_normals(P, ok, smooth_radius)
                self.P[a, :h, :w] = torch.where(good[..., None], M, P)
                self.N[a, :h, :w] = nrm
                self.N_ok[a, :h, :w] = good
            rows, cols = sample_grid(self.N_ok[a, :h, :w] if normals else ok, samples)
            src.append(self.P[a, rows, cols])
        S = max(1, max(len(s) for s in src))
        self.src = torch.zeros(n, S, 3, device=self.device)
        self.src_ok = torch.zeros(n, S, dtype=torch.bool, device=self.device)
        for a, s in enumerate(src):
            self.src[a, : len(s)] = s
            self.src_ok[a, : len(s)] = True
        pairs = [(a, b) for a in range(n) for b in range(n) if a != b]
        self.I = torch.tensor([p[0] for p in pairs], dtype=torch.long, device=self.device)
        self.J = torch.tensor([p[1] for p in pairs], dtype=torch.long, device=self.device)

    def keep_pairs(self, keep: torch.Tensor) -> None:
        """Drop the pairs not in ``keep`` (e.g. views that never see each other) from later calls."""
        self.I, self.J = self.I[keep], self.J[keep]

    def associate(self, T: np.ndarray) -> Association:
        """Project every view's samples into every other view under camera-to-window poses ``T`` (n, 4, 4)."""
        # float32 is plenty once the window is centred (odometry coordinates can be kilometres).
        T = np.array(T, dtype=np.float64)
        T[:, :3, 3] -= T[:, :3, 3].mean(axis=0)
        Tt = torch.as_tensor(T, dtype=torch.float32, device=self.device)
        R, t = Tt[:, :3, :3], Tt[:, :3, 3]
        X = self.src @ R.transpose(1, 2) + t[:, None]  # (n, S, 3) window frame
        I, J = self.I, self.J
        Y = (X[I] - t[J][:, None]) @ R[J]  # (P, S, 3) camera j
        z = Y[..., 2]
        K = self.K[J].float()
        u = (K[:, 0, 0, None] * Y[..., 0] / z.clamp_min(1e-6) + K[:, 0, 2, None]).round().long()
        v = (K[:, 1, 1, None] * Y[..., 1] / z.clamp_min(1e-6) + K[:, 1, 2, None]).round().long()
        size = self.size[J]
        inside = (z > 1e-6) & (u >= 0) & (v >= 0) & (u < size[:, 0, None]) & (v < size[:, 1, None])
        u, v = u.clamp(0, self.W - 1), v.clamp(0, self.H - 1)
        flat = (J[:, None] * self.H + v) * self.W + u
        seen = inside & self.src_ok[I] & self.ok.reshape(-1)[flat]
        Q = self.P.reshape(-1, 3)[flat]
        normal = self.N.reshape(-1, 3)[flat]
        planar = seen & self.N_ok.reshape(-1)[flat]
        return Association(Y, Q, normal, seen, planar)
