"""Time synchronisation of several cameras into frame groups (one group = one rig snapshot)."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from mapany_ros.core.frames import Frame


@dataclass
class FrameSync:
    """Groups one frame per camera whose stamps lie within ``tolerance_s`` of each other.

    Approximate-time policy: a group is emitted as soon as every camera has a frame close to
    the oldest waiting one; frames that can no longer be matched are dropped and counted.
    With one camera every frame is its own group.
    """

    cameras: tuple[str, ...]
    tolerance_s: float = 0.02
    queue_size: int = 10
    dropped: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        self._queues: dict[str, deque[Frame]] = {c: deque() for c in self.cameras}

    def clear(self) -> None:
        for q in self._queues.values():
            q.clear()

    def push(self, frame: Frame) -> list[list[Frame]]:
        """Add a frame; return the groups (ordered as ``cameras``) completed by it."""
        if len(self.cameras) == 1:
            return [[frame]]
        q = self._queues[frame.camera]
        q.append(frame)
        while len(q) > self.queue_size:
            q.popleft()
            self.dropped += 1
        groups = []
        while all(self._queues[c] for c in self.cameras):
            group = self._match()
            if group is None:
                break
            groups.append(group)
        return groups

    def _match(self) -> list[Frame] | None:
        tol = int(self.tolerance_s * 1e9)
        heads = {c: self._queues[c][0] for c in self.cameras}
        newest = max(f.stamp_ns for f in heads.values())
        # Heads too old to ever pair with the newest head are dropped.
        stale = [c for c, f in heads.items() if newest - f.stamp_ns > tol]
        if stale:
            for c in stale:
                self._queues[c].popleft()
                self.dropped += 1
            return None if not all(self._queues[c] for c in self.cameras) else self._match()
        return [self._queues[c].popleft() for c in self.cameras]
