"""Dense 3D-3D correspondences between a window and the map, through the frames they share.

Every window after the first starts with context frames that an earlier window already placed.
The model predicts those frames again, so the same pixels have a 3D point in the map (from the
earlier window) and one in the new window's frame: thousands of correspondences per shared
frame, weighted by confidence, from which a robust Sim(3)/SE(3) fit places the window. An
:class:`Anchor` keeps a placed frame's points on a sparse pixel grid (normalised coordinates, so
any output resolution samples the same pixels).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from mapany_ros.core.backends.base import ViewPrediction
from mapany_ros.core.placement.multiview import by_size, grid_stride


@dataclass(frozen=True)
class Anchor:
    """A placed view's points on a sparse pixel grid (host memory).

    In the map frame when ``window`` is None (overlap chaining), else in that window's own frame,
    in metres (pose-graph links between windows).
    """

    key: tuple[str, int]
    T_map_camera: np.ndarray
    uv: np.ndarray  # (N, 2) pixel centres in [0, 1] image coordinates
    points: np.ndarray  # (N, 3) map frame
    depth: np.ndarray  # (N,) map units
    weight: np.ndarray  # (N,) confidence normalised by the view's median
    window: int | None = None


def normalised_confidence(view: ViewPrediction, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Confidence at the pixels divided by its median: backends use different confidence scales."""
    conf = view.confidence[rows, cols].float()
    med = conf.median() if conf.numel() else torch.tensor(1.0)
    return (conf / med.clamp_min(1e-6)).clamp(0.0, 3.0)


def make_anchors(keys: Sequence[tuple[str, int]], views: Sequence[ViewPrediction], samples: int = 3000,
                 window: int | None = None, scale: float = 1.0) -> list[Anchor]:
    """An anchor per view (keyed by ``keys``), in the map frame, or in window ``window``'s frame times
    ``scale`` (metres). Views of one size are sampled in one pass: a window makes an anchor of every
    new view, and most of a single view's cost is the number of steps."""
    out: list[Anchor | None] = [None] * len(views)
    for (height, width, _), idx in by_size(views).items():
        s = grid_stride((height, width), samples)
        grid = (slice(s // 2, None, s), slice(s // 2, None, s))  # only where the grid samples
        depth = torch.stack([views[i].depth[grid] for i in idx]).float()
        ok = torch.stack([views[i].valid[grid] for i in idx]) & torch.isfinite(depth)
        conf = torch.stack([views[i].confidence[grid] for i in idx]).float()
        # Confidence over its median among the sampled valid pixels: backends use different scales.
        med = torch.where(ok, conf, float("nan")).flatten(1).nanmedian(1).values.nan_to_num(1.0).clamp_min(1e-6)
        weight = (conf / med[:, None, None]).clamp(0.0, 3.0)
        counts = ok.sum((1, 2)).tolist()
        _, sub_r, sub_c = torch.nonzero(ok, as_tuple=True)  # view by view, in row-major order
        rows, cols = sub_r * s + s // 2, sub_c * s + s // 2
        uv = torch.stack([(cols.float() + 0.5) / width, (rows.float() + 0.5) / height], dim=1).cpu().numpy()
        d = depth[ok].double().cpu().numpy() * scale
        w = weight[ok].double().cpu().numpy()
        start = 0
        for i, n in zip(idx, counts, strict=True):
            part = slice(start, start + n)
            start += n
            out[i] = Anchor(key=keys[i], T_map_camera=views[i].T_world_camera.copy(), uv=uv[part],
                            points=views[i].points_at(rows[part], cols[part]).double().cpu().numpy() * scale,
                            depth=d[part], weight=w[part], window=window)
    return out  # type: ignore[return-value]


def correspondences(anchor: Anchor, view: ViewPrediction, owed: np.ndarray | None = None
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(window points, map points, map depth, weights) at the anchor's pixels where ``view`` is valid;
    ``owed``: a transform the view's points still owe (refinement's), applied to those pixels only."""
    u = np.clip((anchor.uv[:, 0] * view.width).astype(np.int64), 0, view.width - 1)
    v = np.clip((anchor.uv[:, 1] * view.height).astype(np.int64), 0, view.height - 1)
    rows = torch.as_tensor(v, device=view.depth.device)
    cols = torch.as_tensor(u, device=view.depth.device)
    ok = (view.valid[rows, cols] & torch.isfinite(view.depth[rows, cols])).cpu().numpy()
    src = view.points_at(rows, cols).double().cpu().numpy()[ok]
    if owed is not None:
        src = src @ owed[:3, :3].T + owed[:3, 3]
    weight = np.minimum(anchor.weight[ok], normalised_confidence(view, rows, cols).double().cpu().numpy()[ok])
    return src, anchor.points[ok], anchor.depth[ok], weight


def depth_ratio(anchor: Anchor, view: ViewPrediction, min_points: int = 50) -> float | None:
    """Median of the anchor's depth over ``view``'s at the anchor's pixels: how much larger the map
    sees the frame than the view does (None with too few valid pixels in common)."""
    u = np.clip((anchor.uv[:, 0] * view.width).astype(np.int64), 0, view.width - 1)
    v = np.clip((anchor.uv[:, 1] * view.height).astype(np.int64), 0, view.height - 1)
    rows = torch.as_tensor(v, device=view.depth.device)
    cols = torch.as_tensor(u, device=view.depth.device)
    d = view.depth[rows, cols].double().cpu().numpy()
    ok = view.valid[rows, cols].cpu().numpy() & np.isfinite(d) & (d > 0) & (anchor.depth > 0)
    if ok.sum() < min_points:
        return None
    return float(np.median(anchor.depth[ok] / d[ok]))
