"""Plane-sweep stereo against synthetic ground truth, plus its input contract."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from mapany_ros.core.backends.base import Backend, BackendError, WindowPrediction
from mapany_ros.core.backends.planesweep import PlaneSweepBackend, _mean_of_smallest, _window_sum
from mapany_ros.core.geometry import backproject, make_pose
from mapany_ros.scoring.metrics import (
    depth_errors,
    downsample_depth,
    gt_points,
    pixel_point_errors,
    surface_distances,
)
from mapany_ros.sim.scene import SyntheticSequence, make_sequence

# The acceptance bar, per frame of the window.
MAX_MEDIAN_REL = 0.03
MIN_WITHIN_10PCT = 0.90
MIN_VALID = 0.60
MAX_POINT_MEDIAN_M = 0.05


@pytest.fixture(scope="module")
def seq0() -> SyntheticSequence:
    """Default scene, 8 consecutive frames of a 10 Hz 640x480 camera on the default trajectory."""
    return make_sequence(0, 640, 480, n_frames=8, rate_hz=10.0)


@pytest.fixture(scope="module")
def pred0(seq0: SyntheticSequence) -> WindowPrediction:
    return PlaneSweepBackend().infer(seq0.to_frames())


def frame_scores(seq: SyntheticSequence, pred: WindowPrediction) -> list[dict[str, float]]:
    scores = []
    for vp, f in zip(pred.views, seq.frames):
        gt = downsample_depth(f.depth, vp.width, vp.height)
        e = depth_errors(vp.depth, vp.valid, gt)
        along_ray = pixel_point_errors(vp.points_world, vp.valid, gt, vp.K, vp.T_world_camera)
        surface = gt_points(f.depth, seq.camera_model.K, f.T_odom_camera)  # full-resolution truth
        to_surface = surface_distances(vp.points_world[vp.valid], surface)
        scores.append(
            dict(
                median_rel=e.median_abs_rel,
                within10=e.within_10pct,
                valid=e.valid_fraction,
                point_median=float(np.median(along_ray)),
                surface_median=float(np.median(to_surface)),
            )
        )
    return scores


def assert_accurate(scores: list[dict[str, float]]) -> None:
    for i, s in enumerate(scores):
        msg = f"frame {i}: {s}"
        assert s["median_rel"] <= MAX_MEDIAN_REL, msg
        assert s["within10"] >= MIN_WITHIN_10PCT, msg
        assert s["valid"] >= MIN_VALID, msg
        assert s["point_median"] <= MAX_POINT_MEDIAN_M, msg
        assert s["surface_median"] <= MAX_POINT_MEDIAN_M, msg


# ------------------------------------------------------------------------------ accuracy


def test_default_scene_accuracy(seq0: SyntheticSequence, pred0: WindowPrediction) -> None:
    assert [(v.width, v.height) for v in pred0.views] == [(320, 240)] * 8
    assert_accurate(frame_scores(seq0, pred0))


def test_other_seed_and_resolution_accuracy() -> None:
    seq = make_sequence(3, 480, 360, n_frames=8, rate_hz=10.0, start_s=6.0)
    pred = PlaneSweepBackend().infer(seq.to_frames())
    assert [(v.width, v.height) for v in pred.views] == [(240, 180)] * 8
    assert_accurate(frame_scores(seq, pred))


def test_coarse_to_fine_at_full_input_resolution() -> None:
    """The faster mode, with no resize (downscale 1), on a third seed."""
    seq = make_sequence(2, 256, 192, n_frames=8, rate_hz=10.0, start_s=12.0)
    pred = PlaneSweepBackend(downscale=1.0, coarse_to_fine=True, refine_hypotheses=9).infer(seq.to_frames())
    assert [(v.width, v.height) for v in pred.views] == [(256, 192)] * 8
    assert_accurate(frame_scores(seq, pred))


def test_filtering_is_what_makes_it_trustworthy() -> None:
    """Without confidence and consistency filtering more pixels come out, and many are wrong."""
    seq = make_sequence(1, 160, 120, n_frames=6, rate_hz=10.0, start_s=3.0)
    frames = seq.to_frames()
    kept = PlaneSweepBackend(downscale=1.0).infer(frames)
    raw = PlaneSweepBackend(
        downscale=1.0, min_confidence=0.0, min_zncc=-1.0, min_texture=0.0, min_consistent_views=0
    ).infer(frames)
    kept_s, raw_s = frame_scores(seq, kept), frame_scores(seq, raw)
    assert np.mean([s["valid"] for s in raw_s]) > np.mean([s["valid"] for s in kept_s]) + 0.05
    assert np.mean([s["within10"] for s in kept_s]) > np.mean([s["within10"] for s in raw_s]) + 0.03
    assert all(s["within10"] > 0.95 for s in kept_s)


def test_a_frame_with_a_wrong_pose_prior_is_not_trusted() -> None:
    """Depth that disagrees with the other views (here: a 15 cm pose error) is filtered out."""
    seq = make_sequence(0, 160, 120, n_frames=6, rate_hz=10.0, start_s=9.0)
    frames = seq.to_frames()
    good = PlaneSweepBackend(downscale=1.0).infer(frames)
    frames[2].T_world_camera = frames[2].T_world_camera @ make_pose(np.eye(3), [0.15, 0.0, 0.0])
    bad = PlaneSweepBackend(downscale=1.0).infer(frames)
    assert bad.views[2].valid.float().mean() < 0.5 * good.views[2].valid.float().mean()


# ------------------------------------------------------------------------------ contract


def test_prediction_contract(seq0: SyntheticSequence, pred0: WindowPrediction) -> None:
    backend: Backend = PlaneSweepBackend()
    assert backend.name == "planesweep" and backend.needs_pose_priors is True
    assert set(pred0.timings_s) >= {"prepare", "sweep", "filter", "total"}
    assert pred0.timings_s["total"] > 0
    K_out = seq0.camera_model.scaled(320, 240).K
    for vp, f in zip(pred0.views, seq0.frames):
        assert vp.depth.dtype == torch.float32 and vp.depth.shape == (240, 320)
        assert vp.confidence.dtype == torch.float32 and vp.confidence.shape == (240, 320)
        assert vp.valid.dtype == torch.bool
        assert vp.points_world.dtype == torch.float32 and vp.points_world.shape == (240, 320, 3)
        assert vp.colors.dtype == torch.uint8 and vp.colors.shape == (240, 320, 3)
        assert torch.all(torch.isnan(vp.depth) == ~vp.valid)
        assert torch.all((vp.confidence >= 0) & (vp.confidence <= 1))
        assert vp.T_world_camera.dtype == np.float64
        np.testing.assert_array_equal(vp.T_world_camera, f.T_odom_camera)
        np.testing.assert_allclose(vp.K, K_out)
        torch.testing.assert_close(
            vp.points_world, backproject(vp.depth, vp.K, vp.T_world_camera), equal_nan=True
        )
        # Colours are the input averaged over each 2x2 block.
        block = f.rgb.reshape(240, 2, 320, 2, 3).mean(axis=(1, 3))
        assert np.abs(vp.colors.numpy().astype(float) - block).max() <= 0.5 + 1e-6


def test_single_frame_window_has_no_depth() -> None:
    seq = make_sequence(0, 64, 48, n_frames=1)
    pred = PlaneSweepBackend(downscale=1.0).infer(seq.to_frames())
    assert len(pred.views) == 1 and not pred.views[0].valid.any()
    assert torch.isnan(pred.views[0].depth).all()


@pytest.fixture(scope="module")
def tiny_frames():
    return make_sequence(0, 64, 48, n_frames=3).to_frames()


def test_missing_pose_prior_is_refused_with_the_fix(tiny_frames) -> None:
    frames = [dataclasses.replace(f) for f in tiny_frames]
    frames[1].T_world_camera = None
    with pytest.raises(BackendError) as err:
        PlaneSweepBackend().infer(frames)
    msg = str(err.value)
    assert "pose prior" in msg and "use_odometry: true" in msg and "/tf_static" in msg


def test_distortion_and_bad_input_are_refused(tiny_frames) -> None:
    f = tiny_frames[0]
    cam = dataclasses.replace(f.camera_model, D=np.array([0.1, 0.0, 0.0, 0.0, 0.0]))
    with pytest.raises(BackendError, match="distortion"):
        PlaneSweepBackend().infer([dataclasses.replace(f, camera_model=cam), *tiny_frames[1:]])
    with pytest.raises(BackendError, match="empty"):
        PlaneSweepBackend().infer([])
    with pytest.raises(BackendError, match="rigid"):
        PlaneSweepBackend().infer([dataclasses.replace(f, T_world_camera=np.full((4, 4), np.nan))])
    with pytest.raises(BackendError, match="CameraInfo"):
        PlaneSweepBackend().infer([dataclasses.replace(f, image=f.image[:, :-2])])


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        (dict(num_planes=2), "num_planes"),
        (dict(num_planes=32.0), "num_planes"),
        (dict(min_depth_m=0.0), "min_depth_m"),
        (dict(min_depth_m=5.0, max_depth_m=4.0), "max_depth_m"),
        (dict(max_depth_m=float("inf")), "max_depth_m"),
        (dict(downscale=0.5), "downscale"),
        (dict(downscale="two"), "downscale"),
        (dict(num_neighbors=0), "num_neighbors"),
        (dict(window=4), "window"),
        (dict(best_k=0), "best_k"),
        (dict(refine_hypotheses=6), "refine_hypotheses"),
        (dict(min_baseline_m=-0.1), "min_baseline_m"),
        (dict(max_view_angle_deg=0.0), "max_view_angle_deg"),
        (dict(min_confidence=1.0), "min_confidence"),
        (dict(min_zncc=1.5), "min_zncc"),
        (dict(min_texture=-1.0), "min_texture"),
        (dict(consistency_rel=0.0), "consistency_rel"),
        (dict(min_consistent_views=-1), "min_consistent_views"),
        (dict(plane_chunk=0), "plane_chunk"),
        (dict(device="tpu"), "device"),
    ],
)
def test_settings_are_validated(kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        PlaneSweepBackend(**kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="only meaningful without CUDA")
def test_cuda_request_without_cuda_is_a_backend_error() -> None:
    with pytest.raises(BackendError, match="device: cpu"):
        PlaneSweepBackend(device="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu() -> None:
    seq = make_sequence(0, 320, 240, n_frames=5, rate_hz=10.0)
    frames = seq.to_frames()
    cpu = PlaneSweepBackend(downscale=1.0).infer(frames)
    gpu = PlaneSweepBackend(device="cuda", downscale=1.0).infer(frames)
    for c, g in zip(cpu.views, gpu.views):
        assert g.depth.is_cuda and g.points_world.is_cuda
        both = c.valid & g.valid.cpu()
        assert both.float().mean() > 0.9 * c.valid.float().mean()
        rel = (c.depth[both] - g.depth.cpu()[both]).abs() / c.depth[both]
        assert rel.median() < 1e-3


# ------------------------------------------------------------------------------ building blocks


@pytest.mark.parametrize("n", [1, 2, 3, 4, 6])
def test_mean_of_smallest_matches_sorting(n: int) -> None:
    g = torch.Generator().manual_seed(n)
    costs = torch.rand((n, 5, 7), generator=g)
    for k in range(1, n + 2):
        expected = costs.sort(dim=0).values[: min(k, n)].mean(dim=0)
        torch.testing.assert_close(_mean_of_smallest(list(costs), k), expected)


@pytest.mark.parametrize("k", [1, 3, 5, 7, 9])
def test_window_sum_matches_direct_sum(k: int) -> None:
    x = torch.rand(3, 20, 17)
    out = _window_sum(x, k, -1)
    expected = torch.stack([x[..., i : i + k].sum(-1) for i in range(17 - k + 1)], dim=-1)
    torch.testing.assert_close(out, expected)
    out = _window_sum(x, k, -2)
    expected = torch.stack([x[:, i : i + k].sum(-2) for i in range(20 - k + 1)], dim=-2)
    torch.testing.assert_close(out, expected)
