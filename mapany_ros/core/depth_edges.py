"""Depth edges: the pixels where a depth map jumps, and where a model puts its flying pixels.

A network (or stereo) interpolates across a depth discontinuity: the pixels on the edge get a
depth between the foreground and the background, with ordinary confidence, and back-project
into empty space between the two surfaces. No plane does that: the inverse depth of a plane is
affine in the pixel coordinates, however slanted the plane, so its second difference along any
image direction is zero (noise aside), while across a jump it is of the order of the jump. A
pixel is an edge pixel when, at it or at one of its eight neighbours, the second difference of
inverse depth along its row or its column exceeds ``threshold`` times the pixel's own inverse
depth (a jump from z to more than z / (1 - threshold) at the last pixel before it); a flying
pixel, the last foreground pixel and the first background pixel are all flagged.
Pixels next to an invalid one are edge pixels too (a mask often ends where the flying starts).
Vectorised torch on the depth's device: a handful of shifted-slice operations, no loop over pixels.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

#: Default relative threshold on the second difference of inverse depth (see the module docstring).
EDGE_THRESHOLD = 0.05
#: The threshold is at least this many standard deviations of the image's own second differences.
NOISE_FACTOR = 5.0
#: The noise is estimated on at most about this many pixels (every n-th row and column): its median
#: is then within a few per cent, and the estimate costs a small sort, not the image's.
_NOISE_SAMPLES = 4_000
#: Along rows and along columns: an edge of any orientation crosses at least one of them.
_DIRECTIONS = ((0, 1), (1, 0))


def depth_edges(depth: torch.Tensor, threshold: float = EDGE_THRESHOLD, valid: torch.Tensor | None = None,
                stride: int = 1, noise_factor: float = NOISE_FACTOR) -> torch.Tensor:
    """Edge pixels of z-depth ``depth`` (..., h, w) (NaN, inf or <= 0 = no depth), as a bool mask.

    With ``stride`` > 1 the mask is returned for every ``stride``-th pixel only (shape of
    ``depth[..., ::stride, ::stride]``), still judged on the full-resolution neighbourhood.
    Invalid pixels are never edge pixels (they are not there to drop). ``threshold`` <= 0 flags
    nothing. Where the depth is noisy from pixel to pixel, the threshold rises to ``noise_factor``
    times that noise (per image: :func:`_threshold`), so noise alone does not eat the surfaces.
    """
    inv = torch.reciprocal(depth.float())
    ok = (inv > 0) & (inv < float("inf"))  # False for NaN, inf, zero and negative depth
    if valid is not None:
        ok &= valid
    sub = (..., slice(None, None, stride), slice(None, None, stride))
    if threshold <= 0:
        return torch.zeros_like(ok[sub])
    h, w = depth.shape[-2:]
    inv.masked_fill_(~ok, float("nan"))
    P = F.pad(inv, (1, 1, 1, 1), value=float("nan"))
    twice = inv + inv
    second = []
    for dy, dx in _DIRECTIONS:
        a = P[..., 1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]
        b = P[..., 1 - dy : 1 - dy + h, 1 - dx : 1 - dx + w]
        second.append(torch.add(a, b).sub_(twice).abs_())  # NaN where a neighbour is missing
    limit = inv * _threshold(second[0], inv, threshold, noise_factor)
    kink = (second[0] > limit).logical_or_(second[1] > limit)  # NaN compares False
    # Dilate by one pixel, and flag pixels next to an invalid one; the image border is neither.
    kink = F.pad(kink, (1, 1, 1, 1), value=False)
    present = F.pad(ok, (1, 1, 1, 1), value=True)
    edge = _over_3x3(kink, torch.bitwise_or, h, w, stride)  # separable: rows, then (strided) columns
    whole = _over_3x3(present, torch.bitwise_and, h, w, stride)
    return (edge | ~whole) & ok[sub]


def _over_3x3(x: torch.Tensor, op, h: int, w: int, stride: int) -> torch.Tensor:
    """``op`` (bitwise or / and, on masks) over every 3x3 neighbourhood of ``x`` (..., h + 2, w + 2), for every
    ``stride``-th pixel: along rows, then along columns (four operations, not eighteen)."""
    r = op(x[..., :, 0:w:stride], x[..., :, 1 : w + 1 : stride])
    op(r, x[..., :, 2 : w + 2 : stride], out=r)
    out = op(r[..., 0:h:stride, :], r[..., 1 : h + 1 : stride, :])
    return op(out, r[..., 2 : h + 2 : stride, :], out=out)


def _threshold(second: torch.Tensor, inv: torch.Tensor, threshold: float, noise_factor: float) -> torch.Tensor:
    """Per image (leading dimensions): ``threshold``, or ``noise_factor`` robust standard deviations
    (1.4826 x median absolute value) of the relative second differences ``second / inv`` when that is larger.

    White depth noise of relative sigma s gives second differences of sigma ~2.45 s: 1 % noise
    would put one pixel in a few hundred over a 5 % threshold, and with the dilation eat a few
    per cent of every surface. A model's noise is smooth over its patches and changes nothing.
    """
    h, w = inv.shape[-2:]
    step = max(1, math.ceil((h * w / _NOISE_SAMPLES) ** 0.5))
    sample = (second[..., ::step, ::step] / inv[..., ::step, ::step]).flatten(-2)
    sigma = 1.4826 * torch.nanmedian(sample, dim=-1).values.nan_to_num(0.0)
    return torch.clamp(noise_factor * sigma, min=threshold)[..., None, None]
