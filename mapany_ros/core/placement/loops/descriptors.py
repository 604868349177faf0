"""Global image descriptors: which old keyframe looks like the new one, however far the map drifted.

Two classical descriptors, measured against each other on the synthetic revisits
(``mapany_ros/bench/loops.py``, docs/benchmarks.md):

* ``gradients``: histograms of gradient orientation (8 bins, magnitude-weighted) on a 4 x 4 grid
  of a 64 x 48 grey image, each cell normalised (lighting), square-rooted (Hellinger) and the
  whole L2-normalised: the layout of edges, tolerant to a few pixels of shift.
* ``thumbnail``: the 16 x 12 grey image, zero mean, unit norm (normalised cross-correlation).

A backend may offer its own (its encoder's features) with an optional method
``describe(frames) -> (n, d) array``; placement then uses those instead. Similarity
(:func:`similarities`) is the cosine of two descriptors after subtracting the mean of the stored
ones: images of one building share most of their edge statistics (raw cosines of any two lie
within 0.96-0.99), and only what sets a place apart from the rest of the map should count.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

DESCRIPTORS = ("gradients", "thumbnail")
_GREY = torch.tensor([0.299, 0.587, 0.114])


def _grey(image: np.ndarray, width: int, height: int) -> torch.Tensor:
    """(height, width) float32 grey image, area-averaged."""
    rgb = torch.from_numpy(np.array(image, dtype=np.float32))  # a copy: bag images are read-only
    grey = rgb @ _GREY if rgb.ndim == 3 else rgb
    return F.adaptive_avg_pool2d(grey[None, None], (height, width))[0, 0]


def gradient_descriptor(image: np.ndarray, bins: int = 8, grid: tuple[int, int] = (4, 4)) -> np.ndarray:
    """Edge-orientation layout of an RGB (or grey) image: (grid cells x bins,) float32, unit norm."""
    g = _grey(image, 64, 48)
    gx = torch.zeros_like(g)
    gy = torch.zeros_like(g)
    gx[:, 1:-1] = g[:, 2:] - g[:, :-2]
    gy[1:-1, :] = g[2:, :] - g[:-2, :]
    magnitude = torch.sqrt(gx**2 + gy**2)
    angle = torch.atan2(gy, gx) % np.pi  # unsigned orientation: a dark-to-light edge = light-to-dark
    index = torch.clamp((angle / np.pi * bins).long(), 0, bins - 1)
    onehot = F.one_hot(index, bins).float() * magnitude[..., None]  # (48, 64, bins)
    rows, cols = grid
    cells = F.adaptive_avg_pool2d(onehot.permute(2, 0, 1)[None], (rows, cols))[0]  # (bins, rows, cols)
    cells = cells / (cells.sum(0, keepdim=True) + 1e-6)
    d = torch.sqrt(cells).permute(1, 2, 0).reshape(-1)
    return (d / (d.norm() + 1e-12)).numpy().astype(np.float32)


def thumbnail_descriptor(image: np.ndarray) -> np.ndarray:
    """The 16 x 12 grey thumbnail, zero mean, unit norm: (192,) float32."""
    d = _grey(image, 16, 12).reshape(-1)
    d = d - d.mean()
    return (d / (d.norm() + 1e-12)).numpy().astype(np.float32)


def describe(image: np.ndarray, kind: str = "gradients") -> np.ndarray:
    if kind == "gradients":
        return gradient_descriptor(image)
    if kind == "thumbnail":
        return thumbnail_descriptor(image)
    raise ValueError(f"descriptor must be one of {', '.join(DESCRIPTORS)}, got {kind!r}")


def similarities(queries: np.ndarray, stored: np.ndarray) -> np.ndarray:
    """(q, n) cosines of ``queries`` (q, d) and ``stored`` (n, d), both centred on the stored mean."""
    stored = np.asarray(stored, dtype=np.float32)
    mean = stored.mean(axis=0, keepdims=True) if len(stored) > 1 else np.zeros((1, stored.shape[1]), np.float32)

    def unit(x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32) - mean
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)

    return unit(queries) @ unit(stored).T
