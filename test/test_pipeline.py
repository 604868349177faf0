"""The pipeline's threading, queueing, odometry waits and resets, with a fake backend."""

import threading
import time

import numpy as np
from core_fakes import RecordingBackend, base_pose, frame

from mapany_ros.core.geometry import make_pose
from mapany_ros.core.pipeline import FrameStatus, Pipeline, PipelineConfig

T_BASE_CAM = make_pose(np.eye(3), [0.1, 0.0, 0.5])


def make(backend, **kw):
    results = []
    cfg = PipelineConfig(**{"window_size": 4, "window_overlap": 1, "min_translation_m": 0.1,
                            "max_interval_s": 10.0, **kw})
    p = Pipeline(cfg, backend, results.append)
    p.set_extrinsic("camera", T_BASE_CAM)
    return p, results


def test_frames_get_interpolated_pose_priors_and_windows_run_on_the_worker():
    backend = RecordingBackend()
    p, results = make(backend, min_translation_m=0.05, queue_size=16)
    p.start()
    worker_threads = set()
    original = backend.infer
    backend.infer = lambda fs: (worker_threads.add(threading.current_thread().name), original(fs))[1]
    for i in range(40):
        p.add_odometry(int(i * 0.05e9), base_pose(i * 0.05))  # 1 m/s at 20 Hz
    for i in range(19):
        status, reset = p.add_frame(frame(0.1 * i + 0.025))
        assert status is FrameStatus.ACCEPTED and not reset
    p.flush()
    assert p.wait_idle(10)
    p.stop()
    assert worker_threads == {"mapany-backend"}
    first = backend.calls[0][0]
    np.testing.assert_allclose(first.T_world_camera[:3, 3], [0.025 + 0.1, 0, 0.5], atol=1e-9)
    outputs = [f.stamp_ns for r in results for f, o in zip(r.frames, r.output_mask, strict=True) if o]
    assert len(outputs) == len(set(outputs)) == 19
    for r in results:  # exact odometry and an identity backend: map -> odom is identity
        np.testing.assert_allclose(r.T_map_odom, np.eye(4), atol=1e-9)


def test_frame_waits_for_odometry_then_times_out():
    clock = [0.0]
    backend = RecordingBackend()
    cfg = PipelineConfig(window_size=4, window_overlap=1, odom_max_wait_s=0.5)
    p = Pipeline(cfg, backend, lambda r: None, clock=lambda: clock[0])
    p.set_extrinsic("camera", T_BASE_CAM)
    p.add_odometry(0, base_pose(0))
    assert p.add_frame(frame(0.05))[0] is FrameStatus.WAITING
    assert p.add_odometry(int(0.1e9), base_pose(0.1)) == [FrameStatus.ACCEPTED]
    assert p.add_frame(frame(0.2))[0] is FrameStatus.WAITING
    clock[0] = 1.0
    assert p.poll() == [FrameStatus.DROPPED_ODOM_TIMEOUT]
    assert p.stats.frames_dropped == 1


def test_missing_extrinsic_drops_frames():
    p = Pipeline(PipelineConfig(), RecordingBackend(), lambda r: None)
    assert p.add_frame(frame(0.0))[0] is FrameStatus.DROPPED_NO_EXTRINSIC


def test_stamps_going_backwards_reset_everything():
    p, _ = make(RecordingBackend())
    p.add_odometry(0, base_pose(0))
    p.add_odometry(int(0.1e9), base_pose(0.1))
    assert p.add_frame(frame(0.05)) == (FrameStatus.ACCEPTED, False)
    status, reset = p.add_frame(frame(0.02))
    assert reset and p.stats.resets == 1
    assert len(p.odometry) == 0 and status is FrameStatus.WAITING


def test_slow_backend_never_blocks_callers_and_drops_oldest_windows():
    backend = RecordingBackend(delay_s=0.3)
    p, results = make(backend, use_odometry=False, window_size=2, window_overlap=0, max_interval_s=0.001,
                      queue_size=2)
    p.start()
    worst = 0.0
    for i in range(90):  # 3 s of 30 Hz input
        t0 = time.perf_counter()
        p.add_frame(frame(i / 30))
        worst = max(worst, time.perf_counter() - t0)
        time.sleep(1 / 30)
    queued = len(p._queue)
    p.stop()
    assert worst < 0.05, f"add_frame blocked for {worst * 1e3:.0f} ms"
    assert queued <= 2
    assert backend.max_active == 1
    assert p.stats.windows_dropped >= 20 and len(backend.calls) >= 5
    assert p.stats.windows_built == p.stats.windows_dropped + len(backend.calls) + queued


def test_backend_failure_is_counted_and_the_worker_survives():
    errors = []
    backend = RecordingBackend(fail_on=1)
    p, results = make(backend, use_odometry=False, window_size=2, window_overlap=0, max_interval_s=0.001)
    p._on_error = errors.append
    p.start()
    for i in range(4):
        p.add_frame(frame(i * 0.1))
        p.wait_idle(5)
    p.stop()
    assert len(errors) == 1 and p.stats.windows_failed == 1
    assert len(results) == 1


def test_context_frames_carry_previous_estimates():
    class Shift(RecordingBackend):
        def infer(self, frames):
            pred = super().infer(frames)
            for v in pred.views:
                v.T_world_camera = v.T_world_camera @ make_pose(np.eye(3), [0, 0, 1.0])
            return pred

    backend = Shift()
    p, _ = make(backend, use_odometry=False, window_size=3, window_overlap=1, max_interval_s=0.001)
    p.start()
    for i in range(5):
        p.add_frame(frame(i * 0.1, pose=None))
    p.wait_idle(5)
    p.stop()
    ctx = backend.calls[1][0]
    assert ctx.stamp_ns == backend.calls[0][-1].stamp_ns
    np.testing.assert_allclose(ctx.T_world_camera[:3, 3], [0, 0, 1.0])


def test_partial_window_is_flushed_by_the_age_of_its_oldest_keyframe():
    clock = [100.0]
    backend = RecordingBackend()
    cfg = PipelineConfig(use_odometry=False, window_size=8, window_overlap=2, max_interval_s=0.001,
                         max_window_latency_s=1.5, queue_size=8)
    p = Pipeline(cfg, backend, lambda r: None, clock=lambda: clock[0])
    clock[0] = 200.0  # the node waited long for its first input: that alone must not flush
    p.add_frame(frame(0.0))
    p.add_frame(frame(0.1))
    p.poll()
    assert p.stats.windows_built == 0
    clock[0] = 201.0
    p.poll()
    assert p.stats.windows_built == 0
    clock[0] = 201.6  # the oldest waiting keyframe is now 1.6 s old
    p.poll()
    assert p.stats.windows_built == 1 and p._windows.pending == 0
