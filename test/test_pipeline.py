"""The pipeline's threading, queueing, odometry waits and resets, with a fake backend."""

import dataclasses
import threading
import time

import numpy as np
from core_fakes import RecordingBackend, base_pose, frame

from mapany_ros.core.geometry import invert, make_pose, rotation_angle
from mapany_ros.core.pipeline import FrameStatus, Pipeline, PipelineConfig
from mapany_ros.core.placement import PlacementConfig
from mapany_ros.core.placement.loops import LoopConfig

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
    # Every prior the backend sees is the odometry's, context frames included (never a map estimate).
    for call in backend.calls:
        for f in call:
            np.testing.assert_allclose(f.T_world_base[:3, 3], [f.stamp_ns * 1e-9, 0, 0], atol=1e-9)


def test_frame_waits_for_odometry_then_times_out():
    clock = [0]
    backend = RecordingBackend()
    cfg = PipelineConfig(window_size=4, window_overlap=1, odom_max_wait_s=0.5)
    p = Pipeline(cfg, backend, lambda r: None, clock=lambda: clock[0])
    p.set_extrinsic("camera", T_BASE_CAM)
    p.add_odometry(0, base_pose(0))
    assert p.add_frame(frame(0.05))[0] is FrameStatus.WAITING
    assert p.add_odometry(int(0.1e9), base_pose(0.1)) == [FrameStatus.ACCEPTED]
    assert p.add_frame(frame(0.2))[0] is FrameStatus.WAITING
    clock[0] = int(0.6e9)  # message time: 0.4 s after the image's stamp, still within the wait
    assert p.poll() == []
    clock[0] = int(0.75e9)
    assert p.poll() == []  # past its deadline: dropped at the next poll unless odometry comes first
    clock[0] = int(0.85e9)
    assert p.poll() == [FrameStatus.DROPPED_ODOM_TIMEOUT]
    assert p.stats.frames_dropped == 1


def test_a_stalled_executor_neither_drops_frames_nor_cuts_windows_the_data_does_not():
    """After a stall the clock (a depth-1 /clock subscription) jumps ahead of images and odometry
    still queued for the node, and the timer runs first: nothing may be decided on that jump."""
    clock = [0]
    backend = RecordingBackend()
    cfg = PipelineConfig(window_size=4, window_overlap=1, odom_max_wait_s=0.5, max_window_latency_s=1.0,
                         max_interval_s=0.01, queue_size=8)
    p = Pipeline(cfg, backend, lambda r: None, clock=lambda: clock[0])
    p.set_extrinsic("camera", T_BASE_CAM)
    p.add_odometry(0, base_pose(0))
    for t in (0.1, 0.2):  # two keyframes taken in, one frame waiting for its odometry
        p.add_odometry(int(t * 1e9), base_pose(t))
        clock[0] = int(t * 1e9)
        p.add_frame(frame(t))
    assert p.add_frame(frame(0.3))[0] is FrameStatus.WAITING
    clock[0] = int(3.0e9)  # the stall: the clock jumps by 2.7 s
    assert p.poll() == [] and len(p._pending) == 2 and p._pending.windows_ready == 0
    # The backlog arrives before the next timer tick: odometry, then the images it covers.
    for t in (0.3, 0.4, 0.5):
        p.add_odometry(int(t * 1e9), base_pose(t))
        if t > 0.3:
            p.add_frame(frame(t))
    clock[0] = int(3.1e9)
    assert p.poll() == [] and p.stats.frames_dropped == 0
    assert p._pending.windows_ready == 1  # the first full window (4 keyframes), cut by the data
    # Input really stops (a driver repeating its last frame is no new input): two polls later the
    # rest is flushed as a partial window.
    for t in (3.2, 3.3, 4.0, 4.1, 4.2):
        p.add_frame(frame(0.6))
        clock[0] = int(t * 1e9)
        p.poll()
    assert p.stats.frames_dropped == 1 + 4  # 0.6 s never got its odometry; four repeats of it
    assert p._pending.windows_ready == 2


def test_frames_wait_for_a_late_extrinsic_then_time_out():
    clock = [0]
    p = Pipeline(PipelineConfig(odom_max_wait_s=0.5), RecordingBackend(), lambda r: None, clock=lambda: clock[0])
    p.add_odometry(0, base_pose(0))
    p.add_odometry(int(0.2e9), base_pose(0.2))
    assert p.add_frame(frame(0.1))[0] is FrameStatus.WAITING  # /tf_static comes just after the first image
    assert p.set_extrinsic("camera", T_BASE_CAM) == [FrameStatus.ACCEPTED]
    late = Pipeline(PipelineConfig(odom_max_wait_s=0.5), RecordingBackend(), lambda r: None, clock=lambda: clock[0])
    assert late.add_frame(frame(0.1))[0] is FrameStatus.WAITING
    clock[0] = int(0.7e9)
    assert late.poll() == [FrameStatus.DROPPED_NO_EXTRINSIC]


def test_a_long_jump_back_resets_everything_and_duplicates_are_dropped():
    resets = []
    p, _ = make(RecordingBackend())
    p._on_reset = resets.append
    p.add_odometry(0, base_pose(0))
    p.add_odometry(int(0.1e9), base_pose(0.1))
    assert p.add_frame(frame(0.05)) == (FrameStatus.ACCEPTED, False)
    assert p.add_frame(frame(0.05)) == (FrameStatus.DROPPED_DUPLICATE, False)
    assert p.add_frame(frame(0.02)) == (FrameStatus.DROPPED_OUT_OF_ORDER, False)
    assert p.stats.resets == 0 and len(p.odometry) == 2
    for t in np.arange(0.2, 5.05, 0.1):
        p.add_odometry(int(round(t * 1e9)), base_pose(t))
    assert p.add_frame(frame(4.9)) == (FrameStatus.ACCEPTED, False)
    status, reset = p.add_frame(frame(2.0))  # 2.9 s back from the newest image: the bag looped
    assert reset and p.stats.resets == 1 and "jumped back" in resets[0]
    assert len(p.odometry) == 0 and status is FrameStatus.WAITING
    p.add_odometry(int(5.0e9), base_pose(5.0))
    p.add_odometry(int(1.0e9), base_pose(1.0))  # odometry 4 s back resets again, and says so
    assert p.stats.resets == 2 and "odometry" in resets[1]


def test_slow_backend_never_blocks_callers_and_thins_keyframes_instead_of_dropping_windows():
    backend = RecordingBackend(delay_s=0.3)
    p, results = make(backend, use_odometry=False, window_size=3, window_overlap=1, max_interval_s=0.001,
                      queue_size=2)
    p.start()
    worst = 0.0
    start = time.perf_counter()
    for i in range(90):  # 3 s of 30 Hz input
        t0 = time.perf_counter()
        p.add_frame(frame(i / 30))
        worst = max(worst, time.perf_counter() - t0)
        time.sleep(max(0.0, start + (i + 1) / 30 - time.perf_counter()))
    waiting = len(p._pending)
    p.stop()
    assert worst < 0.05, f"add_frame blocked for {worst * 1e3:.0f} ms"
    assert waiting <= (2 + 1) * (3 - 1)  # two cut windows may wait, and one window's worth uncut
    assert backend.max_active == 1
    assert p.stats.keyframes_skipped >= 40 and len(backend.calls) >= 5
    # No window is dropped: every one built ran; every one after the first starts with the
    # newest keyframe the previous one placed.
    assert p.stats.windows_built - len(backend.calls) <= 1
    for prev, call in zip(backend.calls, backend.calls[1:], strict=False):
        assert call[0].key == prev[-1].key


def test_backend_failure_is_counted_and_the_worker_survives():
    errors = []
    backend = RecordingBackend(fail_on=1)
    p, results = make(backend, use_odometry=False, window_size=2, window_overlap=1, max_interval_s=0.001)
    p._on_error = errors.append
    p.start()
    for i in range(5):
        p.add_frame(frame(i * 0.1))
        p.wait_idle(5)
    p.stop()
    assert len(errors) == 1 and "on purpose" in str(errors[0]) and p.stats.windows_failed == 1
    # The failed window's keyframes went into the next one: every frame is output once.
    assert len(results) == 4 and p.stats.keyframes_lost == 0
    assert sorted(outputs(results)) == [frame(i * 0.1).key for i in range(5)]


def outputs(results) -> list[tuple[str, int]]:
    return [f.key for r in results for f, o in zip(r.frames, r.output_mask, strict=True) if o]


def nine_keyframes_in_windows_of_three(backend: RecordingBackend) -> tuple[Pipeline, list, list[list]]:
    """Nine keyframes, one at a time, into windows of 3 (overlap 1): the pipeline, its results and the
    keys of every backend call."""
    p, results = make(backend, use_odometry=False, window_size=3, window_overlap=1, max_interval_s=0.001,
                      queue_size=8)
    p.start()
    for i in range(9):
        p.add_frame(frame(i * 0.1))
        assert p.wait_idle(5)
    p.stop()
    return p, results, [[f.key for f in c] for c in backend.calls]


def test_a_failed_windows_keyframes_are_sent_again_once_then_dropped_and_counted():
    keys = [frame(i * 0.1).key for i in range(9)]
    # The second window fails once: its keyframes come in the next call, behind fresh context.
    backend = RecordingBackend(fail_on=2)
    p, results, calls = nine_keyframes_in_windows_of_three(backend)
    assert calls[1] == calls[2] == [keys[2], keys[3], keys[4]]
    assert sorted(outputs(results)) == keys
    assert p.stats.windows_failed == 1 and p.stats.keyframes_lost == 0
    # It fails again: its keyframes are dropped and counted; the next window anchors on the last placed one.
    backend = RecordingBackend(fail_on=(2, 3))
    p, results, calls = nine_keyframes_in_windows_of_three(backend)
    assert calls[1] == calls[2] == [keys[2], keys[3], keys[4]]
    assert calls[3] == [keys[2], keys[5], keys[6]]
    assert sorted(outputs(results)) == keys[:3] + keys[5:]
    assert p.stats.windows_failed == 2 and p.stats.keyframes_lost == 2


def test_callbacks_run_without_the_pipeline_lock_so_a_reset_during_a_result_cannot_deadlock():
    """The consumer's on_result holds its own lock and asks the pipeline something; a reset from
    another thread announces itself through on_reset, which takes that same lock. Announced while
    the pipeline's lock is held, the two threads would wait for each other forever (and with them
    every caller of the pipeline: no more input, no more output)."""
    consumer = threading.Lock()
    in_result, reset_announced = threading.Event(), threading.Event()
    seen_resets: list[int] = []

    def on_result(result) -> None:
        with consumer:
            in_result.set()
            reset_announced.wait(5)  # the reset is being announced right now
            seen_resets.append(p.status()["resets"])

    def on_reset(reason: str) -> None:
        reset_announced.set()
        with consumer:
            pass

    cfg = PipelineConfig(use_odometry=False, window_size=2, window_overlap=0, max_interval_s=0.001)
    p = Pipeline(cfg, RecordingBackend(), on_result, on_reset=on_reset)
    p.start()
    p.add_frame(frame(0.0))
    p.add_frame(frame(0.1))
    assert in_result.wait(10)
    resetter = threading.Thread(target=p.reset, args=("~/reset",), daemon=True)
    resetter.start()
    resetter.join(10)
    assert not resetter.is_alive(), "reset and on_result deadlocked"
    assert p.wait_idle(10) and seen_resets == [1]
    # The pipeline goes on after the reset: a new window is placed and handed on.
    in_result.clear()
    p.add_frame(frame(0.2))
    p.add_frame(frame(0.3))
    assert in_result.wait(10)
    p.stop()


def test_after_a_failed_window_the_next_reattaches_to_the_last_placed_keyframes():
    backend = RecordingBackend(fail_on=2)
    p, results = make(backend, use_odometry=False, window_size=3, window_overlap=1, max_interval_s=0.001,
                      queue_size=8)
    p.start()
    for i in range(9):
        p.add_frame(frame(i * 0.1))
        p.wait_idle(5)
    p.stop()
    calls = [[f.key for f in c] for c in backend.calls]
    assert p.stats.windows_failed == 1 and len(calls) >= 3
    # Window 2 failed: window 3 starts from window 1's newest keyframe, not window 2's.
    assert calls[2][0] == calls[0][-1]
    assert calls[1][0] == calls[0][-1]


def test_partial_window_is_flushed_by_the_age_of_its_oldest_keyframe():
    clock = [100 * 10**9]
    backend = RecordingBackend()
    cfg = PipelineConfig(use_odometry=False, window_size=8, window_overlap=2, max_interval_s=0.001,
                         max_window_latency_s=1.5, queue_size=8)
    p = Pipeline(cfg, backend, lambda r: None, clock=lambda: clock[0])
    p.start()
    clock[0] = 200 * 10**9  # the node waited long for its first input: that alone must not flush
    p.add_frame(frame(0.0))
    p.add_frame(frame(0.1))
    p.poll()
    clock[0] = 201 * 10**9
    p.poll()
    time.sleep(0.2)
    assert p.wait_idle(5) and backend.calls == []
    clock[0] = int(201.6e9)  # the oldest waiting keyframe is now 1.6 s old
    p.poll()
    time.sleep(0.2)
    assert p.wait_idle(5) and backend.calls == []  # due once: cut only if no frame comes until the next poll
    clock[0] = int(201.7e9)
    p.poll()
    assert p.wait_idle(5)
    p.stop()
    assert p.stats.windows_built == 1 and len(p._pending) == 0 and len(backend.calls) == 1


def test_in_message_time_the_same_stream_gives_the_same_windows_at_any_pace():
    """Offline (synchronous, bag time) and live (worker thread, a clock running at 0.3x / 4x, a
    pause) build the same windows from the same stream, partial flushes included."""

    def run(pace: float | None, pause_at: int | None = None) -> list[list[int]]:
        # Live, the backend is slower than the stream: windows wait while the clock passes their
        # keyframes' flush deadlines, which must not change how the stream is cut.
        backend = RecordingBackend(delay_s=0.0 if pace is None else 0.15)
        clock = [0]
        # No loop closure: its verifications run whenever the backend is idle, which depends on the pace.
        cfg = PipelineConfig(use_odometry=False, window_size=4, window_overlap=1, max_interval_s=0.01,
                             max_window_latency_s=0.35, queue_size=8, thin_keyframes=pace is not None,
                             placement=PlacementConfig(loops=LoopConfig(enabled=False)))
        p = Pipeline(cfg, backend, lambda r: None, clock=lambda: clock[0])
        if pace is not None:
            p.start()
        # Bursts of frames with gaps longer than the latency limit: partial windows in between.
        stamps = [t for burst in range(4) for t in (burst * 1.0 + 0.1 * np.arange(5 - burst % 2))]
        for i, t in enumerate(stamps):
            if pace is not None:
                time.sleep(0.02 if i != pause_at else 0.3)
            clock[0] = int(round(t * 1e9))
            p.poll()
            p.add_frame(frame(t))
            if pace is None:
                p.process_ready()
        clock[0] += int(1e9)
        p.poll()
        p.poll()  # the node's timer polls on: input has stopped
        if pace is None:
            p.process_ready()
        else:
            p.wait_idle(30)
            p.stop()
        return [[f.stamp_ns for f in call] for call in backend.calls]

    offline = run(None)
    assert len(offline) >= 5
    assert run(0.3) == offline
    assert run(4.0, pause_at=7) == offline


def test_a_moving_camera_gets_its_extrinsic_at_each_image_stamp_and_waits_for_it():
    """A camera on a pan head (base -> optical moving on /tf): every frame's prior is the odometry and the
    extrinsic both at its own stamp, and a frame waits for the extrinsic as it waits for odometry."""
    from scipy.spatial.transform import Rotation

    def pan(t: float) -> np.ndarray:  # 0.8 rad/s, the camera 5 cm off the pan axis
        R = Rotation.from_euler("z", 0.8 * t).as_matrix()
        return make_pose(np.eye(3), [0.1, 0, 0.6]) @ make_pose(R, [0, 0, 0]) @ make_pose(np.eye(3), [0.05, 0, 0])

    def odom(t: float) -> np.ndarray:
        return make_pose(Rotation.from_euler("z", 0.2 * t).as_matrix(), [0.5 * t, 0.1 * t, 0])

    backend = RecordingBackend()
    p = Pipeline(PipelineConfig(window_size=4, window_overlap=1, min_translation_m=0.0, max_interval_s=0.01,
                                queue_size=16), backend, lambda r: None)
    for i in range(61):  # odometry at 50 Hz, ahead of everything
        p.add_odometry(int(i * 0.02e9), odom(i * 0.02))
    expected = {}
    statuses = []
    for i in range(10):  # images at 10 Hz between the joint states at 30 Hz
        t = 0.1 * i + 0.013
        expected[int(round(t * 1e9))] = odom(t) @ pan(t)
        for k in range(3 * i, 3 * i + 4):
            if k / 30 <= t + 0.04:
                statuses += p.add_extrinsic("camera", int(round(k / 30 * 1e9)), pan(k / 30))
        assert p.add_frame(frame(t))[0] is FrameStatus.ACCEPTED
        if i == 3:  # the extrinsic lags this image: it waits, then goes on when a sample covers its stamp
            assert p.add_frame(frame(t + 0.05))[0] is FrameStatus.WAITING
            assert p.add_extrinsic("camera", int(round((t + 0.06) * 1e9)), pan(t + 0.06)) == [FrameStatus.ACCEPTED]
            expected[int(round((t + 0.05) * 1e9))] = odom(t + 0.05) @ pan(t + 0.05)
    p.flush()
    p.process_ready()
    seen = {f.stamp_ns: f for call in backend.calls for f in call}
    assert sorted(seen) == sorted(expected) and statuses == []
    for stamp, f in seen.items():
        np.testing.assert_allclose(f.T_world_camera, expected[stamp], atol=2e-5)  # 30 Hz samples: chord vs arc
        np.testing.assert_allclose(f.T_base_camera, invert(f.T_world_base) @ f.T_world_camera, atol=1e-12)
    assert np.degrees(rotation_angle(invert(seen[min(seen)].T_base_camera) @ seen[max(seen)].T_base_camera)) > 30


def test_keyframes_keep_flowing_while_one_camera_of_two_is_silent_and_it_rejoins():
    backend = RecordingBackend()
    p = Pipeline(PipelineConfig(cameras=("left", "right"), window_size=4, window_overlap=1, min_translation_m=0.2,
                                sync_tolerance_s=0.01, queue_size=64), backend, lambda r: None)
    p.set_extrinsic("left", T_BASE_CAM)
    p.set_extrinsic("right", T_BASE_CAM @ make_pose(np.eye(3), [0.12, 0, 0]))
    missing = {}
    p.add_odometry(0, base_pose(0.0))
    for i in range(200):  # 20 s at 10 Hz, driving at 0.5 m/s; the right camera is silent from 4 s to 14 s
        t = round(0.1 * i, 3)
        p.add_odometry(int(round((t + 0.05) * 1e9)), base_pose(0.5 * (t + 0.05)))
        p.add_odometry(int(round((t + 0.1) * 1e9)), base_pose(0.5 * (t + 0.1)))
        assert p.add_frame(frame(t, "left"))[0] is FrameStatus.ACCEPTED
        if not 4.0 <= t < 14.0:
            p.add_frame(frame(t + 0.002, "right"))
        missing[t] = p.missing_cameras()
        p.process_ready()
    p.flush()
    p.process_ready()
    assert missing[4.9] == [] and missing[5.5] == missing[13.9] == ["right"] and missing[14.5] == []
    groups = {}
    for call in backend.calls:
        for f in call:
            groups.setdefault(round(f.stamp_ns * 1e-9, 1), set()).add(f.camera)
    silent = [t for t in groups if 5.0 <= t < 14.0]
    # A keyframe every 0.2 m (0.5 s at 10 Hz) through the silence, of the left camera alone; both cameras after it.
    assert len(silent) >= 17 and all(groups[t] == {"left"} for t in silent)
    assert all(groups[t] == {"left", "right"} for t in groups if t < 3.9 or t > 14.2)
    assert max(groups) > 19.0 and p.stats.windows_failed == 0


def test_a_pose_graph_correction_moves_each_fused_camera_with_its_own_stamp_and_extrinsic():
    """Two cameras a few ms apart in one group, each with its own extrinsic (one on a moving head, sampled
    at its own stamp): a correction of the group's base pose moves both contributions to the map, each
    where its camera was - placement's per-frame corrections, applied by the pipeline's fusion."""
    from scipy.spatial.transform import Rotation

    from mapany_ros.core.placement import PlacedWindow, PlacementStatus
    from mapany_ros.core.placement.keyframe_index import KeyframeIndex
    from mapany_ros.core.windows import Window

    def base_at(t: float) -> np.ndarray:  # turning at 1 rad/s: 3 ms between the cameras matter
        return make_pose(Rotation.from_euler("z", t).as_matrix(), [t, 0.0, 0.0])

    p, _ = make(RecordingBackend(), cameras=("left", "right"))
    head = make_pose(Rotation.from_euler("y", 7, degrees=True).as_matrix(), [0.12, 0, 0])
    extrinsics = {"left": T_BASE_CAM, "right": T_BASE_CAM @ head}
    group = []
    for i, (cam, T_base_camera) in enumerate(extrinsics.items()):
        f = frame(1.0 + 0.003 * i, cam)
        T_world_base = base_at(f.stamp_ns * 1e-9)
        group.append(dataclasses.replace(f, T_world_base=T_world_base, T_base_camera=T_base_camera,
                                         T_world_camera=T_world_base @ T_base_camera))
    prediction = RecordingBackend().infer(group)
    p._fuse(Window(0, [group], 0), PlacedWindow(prediction, [True, True], PlacementStatus.PLACED, 1.0, 0.0, None))
    index = KeyframeIndex()
    kf = index.add(group)
    T_odom_ref = group[0].T_world_base
    index.changed({kf.kid: T_odom_ref})  # reported where odometry put it
    corrected = make_pose(np.eye(3), [0.2, 0.1, 0]) @ T_odom_ref
    corrections, view_corrections = index.changed({kf.kid: corrected})
    assert set(corrections) == {group[0].stamp_ns} and set(view_corrections) == {f.key for f in group}
    p._fuse(Window(1, [group], 1), PlacedWindow(prediction, [True, True], PlacementStatus.PLACED, 1.0, 0.0, None,
                                                 corrections, view_corrections))  # the group as context now
    assert p.map.keyframes_reposed == 2
    for f in group:  # the right camera: 3 ms of motion after the group's stamp, then its own head pose
        expected = corrected @ invert(T_odom_ref) @ f.T_world_base @ extrinsics[f.camera]
        table = p.map._keyframes  # the fused map's latest pose of each keyframe's camera
        np.testing.assert_allclose(table.T_now[table.rows[f.key]], expected, atol=1e-9)


def test_a_frame_whose_moving_extrinsic_stops_is_dropped_while_odometry_still_flows():
    clock = [0]
    p = Pipeline(PipelineConfig(odom_max_wait_s=0.5), RecordingBackend(), lambda r: None, clock=lambda: clock[0])
    for t in (0.0, 0.1):
        p.add_extrinsic("camera", int(t * 1e9), T_BASE_CAM)
    for i in range(3):
        p.add_odometry(int(i * 0.1e9), base_pose(0.1 * i))
    assert p.add_frame(frame(0.05))[0] is FrameStatus.ACCEPTED
    assert p.add_frame(frame(0.15))[0] is FrameStatus.WAITING  # the head's joint states stop at 0.1 s
    statuses = []
    for i in range(3, 12):  # the odometry goes on: the frame waits for the extrinsic, then goes
        clock[0] = int(i * 0.1e9)
        p.add_odometry(int(i * 0.1e9), base_pose(0.1 * i))
        statuses += p.poll()
    assert statuses == [FrameStatus.DROPPED_NO_EXTRINSIC]
    p.add_extrinsic("camera", int(0.3e9), T_BASE_CAM)  # the joint states come back
    assert p.add_frame(frame(0.35))[0] is FrameStatus.WAITING
    assert p.add_extrinsic("camera", int(0.4e9), T_BASE_CAM) == [FrameStatus.ACCEPTED]


class OwnedLock:
    """threading.Lock that knows its holder, so a test can tell whether the calling thread holds it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.owner: int | None = None

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        ok = self._lock.acquire(blocking, timeout)
        if ok:
            self.owner = threading.get_ident()
        return ok

    def release(self) -> None:
        self.owner = None
        self._lock.release()

    def __enter__(self) -> bool:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def _is_owned(self) -> bool:  # threading.Condition asks this
        return self.owner == threading.get_ident()


class ScriptedLoops:
    """The real placer, with loop candidates scripted: ``queue`` jobs are proposed once the first
    window is placed, and each verification closes its loop unless ``during_close`` says otherwise.
    Every call the pipeline makes to it must come without the pipeline lock held by the caller."""

    def __init__(self, pipeline: Pipeline, n_loops: int) -> None:
        self._placer, self._pipeline = pipeline.placer, pipeline
        self.queue: list[int] = []
        self._n_loops = n_loops
        self.during_close = lambda: None
        self.calls: list[str] = []
        self.loops = self  # the pipeline asks placer.loops.pending

    def _check(self, name: str) -> None:
        assert not self._pipeline._lock._is_owned(), f"placer.{name} called under the pipeline lock"
        self.calls.append(name)

    @property
    def pending(self) -> bool:
        self._check("loops.pending")
        return bool(self.queue)

    def place(self, *args, **kwargs):
        self._check("place")
        placed = self._placer.place(*args, **kwargs)
        if self._n_loops:
            self.queue, self._n_loops = list(range(self._n_loops)), 0
        return placed

    def loop_job(self):
        from mapany_ros.core.placement.loops.closer import LoopJob

        self._check("loop_job")
        n = self.queue.pop()
        ctx = self._placer.context(1)[0]
        return LoopJob(None, [dataclasses.replace(f, image=f.image) for f in ctx], [(n, 0)] * len(ctx), {})

    def close_loop(self, job, prediction):
        from mapany_ros.core.placement import PlacedWindow, PlacementStatus

        self._check("close_loop")
        self.during_close()
        return PlacedWindow(dataclasses.replace(prediction, views=[]), [], PlacementStatus.LOOP_CLOSED, 1.0, None,
                            None, {}, {}, message=f"loop {job.owners[0][0]} closed")

    def __getattr__(self, name: str):
        self._check(name)
        return getattr(self._placer, name)


def scripted(backend, n_loops: int, **kw):
    """A pipeline whose lock knows its holder, with scripted loops; its results, with the lock state
    and the generation each was announced in."""
    results, errors = [], []
    cfg = PipelineConfig(**{"use_odometry": False, "window_size": 3, "window_overlap": 1, "max_interval_s": 0.001,
                            "queue_size": 8, **kw})

    def on_result(result) -> None:
        assert not p._lock._is_owned(), "on_result called under the pipeline lock"
        results.append((result, p.generation))  # asking the pipeline back must not deadlock

    p = Pipeline(cfg, backend, on_result, errors.append)
    p._lock = OwnedLock()
    p._cv = threading.Condition(p._lock)
    p.placer = ScriptedLoops(p, n_loops)
    infer = backend.infer

    def checked_infer(frames):
        assert not p._lock._is_owned(), "backend called under the pipeline lock"
        return infer(frames)

    backend.infer = checked_infer
    return p, results, errors


def test_loop_jobs_run_only_when_no_window_waits_a_retried_one_included_and_go_out_with_their_generation():
    backend = RecordingBackend(fail_on=2)  # the second window fails once and is sent again
    p, results, errors = scripted(backend, n_loops=2)
    for i in range(7):  # windows of 3 new keyframes (the first), then 2 behind one of context
        p.add_frame(frame(i * 0.1))
    p.flush()
    assert p.process_ready() == 4  # three windows, one of them twice
    kinds = ["loop" if not r.frames else "window" for r, _ in results]
    # The loops were proposed by the first window, yet the failed window's retry and the third window ran first.
    assert kinds == ["window", "window", "window", "loop", "loop"], kinds
    assert [c for c in p.placer.calls if c in ("place", "loop_job")] == ["place"] * 3 + ["loop_job"] * 2
    assert len(backend.calls) == 6 and p.stats.windows_failed == 1 and p.stats.keyframes_lost == 0
    assert len(errors) == 1 and "on purpose" in str(errors[0])
    for result, generation in results[3:]:
        assert result.window.index == -1 and result.frames == [] and result.output_mask == []
        assert result.placement.status.name == "LOOP_CLOSED" and result.generation == generation == 0
    assert p.status()["keyframes_pending"] == 0 and not p.status()["backend_busy"]


def test_a_loop_closed_across_a_reset_is_dropped_and_the_worker_restarts_placement():
    backend = RecordingBackend()
    p, results, errors = scripted(backend, n_loops=1)
    p.placer.during_close = lambda: p.reset("~/reset")  # arrives while the loop is being verified
    p.start()
    for i in range(3):
        p.add_frame(frame(i * 0.1))
    p.flush()
    assert p.wait_idle(10)
    assert [r.window.index for r, _ in results] == [0], "the loop of the old map went out"
    assert p.generation == 1 and p.stats.resets == 1
    # The next window starts the new map, and its result carries the new generation.
    for i in range(3, 6):
        p.add_frame(frame(i * 0.1))
    p.flush()
    assert p.wait_idle(10)
    p.stop()
    assert [(r.generation, r.window.n_context) for r, _ in results[1:]] == [(1, 0)]
    assert "reset" in p.placer.calls and not errors


def test_save_map_is_written_by_the_worker_between_two_windows(tmp_path):
    backend = RecordingBackend(delay_s=0.3)
    p, results, errors = scripted(backend, n_loops=0)
    writers: list[tuple[str, int]] = []
    saved_keyframes = p.placer._placer.saved_keyframes

    def recording_saved_keyframes(*args):
        writers.append((threading.current_thread().name, backend.active))
        return saved_keyframes(*args)

    p.placer._placer.saved_keyframes = recording_saved_keyframes
    grid_readers: list[tuple[str, int]] = []
    snapshot = p.grid.snapshot

    def recording_snapshot():
        grid_readers.append((threading.current_thread().name, backend.active))
        return snapshot()

    p.grid.snapshot = recording_snapshot
    p.start()
    for i in range(7):
        p.add_frame(frame(i * 0.1))
    p.flush()
    deadline = time.monotonic() + 10
    while not backend.active:  # the first window is with the backend; two more wait
        assert time.monotonic() < deadline
        time.sleep(0.01)
    wrote = p.save_map(tmp_path / "map")
    n_windows = len(results)
    assert p.wait_idle(10)
    assert writers == [("mapany-backend", 0)], writers  # on the worker, with no backend call under way
    assert n_windows < 3, "the save waited for every window instead of the next gap"
    assert "keyframes" in wrote and (tmp_path / "map" / "keyframes.npz").is_file()
    # The occupancy grid's Nav2 pair in the folder, read on the worker as the voxel map is.
    assert "map_grid.yaml" in wrote and (tmp_path / "map" / "map_grid.pgm").is_file()
    assert "image: map_grid.pgm" in (tmp_path / "map" / "map_grid.yaml").read_text()
    assert grid_readers == [("mapany-backend", 0)], grid_readers
    p.stop()
    # Without a worker the caller writes it.
    assert "keyframes" in p.save_map(tmp_path / "again") and writers[-1] == ("MainThread", 0)
    assert not errors
