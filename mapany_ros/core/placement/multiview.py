"""A window's views stacked for batched pairwise projection (view checks and pose refinement).

Both questions placement asks inside a window - does this view agree with its neighbours, and
which small pose corrections make them agree - project a sparse sample of every view's points
into every other view and read that view's depth there. Doing it for all ordered pairs at once,
in a few large tensor operations on the prediction's device, keeps the cost independent of the
number of kernel launches (a window of 16 views has 240 pairs). Views of different sizes are
padded to one size. Each view's grid is its camera model's (:attr:`ViewPrediction.grid_camera`):
pixels are back-projected along the model's true rays and points projected through its forward
distortion, so a distorted camera is judged on its real geometry, not on its pinhole part.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from mapany_ros.core.alignment import rigidify
from mapany_ros.core.backends.base import ViewPrediction
from mapany_ros.core.camera_rays import distort, image_reach, plane_rays
from mapany_ros.core.depth_edges import depth_edges
from mapany_ros.core.frames import CameraModel


def grid_stride(shape: tuple[int, ...], samples: int) -> int:
    """Pixel stride of a regular grid of about ``samples`` pixels over an image of ``shape`` (h, w)."""
    h, w = shape[-2:]
    return max(1, int(np.sqrt(h * w / max(samples, 1))))


def by_size(views: Sequence[ViewPrediction]) -> dict[tuple[int, int, torch.device], list[int]]:
    """Indices of ``views`` grouped by (height, width, device): each group can be stacked and
    handled in one operation."""
    groups: dict[tuple[int, int, torch.device], list[int]] = {}
    for i, v in enumerate(views):
        groups.setdefault((v.height, v.width, v.depth.device), []).append(i)
    return groups


def _window_reduce(x: torch.Tensor, r: int, op, fill: float) -> torch.Tensor:
    """``op`` over the (2r + 1)^2 neighbourhood of every pixel of ``x`` (n, h, w[, c]), borders
    filled with ``fill`` (``op``'s identity: 0 for a sum, -inf for a maximum, inf for a minimum, so
    a border pixel simply has fewer terms). Separable, shifted slices combined in place: on a CPU
    several times faster than torch's pooling, and no padded copies."""
    del fill  # the identity adds nothing: border pixels just skip the terms beyond the image
    for dim in (1, 2):
        size = x.shape[dim]
        acc = x.clone()
        for k in range(1, min(r, size - 1) + 1):
            right = acc.narrow(dim, k, size - k)  # x[i] with x[i - k]
            op(right, x.narrow(dim, 0, size - k), out=right)
            left = acc.narrow(dim, 0, size - k)  # ... and x[i + k]
            op(left, x.narrow(dim, k, size - k), out=left)
        x = acc
    return x


def surface_normals(P: torch.Tensor, ok: torch.Tensor, radius: int = 1
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Smoothed points (n, h, w, 3), unit normals (n, h, w, 3) facing the camera, and where both are
    trustworthy, for a batch of ``n`` views (one call: the cost is in the number of operations).
    ``P`` must be zero where ``ok`` is False (as :class:`ViewStack`'s grids are).

    Differences across ``2 * radius`` pixels of points averaged over a (2r + 1)^2 neighbourhood,
    so per-pixel depth noise does not turn them. Untrustworthy: next to an invalid pixel or a depth
    jump, on a crease (neighbouring normals disagree), or at the image border.
    """
    r = radius
    n_views, h, w = ok.shape
    area = (2 * r + 1) ** 2
    # Coordinates as planes (3, n, h, w): every step below is a few operations on contiguous images
    # (given P as a view of planes, as ViewStack's is, nothing is copied), and the results are
    # (n, h, w, 3) views of planes too.
    Pp = P.permute(3, 0, 1, 2)
    d = Pp[2]
    # Neighbourhood sums of the valid points and their count, in one pass over four planes.
    X = torch.empty(4, n_views, h, w, dtype=P.dtype, device=P.device)
    X[0:3] = Pp
    X[3] = ok
    sums = _window_reduce(X.view(4 * n_views, h, w), r, torch.add, 0.0).view(4, n_views, h, w)
    M = sums[0:3] / sums[3].clamp_min(1e-6)
    # The neighbourhood's largest depth and (negated) its smallest, in one pass over two planes.
    D = torch.empty(2, n_views, h, w, dtype=P.dtype, device=P.device)
    D[0] = d
    torch.where(ok, -d, torch.full((), -1e9, dtype=P.dtype, device=P.device), out=D[1])
    D = _window_reduce(D.view(2 * n_views, h, w), r, torch.maximum, float("-inf")).view(2, n_views, h, w)
    d_max, d_min = D[0], -D[1]
    # Normals inside the border only (the border is never trustworthy); zero on it, so finite.
    inner = (slice(None), slice(None), slice(r, h - r), slice(r, w - r))
    dx = M[:, :, r : h - r, 2 * r :] - M[:, :, r : h - r, : w - 2 * r]
    dy = M[:, :, 2 * r :, r : w - r] - M[:, :, : h - 2 * r, r : w - r]
    n = torch.zeros(3, n_views, h, w, dtype=P.dtype, device=P.device)
    ni = n[inner]
    for k, (i, j) in enumerate(((1, 2), (2, 0), (0, 1))):
        torch.mul(dx[i], dy[j], out=ni[k])
        ni[k].addcmul_(dx[j], dy[i], value=-1.0)
    # Unit length and facing the camera in one product: the sign of n . P does not need unit n.
    scale = (ni[0] * ni[0]).addcmul_(ni[1], ni[1]).addcmul_(ni[2], ni[2]).clamp_min_(1e-24).rsqrt_()
    facing = (ni[0] * Pp[0][inner[1:]]).addcmul_(ni[1], Pp[1][inner[1:]]).addcmul_(ni[2], Pp[2][inner[1:]])
    ni.mul_(torch.where(facing > 0, -scale, scale))
    # A crease: the 3x3 neighbourhood's normals disagree (their sum is shorter than 0.97 of 9).
    n_sum = _window_reduce(n.view(3 * n_views, h, w), 1, torch.add, 0.0).view(3, n_views, h, w)
    n_sum_sq = (n_sum[0] * n_sum[0]).addcmul_(n_sum[1], n_sum[1]).addcmul_(n_sum[2], n_sum[2])
    border = torch.zeros_like(ok)
    border[:, r + 1 : -r - 1, r + 1 : -r - 1] = True
    good = ok & (sums[3] > area - 0.5) & (d_max - d_min < 0.1 * d) & (n_sum_sq > (0.97 * 9) ** 2) & border
    return M.permute(1, 2, 3, 0), n.permute(1, 2, 3, 0), good


#: Views are judged on a grid at most this wide: a few thousand samples per view need no more, and
#: the cost then does not grow with the backend's output resolution.
MAX_WIDTH = 160


def _coarse_grids(views: Sequence[ViewPrediction], max_width: int
                  ) -> tuple[torch.Tensor, torch.Tensor, list[CameraModel]]:
    """Camera-frame points (n, H, W, 3), validity (n, H, W) and per view its camera model, on a
    grid at most ``max_width`` wide; views of other sizes are padded (invalid) to the largest.

    Every f-th pixel of every f-th row (f the smallest factor that fits), the one nearest its
    block's centre: a model's depth is smooth over many pixels (a ViT's patches are 14 wide), so the
    pixel stands for its block, and the full-resolution images are only read where the grid samples
    them (averaging every block cost five full-resolution passes, a tenth of a window's placement).
    Points are the depth along the camera model's rays (distortion included); depth edges are
    dropped (see :mod:`mapany_ros.core.depth_edges`); the camera model follows the grid (distortion
    holds in normalised coordinates, so only K changes). Views of one size are done in one operation.
    Points are stored as planes (3, n, H, W) and seen as (n, H, W, 3).
    """
    cameras: list[CameraModel | None] = [None] * len(views)
    batches = []
    for (height, width, device), idx in by_size(views).items():
        cams = [views[i].grid_camera for i in idx]
        f = max(1, -(-width // max_width))
        h, w = height // f, width // f
        grid = (slice(f // 2, f // 2 + h * f, f), slice(f // 2, f // 2 + w * f, f))
        depth = torch.stack([views[i].depth[grid] for i in idx]).float()
        ok = torch.stack([views[i].valid[grid] for i in idx])
        ok &= (depth > 0) & (depth < float("inf"))  # NaN fails both
        grids = [plane_rays(cam, device) for cam in cams]
        if all(r is grids[0][0] for r, _ in grids):  # views of one camera model share its rays (one cached grid)
            rays, ray_ok = grids[0][0][grid], grids[0][1][grid]
        else:
            rays = torch.stack([r[grid] for r, _ in grids])
            ray_ok = torch.stack([o[grid] for _, o in grids])
        # As contiguous planes: the products below then run over contiguous memory (a third of the time).
        rays, ray_ok = rays[..., 0:2].movedim(-1, 0).contiguous(), ray_ok.contiguous()
        ok &= ray_ok  # a distorted camera's grid reaches beyond its rays
        # A depth edge is where a model puts its flying pixels: neither a surface to sample nor one
        # to compare against.
        ok &= ~depth_edges(depth, valid=ok)
        D = torch.where(ok, depth, torch.zeros((), device=device))
        P = torch.empty(3, len(idx), h, w, device=device)
        torch.mul(D, rays[0], out=P[0])
        torch.mul(D, rays[1], out=P[1])
        P[2] = D
        batches.append((idx, P, ok))
        for i, cam in zip(idx, cams, strict=True):
            K = np.asarray(cam.K, dtype=np.float64).copy()
            if f > 1:  # coarse pixel c is full-resolution pixel f c + f // 2
                K[:2, :2] /= f
                K[:2, 2] = (K[:2, 2] - f // 2) / f
            cameras[i] = CameraModel(w, h, K, cam.distortion_model, np.asarray(cam.D).copy())
    if len(batches) == 1 and batches[0][0] == list(range(len(views))):
        _, P, ok = batches[0]
        return P.permute(1, 2, 3, 0), ok, cameras  # type: ignore[return-value]
    H, W = max(P.shape[2] for _, P, _ in batches), max(P.shape[3] for _, P, _ in batches)
    device = batches[0][1].device
    P_all = torch.zeros(3, len(views), H, W, device=device)
    ok_all = torch.zeros(len(views), H, W, dtype=torch.bool, device=device)
    for idx, P, ok in batches:
        h, w = ok.shape[1:]
        at = torch.as_tensor(idx, device=device)
        P_all[:, at, :h, :w] = P
        ok_all[at, :h, :w] = ok
    return P_all.permute(1, 2, 3, 0), ok_all, cameras  # type: ignore[return-value]


@dataclass
class Association:
    """View i's sampled points seen from view j, for every ordered pair (P pairs x S samples).

    Coordinates come first (P, 3, S): every coordinate of every pair is one contiguous row, so the
    per-sample arithmetic runs on whole rows and the normal equations are one batched product.
    """

    Y: torch.Tensor  # (P, 3, S) points of view i in camera j
    Qz: torch.Tensor  # (P, S) depth of view j's point at the pixel they fall on
    plane: torch.Tensor  # (P, S) n . Q there: the point-to-plane residual is n . Y - plane
    normal: torch.Tensor  # (P, 3, S) camera-j normal there
    seen: torch.Tensor  # (P, S) inside view j, on a valid pixel of both views
    planar: torch.Tensor  # (P, S) seen, and view j's normal there is trustworthy
    p: torch.Tensor  # (P, 3, S) the samples of view i in camera i
    R_ji: torch.Tensor  # (P, 3, 3) camera i -> camera j rotation
    t_ji: torch.Tensor  # (P, 3) camera i -> camera j translation

    def select(self, keep: torch.Tensor) -> Association:
        """The same association for the pairs in ``keep`` only (every pair is computed on its own)."""
        keep = torch.nonzero(keep).squeeze(1) if keep.dtype == torch.bool else keep  # one index for all
        return Association(self.Y[keep], self.Qz[keep], self.plane[keep], self.normal[keep], self.seen[keep],
                           self.planar[keep], self.p[keep], self.R_ji[keep], self.t_ji[keep])


class ViewStack:
    """Padded per-view tensors and every ordered pair of the ``candidates`` (indices into ``views``).

    With ``normals``, points where a normal is trustworthy are replaced by their neighbourhood mean
    (``smooth_radius``): per-pixel depth noise then neither turns the normals nor the residuals.
    """

    def __init__(self, views: Sequence[ViewPrediction], candidates: Sequence[int], samples: int = 1500,
                 normals: bool = False, smooth_radius: int = 1, max_width: int = MAX_WIDTH) -> None:
        self.candidates = list(candidates)
        self.P, self.ok, self.cameras = _coarse_grids([views[i] for i in self.candidates], max_width)
        self.device = self.P.device
        n, H, W = self.ok.shape
        self.H, self.W = H, W
        self.K = torch.as_tensor(np.stack([c.K for c in self.cameras]), dtype=torch.float64, device=self.device)
        # Views whose grids are distorted, by camera model: their projections go through the distortion.
        self._distorted: dict[tuple, list[int]] = {}
        for a, cam in enumerate(self.cameras):
            if not cam.is_pinhole:
                key = (cam.width, cam.height, cam.K.tobytes(), cam.distortion_model, np.asarray(cam.D).tobytes())
                self._distorted.setdefault(key, []).append(a)
        self.T0 = np.stack([rigidify(views[i].T_world_camera) for i in self.candidates])
        if normals:  # padding is invalid, so a smaller view's edge counts as its border
            M, self.N, self.N_ok = surface_normals(self.P, self.ok, smooth_radius)
            self.P = torch.where(self.N_ok, M.permute(3, 0, 1, 2), self.P.permute(3, 0, 1, 2)).permute(1, 2, 3, 0)
        else:  # points and normals are planes (3, n, H, W), seen as (n, H, W, 3)
            self.N = torch.zeros(3, n, H, W, device=self.device).permute(1, 2, 3, 0)
            self.N_ok = torch.zeros(n, H, W, dtype=torch.bool, device=self.device)
        self.src, self.src_ok = self._samples(self.N_ok if normals else self.ok, samples)
        pairs = [(a, b) for a in range(n) for b in range(n) if a != b]
        self._pairs = np.array(pairs, dtype=np.int64).reshape(-1, 2)
        self.I = torch.as_tensor(self._pairs[:, 0], device=self.device)
        self.J = torch.as_tensor(self._pairs[:, 1], device=self.device)
        # What a pair reads at the pixel its samples fall on, one column per pixel of every view (one
        # gather): normal, the plane's offset n . P, depth, and 0 (invalid), 1 (valid) or 3 (valid
        # with a trustworthy normal: N_ok holds only where ok does). A ring of invalid pixels around
        # every view: a projection clamped onto it reads "not seen", so no separate inside test.
        lookup = torch.zeros(6, n, H + 2, W + 2, device=self.device)
        inner = lookup[:, :, 1:-1, 1:-1]
        Np, Pp = self.N.permute(3, 0, 1, 2), self.P.permute(3, 0, 1, 2)
        inner[0:3] = Np
        torch.mul(Np[0], Pp[0], out=inner[3])
        inner[3].addcmul_(Np[1], Pp[1]).addcmul_(Np[2], Pp[2])
        inner[4] = Pp[2]
        torch.add(self.ok.float(), self.N_ok.float(), alpha=2.0, out=inner[5])
        self._lookup = lookup.reshape(6, -1)
        #: Associations already computed, by the poses' bytes: the view checks and the first step of
        #: the refinement (twice, when a view is dropped) ask at the model's own poses.
        #: Each with the indices of the pairs still kept into it (None: all of them).
        self._cache: dict[tuple[bytes, int], tuple[Association, torch.Tensor | None]] = {}
        self._per_pair()

    def _samples(self, mask: torch.Tensor, samples: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Every view's points on a regular grid of about ``samples`` of its pixels where ``mask``
        holds, coordinates first (n, 3, S), and which of the S slots are filled (n, S). Views of one
        size are sampled in one pass."""
        n = mask.shape[0]
        strides = [grid_stride((c.height, c.width), samples) for c in self.cameras]
        picks: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        for s in sorted(set(strides)):
            views = torch.as_tensor([a for a in range(n) if strides[a] == s], device=self.device)
            sub = mask[views, s // 2 :: s, s // 2 :: s]  # padding is False: a smaller view's grid ends at its edge
            slot, rows, cols = torch.nonzero(sub, as_tuple=True)
            picks.append((views[slot], rows * s + s // 2, cols * s + s // 2))
        view = torch.cat([p[0] for p in picks])
        rows, cols = torch.cat([p[1] for p in picks]), torch.cat([p[2] for p in picks])
        counts = torch.bincount(view, minlength=n)
        # Each sample's slot among its view's: samples come grouped by view within each stride.
        order = torch.argsort(view, stable=True)
        view, rows, cols = view[order], rows[order], cols[order]
        starts = torch.cumsum(counts, 0) - counts
        slot = torch.arange(len(view), device=self.device) - starts[view]
        S = max(1, int(counts.max()) if n else 1)
        src = torch.zeros(n, 3, S, device=self.device)
        src_ok = torch.zeros(n, S, dtype=torch.bool, device=self.device)
        src.permute(0, 2, 1)[view, slot] = self.P[view, rows, cols]
        src_ok[view, slot] = True
        return src, src_ok

    @property
    def pairs(self) -> np.ndarray:
        """(P, 2) the ordered pairs (slots i, j) every association holds, in its order."""
        return self._pairs

    def keep_pairs(self, keep: torch.Tensor) -> None:
        """Drop the pairs not in ``keep`` (e.g. views that never see each other) from later calls."""
        self.I, self.J = self.I[keep], self.J[keep]
        self._pairs = self._pairs[keep.cpu().numpy()]
        # Cached associations are narrowed when asked for again (rarely: a second refinement at
        # the model's poses), not now; drops compose as indices into the association as computed.
        rows = torch.nonzero(keep).squeeze(1)
        self._cache = {k: (a, rows if kept is None else kept[rows]) for k, (a, kept) in self._cache.items()}
        self._per_pair()

    def _per_pair(self) -> None:
        """What every association reads per pair and does not depend on the poses (gathered once)."""
        I, J = self.I, self.J
        self._p = self.src[I]  # (P, 3, S) samples of view i
        self._p_ok = self.src_ok[I]
        self._thinned: dict[int, tuple[torch.Tensor, torch.Tensor]] = {1: (self._p, self._p_ok)}
        self._K = self.K[J].float()  # a copy: pixel coordinates in view j's ringed grid
        self._K[:, 0:2, 2] += 1
        self._skew = bool((self.K[:, 0, 1] != 0).any())
        # The pixel a sample falls on, as a float: exact while the stack has fewer than 2^24 pixels.
        self._exact_float_index = self._lookup.shape[1] < 2**24
        self._base = (J * (self.H + 2)).float()[:, None]  # the row where view j's ringed grid starts

    def associate(self, T: np.ndarray, every: int = 1) -> Association:
        """Project every view's samples into every other view under camera-to-window poses ``T`` (n, 4, 4).

        ``every``: only every such sample of each view (a cheaper, coarser association for the early,
        large steps of an iterative fit)."""
        T = np.asarray(T, dtype=np.float64)
        key = (T.tobytes(), every)
        entry = self._cache.get(key)
        if entry is not None:
            hit, kept = entry
            if kept is not None:
                hit = hit.select(kept)
                self._cache[key] = (hit, None)
            return hit
        hit = self._associate(T, every)
        first = (self.T0.tobytes(), 1)
        keep = self._cache.get(first) if key != first else None
        self._cache = {key: (hit, None)} if keep is None else {first: keep, key: (hit, None)}
        return hit

    def moved(self, a: Association, T: np.ndarray) -> Association:
        """``a`` with its samples moved under new poses ``T`` but still read at the pixels they fell
        on: Gauss-Newton steps between two projections (the surfaces they meet barely change)."""
        R, t = self._pair_motion(T)
        return dataclasses.replace(a, Y=torch.baddbmm(t[:, :, None], R, a.p), R_ji=R, t_ji=t)

    def _pair_motion(self, T: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Every pair's camera i -> camera j rotation (P, 3, 3) and translation (P, 3) under ``T``."""
        Ti, Tj = T[self._pairs[:, 0]], T[self._pairs[:, 1]]
        Rj_t = Tj[:, :3, :3].transpose(0, 2, 1)
        R = torch.as_tensor(Rj_t @ Ti[:, :3, :3], dtype=torch.float32, device=self.device)
        t = torch.as_tensor(np.einsum("pij,pj->pi", Rj_t, Ti[:, :3, 3] - Tj[:, :3, 3]), dtype=torch.float32,
                            device=self.device)
        return R, t

    def _samples_every(self, every: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Every ``every``-th sample slot of every pair (P, 3, S'), and which are filled (P, S')."""
        if every not in self._thinned:
            self._thinned[every] = (self._p[:, :, ::every].contiguous(), self._p_ok[:, ::every].contiguous())
        return self._thinned[every]

    def _associate(self, T: np.ndarray, every: int = 1) -> Association:
        # Each pair's camera i -> camera j in float64, then float32: no large coordinates are left
        # (odometry coordinates can be kilometres).
        R, t = self._pair_motion(T)
        J = self.J
        p, p_ok = self._samples_every(every)
        Y = torch.baddbmm(t[:, :, None], R, p)  # (P, 3, S) camera j
        z = Y[:, 2]
        front = z > 1e-6
        zc = z.clamp_min(1e-6)
        x, y = Y[:, 0] / zc, Y[:, 1] / zc
        for slots in self._distorted.values():
            cam = self.cameras[slots[0]]
            sel = torch.isin(J, torch.tensor(slots, device=self.device))
            if bool(sel.any()):
                xs, ys = x[sel], y[sel]
                front[sel] &= xs * xs + ys * ys <= image_reach(cam) * 1.0001  # beyond, the model folds back
                xd, yd = distort(xs, ys, cam.distortion_model, cam.D)
                x[sel], y[sel] = xd.to(x.dtype), yd.to(y.dtype)
        K = self._K
        # Pixel coordinates stay floats (integers after rounding) until the one index is made.
        u = torch.addcmul(K[:, 0, 2, None], K[:, 0, 0, None], x)
        if self._skew:
            u.addcmul_(K[:, 0, 1, None], y)
        # Views smaller than the stack are padded with invalid pixels: one clamp onto the ring suits all.
        u.round_().clamp_(0, self.W + 1)
        v = torch.addcmul(K[:, 1, 2, None], K[:, 1, 1, None], y).round_().clamp_(0, self.H + 1)
        if self._exact_float_index:
            flat = v.add_(self._base).mul_(self.W + 2).add_(u).long()
        else:
            flat = (J[:, None] * (self.H + 2) + v.long()) * (self.W + 2) + u.long()
        at = self._lookup.index_select(1, flat.reshape(-1)).reshape(6, *flat.shape).transpose(0, 1)  # (P, 6, S)
        seen = front.logical_and_(p_ok).logical_and_(at[:, 5] > 0.5)
        planar = seen & (at[:, 5] > 2.5)
        return Association(Y, at[:, 4], at[:, 3], at[:, 0:3], seen, planar, p, R, t)
