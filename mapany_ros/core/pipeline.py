"""From frames and odometry to placed, map-frame predictions, with inference off the caller's thread.

The ROS node calls :meth:`Pipeline.add_frame` / :meth:`Pipeline.add_odometry` from its
callbacks: these only attach odometry priors, synchronise, select keyframes and queue them.
One worker thread builds each window when the backend is free (placed context + the waiting
keyframes), runs the backend, places the window in the map (:mod:`mapany_ros.core.placement`)
and hands the result on. A slow backend never blocks a callback: waiting keyframes are thinned,
never whole windows dropped, so every window still overlaps a placed one. A window whose backend
call fails is sent once more with fresh context; a second failure drops its keyframes
(``keyframes_lost``). When no window waits, the worker verifies the loop candidates placement
proposed (a closed loop or a relocalisation goes out through ``on_result`` as a result of no
window), and between two jobs it writes the map that :meth:`Pipeline.save_map` asked for.

Threads and locks. Callers (the node's executor, its timers, services) and the worker share one
lock, ``Pipeline._lock``, which guards the buffers, counters and the worker's queue. It is a leaf:
while it is held the pipeline calls out to nothing - not the callbacks (``on_result``,
``on_error``, ``on_reset``), not the clock, not the placer and not the voxel map or the occupancy
grid (each has its own leaf lock). What a locked section decides to announce is collected and
announced after the lock is released, so a callback may take its own locks and call back into the
pipeline in any order. The
placer is the worker's alone (or the caller's of :meth:`Pipeline.process_ready`), so it needs no lock:
what others may read of it (counters, ``localised``) the worker copies under the lock after each job.
"""

from __future__ import annotations

import dataclasses
import enum
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mapany_ros.core.backends.base import Backend, WindowPrediction
from mapany_ros.core.frames import Frame
from mapany_ros.core.fusion import FusionConfig, VoxelMap
from mapany_ros.core.keyframes import KeyframeSelector
from mapany_ros.core.map_folder import GRID_YAML, MAP_PLY, read_keyframes, write_keyframes
from mapany_ros.core.occupancy import OccupancyConfig, OccupancyGrid, write_nav2_map
from mapany_ros.core.odometry import Lookup, OdometryBuffer
from mapany_ros.core.placement import PlacedWindow, PlacementConfig, PlacementStats, PlacementStatus, WindowPlacer
from mapany_ros.core.sync import FrameSync
from mapany_ros.core.windows import Group, PendingKeyframes, Window


class FrameStatus(enum.Enum):
    """What happened to a frame handed to the pipeline (the node warns on the drop reasons)."""

    ACCEPTED = "accepted"
    WAITING = "waiting for odometry"
    DROPPED_ODOM_GAP = "no odometry close enough to the image stamp"
    DROPPED_ODOM_TIMEOUT = "odometry for the image stamp never arrived"
    DROPPED_TOO_OLD = "image stamp is older than all buffered odometry"
    DROPPED_NO_EXTRINSIC = "no base -> camera extrinsic on /tf_static or /tf within odometry.max_wait_s"
    DROPPED_EXTRINSIC_GAP = "no moving base -> camera extrinsic on /tf close enough to the image stamp"
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
    #: Without odometry: parallax (deg) since the last keyframe that makes a new one.
    min_parallax_deg: float = 1.0
    sync_tolerance_s: float = 0.02
    #: A camera without a frame for this long (message time, against the others' stamps) is left out of
    #: groups until it sends again; 0 = groups always wait for every camera.
    camera_timeout_s: float = 1.0
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
    #: False: localisation only in a loaded map - new keyframes are placed and published, the map
    #: (fused, and what a saved map holds) is not changed.
    update_map: bool = True

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
    #: The pipeline's :attr:`Pipeline.generation` the window belongs to: a result of an older one is stale.
    generation: int = 0
    #: Per frame: a new keyframe placement could not put in the map whose view passed the view
    #: checks: its depth (in its own camera frame) still goes out, without points or a path pose.
    depth_only_mask: list[bool] = dataclasses.field(default_factory=list)

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
    #: Keyframe groups dropped because the backend failed twice on them (or placement failed once).
    keyframes_lost: int = 0
    windows_rejected: int = 0
    views_rejected: int = 0
    #: Views whose depth was published without a place in the map (their window was rejected).
    views_unplaced: int = 0
    chain_breaks: int = 0
    odometry_slips: int = 0
    loop_candidates: int = 0
    loops_rejected: int = 0
    loops_closed: int = 0
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


@dataclass
class _Job:
    """The worker's next task: restart placement and map after a reset (``new`` empty), or run a window."""

    generation: int
    new: list[Group] = dataclasses.field(default_factory=list)
    index: int = 0
    n_context: int = 0
    queued_ns: int = 0
    #: The backend already failed once on these keyframes.
    retry: bool = False


@dataclass
class _PlacerSnapshot:
    """What the pipeline mirrors of the placer (the worker's), read with no lock held."""

    stats: PlacementStats
    localised: bool
    n_context: int


class _BackendFailed(Exception):
    """``backend.infer`` raised: the window's keyframes may be sent once more."""


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
        #: Per camera its newest known base -> optical extrinsic (static, or the newest moving sample).
        self._extrinsics: dict[str, np.ndarray] = {}
        #: Cameras whose extrinsic moves (/tf): their samples by stamp, looked up at each image's stamp.
        self._moving_extrinsics: dict[str, OdometryBuffer] = {}
        self._sync = FrameSync(config.cameras, config.sync_tolerance_s, camera_timeout_s=config.camera_timeout_s)
        self._keyframes = KeyframeSelector(
            config.min_translation_m, config.min_rotation_deg, config.max_interval_s, config.min_interval_s,
            config.min_parallax_deg)
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
        self._extrinsics_seen = 0  # the same for the samples of moving extrinsics
        self._extrinsic_armed: int | None = None
        self._lock = threading.Lock()  # guards everything touched by callbacks, timers and the worker; a leaf
        self._cv = threading.Condition(self._lock)
        self._n_context = 0  # context groups the next window gets (placed groups, up to the overlap)
        self._generation = 0  # bumped by every reset: results of an older generation are dropped
        self._placer_generation = 0
        #: New keyframes of a window the backend failed on once, with their queue time: the next window.
        self._retry: tuple[list[Group], int] | None = None
        self._busy = False
        #: The placer has loop candidates to verify (set by the worker after each job).
        self._loops_waiting = False
        #: ~/save_map requests the worker answers between jobs.
        self._save_requests: list[dict] = []
        #: The placer's state as the worker last copied it (status() must not read the worker's placer).
        self._localised = True
        self._last_loop_s = 0.0
        #: The placer's model scale over the odometry's and its sigma (0, 0 until known).
        self._model_scale = (0.0, 0.0)
        self._odometry_scale = (0.0, 0.0)
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
        if not self._worker.is_alive():  # a save that came as the worker stopped: placement is ours now
            with self._lock:
                saves, self._save_requests = self._save_requests, []
            self._serve_saves(saves)

    def wait_idle(self, timeout: float = 60.0) -> bool:
        """Block until no window can be sent and the backend is idle (for tools and tests)."""
        deadline = time.monotonic() + timeout
        with self._cv:
            while self._busy or self._ready_locked() or self._loops_waiting:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cv.wait(left)
        return True

    # ------------------------------------------------------------------ inputs
    def set_extrinsic(self, camera: str, T_base_camera: np.ndarray) -> list[FrameStatus]:
        """The camera's static base -> optical transform; returns the fate of frames that waited for it."""
        now = self._clock()
        with self._cv:
            self._extrinsics[camera] = T_base_camera.copy()
            self._moving_extrinsics.pop(camera, None)
            return self._release_waiting_locked(now, timeouts=False) if self.config.use_odometry else []

    def add_extrinsic(self, camera: str, stamp_ns: int, T_base_camera: np.ndarray) -> list[FrameStatus]:
        """A sample of a moving camera's base -> optical transform (a pan-tilt head on /tf).

        From then on the camera's frames get the extrinsic interpolated at their own stamp, and wait
        for it as for odometry. Raises ValueError for a transform that is not finite and rigid.
        """
        now = self._clock()
        with self._cv:
            buf = self._moving_extrinsics.get(camera)
            if buf is None:
                buf = self._moving_extrinsics[camera] = OdometryBuffer(max_gap_s=self.config.odom_max_gap_s)
            buf.add(stamp_ns, T_base_camera.copy())
            if buf.newest_ns == stamp_ns:
                self._extrinsics[camera] = T_base_camera.copy()
            self._extrinsics_seen += 1  # a frame waiting for it is not timed out while samples flow
            return self._release_waiting_locked(now, timeouts=False) if self.config.use_odometry else []

    def extrinsic(self, camera: str) -> np.ndarray | None:
        """The camera's newest known extrinsic (static, or the newest sample of a moving one)."""
        with self._lock:
            return self._extrinsics.get(camera)

    @property
    def generation(self) -> int:
        """Bumped by every reset; :attr:`WindowResult.generation` says which one a result belongs to."""
        with self._lock:
            return self._generation

    def _extrinsic_at_locked(self, camera: str, stamp_ns: int) -> tuple[Lookup | None, np.ndarray | None]:
        """The extrinsic at an image stamp: (None, None) while none is known."""
        moving = self._moving_extrinsics.get(camera)
        if moving is not None:
            return moving.lookup(stamp_ns)
        T = self._extrinsics.get(camera)
        return (None, None) if T is None else (Lookup.OK, T)

    def missing_cameras(self) -> list[str]:
        """Cameras left out of groups for now (no frame for ``camera_timeout_s``), for diagnostics."""
        with self._lock:
            return self._sync.missing()

    def add_odometry(self, stamp_ns: int, T_odom_base: np.ndarray,
                     covariance: np.ndarray | None = None) -> list[FrameStatus]:
        """Buffer an odometry sample (with its 6x6 pose covariance, when used); returns the fate of
        frames it released or timed out.

        Raises ValueError for a pose that is not finite and rigid. A stamp more than
        ``reset_jump_s`` older than the newest sample means the source restarted (bag loop): every
        buffer and the map are reset.
        """
        now = self._clock()
        reset = None
        try:
            with self._cv:
                newest = self.odometry.newest_ns
                if newest is not None and newest - stamp_ns > self.config.reset_jump_s * 1e9:
                    reset = f"odometry stamp jumped back {(newest - stamp_ns) * 1e-9:.2f} s"
                    self._reset_locked()
                self.odometry.add(stamp_ns, T_odom_base, covariance)
                self._odometry_seen += 1
                return self._release_waiting_locked(now, timeouts=False)
        finally:
            if reset is not None:
                self._on_reset(reset)

    def add_frame(self, frame: Frame) -> tuple[FrameStatus, bool]:
        """Hand over one camera frame; returns its status and whether buffers were reset.

        A stamp more than ``reset_jump_s`` behind the previous one of its camera (a bag played in a
        loop) resets every buffer first, so stale odometry, context frames and the map are never
        mixed with new ones; a duplicate or slightly older stamp is dropped instead.
        """
        now = self._clock()
        with self._cv:
            status, reset = self._add_frame_locked(frame, now)
        if reset is not None:
            self._on_reset(reset)
        return status, reset is not None

    def _add_frame_locked(self, frame: Frame, now: int) -> tuple[FrameStatus, str | None]:
        """add_frame under the lock; the reason of a reset it did, to announce once the lock is released."""
        self.stats.frames_in += 1
        reset = None
        last = self._last_stamp.get(frame.camera)
        if last is not None and frame.stamp_ns <= last:
            if last - frame.stamp_ns <= self.config.reset_jump_s * 1e9:
                self.stats.frames_dropped += 1
                dup = frame.stamp_ns == last
                return (FrameStatus.DROPPED_DUPLICATE if dup else FrameStatus.DROPPED_OUT_OF_ORDER), None
            reset = f"{frame.camera} image stamp jumped back {(last - frame.stamp_ns) * 1e-9:.2f} s"
            self._reset_locked()
        self._last_stamp[frame.camera] = frame.stamp_ns
        self._frames_seen += 1  # new data (a repeated stamp is not): the input has not stopped
        self._check_latency_locked(frame.stamp_ns)
        if not self.config.use_odometry:  # the extrinsic only sets the map's axes: the newest will do
            status, T_base_camera = self._extrinsic_at_locked(frame.camera, frame.stamp_ns)
            T_base_camera = T_base_camera if status is Lookup.OK else self._extrinsics.get(frame.camera)
            self._accept_locked(dataclasses.replace(frame, T_base_camera=T_base_camera), now)
            return FrameStatus.ACCEPTED, reset
        deadline = max(frame.stamp_ns, now) + int(self.config.odom_max_wait_s * 1e9)
        if len(self._waiting) >= self.config.max_waiting_frames:
            self._waiting.popleft()
            self.stats.frames_dropped += 1
            self._waiting.append(_Waiting(frame, deadline))
            return FrameStatus.DROPPED_WAIT_QUEUE, reset
        self._waiting.append(_Waiting(frame, deadline))
        statuses = self._release_waiting_locked(now, timeouts=False)
        if self._waiting and self._waiting[-1].frame is frame:
            return FrameStatus.WAITING, reset
        return statuses[-1], reset

    def poll(self) -> list[FrameStatus]:
        """Time-driven work once input stops: drop frames whose odometry never came, flush stalled
        keyframes (each after two polls in a row found it due with no new input in between)."""
        now = self._clock()
        with self._cv:
            overdue = bool(self._waiting) and now > self._waiting[0].deadline_ns
            quiet = overdue and self._odometry_armed == self._odometry_seen
            self._odometry_armed = self._odometry_seen if overdue and not quiet else None
            quiet_extrinsics = overdue and self._extrinsic_armed == self._extrinsics_seen
            self._extrinsic_armed = self._extrinsics_seen if overdue and not quiet_extrinsics else None
            statuses = self._release_waiting_locked(now, timeouts=True, odometry_timeouts=quiet,
                                                    extrinsic_timeouts=quiet_extrinsics)
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
        """Start a new map: every buffer is emptied now, placement and map by the worker next; ``on_reset`` is told."""
        with self._cv:
            self._reset_locked()
        self._on_reset(reason)

    def status(self) -> dict[str, float | int | bool]:
        """Counters plus the work in flight, for diagnostics and for tools that wait for idle."""
        with self._lock:
            return {
                **dataclasses.asdict(self.stats),
                "frames_waiting_for_odometry": len(self._waiting),
                "keyframes_pending": len(self._pending),
                "backend_busy": self._busy,
                # as the last window or loop job left them
                "localised": self._localised,
                "last_loop_ms": round(self._last_loop_s * 1e3, 1),
                # with odometry and a metric model (0 until known): a steady departure from 1 is a
                # miscalibrated odometry or a biased model; the map's scale is the odometry's (no rig)
                "model_scale_vs_odometry": round(self._model_scale[0], 4),
                "model_scale_sigma": round(self._model_scale[1], 4),
                # the odometry's distances over the true ones, against a camera rig's calibrated
                # baseline (0 without one, or until 5 windows measured it): the map is in true metres
                "odometry_scale": round(self._odometry_scale[0], 4),
                "odometry_scale_sigma": round(self._odometry_scale[1], 4),
            }

    # ------------------------------------------------------------------ internals
    def _separation(self, a: Group, b: Group) -> float:
        """How far apart two keyframe groups are, in units of the keyframe thresholds (>= 1 = distinct)."""
        return self._keyframes.separation(a[0].stamp_ns, _pose_of(a), b[0].stamp_ns, _pose_of(b))

    def _reset_locked(self) -> None:
        """Empty every buffer; the caller announces the reset through ``on_reset`` once the lock is released."""
        self.stats.resets += 1
        self.odometry.clear()
        for moving in self._moving_extrinsics.values():  # message-time samples of the input that restarted
            moving.clear()
        self._sync.clear()
        self._keyframes.reset()
        self._pending.clear()
        self._due.clear()
        self._waiting.clear()
        self._last_stamp.clear()
        self._latency_armed = self._odometry_armed = self._extrinsic_armed = None
        self._n_context = 0
        self._retry = None
        self._generation += 1
        self._cv.notify_all()

    def _release_waiting_locked(self, now: int, *, timeouts: bool, odometry_timeouts: bool = False,
                                extrinsic_timeouts: bool = False) -> list[FrameStatus]:
        """Frames whose odometry and extrinsic have arrived go on; with ``timeouts`` (polls only)
        frames past their deadline (``now``: the clock read before the lock) are dropped, for missing
        odometry only with ``odometry_timeouts`` (for a moving extrinsic's missing sample with
        ``extrinsic_timeouts``)."""
        statuses = []
        while self._waiting:
            item = self._waiting[0]
            status, T_odom_base = self.odometry.lookup(item.frame.stamp_ns)
            extrinsic, T_base_camera = self._extrinsic_at_locked(item.frame.camera, item.frame.stamp_ns)
            if extrinsic is None:  # /tf_static may come just after the first images
                if not timeouts or now <= item.deadline_ns:
                    break
                statuses.append(FrameStatus.DROPPED_NO_EXTRINSIC)
            elif extrinsic is Lookup.WAIT:  # a moving extrinsic is waited for as odometry is
                if not extrinsic_timeouts or now <= item.deadline_ns:
                    break
                statuses.append(FrameStatus.DROPPED_NO_EXTRINSIC)
            elif extrinsic is not Lookup.OK:
                statuses.append(FrameStatus.DROPPED_EXTRINSIC_GAP)
            elif status is Lookup.WAIT:
                if not odometry_timeouts or now <= item.deadline_ns:
                    break
                statuses.append(FrameStatus.DROPPED_ODOM_TIMEOUT)
            elif status is Lookup.GAP:
                statuses.append(FrameStatus.DROPPED_ODOM_GAP)
            elif status is Lookup.TOO_OLD:
                statuses.append(FrameStatus.DROPPED_TOO_OLD)
            else:
                assert T_base_camera is not None and T_odom_base is not None
                frame = dataclasses.replace(item.frame, T_world_base=T_odom_base,
                                            T_world_camera=T_odom_base @ T_base_camera, T_base_camera=T_base_camera,
                                            odometry_covariance=self.odometry.covariance(item.frame.stamp_ns))
                self._accept_locked(frame, now)
                statuses.append(FrameStatus.ACCEPTED)
            if statuses[-1] is not FrameStatus.ACCEPTED:
                self.stats.frames_dropped += 1
            self._waiting.popleft()
        return statuses

    def _accept_locked(self, frame: Frame, now: int) -> None:
        for group in self._sync.push(frame):
            if not self._keyframes.consider(group[0].stamp_ns, _pose_of(group), group):
                continue
            self.stats.keyframes += 1
            stamp = group[0].stamp_ns
            self._due[stamp] = max(stamp, now) + int(self.config.max_window_latency_s * 1e9)
            for skipped in self._pending.push(group):
                self._due.pop(skipped[0].stamp_ns, None)
                self.stats.keyframes_skipped += 1
            self._cv.notify_all()

    def _ready_locked(self) -> bool:
        """A map reset is due, or a window (a failed one sent again, or a cut one) waits for the backend."""
        return (self._generation != self._placer_generation or self._retry is not None
                or self._pending.windows_ready > 0)

    def process_ready(self) -> int:
        """Run every window that can be sent now in the caller's thread, then the loop closures they
        proposed (offline processing, without :meth:`start`); returns how many windows ran."""
        ran = 0
        while True:
            with self._cv:
                if not (self._ready_locked() or self._loops_waiting):
                    return ran
                job = self._take_locked()
            self._run_task(job)
            ran += job is not None and bool(job.new)

    def _run(self) -> None:
        """The worker: map saves between jobs, windows first, loop closures only while no window waits
        (while relocalising, verifications first)."""
        while True:
            with self._cv:
                while not (self._stop or self._ready_locked() or self._loops_waiting or self._save_requests):
                    self._cv.wait()
                if self._stop:
                    return
                saves, self._save_requests = self._save_requests, []
                job = self._take_locked() if not saves else None
            if saves:
                self._serve_saves(saves)
            else:
                self._run_task(job)

    def _take_locked(self) -> _Job | None:
        """The next task: a map restart after a reset, else the oldest waiting keyframes (a failed
        window's first), else None: verify a loop candidate. Relocalising in a loaded map, a waiting
        verification goes before windows: it decides where the next window starts."""
        self._busy = True
        if self._generation != self._placer_generation:
            return _Job(self._generation)
        if self._loops_waiting and not self._localised:
            return None
        if self._retry is not None:
            (new, queued), self._retry = self._retry, None
            retry = True
        elif self._pending.windows_ready > 0:
            new = self._pending.take()
            oldest = min(g[0].stamp_ns for g in new)
            queued = self._due.get(oldest, oldest) - int(self.config.max_window_latency_s * 1e9)
            for g in new:
                self._due.pop(g[0].stamp_ns, None)
            retry = False
        else:
            return None
        job = _Job(self._generation, new, self.stats.windows_built, self._n_context, queued, retry)
        self.stats.windows_built += 1
        return job

    def _run_task(self, job: _Job | None) -> None:
        """Run one task with no lock held: a window or restart (``job``), else a loop verification."""
        if job is None:
            self._run_loop()
        else:
            self._run_job(job)

    def _run_job(self, job: _Job) -> None:
        """Run one window or map restart (placer, backend, map and callbacks are called out to)."""
        try:
            if not job.new:
                self.placer.reset()
                if self.map is not None:
                    self.map.reset()
                if self.grid is not None:
                    self.grid.reset()
                snapshot = self._placer_snapshot()
                with self._lock:
                    self._placer_generation = job.generation  # another reset since: the worker restarts again
                    if job.generation == self._generation:
                        self._apply_snapshot_locked(snapshot)
                return
            context = self.placer.context(job.n_context)
            window = Window(job.index, context + job.new, len(context))
            try:
                result = self._process(window, job)
            except Exception as exc:  # the worker must survive any backend, placement or fusion failure
                self._failed(job, exc)
                self._on_error(exc.__cause__ if isinstance(exc, _BackendFailed) else exc)
                return
            if result is None:
                return
            try:
                self._on_result(result)
            except Exception as exc:  # placed and fused, but its output is lost
                with self._lock:
                    self.stats.windows_failed += 1
                self._on_error(exc)
        finally:
            self._idle()

    def _run_loop(self) -> None:
        """Verify one loop candidate with the backend and close it when it holds (worker thread).

        A closed loop or a relocalisation goes out through ``on_result`` as a result of no window
        (``Window(-1, [], 0)``, no frames) that carries the placement's corrections and map -> odom.
        """
        with self._lock:
            generation = self._generation
        result = None
        try:
            job = self.placer.loop_job()
            if job is not None:
                t0 = time.perf_counter()
                prediction = self.backend.infer(job.frames)
                placed = self.placer.close_loop(job, prediction)
                self.placer.stats.last_loop_s = time.perf_counter() - t0
                if placed is not None:
                    if self.map is not None or self.grid is not None:
                        self._fuse(Window(-1, [], 0), placed)
                    result = WindowResult(Window(-1, [], 0), [], placed.prediction, [], placed, 0.0, generation)
        except Exception as exc:  # a failed verification loses a candidate, nothing else
            self._on_error(exc)
        # A relocalisation places its first keyframe: the next window starts from it.
        snapshot = self._placer_snapshot()
        with self._lock:
            if generation == self._generation:
                self._apply_snapshot_locked(snapshot)
            else:
                result = None  # the input restarted meanwhile: the worker restarts placement next
        try:
            if result is not None:
                self._on_result(result)
        except Exception as exc:
            self._on_error(exc)
        finally:
            self._idle()

    def _idle(self) -> None:
        """After a task: the worker is free, and it knows whether the placer has loop candidates waiting."""
        pending = self.placer.loops.pending
        with self._cv:
            self._busy = False
            self._loops_waiting = pending
            self._cv.notify_all()

    def _placer_snapshot(self) -> _PlacerSnapshot:
        """The placer's counters and state, read on the worker (placement is the worker's) before
        the pipeline lock is taken to copy them."""
        n = min(self.config.window_overlap, len(self.placer.context(self.config.window_overlap)))
        return _PlacerSnapshot(dataclasses.replace(self.placer.stats), self.placer.localised, n)

    def _apply_snapshot_locked(self, snap: _PlacerSnapshot) -> None:
        """Copy the placer's counters into the pipeline's; the next window's context count."""
        p, s = snap.stats, self.stats
        s.windows_rejected, s.views_rejected, s.chain_breaks = p.windows_rejected, p.views_rejected, p.chain_breaks
        s.odometry_slips, s.loops_closed, s.loop_candidates = p.odometry_slips, p.loops_closed, p.loop_candidates
        s.loops_rejected = p.loops_rejected
        self._last_loop_s = p.last_loop_s
        self._model_scale = (p.model_scale_vs_odometry, p.model_scale_sigma)
        self._odometry_scale = (p.odometry_scale, p.odometry_scale_sigma)
        self._localised = snap.localised
        self._n_context = snap.n_context

    # ------------------------------------------------------------------ saved maps
    def load_map(self, folder: str | Path) -> int:
        """Start in the map saved in ``folder`` (before :meth:`start`): its fused map is loaded and
        the robot is relocalised in it before anything is placed. Returns its keyframe count.

        Raises ValueError naming what is missing or wrong in the folder.
        """
        folder = Path(folder)
        saved = read_keyframes(folder)
        if self.map is not None and (folder / MAP_PLY).is_file():
            self.map.load_ply(folder / MAP_PLY)
        self.placer.load(saved)
        snapshot = self._placer_snapshot()
        with self._lock:
            self._apply_snapshot_locked(snapshot)
        return len(saved.keyframes)

    def save_map(self, folder: str | Path, timeout: float = 60.0) -> str:
        """Write the map into ``folder`` (fused map, keyframes for relocalisation); returns what it
        wrote. Runs on the worker between two jobs (placement is the worker's), or here without one;
        blocks until it is written, so a ROS service calls it off the executor.

        Raises OSError when the folder cannot be written, ValueError in localisation-only mode.
        """
        if not self.config.update_map:
            raise ValueError("localisation only (map.update: false): the loaded map is not changed")
        request = {"folder": Path(folder), "done": threading.Event()}
        with self._cv:
            queued = self._worker.is_alive() and not self._stop
            if queued:
                self._save_requests.append(request)
                self._cv.notify_all()
        if not queued:
            return self._write_map(request["folder"])
        if not request["done"].wait(timeout):
            raise OSError(f"the map was not written within {timeout:g} s (the backend is busy)")
        if "error" in request:
            raise request["error"]
        return request["result"]

    def _write_map(self, folder: Path) -> str:
        """The map folder (worker between two jobs, or the caller without a worker): the voxel map and
        the grid are read through their own locks (points(), snapshot()), as the map publisher reads them."""
        folder.mkdir(parents=True, exist_ok=True)
        saved = self.placer.saved_keyframes()
        extra: dict = {}
        if self.map is not None:
            extra["map_points"] = self.map.save_ply(folder / MAP_PLY)
        grid = ""
        if self.grid is not None:
            snapshot = self.grid.snapshot()
            write_nav2_map(folder / GRID_YAML, snapshot)
            extra["occupancy_grid"] = GRID_YAML
            grid = f", the occupancy grid ({snapshot.width} x {snapshot.height} cells, {GRID_YAML})"
        write_keyframes(folder, saved, extra)
        return f"{extra.get('map_points', 0)} map points, {len(saved.keyframes)} keyframes{grid}"

    def _serve_saves(self, requests: list[dict]) -> None:
        """Answer ~/save_map requests (worker thread between jobs, or ``stop`` once the worker is gone)."""
        for r in requests:
            try:
                r["result"] = self._write_map(r["folder"])
            except (OSError, ValueError) as exc:
                r["error"] = exc
            r["done"].set()

    def _failed(self, job: _Job, exc: Exception) -> None:
        """Count a failed window; a first backend failure puts its keyframes back for the next window."""
        with self._lock:
            self.stats.windows_failed += 1
            if job.generation != self._generation:
                return  # the input restarted meanwhile: these keyframes belong to the old map
            if isinstance(exc, _BackendFailed) and not job.retry:
                self._retry = (job.new, job.queued_ns)
            else:
                self.stats.keyframes_lost += len(job.new)

    def _process(self, window: Window, job: _Job) -> WindowResult | None:
        """Infer, place and fuse one window; its result, or None when it is stale or rejected with
        no view whose depth may still go out."""
        frames = window.frames
        t0 = time.perf_counter()
        try:
            prediction = self.backend.infer(frames)
        except Exception as exc:
            raise _BackendFailed(f"{type(exc).__name__}: {exc}") from exc
        if len(prediction.views) == len(frames):  # a count mismatch is the placer's error to report
            prediction = prediction.with_cameras(frames)
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
        snapshot = self._placer_snapshot()
        now = self._clock()
        mask = [o and a for o, a in zip(window.output_mask, placed.accepted, strict=True)]
        depth_only = [o and d and not m for o, d, m in zip(window.output_mask, placed.depth_ok, mask, strict=True)]
        with self._lock:
            if job.generation != self._generation:
                return None  # the input restarted while this window was running: its map is gone
            s = self.stats
            s.backend_time_s, s.placement_time_s, s.fusion_time_s = t1 - t0, t2 - t1, t3 - t2
            self._apply_snapshot_locked(snapshot)
            s.views_unplaced += sum(depth_only)
            if placed.status is PlacementStatus.REJECTED and not any(depth_only):
                return None
            if placed.status is not PlacementStatus.REJECTED:
                s.windows_done += 1
            s.latency_s = latency_s = max(0.0, (now - job.queued_ns) * 1e-9)
        return WindowResult(window, frames, placed.prediction, mask, placed, latency_s, job.generation, depth_only)

    def _fuse(self, window: Window, placed: PlacedWindow) -> None:
        """Integrate the window's new keyframes into the map and the grid; move earlier ones the pose graph
        corrected."""
        voxel_map, grid = self.map, self.grid
        for frame, view, out, ok in zip(window.frames, placed.prediction.views, window.output_mask, placed.accepted,
                                        strict=True):
            if out and ok and self.config.update_map:
                if voxel_map is not None:
                    voxel_map.integrate(frame.key, view.depth, view.grid_camera, view.T_world_camera, view.colors,
                                        view.confidence, view.valid)
                if grid is not None:
                    grid.integrate(frame.key, view.depth, view.K, view.T_world_camera, view.confidence, view.valid,
                                   T_base_camera=frame.T_base_camera)
        # every camera's view of every corrected keyframe, any age, in one call (submaps re-anchor once)
        if voxel_map is not None:
            voxel_map.update_poses(placed.view_corrections)
        if grid is not None:
            grid.update_poses(placed.view_corrections)


def _pose_of(group: Group) -> np.ndarray | None:
    """The pose keyframe selection looks at: the base with odometry, else none."""
    return group[0].T_world_base if group[0].T_world_base is not None else group[0].T_world_camera
