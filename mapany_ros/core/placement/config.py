"""The placement stage's knobs (one node parameter each, validated by the node's parameter layer)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from mapany_ros.core.placement.loops.closer import LoopConfig
from mapany_ros.core.placement.pose_graph import GraphConfig


@dataclass
class PlacementConfig:
    """Every knob of the placement stage; validated by the node's parameter layer."""

    use_odometry: bool = True
    #: Reject a window whose placement residual exceeds this, metres (0 = never).
    max_residual_m: float = 0.5
    #: A view's best agreement with a neighbour must reach this fraction of the window's median (0 = no check).
    view_consistency: float = 0.85
    #: Relative depth difference under which a point agrees with a neighbour's depth.
    consistency_tolerance: float = 0.08
    #: A metric view whose median depth is beyond this is implausible (0 = no limit).
    max_depth_m: float = 100.0
    robust_kernel: str = "cauchy"
    robust_threshold: float = 2.0
    view_sigma_m: float = 0.05
    view_sigma_deg: float = 1.0
    #: Expected per-window scale error of a metric model (relative, one sigma).
    metric_scale_sigma: float = 0.03
    odom_sigma_ratio: float = 0.05
    odom_sigma_deg_per_m: float = 5.0
    #: Relative depth error assumed for overlap correspondences (whitening of the robust fit).
    overlap_sigma: float = 0.02
    #: Fraction of overlap correspondences that must fit for a window to attach.
    min_overlap_inliers: float = 0.5
    #: Consecutive windows that fail to attach before a break is declared.
    max_attach_failures: int = 2
    anchor_samples: int = 3000
    #: Refine each window's view poses so that their depth maps agree (see :mod:`.refine`).
    refine_poses: bool = True
    #: With odometry and a rig of cameras a calibrated distance apart: the map in the rig's metres (see :mod:`.scale`).
    rig_scale: bool = True
    loops: LoopConfig = field(default_factory=LoopConfig)

    def graph(self) -> GraphConfig:
        return GraphConfig(
            view_sigma_m=self.view_sigma_m, view_sigma_rad=np.radians(self.view_sigma_deg),
            odom_sigma_ratio=self.odom_sigma_ratio, odom_sigma_rad_per_m=np.radians(self.odom_sigma_deg_per_m),
            kernel=self.robust_kernel, kernel_threshold=self.robust_threshold,
        )
