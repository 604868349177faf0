"""Time synchronisation of several cameras into frame groups (one group = one rig snapshot)."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from mapany_ros.core.frames import Frame

#: While a camera is late, the others' queues may hold this many times ``queue_size`` frames.
LATE_QUEUE_FACTOR = 3


@dataclass
class FrameSync:
    """Groups one frame per camera whose stamps lie within ``tolerance_s`` of each other.

    Approximate-time policy: a group is emitted as soon as every camera has a frame close to
    the oldest waiting one; frames that can no longer be matched are dropped and counted.
    With one camera every frame is its own group.

    A camera that sent no frame for ``camera_timeout_s`` of message time - measured against the
    newest stamp any camera sent, so it holds in replay at any rate - is *missing*: groups go on
    with the remaining cameras (frames that waited for it are released), and it rejoins with its
    next frame. A camera that never sent counts from the first frame of any camera.
    ``camera_timeout_s = 0`` keeps the strict policy: groups always wait for every camera.
    """

    cameras: tuple[str, ...]
    tolerance_s: float = 0.02
    queue_size: int = 10
    camera_timeout_s: float = 1.0
    dropped: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        self._queues: dict[str, deque[Frame]] = {c: deque() for c in self.cameras}
        self._latest: dict[str, int] = {}  # newest stamp each camera sent
        self._start: int | None = None  # first stamp since the last clear

    def clear(self) -> None:
        for q in self._queues.values():
            q.clear()
        self._latest.clear()
        self._start = None

    def missing(self) -> list[str]:
        """Cameras left out of groups for now: silent for ``camera_timeout_s`` while others sent frames."""
        if self.camera_timeout_s <= 0 or self._start is None or len(self.cameras) == 1:
            return []
        now = max(self._latest.values())
        limit = int(self.camera_timeout_s * 1e9)
        start = self._start
        return [c for c in self.cameras if now - self._latest.get(c, start) > limit]

    def push(self, frame: Frame) -> list[list[Frame]]:
        """Add a frame; return the groups (ordered as ``cameras``, without missing cameras) completed by it."""
        if len(self.cameras) == 1:
            return [[frame]]
        if self._start is None:
            self._start = frame.stamp_ns
        self._latest[frame.camera] = max(self._latest.get(frame.camera, frame.stamp_ns), frame.stamp_ns)
        q = self._queues[frame.camera]
        q.append(frame)
        # A queue grows only while another camera is late, camera_timeout_s at most: its frames are kept
        # for that long (bounded, images are large) so they can go on without the late camera.
        keep_ns = int(self.camera_timeout_s * 1e9) if self.camera_timeout_s > 0 else -1
        while len(q) > self.queue_size and (keep_ns < 0 or q[-1].stamp_ns - q[0].stamp_ns > keep_ns
                                            or len(q) > LATE_QUEUE_FACTOR * self.queue_size):
            q.popleft()
            self.dropped += 1
        missing = self.missing()
        for c in missing:  # what a missing camera still holds is older than any group to come
            self.dropped += len(self._queues[c])
            self._queues[c].clear()
        active = [c for c in self.cameras if c not in missing]
        groups = []
        while active and all(self._queues[c] for c in active):
            group = self._match(active)
            if group is None:
                break
            groups.append(group)
        return groups

    def _match(self, active: list[str]) -> list[Frame] | None:
        tol = int(self.tolerance_s * 1e9)
        heads = {c: self._queues[c][0] for c in active}
        newest = max(f.stamp_ns for f in heads.values())
        # Heads too old to ever pair with the newest head are dropped.
        stale = [c for c, f in heads.items() if newest - f.stamp_ns > tol]
        if stale:
            for c in stale:
                self._queues[c].popleft()
                self.dropped += 1
            return None if not all(self._queues[c] for c in active) else self._match(active)
        return [self._queues[c].popleft() for c in active]
