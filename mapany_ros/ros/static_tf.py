"""A tiny /tf_static tree: enough to find base -> camera extrinsics without tf2_ros.

tf2_ros is not installable from PyPI; static extrinsics only need a dictionary of child ->
(parent, transform) and a walk to the common root.
"""

from __future__ import annotations

import numpy as np

from mapany_ros.core.geometry import invert, is_rigid
from mapany_ros.ros import conversions as conv


class StaticTransforms:
    """Latched static transforms by child frame, composed on lookup."""

    def __init__(self) -> None:
        self._parent: dict[str, tuple[str, np.ndarray]] = {}
        #: Optical frame id last seen on each camera's images.
        self.camera_frames: dict[str, str] = {}

    def add(self, msg) -> None:
        """Store every transform of a TFMessage; a bad one raises ConversionError after the rest are kept."""
        bad = []
        for t in msg.transforms:
            T = conv.transform_to_matrix(t.transform)
            child, parent = t.child_frame_id.lstrip("/"), t.header.frame_id.lstrip("/")
            if not is_rigid(T) or not child or not parent or child == parent:
                bad.append(f"{parent!r} -> {child!r}")
                continue
            self._parent[child] = (parent, T)
        if bad:
            raise conv.ConversionError(f"invalid static transform(s): {', '.join(bad)}")

    def _chain(self, frame: str) -> dict[str, np.ndarray]:
        """T_ancestor_frame for ``frame`` and every ancestor (cycle-safe)."""
        out = {frame: np.eye(4)}
        T = np.eye(4)
        while frame in self._parent and len(out) <= len(self._parent) + 1:
            parent, T_parent_frame = self._parent[frame]
            T = T_parent_frame @ T
            frame = parent
            if frame in out:
                break
            out[frame] = T
        return out

    def lookup(self, target: str, source: str) -> np.ndarray | None:
        """T_target_source (maps points in ``source`` to ``target``), or None when not connected."""
        a, b = self._chain(target), self._chain(source)
        common = next((f for f in b if f in a), None)
        if common is None:
            return None
        return invert(a[common]) @ b[common]
