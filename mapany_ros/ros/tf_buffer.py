"""/tf and /tf_static messages into the core's time-indexed :class:`~mapany_ros.core.tf_buffer.TransformBuffer`.

tf2_ros is not installable from PyPI; the node needs only a few chains of the tree (base -> each
camera, odom -> base), which the core's buffer keeps with their history.
"""

from __future__ import annotations

from typing import Any

from mapany_ros.core.tf_buffer import TransformBuffer
from mapany_ros.ros import conversions as conv


def add_tf_message(buffer: TransformBuffer, msg: Any, *, static: bool, skip_parents: tuple[str, ...] = ()) -> set[str]:
    """Store every transform of a TFMessage; returns the child frames stored.

    Transforms whose parent is in ``skip_parents`` are ignored (the node's own ``map_frame`` output
    comes back on /tf). A bad transform raises ConversionError naming it, after the rest are stored.
    """
    stored, bad = set(), []
    for t in msg.transforms:
        child, parent = t.child_frame_id.lstrip("/"), t.header.frame_id.lstrip("/")
        if parent in skip_parents:
            continue
        try:
            T = conv.transform_to_matrix(t.transform)
            buffer.add(parent, child, conv.stamp_to_ns(t.header.stamp), T, static=static)
        except (conv.ConversionError, ValueError):
            bad.append(f"{parent!r} -> {child!r}")
            continue
        stored.add(child)
    if bad:
        raise conv.ConversionError(f"invalid transform(s): {', '.join(bad)}")
    return stored
