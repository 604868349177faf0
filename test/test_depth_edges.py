"""Depth edges: jumps and flying pixels are found, planes of any slant and noisy surfaces are kept."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mapany_ros.core.depth_edges import depth_edges

H, W, F = 120, 160, 120.0  # pixels and focal length


def plane_depth(normal: np.ndarray, distance: float) -> torch.Tensor:
    """z-depth of the plane n . X = distance seen by a pinhole camera at the origin."""
    v, u = np.mgrid[0:H, 0:W].astype(np.float64)
    rays = np.stack([(u - (W - 1) / 2) / F, (v - (H - 1) / 2) / F, np.ones_like(u)], -1)
    return torch.tensor(distance / (rays @ normal), dtype=torch.float32)


@pytest.mark.parametrize("slant_deg", [0.0, 45.0, 75.0, 85.0])
def test_planes_of_any_slant_have_no_edges(slant_deg: float) -> None:
    """The inverse depth of a plane is affine in the pixel: even a floor seen at 85 degrees is no edge."""
    a = np.radians(slant_deg)
    depth = plane_depth(np.array([0.0, np.sin(a), np.cos(a)]), 3.0)
    depth[(depth <= 0) | (depth > 30.0)] = float("nan")  # towards and behind the horizon
    missing = ~torch.isfinite(depth)
    assert (~missing).float().mean() > 0.3
    rim = torch.nn.functional.max_pool2d(missing[None].float(), 3, 1, 1)[0].bool() & ~missing
    assert not (depth_edges(depth) & ~rim).any()  # only the rim of the missing part, as next to any hole


def test_a_step_and_a_flying_pixel_are_edges_on_both_sides_and_nothing_else() -> None:
    depth = torch.full((H, W), 2.0)
    depth[:, 80:] = 3.0  # a wall behind a box
    depth[40, 80] = 2.5  # a flying pixel between them
    edges = depth_edges(depth)
    assert bool(edges[:, 78:82].all())  # the jump and one pixel beside it, on both sides
    assert torch.nonzero(edges[:, 82]).flatten().tolist() == [39, 40, 41]  # beside the flying pixel's own jump
    assert not edges[:, :78].any() and not edges[:, 83:].any()
    small = torch.full((H, W), 2.0)
    small[:, 80:] = 2.06  # a 3 % step is below the threshold: its flying pixels land within 3 cm
    assert not depth_edges(small).any()


def test_pixels_next_to_a_hole_are_edges_but_the_image_border_is_not() -> None:
    depth = torch.full((H, W), 2.0)
    valid = torch.ones(H, W, dtype=torch.bool)
    valid[50:60, 70:90] = False
    edges = depth_edges(depth, valid=valid)
    ring = torch.zeros(H, W, dtype=torch.bool)
    ring[49:61, 69:91] = True
    ring[50:60, 70:90] = False  # the hole itself is not an edge, it is not there
    assert torch.equal(edges, ring)
    depth[50:60, 70:90] = float("nan")
    assert torch.equal(depth_edges(depth), ring)


def test_white_noise_raises_the_threshold_instead_of_eating_the_surface() -> None:
    """1 % per-pixel noise makes second differences of 2.5 %: the threshold follows the image's noise."""
    rng = np.random.default_rng(0)
    a = np.radians(60.0)
    clean = plane_depth(np.array([0.0, np.sin(a), np.cos(a)]), 3.0)
    clean[clean <= 0] = float("nan")
    noisy = clean * torch.tensor(1 + 0.01 * rng.standard_normal((H, W)), dtype=torch.float32)
    assert depth_edges(noisy).float().mean() < 0.01
    assert depth_edges(noisy, noise_factor=0.0).float().mean() > 0.2  # a fixed 5 % threshold would
    noisy[:, 80:] *= 1.5  # and a real jump still shows above the noise
    assert bool(depth_edges(noisy)[:, 79:81].float().mean() > 0.95)


def test_strided_and_batched_masks_are_the_full_mask_subsampled() -> None:
    rng = np.random.default_rng(1)
    depth = torch.tensor(2 + rng.uniform(size=(2, H, W)) * (rng.uniform(size=(2, H, W)) < 0.05), dtype=torch.float32)
    depth[0, ::7, ::5] = float("nan")
    full = depth_edges(depth)
    for b in range(2):
        assert torch.equal(full[b], depth_edges(depth[b]))  # each image judged on its own noise
    for stride in (2, 3, 4):
        assert torch.equal(depth_edges(depth, stride=stride), full[:, ::stride, ::stride])
    assert not depth_edges(depth, threshold=0.0).any()
