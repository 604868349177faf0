"""A bounded, time-indexed transform tree: what tf2's buffer does for this node, without tf2_ros.

tf2_ros is not installable from PyPI. The node needs two chains from it: ``base_frame`` -> each
camera's optical frame (static from robot_state_publisher, or moving on a pan-tilt head) and, when
odometry comes as TF, ``odom_frame`` -> ``base_frame``. Each frame has one parent (as in tf2); a
static edge is kept forever, a moving edge keeps its samples of the last ``buffer_s`` seconds (and
at most ``max_samples``). A chain is looked up at a stamp edge by edge, each moving edge
interpolated (slerp + linear) between its samples around the stamp, never extrapolated beyond
``tolerance_s``. :class:`ChainSampler` turns a chain into a stream of samples at its moving edges'
stamps, which the pipeline buffers like odometry.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

import numpy as np

from mapany_ros.core.geometry import interpolate, invert, is_rigid
from mapany_ros.core.odometry import Lookup


@dataclass
class _Edge:
    """parent <- child: one static transform, or time-sorted samples."""

    parent: str
    static: np.ndarray | None = None
    stamps: list[int] = field(default_factory=list)
    poses: list[np.ndarray] = field(default_factory=list)


class TransformBuffer:
    """Transforms by child frame; static ones forever, moving ones for ``buffer_s`` per edge.

    Not thread-safe: one owner (the node's input handler) adds and looks up.
    """

    def __init__(self, buffer_s: float = 10.0, max_gap_s: float = 0.25, tolerance_s: float = 0.005,
                 max_samples: int = 4000, reset_jump_s: float = 1.0) -> None:
        self.buffer_ns = int(buffer_s * 1e9)
        self.max_gap_ns = int(max_gap_s * 1e9)
        self.tolerance_ns = int(tolerance_s * 1e9)
        self.max_samples = max_samples
        self.reset_jump_ns = int(reset_jump_s * 1e9)
        self._edges: dict[str, _Edge] = {}
        #: Bumped whenever moving history is thrown away (a stamp jumped back: the input restarted).
        self.generation = 0

    def __contains__(self, child: str) -> bool:
        return child in self._edges

    def add(self, parent: str, child: str, stamp_ns: int, T_parent_child: np.ndarray, static: bool = False) -> None:
        """Store one transform; raises ValueError for a non-rigid one or bad frame names.

        A child's parent or kind (static / moving) may change: its history then starts anew. A moving
        sample more than ``reset_jump_s`` older than its edge's newest means the input restarted (a
        bag played in a loop): every moving edge's history is cleared first.
        """
        if not parent or not child or parent == child:
            raise ValueError(f"invalid frame names {parent!r} -> {child!r}")
        if not is_rigid(T_parent_child):
            raise ValueError(f"{parent!r} -> {child!r} is not a finite rigid transform")
        edge = self._edges.get(child)
        if edge is None or edge.parent != parent or (edge.static is not None) != static:
            edge = self._edges[child] = _Edge(parent)
        if static:
            edge.static = np.array(T_parent_child, dtype=np.float64)
            return
        if edge.stamps and edge.stamps[-1] - stamp_ns > self.reset_jump_ns:
            self.clear_moving()
        stamps, poses = edge.stamps, edge.poses
        i = bisect.bisect_left(stamps, stamp_ns)
        if i < len(stamps) and stamps[i] == stamp_ns:
            poses[i] = np.array(T_parent_child, dtype=np.float64)
            return
        stamps.insert(i, stamp_ns)
        poses.insert(i, np.array(T_parent_child, dtype=np.float64))
        # Keep the window behind the newest sample (always at least the newest two).
        drop = bisect.bisect_left(stamps, stamps[-1] - self.buffer_ns)
        drop = max(min(drop, len(stamps) - 2), len(stamps) - self.max_samples, 0)
        if drop:
            del stamps[:drop]
            del poses[:drop]

    def clear_moving(self) -> None:
        """Forget every moving sample (static edges stay)."""
        for edge in self._edges.values():
            edge.stamps.clear()
            edge.poses.clear()
        self.generation += 1

    # ------------------------------------------------------------------ the tree
    def _ancestors(self, frame: str) -> list[str]:
        """``frame`` and its ancestors up to the root (cycle-safe)."""
        out = [frame]
        seen = {frame}
        while frame in self._edges:
            frame = self._edges[frame].parent
            if frame in seen:
                break
            out.append(frame)
            seen.add(frame)
        return out

    def path(self, target: str, source: str) -> tuple[list[str], list[str]] | None:
        """The edges (child frames) from ``source`` up to the common ancestor, and from ``target`` up to
        it; None when the two frames are not connected."""
        up_source, up_target = self._ancestors(source), self._ancestors(target)
        on_target = {f: i for i, f in enumerate(up_target)}
        for i, f in enumerate(up_source):
            if f in on_target:
                return up_source[:i], up_target[:on_target[f]]
        return None

    def is_static(self, child: str) -> bool:
        edge = self._edges.get(child)
        return edge is not None and edge.static is not None

    def newest_ns(self, child: str) -> int | None:
        edge = self._edges.get(child)
        return edge.stamps[-1] if edge is not None and edge.stamps else None

    def stamps_between(self, child: str, after_ns: int | None, until_ns: int) -> list[int]:
        """Stamps of the moving edge ``child`` in (after_ns, until_ns]."""
        edge = self._edges.get(child)
        if edge is None:
            return []
        lo = 0 if after_ns is None else bisect.bisect_right(edge.stamps, after_ns)
        return edge.stamps[lo:bisect.bisect_right(edge.stamps, until_ns)]

    # ------------------------------------------------------------------ lookups
    def _edge_at(self, child: str, stamp_ns: int) -> tuple[Lookup, np.ndarray | None]:
        edge = self._edges[child]
        if edge.static is not None:
            return Lookup.OK, edge.static
        stamps = edge.stamps
        if not stamps:
            return Lookup.WAIT, None
        if stamp_ns >= stamps[-1]:
            return (Lookup.OK, edge.poses[-1]) if stamp_ns - stamps[-1] <= self.tolerance_ns else (Lookup.WAIT, None)
        if stamp_ns <= stamps[0]:
            return (Lookup.OK, edge.poses[0]) if stamps[0] - stamp_ns <= self.tolerance_ns else (Lookup.TOO_OLD, None)
        i = bisect.bisect_left(stamps, stamp_ns)
        if stamps[i] == stamp_ns:
            return Lookup.OK, edge.poses[i]
        t0, t1 = stamps[i - 1], stamps[i]
        if t1 - t0 > self.max_gap_ns:
            return Lookup.GAP, None
        return Lookup.OK, interpolate(edge.poses[i - 1], edge.poses[i], (stamp_ns - t0) / (t1 - t0))

    def lookup(self, target: str, source: str, stamp_ns: int) -> tuple[Lookup, np.ndarray | None]:
        """T_target_source at ``stamp_ns`` (maps points in ``source`` into ``target``).

        WAIT when the frames are not (yet) connected or a moving edge has no sample at or after the
        stamp; GAP / TOO_OLD when a moving edge can never give one (samples too far apart, or the
        stamp is older than its kept history).
        """
        path = self.path(target, source)
        if path is None:
            return Lookup.WAIT, None
        up_source, up_target = path
        worst = Lookup.OK
        T_common = {}
        for side, chain in (("source", up_source), ("target", up_target)):
            T = np.eye(4)
            for child in chain:
                status, T_edge = self._edge_at(child, stamp_ns)
                if status is not Lookup.OK:
                    if status is not Lookup.WAIT or worst is Lookup.OK:
                        worst = status
                    continue
                T = T_edge @ T
            T_common[side] = T
        if worst is not Lookup.OK:
            return worst, None
        return Lookup.OK, invert(T_common["target"]) @ T_common["source"]


@dataclass
class SampledChain:
    """What :meth:`ChainSampler.update` found: a new static transform, and/or samples (stamp, T) in time order."""

    static: np.ndarray | None = None
    samples: list[tuple[int, np.ndarray]] = field(default_factory=list)


class ChainSampler:
    """The chain T_target_source as samples at the stamps of its moving edges, each stamp once, in order.

    A sample is taken at a stamp once every moving edge of the chain has a sample at or after it, so
    it is interpolated, never extrapolated; the pipeline buffers these samples and interpolates
    between them at image stamps, as it does odometry. A chain of static edges only gives its
    transform once, and again only when it changes.
    """

    def __init__(self, target: str, source: str) -> None:
        self.target, self.source = target, source
        self._static: np.ndarray | None = None
        self._done_ns: int | None = None  # newest stamp sampled
        self._generation = -1

    def edges(self, buffer: TransformBuffer) -> list[str] | None:
        """The chain's edges (child frames) as the buffer now holds them; None when not connected."""
        path = buffer.path(self.target, self.source)
        return None if path is None else path[0] + path[1]

    def update(self, buffer: TransformBuffer) -> SampledChain:
        edges = self.edges(buffer)
        if edges is None:
            return SampledChain()
        moving = [c for c in edges if not buffer.is_static(c)]
        if not moving:
            _, T = buffer.lookup(self.target, self.source, 0)
            assert T is not None
            if self._static is not None and np.allclose(T, self._static, atol=1e-9):
                return SampledChain()
            self._static = T
            return SampledChain(static=T)
        self._static = None
        if buffer.generation != self._generation:  # the input restarted: sample its history anew
            self._generation, self._done_ns = buffer.generation, None
        newest = [buffer.newest_ns(c) for c in moving]
        if any(n is None for n in newest):
            return SampledChain()
        horizon = min(n for n in newest if n is not None)
        if self._done_ns is not None and horizon <= self._done_ns:
            return SampledChain()
        stamps = sorted({s for c in moving for s in buffer.stamps_between(c, self._done_ns, horizon)})
        self._done_ns = horizon
        out = SampledChain()
        for s in stamps:
            status, T = buffer.lookup(self.target, self.source, s)
            if status is Lookup.OK and T is not None:
                out.samples.append((s, T))
        return out
