"""From frames and odometry to placed, map-frame predictions, with inference off the caller's thread.

The ROS node calls :meth:`Pipeline.add_frame` / :meth:`Pipeline.add_odometry` from its
callbacks: these only attach odometry priors, synchronise, select keyframes and queue them.
One worker thread builds each window when the backend is free (placed context + the waiting
keyframes), runs the backend, places the window in the map (:mod:`mapany_ros.core.placement`)
and hands the result on. A slow backend never blocks a callback: waiting keyframes are thinned,
never whole windows dropped, so every window still overlaps a placed one.
"""

from __future__ import annotations

import dataclasses
import enum
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from mapany_ros.core.backends.base import Backend, WindowPrediction
from mapany_ros.core.frames import Frame
from mapany_ros.core.fusion import FusionConfig, VoxelMap
from mapany_ros.core.keyframes import KeyframeSelector
from mapany_ros.core.occupancy import OccupancyConfig, OccupancyGrid
from mapany_ros.core.odometry import Lookup, OdometryBuffer
from mapany_ros.core.placement import PlacedWindow, PlacementConfig, PlacementStatus, WindowPlacer
from mapany_ros.core.sync import FrameSync
from mapany_ros.core.windows import Group, PendingKeyframes, Window


class FrameStatus(enum.Enum):
    """What happened to a frame handed to the pipeline (the node warns on the drop reasons)."""

    ACCEPTED = "accepted"
    WAITING = "waiting for odometry"
    DROPPED_ODOM_GAP = "no odometry close enough to the image stamp"
    DROPPED_ODOM_TIMEOUT = "odometry for the image stamp never arrived"
    DROPPED_TOO_OLD = "image stamp is older than all buffered odometry"
    DROPPED_NO_EXTRINSIC = "no base -> camera extrinsic on /tf_static within odometry.max_wait_s"
    DROPPED_WAIT_QUEUE = "too many frames waiting for odometry"
    DROPPED_DUPLICATE = "same stamp as the previous image of this camera"
    DROPPED_OUT_OF_ORDER = "stamp older than the previous image of this camera"


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
    #: Cut windows that may wait for the backend; beyond, the uncut keyframes are thinned.
    queue_size: int = 2
    #: False for offline processing: every keyframe waits for the backend, none is thinned.
    thin_keyframes: bool = True
    max_window_latency_s: float = 2.0
    #: A stamp this far behind the newest one means the input restarted (bag loop): reset.
    reset_jump_s: float = 1.0
    placement: PlacementConfig = dataclasses.field(default_factory=PlacementConfig)
    #: The fused voxel map of every placed keyframe (None: no map).
    fusion: FusionConfig | None = dataclasses.field(default_factory=FusionConfig)
    #: The 2-D occupancy grid of every placed keyframe (None: no grid).
    grid: OccupancyConfig | None = dataclasses.field(default_factory=OccupancyConfig)

    def __post_init__(self) -> None:
        self.placement = dataclasses.replace(self.placement, use_odometry=self.use_odometry)


@dataclass
class WindowResult:
    """A processed window: the frames as received, the placed prediction, and what to output."""

    window: Window
    frames: list[Frame]
    #: Views in the map frame (rejected ones stay as the backend gave them and are not output).
    prediction: WindowPrediction
    #: Per frame: this window outputs it (a new keyframe) and placement accepted it.
    output_mask: list[bool]
    placement: PlacedWindow
    #: Seconds (node clock) from the window's oldest new keyframe being queued to its placed prediction.
    latency_s: float

    @property
    def T_map_odom(self) -> np.ndarray | None:
        return self.placement.T_map_odom


@dataclass
class PipelineStats:
    frames_in: int = 0
    keyframes: int = 0
    keyframes_skipped: int = 0
    windows_built: int = 0
    windows_done: int = 0
    windows_failed: int = 0
    windows_rejected: int = 0
    views_rejected: int = 0
    chain_breaks: int = 0
    frames_dropped: int = 0
    resets: int = 0
    backend_time_s: float = 0.0
    placement_time_s: float = 0.0
    fusion_time_s: float = 0.0
    latency_s: float = 0.0


@dataclass
class _Waiting:
    frame: Frame
    deadline_ns: int


def _monotonic_ns() -> int:
    return time.monotonic_ns()


class Pipeline:
    """Frames + odometry in, :class:`WindowResult` out through ``on_result``.

    Time is message time: ``clock`` returns "now" in nanoseconds of the same clock the stamps
    use (the node passes its ROS clock, so ``use_sim_time`` replay at any rate, or paused, makes
    the same decisions; offline processing passes the bag's time).

    While frames flow, a partial window is cut by stamps alone: at the first frame stamped more
    than ``max_window_latency_s`` after the window's oldest keyframe. The clock only decides when
    input stops. A node whose executor stalled sees the clock jump ahead of messages still queued
    for it, so a time-out (partial window, missing odometry) is acted on only when it has held for
    two consecutive polls with no frame (no odometry) arriving in between. Time-outs count from
    the later of a frame's stamp and its arrival, so stamps from another epoch (a bag replayed
    without sim time) still get their full wait.
    """

    def __init__(
        self,
        config: PipelineConfig,
        backend: Backend,
        on_result: Callable[[WindowResult], None],
        on_error: Callable[[Exception], None] | None = None,
        clock: Callable[[], int] = _monotonic_ns,
        on_reset: Callable[[str], None] | None = None,
    ) -> None:
        self.config = config
        self.backend = backend
        self._on_result = on_result
        self._on_error = on_error or (lambda exc: None)
        self._on_reset = on_reset or (lambda reason: None)
        self._clock = clock
        self.stats = PipelineStats()
        self.odometry = OdometryBuffer(max_gap_s=config.odom_max_gap_s)
        self._extrinsics: dict[str, np.ndarray] = {}
        self._sync = FrameSync(config.cameras, config.sync_tolerance_s)
        self._keyframes = KeyframeSelector(
            config.min_translation_m, config.min_rotation_deg, config.max_interval_s, config.min_interval_s
        )
        self._pending = PendingKeyframes(config.window_size, config.window_overlap,
                                         config.queue_size if config.thin_keyframes else 1 << 30, self._separation)
        self.placer = WindowPlacer(config.placement, self.extrinsic)
        device = getattr(backend, "device", None)
        #: Fused in the worker, on the backend's device, before anything leaves it.
        self.map = VoxelMap(config.fusion, device if isinstance(device, torch.device) else "cpu") \
            if config.fusion is not None else None
        self.grid = OccupancyGrid(config.grid, device if isinstance(device, torch.device) else "cpu") \
            if config.grid is not None else None
        self._waiting: deque[_Waiting] = deque()
        self._last_stamp: dict[str, int] = {}
        self._due: dict[int, int] = {}  # group stamp -> node time after which it flushes a partial window
        # Inputs seen so far, and their counts at the last poll that found a time-out due (None: none due).
        self._frames_seen = 0
        self._odometry_seen = 0
        self._latency_armed: int | None = None
        self._odometry_armed: int | None = None
        self._lock = threading.Lock()  # guards everything touched by callbacks, timers and the worker
        self._cv = threading.Condition(self._lock)
        self._n_context = 0  # context groups the next window gets (placed groups, up to the overlap)
        self._generation = 0  # bumped by every reset: results of an older generation are dropped
        self._placer_generation = 0
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
        """Block until no window can be sent and the backend is idle (for tools and tests)."""
        deadline = time.monotonic() + timeout
        with self._cv:
            while self._busy or self._ready_locked():
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cv.wait(left)
        return True

    # ------------------------------------------------------------------ inputs
    def set_extrinsic(self, camera: str, T_base_camera: np.ndarray) -> list[FrameStatus]:
        """The camera's base -> optical transform; returns the fate of frames that waited for it."""
        with self._cv:
            self._extrinsics[camera] = T_base_camera.copy()
            return self._release_waiting_locked(timeouts=False) if self.config.use_odometry else []

    def extrinsic(self, camera: str) -> np.ndarray | None:
        with self._lock:
            return self._extrinsics.get(camera)

    def add_odometry(self, stamp_ns: int, T_odom_base: np.ndarray) -> list[FrameStatus]:
        """Buffer an odometry sample; returns the fate of frames it released or timed out.

        Raises ValueError for a pose that is not finite and rigid. A stamp more than
        ``reset_jump_s`` older than the newest sample means the source restarted (bag loop): every
        buffer and the map are reset.
        """
        with self._cv:
            newest = self.odometry.newest_ns
            if newest is not None and newest - stamp_ns > self.config.reset_jump_s * 1e9:
                self._reset_locked(f"odometry stamp jumped back {(newest - stamp_ns) * 1e-9:.2f} s")
            self.odometry.add(stamp_ns, T_odom_base)
            self._odometry_seen += 1
            return self._release_waiting_locked(timeouts=False)

    def add_frame(self, frame: Frame) -> tuple[FrameStatus, bool]:
        """Hand over one camera frame; returns its status and whether buffers were reset.

        A stamp more than ``reset_jump_s`` behind the previous one of its camera (a bag played in a
        loop) resets every buffer first, so stale odometry, context frames and the map are never
        mixed with new ones; a duplicate or slightly older stamp is dropped instead.
        """
        with self._cv:
            self.stats.frames_in += 1
            reset = False
            last = self._last_stamp.get(frame.camera)
            if last is not None and frame.stamp_ns <= last:
                if last - frame.stamp_ns <= self.config.reset_jump_s * 1e9:
                    self.stats.frames_dropped += 1
                    dup = frame.stamp_ns == last
                    return (FrameStatus.DROPPED_DUPLICATE if dup else FrameStatus.DROPPED_OUT_OF_ORDER), False
                self._reset_locked(f"{frame.camera} image stamp jumped back {(last - frame.stamp_ns) * 1e-9:.2f} s")
                reset = True
            self._last_stamp[frame.camera] = frame.stamp_ns
            self._frames_seen += 1  # new data (a repeated stamp is not): the input has not stopped
            self._check_latency_locked(frame.stamp_ns)
            if not self.config.use_odometry:
                self._accept_locked(dataclasses.replace(frame, T_base_camera=self._extrinsics.get(frame.camera)))
                return FrameStatus.ACCEPTED, reset
            deadline = max(frame.stamp_ns, self._clock()) + int(self.config.odom_max_wait_s * 1e9)
            if len(self._waiting) >= self.config.max_waiting_frames:
                self._waiting.popleft()
                self.stats.frames_dropped += 1
                self._waiting.append(_Waiting(frame, deadline))
                return FrameStatus.DROPPED_WAIT_QUEUE, reset
            self._waiting.append(_Waiting(frame, deadline))
            statuses = self._release_waiting_locked(timeouts=False)
            if self._waiting and self._waiting[-1].frame is frame:
                return FrameStatus.WAITING, reset
            return statuses[-1], reset

    def poll(self) -> list[FrameStatus]:
        """Time-driven work once input stops: drop frames whose odometry never came, flush stalled
        keyframes (each after two polls in a row found it due with no new input in between)."""
        with self._cv:
            now = self._clock()
            overdue = bool(self._waiting) and now > self._waiting[0].deadline_ns
            quiet = overdue and self._odometry_armed == self._odometry_seen
            self._odometry_armed = self._odometry_seen if overdue and not quiet else None
            statuses = self._release_waiting_locked(timeouts=True, odometry_timeouts=quiet)
            oldest = self._pending.oldest_uncut
            due = oldest is not None and now > self._due[oldest[0].stamp_ns] and self._cuttable_locked()
            if due and self._latency_armed == self._frames_seen:
                self._pending.cut()
                self._cv.notify_all()
                due = False
            self._latency_armed = self._frames_seen if due else None
            return statuses

    def _check_latency_locked(self, stamp_ns: int) -> None:
        """Cut a partial window at a frame stamped more than the latency limit after the oldest
        waiting keyframe: decided on the data alone, so replay at any rate, or with the node's
        executor stalling, cuts where offline processing does."""
        oldest = self._pending.oldest_uncut
        limit = int(self.config.max_window_latency_s * 1e9)
        if oldest is not None and stamp_ns > oldest[0].stamp_ns + limit and self._cuttable_locked():
            self._pending.cut()
            self._cv.notify_all()

    def _cuttable_locked(self) -> bool:
        """A partial window can run: the first one (no context) needs two views of its own."""
        return not self._pending.first_window or self._pending.uncut * len(self.config.cameras) >= 2

    def flush(self) -> None:
        """Send the keyframes still waiting for a window to the backend (end of input)."""
        with self._cv:
            if self._cuttable_locked():
                self._pending.cut()
            self._cv.notify_all()

    def reset(self, reason: str = "reset requested") -> None:
        with self._cv:
            self._reset_locked(reason)

    def status(self) -> dict[str, float | int | bool]:
        """Counters plus the work in flight, for diagnostics and for tools that wait for idle."""
        with self._lock:
            return {
                **dataclasses.asdict(self.stats),
                "frames_waiting_for_odometry": len(self._waiting),
                "keyframes_pending": len(self._pending),
                "backend_busy": self._busy,
            }

    # ------------------------------------------------------------------ internals
    def _separation(self, a: Group, b: Group) -> float:
        """How far apart two keyframe groups are, in units of the keyframe thresholds (>= 1 = distinct)."""
        return self._keyframes.separation(a[0].stamp_ns, _pose_of(a), b[0].stamp_ns, _pose_of(b))

    def _reset_locked(self, reason: str) -> None:
        self.stats.resets += 1
        self._on_reset(reason)
        self.odometry.clear()
        self._sync.clear()
        self._keyframes.reset()
        self._pending.clear()
        self._due.clear()
        self._waiting.clear()
        self._last_stamp.clear()
        self._latency_armed = self._odometry_armed = None
        self._n_context = 0
        self._generation += 1

    def _release_waiting_locked(self, *, timeouts: bool, odometry_timeouts: bool = False) -> list[FrameStatus]:
        """Frames whose odometry and extrinsic have arrived go on; with ``timeouts`` (polls only)
        frames past their deadline are dropped, for missing odometry only with ``odometry_timeouts``."""
        statuses = []
        now = self._clock()
        while self._waiting:
            item = self._waiting[0]
            status, T_odom_base = self.odometry.lookup(item.frame.stamp_ns)
            if item.frame.camera not in self._extrinsics:  # /tf_static may come just after the first images
                if not timeouts or now <= item.deadline_ns:
                    break
                statuses.append(FrameStatus.DROPPED_NO_EXTRINSIC)
            elif status is Lookup.WAIT:
                if not odometry_timeouts or now <= item.deadline_ns:
                    break
                statuses.append(FrameStatus.DROPPED_ODOM_TIMEOUT)
            elif status is Lookup.GAP:
                statuses.append(FrameStatus.DROPPED_ODOM_GAP)
            elif status is Lookup.TOO_OLD:
                statuses.append(FrameStatus.DROPPED_TOO_OLD)
            else:
                T_base_camera = self._extrinsics[item.frame.camera]
                frame = dataclasses.replace(item.frame, T_world_base=T_odom_base,
                                            T_world_camera=T_odom_base @ T_base_camera, T_base_camera=T_base_camera)
                self._accept_locked(frame)
                statuses.append(FrameStatus.ACCEPTED)
            if statuses[-1] is not FrameStatus.ACCEPTED:
                self.stats.frames_dropped += 1
            self._waiting.popleft()
        return statuses

    def _accept_locked(self, frame: Frame) -> None:
        for group in self._sync.push(frame):
            if not self._keyframes.consider(group[0].stamp_ns, _pose_of(group)):
                continue
            self.stats.keyframes += 1
            stamp = group[0].stamp_ns
            self._due[stamp] = max(stamp, self._clock()) + int(self.config.max_window_latency_s * 1e9)
            for skipped in self._pending.push(group):
                self._due.pop(skipped[0].stamp_ns, None)
                self.stats.keyframes_skipped += 1
            self._cv.notify_all()

    def _ready_locked(self) -> bool:
        """A map reset is due, or a window has been cut and waits for the backend."""
        return self._generation != self._placer_generation or self._pending.windows_ready > 0

    def process_ready(self) -> int:
        """Run every window that can be sent now in the caller's thread (offline processing,
        without :meth:`start`); returns how many ran."""
        ran = 0
        while True:
            with self._cv:
                if not self._ready_locked():
                    return ran
                job = self._take_locked()
            if job is not None:
                self._run_job(job)
                ran += 1

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._stop and not self._ready_locked():
                    self._cv.wait()
                if self._stop:
                    return
                job = self._take_locked()
            if job is not None:
                self._run_job(job)

    def _take_locked(self) -> tuple[Window, int, int] | None:
        """The next window (placed context + the oldest waiting keyframes), or None after a map reset."""
        if self._generation != self._placer_generation:
            self.placer.reset()
            if self.map is not None:
                self.map.reset()
            if self.grid is not None:
                self.grid.reset()
            self._placer_generation = self._generation
            self._cv.notify_all()
            return None
        new = self._pending.take()
        oldest = min(g[0].stamp_ns for g in new)
        queued = self._due.get(oldest, oldest) - int(self.config.max_window_latency_s * 1e9)
        for g in new:
            self._due.pop(g[0].stamp_ns, None)
        context = self.placer.context(self._n_context)
        window = Window(self.stats.windows_built, context + new, len(context))
        self.stats.windows_built += 1
        self._busy = True
        return window, queued, self._generation

    def _run_job(self, job: tuple[Window, int, int]) -> None:
        window, queued, generation = job
        try:
            self._process(window, queued, generation)
        except Exception as exc:  # the worker must survive any backend failure
            with self._lock:
                self.stats.windows_failed += 1
            self._on_error(exc)
        finally:
            with self._cv:
                self._busy = False
                self._cv.notify_all()

    def _process(self, window: Window, queued_ns: int, generation: int) -> None:
        frames = window.frames
        t0 = time.perf_counter()
        prediction = self.backend.infer(frames)
        t1 = time.perf_counter()
        # A backend that needs pose priors returns them as its poses.
        placed = self.placer.place(window.groups, window.n_context, prediction,
                                   poses_are_priors=getattr(self.backend, "needs_pose_priors", False))
        t2 = time.perf_counter()
        if (self.map is not None or self.grid is not None) and placed.status is not PlacementStatus.REJECTED:
            self._fuse(window, placed)
        # One synchronised copy to (pinned) host memory per window: publishing never waits on the GPU.
        placed.prediction = placed.prediction.to_host()
        t3 = time.perf_counter()
        p = self.placer.stats
        with self._lock:
            if generation != self._generation:
                return  # the input restarted while this window was running: its map is gone
            s = self.stats
            s.backend_time_s, s.placement_time_s, s.fusion_time_s = t1 - t0, t2 - t1, t3 - t2
            s.windows_rejected, s.views_rejected, s.chain_breaks = p.windows_rejected, p.views_rejected, p.chain_breaks
            self._n_context = min(self.config.window_overlap, len(self.placer.context(self.config.window_overlap)))
            if placed.status is PlacementStatus.REJECTED:
                return
            s.windows_done += 1
            s.latency_s = max(0.0, (self._clock() - queued_ns) * 1e-9)
        mask = [o and a for o, a in zip(window.output_mask, placed.accepted, strict=True)]
        self._on_result(WindowResult(window, frames, placed.prediction, mask, placed, self.stats.latency_s))


    def _fuse(self, window: Window, placed: PlacedWindow) -> None:
        """Integrate the window's new keyframes into the map and the grid; move earlier ones the pose graph
        corrected."""
        voxel_map, grid = self.map, self.grid
        for frame, view, out, ok in zip(window.frames, placed.prediction.views, window.output_mask, placed.accepted,
                                        strict=True):
            if out and ok:
                if voxel_map is not None:
                    voxel_map.integrate(frame.key, view.depth, view.K, view.T_world_camera, view.colors,
                                        view.confidence, view.valid)
                if grid is not None:
                    grid.integrate(frame.key, view.depth, view.K, view.T_world_camera, view.confidence, view.valid,
                                   T_base_camera=frame.T_base_camera)
        for stamp, T_map_base in placed.corrections.items():
            for camera in self.config.cameras:
                T_base_camera = self.extrinsic(camera)
                if T_base_camera is not None:
                    if voxel_map is not None:
                        voxel_map.update_pose((camera, stamp), T_map_base @ T_base_camera)
                    if grid is not None:
                        grid.update_pose((camera, stamp), T_map_base @ T_base_camera)


def _pose_of(group: Group) -> np.ndarray | None:
    """The pose keyframe selection looks at: the base with odometry, else none."""
    return group[0].T_world_base if group[0].T_world_base is not None else group[0].T_world_camera
