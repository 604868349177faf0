"""Loop closure: keyframe memory, global descriptors, candidates, verification by the backend."""

from mapany_ros.core.placement.loops.closer import (
    LoopCandidate,
    LoopCloser,
    LoopConfig,
    LoopJob,
    LoopMeasurement,
    LoopStats,
)

__all__ = ["LoopCandidate", "LoopCloser", "LoopConfig", "LoopJob", "LoopMeasurement", "LoopStats"]
