"""From frames and odometry to backend predictions, with inference off the caller's thread.

The ROS node calls :meth:`Pipeline.add_frame` / :meth:`Pipeline.add_odometry` from its
callbacks: these only attach pose priors, synchronise, select keyframes and build windows.
Full windows go to a bounded queue drained by one worker thread that runs the backend, so a
slow backend never blocks a callback; when the backend falls behind the oldest queued window
is dropped and counted.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from mapany_ros.core.backends.base import Backend, WindowPrediction
from mapany_ros.core.frames import Frame
from mapany_ros.core.geometry import invert
from mapany_ros.core.keyframes import KeyframeSelector
from mapany_ros.core.odometry import Lookup, OdometryBuffer
from mapany_ros.core.sync import FrameSync
from mapany_ros.core.windows import Window, WindowBuilder


class FrameStatus(enum.Enum):
    """What happened to a frame handed to the pipeline (the node warns on the drop reasons)."""

    ACCEPTED = "accepted"
    WAITING = "waiting for odometry"
    DROPPED_ODOM_GAP = "no odometry close enough to the image stamp"
    DROPPED_ODOM_TIMEOUT = "odometry for the image stamp never arrived"
    DROPPED_TOO_OLD = "image stamp is older than all buffered odometry"
    DROPPED_NO_EXTRINSIC = "no base -> camera extrinsic received on /tf_static yet"
    DROPPED_WAIT_QUEUE = "too many frames waiting for odometry"


@dataclass
class PipelineConfig:
    """Every knob of the ROS-free pipeline; validated by the node's parameter layer."""

    cameras: tuple[str, ...] = ("camera",)
    use_odometry: bool = True
    window_size: int = 8
    window_overlap: int = 2
    min_translation_m: float = 0.15
    min_rotation_deg: float = 10.0
    max_interval_s: float = 1.0
    min_interval_s: float = 0.0
    sync_tolerance_s: float = 0.02
    odom_max_gap_s: float = 0.25
    odom_max_wait_s: float = 0.5
    max_waiting_frames: int = 60
    queue_size: int = 2
    max_window_latency_s: float = 2.0


@dataclass
class WindowResult:
    """A processed window: the frames as received, the prediction, and which views to output."""

    window: Window
    frames: list[Frame]
    prediction: WindowPrediction
    output_mask: list[bool]
    #: Correction map -> odom implied by the newest output frame (None without odometry).
    T_map_odom: np.ndarray | None
    #: Seconds from the window entering the backend queue to its prediction.
    latency_s: float


@dataclass
class PipelineStats:
    frames_in: int = 0
    keyframes: int = 0
    windows_built: int = 0
    windows_done: int = 0
    windows_dropped: int = 0
    windows_failed: int = 0
    frames_dropped: int = 0
    resets: int = 0
    backend_time_s: float = 0.0
    latency_s: float = 0.0


@dataclass
class _Waiting:
    frame: Frame
    arrived: float


@dataclass
class _Queued:
    window: Window
    enqueued: float


class Pipeline:
    """Frames + odometry in, :class:`WindowResult` out through ``on_result`` (worker thread)."""

    def __init__(
        self,
        config: PipelineConfig,
        backend: Backend,
        on_result: Callable[[WindowResult], None],
        on_error: Callable[[Exception], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.backend = backend
        self._on_result = on_result
        self._on_error = on_error or (lambda exc: None)
        self._clock = clock
        self.stats = PipelineStats()
        self.odometry = OdometryBuffer(max_gap_s=config.odom_max_gap_s)
        self._extrinsics: dict[str, np.ndarray] = {}
        self._sync = FrameSync(config.cameras, config.sync_tolerance_s)
        self._keyframes = KeyframeSelector(
            config.min_translation_m, config.min_rotation_deg, config.max_interval_s, config.min_interval_s
        )
        self._windows = WindowBuilder(config.window_size, config.window_overlap)
        self._waiting: collections.deque[_Waiting] = collections.deque()
        self._last_stamp: dict[str, int] = {}
        #: When the oldest keyframe still waiting for its window arrived (None: none waiting).
        self._pending_since: float | None = None
        self._lock = threading.Lock()  # guards everything touched by callbacks and timers
        self._queue: collections.deque[_Queued] = collections.deque()
        self._cv = threading.Condition()
        self._estimated: collections.OrderedDict[tuple[str, int], np.ndarray] = collections.OrderedDict()
        self._busy = False
        self._stop = False
        self._worker = threading.Thread(target=self._run, name="mapany-backend", daemon=True)

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        self._worker.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        if self._worker.is_alive():
            self._worker.join(timeout)

    def wait_idle(self, timeout: float = 60.0) -> bool:
        """Block until the queue is empty and the backend idle (for tools and tests)."""
        deadline = time.monotonic() + timeout
        with self._cv:
            while self._queue or self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cv.wait(left)
        return True

    # ------------------------------------------------------------------ inputs
    def set_extrinsic(self, camera: str, T_base_camera: np.ndarray) -> None:
        with self._lock:
            self._extrinsics[camera] = T_base_camera.copy()

    def extrinsic(self, camera: str) -> np.ndarray | None:
        with self._lock:
            return self._extrinsics.get(camera)

    def add_odometry(self, stamp_ns: int, T_odom_base: np.ndarray) -> list[FrameStatus]:
        """Buffer an odometry sample; returns the fate of frames it released or timed out.

        Raises ValueError for a pose that is not finite and rigid. A stamp older than the newest
        sample by more than a second means the source restarted (bag loop): buffers are reset.
        """
        with self._lock:
            newest = self.odometry.newest_ns
            if newest is not None and stamp_ns < newest - 1_000_000_000:
                self._reset_locked()
            self.odometry.add(stamp_ns, T_odom_base)
            return self._release_waiting_locked()

    def add_frame(self, frame: Frame) -> tuple[FrameStatus, bool]:
        """Hand over one camera frame; returns its status and whether buffers were reset.

        A stamp that goes backwards on a camera (a bag played in a loop) resets every buffer
        first, so stale odometry, context frames and estimates are never mixed with new ones.
        """
        with self._lock:
            self.stats.frames_in += 1
            reset = False
            last = self._last_stamp.get(frame.camera)
            if last is not None and frame.stamp_ns <= last:
                self._reset_locked()
                reset = True
            self._last_stamp[frame.camera] = frame.stamp_ns
            if not self.config.use_odometry:
                self._accept_locked(frame)
                return FrameStatus.ACCEPTED, reset
            if frame.camera not in self._extrinsics:
                self.stats.frames_dropped += 1
                return FrameStatus.DROPPED_NO_EXTRINSIC, reset
            if len(self._waiting) >= self.config.max_waiting_frames:
                self._waiting.popleft()
                self.stats.frames_dropped += 1
                self._waiting.append(_Waiting(frame, self._clock()))
                return FrameStatus.DROPPED_WAIT_QUEUE, reset
            self._waiting.append(_Waiting(frame, self._clock()))
            statuses = self._release_waiting_locked()
            if self._waiting and self._waiting[-1].frame is frame:
                return FrameStatus.WAITING, reset
            return statuses[-1], reset

    def poll(self) -> list[FrameStatus]:
        """Time-driven work: drop frames whose odometry never came, flush stalled windows."""
        with self._lock:
            statuses = self._release_waiting_locked()
            if (
                self._pending_since is not None
                and self._clock() - self._pending_since > self.config.max_window_latency_s
            ):
                self._enqueue_locked(self._windows.flush())
            return statuses

    def flush(self) -> None:
        """Send the keyframes still waiting for a window to the backend (end of input)."""
        with self._lock:
            self._enqueue_locked(self._windows.flush())

    def reset(self) -> None:
        with self._lock:
            self._reset_locked()

    def status(self) -> dict[str, float | int | bool]:
        """Counters plus the work in flight, for diagnostics and for tools that wait for idle."""
        with self._lock, self._cv:
            return {
                **dataclasses.asdict(self.stats),
                "frames_waiting_for_odometry": len(self._waiting),
                "keyframes_pending": self._windows.pending,
                "windows_queued": len(self._queue),
                "backend_busy": self._busy,
            }

    # ------------------------------------------------------------------ internals
    def _reset_locked(self) -> None:
        self.stats.resets += 1
        self.odometry.clear()
        self._sync.clear()
        self._keyframes.reset()
        self._windows.reset()
        self._waiting.clear()
        self._last_stamp.clear()
        self._pending_since = None
        with self._cv:
            self._estimated.clear()

    def _release_waiting_locked(self) -> list[FrameStatus]:
        statuses = []
        now = self._clock()
        while self._waiting:
            item = self._waiting[0]
            status, T_odom_base = self.odometry.lookup(item.frame.stamp_ns)
            if status is Lookup.WAIT:
                if now - item.arrived <= self.config.odom_max_wait_s:
                    break
                statuses.append(FrameStatus.DROPPED_ODOM_TIMEOUT)
            elif status is Lookup.GAP:
                statuses.append(FrameStatus.DROPPED_ODOM_GAP)
            elif status is Lookup.TOO_OLD:
                statuses.append(FrameStatus.DROPPED_TOO_OLD)
            else:
                T_base_camera = self._extrinsics[item.frame.camera]
                frame = dataclasses.replace(
                    item.frame, T_world_base=T_odom_base, T_world_camera=T_odom_base @ T_base_camera
                )
                self._accept_locked(frame)
                statuses.append(FrameStatus.ACCEPTED)
            if statuses[-1] is not FrameStatus.ACCEPTED:
                self.stats.frames_dropped += 1
            self._waiting.popleft()
        return statuses

    def _accept_locked(self, frame: Frame) -> None:
        for group in self._sync.push(frame):
            pose = group[0].T_world_base if group[0].T_world_base is not None else group[0].T_world_camera
            if not self._keyframes.consider(group[0].stamp_ns, pose):
                continue
            self.stats.keyframes += 1
            if self._pending_since is None:
                self._pending_since = self._clock()
            self._enqueue_locked(self._windows.push(group))

    def _enqueue_locked(self, window: Window | None) -> None:
        if window is None:
            return
        self.stats.windows_built += 1
        self._pending_since = None
        with self._cv:
            if len(self._queue) >= self.config.queue_size:
                self._queue.popleft()
                self.stats.windows_dropped += 1
            self._queue.append(_Queued(window, self._clock()))
            self._cv.notify_all()

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._queue and not self._stop:
                    self._cv.wait()
                if self._stop:
                    return
                item = self._queue.popleft()
                self._busy = True
            try:
                self._process(item)
            except Exception as exc:  # the worker must survive any backend failure
                self.stats.windows_failed += 1
                self._on_error(exc)
            finally:
                with self._cv:
                    self._busy = False
                    self._cv.notify_all()

    def _process(self, item: _Queued) -> None:
        window = item.window
        frames = window.frames
        mask = window.output_mask
        with self._cv:
            estimated = dict(self._estimated)
        # Context frames carry the poses the previous window estimated, so consecutive windows
        # share one frame of reference.
        inputs = [
            dataclasses.replace(f, T_world_camera=estimated[f.key]) if not out and f.key in estimated else f
            for f, out in zip(frames, mask, strict=True)
        ]
        t0 = time.perf_counter()
        # One synchronised copy to (pinned) host memory per window: publishing then never waits on the GPU.
        prediction = self.backend.infer(inputs).to_host()
        self.stats.backend_time_s = time.perf_counter() - t0
        with self._cv:
            for f, view in zip(frames, prediction.views, strict=True):
                self._estimated[f.key] = view.T_world_camera
            while len(self._estimated) > 4 * self.config.window_size * len(self.config.cameras):
                self._estimated.popitem(last=False)
        T_map_odom = None
        for f, view, out in zip(frames, prediction.views, mask, strict=True):
            if out and f.T_world_camera is not None and f.T_world_base is not None:
                T_map_odom = view.T_world_camera @ invert(f.T_world_camera)
        self.stats.windows_done += 1
        self.stats.latency_s = self._clock() - item.enqueued
        self._on_result(WindowResult(window, frames, prediction, mask, T_map_odom, self.stats.latency_s))
