"""One map that holds: loop closure, a false loop that must not bend it, and relocalisation in a saved map.

The backend is the model simulator with errors that accumulate (a steady scale bias and heading and
position drift across every window), on several loops of the synthetic scene, scored against
ground truth with evo: ATE, and the revisit error - for keyframes at the same true place on
different passes, how far apart the map puts them.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mapany_ros.bench.accuracy import DRIFTING_MODEL, restart_in_saved_map
from mapany_ros.core.frames import Frame
from mapany_ros.core.geometry import make_pose
from mapany_ros.core.placement.loops.closer import LoopCandidate, LoopCloser, LoopConfig
from mapany_ros.core.placement.loops.memory import MAX_UNSETTLED_VIEWS
from mapany_ros.scoring.trajectory import ate, path_length, revisit_errors
from mapany_ros.sim.drive import drive
from mapany_ros.sim.model_simulator import ModelSimulator
from mapany_ros.sim.odometry import DriftingOdometry, OdometryErrors
from mapany_ros.sim.scene import SyntheticScene, make_camera_model


@pytest.fixture(scope="module")
def scene() -> SyntheticScene:
    return SyntheticScene(3)


def scores(run, odometry=None) -> dict[str, float]:
    stamps, truth = run.stamps, run.truth()
    est = [run.base_poses[s] for s in stamps]
    out = {"ate": ate(est, truth, stamps)[0], "length": path_length(truth),
           "revisit": float(np.median(revisit_errors(est, truth, stamps)))}
    if odometry is not None:
        odo = [odometry.pose(s * 1e-9) for s in stamps]
        out["odometry_ate"] = ate(odo, truth, stamps)[0]
        out["odometry_revisit"] = float(np.median(revisit_errors(odo, truth, stamps)))
    return out


def test_loops_without_odometry_hold_the_map_together(scene):
    run = drive(scene, ModelSimulator(scene=scene, noise_seed=4, **DRIFTING_MODEL), loops=3.0)
    s = scores(run)
    closed = run.pipeline.stats.loops_closed
    assert closed >= 3, closed
    assert s["ate"] <= 0.01 * s["length"], s
    assert s["revisit"] <= 0.05, s
    assert any(r.placement.status.name == "LOOP_CLOSED" and r.placement.corrections for r in run.results)


def test_loops_with_drifting_odometry(scene):
    odometry = DriftingOdometry(scene.base_pose, OdometryErrors.poor(seed=5))
    run = drive(scene, ModelSimulator(scene=scene, noise_seed=4, **DRIFTING_MODEL), odometry=odometry,
                rate_hz=10.0, loops=2.0)
    s = scores(run, odometry)
    assert run.pipeline.stats.loops_closed >= 3
    assert s["ate"] <= 0.25 * s["odometry_ate"], s
    assert s["revisit"] <= 0.05, s
    assert s["revisit"] <= 0.1 * s["odometry_revisit"], s


def test_a_false_loop_candidate_per_loop_does_not_bend_the_map(scene, monkeypatch):
    """With every true candidate, verification also gets one that is wrong: a keyframe from the
    far side of the loop. The map must come out as without them."""
    odometry = DriftingOdometry(scene.base_pose, OdometryErrors.poor(seed=5))

    def run_drive():
        return drive(scene, ModelSimulator(scene=scene, noise_seed=4, **DRIFTING_MODEL), odometry=odometry,
                     rate_hz=10.0, loops=1.5)

    clean = scores(run_drive())
    propose = LoopCloser.propose
    false = []

    def with_a_false_one(self, kid, poses, sigma, every=False):
        before = len(self._queue)
        propose(self, kid, poses, sigma, every)
        if len(self._queue) > before:  # a true candidate was queued: add a wrong one beside it
            here = self.memory.keyframes[kid].stamp_ns * 1e-9
            far = [k for k, kf in self.memory.keyframes.items() if k < kid - 30 and np.linalg.norm(
                scene.base_pose(kf.stamp_ns * 1e-9)[:3, 3] - scene.base_pose(here)[:3, 3]) > 3.0]
            if far:
                false.append(far[len(far) // 2])
                self.submit(LoopCandidate(far[len(far) // 2], kid, "false", 0.0))

    monkeypatch.setattr(LoopCloser, "propose", with_a_false_one)
    run = run_drive()
    noisy = scores(run, odometry)
    assert len(false) >= 3
    assert run.pipeline.stats.loops_closed >= 3
    assert abs(noisy["ate"] - clean["ate"]) <= 0.1 * clean["ate"] + 0.005, (clean, noisy)


def test_loop_work_left_for_an_idle_backend_finds_what_it_would_have_found_at_once(scene):
    """A window only keeps its keyframes' images and the poses of the moment; the candidate searches,
    descriptors and JPEGs made later, while the backend is idle (here only now and then), are the
    ones made at once - though the graph's poses have moved since - and what waits stays bounded."""
    cam = make_camera_model(128, 96)
    config = LoopConfig(min_gap_keyframes=6, every_keyframes=2, position_candidates=2, appearance_candidates=2)
    now, later = LoopCloser(config, 0.05, 0.01), LoopCloser(config, 0.05, 0.01)
    depth, valid = torch.full((96, 128), 2.0), torch.ones(96, 128, dtype=torch.bool)
    poses: dict[int, np.ndarray] = {}
    for kid in range(48):
        t = 1.0 + 0.4 * kid
        frame = Frame(scene.render(scene.camera_pose(t), cam)[0], int(t * 1e9), "camera", "camera_optical_frame", cam)
        poses[kid] = scene.base_pose(t)
        for closer in (now, later):
            closer.remember(kid, frame.stamp_ns, [(frame, scene.T_base_camera, depth, valid)])
        now.propose(kid, poses, 0.1)
        if later.searches(kid):
            later.search_later(kid, poses, 0.1)
        assert later.memory.unsettled <= MAX_UNSETTLED_VIEWS
        for k in poses:  # the graph moves every keyframe after each window (new arrays, as the placer does)
            poses[k] = poses[k] @ make_pose(np.eye(3), [0.03, 0.0, 0.0])
        if kid % 9 == 8:
            later.idle_work()
    assert later.pending and later.memory.unsettled > 0
    later.idle_work()
    assert later.memory.unsettled == 0
    assert now.stats.candidates == later.stats.candidates > 0

    def jobs(closer):
        out = []
        while (job := closer.next_job()) is not None:
            c = job.candidate
            out.append((c.old_kid, c.new_kid, c.source, c.score))
        return out

    assert jobs(now) == jobs(later)
    for kid, kf in now.memory.keyframes.items():
        other = later.memory.keyframes[kid]
        assert kf.views[0].jpeg == other.views[0].jpeg
        assert np.array_equal(kf.views[0].descriptor, other.views[0].descriptor)
        assert np.array_equal(kf.views[0].depth, other.views[0].depth, equal_nan=True)


@pytest.mark.parametrize("with_odometry", [True, False])
def test_a_restart_in_a_saved_map_localises_and_maps_in_its_frame(with_odometry):
    """Map, save, restart elsewhere on the drive with map.load_path: localised within 3 windows, and
    then the same places land where the saved map has them (the scenario of ``make bench``)."""
    r = restart_in_saved_map(with_odometry)
    assert "map.ply" in r["saved"] and "keyframes.npz" in r["saved"], r["saved"]
    assert r["localised"] and r["windows_unlocalised"] <= 3, r
    assert r["places"] >= 5 and r["median_m"] <= 0.05, r
