"""Placement: every window, from any backend, moved from its own frame into the map (REP 103/105)."""

from mapany_ros.core.placement.config import PlacementConfig
from mapany_ros.core.placement.placed import PlacedWindow, PlacementStats, PlacementStatus
from mapany_ros.core.placement.placer import WindowPlacer
from mapany_ros.core.placement.transform_smoother import TransformSmoother

__all__ = ["PlacedWindow", "PlacementConfig", "PlacementStats", "PlacementStatus", "TransformSmoother",
           "WindowPlacer"]
