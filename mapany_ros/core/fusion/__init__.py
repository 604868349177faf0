"""Fused 3D map of a robot's keyframes: a confidence-weighted point voxel grid in pure torch.

Why a point grid and not a TSDF, and torch rather than Open3D: docs/fusion_comparison.md.
"""

from __future__ import annotations

from mapany_ros.core.fusion.config import FusionConfig
from mapany_ros.core.fusion.ply import read_ply, write_ply
from mapany_ros.core.fusion.voxel_map import VoxelMap

__all__ = ["FusionConfig", "VoxelMap", "read_ply", "write_ply"]
