"""What placement makes of a window: its views in the map frame, and what was decided about them."""

from __future__ import annotations

import dataclasses
import enum
import logging
from dataclasses import dataclass, field

import numpy as np

from mapany_ros.core.alignment import Sim3, rigidify
from mapany_ros.core.backends.base import ViewPrediction, WindowPrediction
from mapany_ros.core.geometry import invert

log = logging.getLogger(__name__)


class PlacementStatus(enum.Enum):
    STARTED = "started the map"
    PLACED = "placed"
    RELOCALISED = "chain broken: continued from the last placed pose"
    REJECTED = "rejected"
    #: Not a window: a loop closure moved keyframes already placed (the result carries corrections only).
    LOOP_CLOSED = "loop closed"
    #: Not a window: the robot was localised in a loaded map; the keyframe that starts the map is the correction.
    LOCALISED = "localised in the loaded map"


@dataclass
class PlacementStats:
    windows_placed: int = 0
    windows_rejected: int = 0
    views_rejected: int = 0
    chain_breaks: int = 0
    #: Odometry steps the model's geometry contradicted by far more than the odometry's noise.
    odometry_slips: int = 0
    last_scale: float = 1.0
    last_residual_m: float = 0.0
    #: Keyframes in the global pose graph.
    graph_keyframes: int = 0
    loop_candidates: int = 0
    loops_verified: int = 0
    loops_rejected: int = 0
    loops_closed: int = 0
    #: Backend + verification + graph time of the newest loop job, seconds.
    last_loop_s: float = 0.0
    #: Windows that arrived while the robot was not yet localised in a loaded map.
    windows_unlocalised: int = 0
    #: With odometry and a metric model: the model's scale over the odometry's, learned over the
    #: windows so far, and its one-sigma (relative); 0 until enough windows measured it. A steady
    #: departure from 1 is a miscalibrated odometry or a biased model: the map takes the odometry's
    #: scale, unless a camera rig's baseline measured the odometry's (``odometry_scale``).
    model_scale_vs_odometry: float = 0.0
    model_scale_sigma: float = 0.0
    #: The odometry's distances over the true ones, measured against the calibrated baseline of a
    #: camera rig, and its one-sigma; 0 without such a rig (or until 5 windows measured it). The map is in true metres.
    odometry_scale: float = 0.0
    odometry_scale_sigma: float = 0.0


@dataclass
class PlacedWindow:
    """A window in the map frame and what placement decided about it."""

    #: The backend's prediction with every accepted view moved into the map frame.
    prediction: WindowPrediction
    #: Per view: placed in the map (points, path, fused map).
    accepted: list[bool]
    status: PlacementStatus
    scale: float
    residual_m: float | None
    #: Drift estimate map -> odom after this window (None without odometry).
    T_map_odom: np.ndarray | None
    #: Group stamp -> T_map_base of every keyframe (of any age) whose pose changed, this window's included.
    corrections: dict[int, np.ndarray] = field(default_factory=dict)
    #: Frame key (camera, stamp) -> T_map_camera of every camera of those keyframes (the fused map follows).
    view_corrections: dict[tuple[str, int], np.ndarray] = field(default_factory=dict)
    message: str = ""
    #: Views judged wrong (context views included): disagreeing with their neighbours or the priors.
    rejected_views: list[int] = field(default_factory=list)
    #: Per view: passed the view checks, so its depth (in its own camera frame) is worth publishing
    #: even when the window as a whole could not be placed (then only depth goes out, flagged).
    depth_ok: list[bool] = field(default_factory=list)
    #: (older stamp, newer stamp, metres) of odometry steps this window's geometry contradicted.
    slips: list[tuple[int, int, float]] = field(default_factory=list)
    #: Without odometry: group stamp -> the node's own chained T_odom_base of this window's new
    #: keyframes (published as odom -> base, as a visual odometry would).
    visual_odometry: dict[int, np.ndarray] = field(default_factory=dict)


def move_view(view: ViewPrediction, T_window_camera: np.ndarray, T_map_camera: np.ndarray, scale: float,
              owed: np.ndarray | None = None) -> ViewPrediction:
    """The view with depth scaled and points carried from the window frame to the map frame.

    The camera's map pose may differ from what the window's single transform would give (the
    pose graph refines each keyframe), so points follow their camera: window -> camera frame
    (rigid), scale, camera -> map. ``owed``: a transform the view's points still owe before that
    (refinement's, see :func:`settle`), applied in the same pass.
    """
    A = Sim3.from_pose(T_map_camera) @ Sim3(np.eye(3), np.zeros(3), scale) @ Sim3.from_pose(invert(T_window_camera))
    M = A.matrix() if owed is None else A.matrix() @ owed
    # The full-resolution points move when first read (published), not here: see ViewPrediction.owing.
    return view.owing(M, depth=view.depth * scale, T_world_camera=T_map_camera)


def settle(view: ViewPrediction, owed: np.ndarray | None) -> ViewPrediction:
    """The view with the transform its points still owe applied (refinement moved its pose only)."""
    if owed is None:
        return view
    return view.owing(owed)


def moved(prediction: WindowPrediction, accepted: list[bool], poses: list[np.ndarray | None], scale: float,
          owed: dict[int, np.ndarray] | None = None) -> WindowPrediction:
    """The prediction with every accepted view that has a map pose moved into the map frame; the
    points of the others settled in the window frame (``owed``: view index -> what its points owe)."""
    owed = owed or {}
    views = [
        move_view(v, rigidify(v.T_world_camera), T, scale, owed.get(i)) if a and T is not None
        else settle(v, owed.get(i))
        for i, (v, a, T) in enumerate(zip(prediction.views, accepted, poses, strict=True))
    ]
    return dataclasses.replace(prediction, views=views)


def rejected(prediction: WindowPrediction, message: str, T_map_odom: np.ndarray | None = None) -> PlacedWindow:
    """A window placement refused: no view is placed (the stage still says which views' depth is fine)."""
    log.debug("window rejected: %s", message)
    return PlacedWindow(prediction, [False] * len(prediction.views), PlacementStatus.REJECTED, 1.0, None,
                        T_map_odom, message=message)
