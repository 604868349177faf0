"""Keyframe groups waiting for the backend, and the windows they are sent in.

Every window after the first starts with ``overlap`` context groups that an earlier window has
already *placed* in the map; they tie the new window to the map and are not output again, so each
keyframe is output exactly once. Context is chosen when a window is sent, from what placement
accepted, so a failed or rejected window never leaves the next one without an anchor.

When the backend falls behind, keyframes are thinned before windows are built (never whole
windows dropped): the waiting keyframe whose removal leaves the smallest gap goes, so a window
still spans from the placed context to the newest keyframe with evenly spread views.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from mapany_ros.core.frames import Frame

Group = list[Frame]


@dataclass
class Window:
    """Frame groups for one backend call; ``n_context`` leading groups are placed context, not output."""

    index: int
    groups: list[Group]
    n_context: int

    @property
    def frames(self) -> list[Frame]:
        """The groups flattened, context first, in the order the backend receives them."""
        return [f for g in self.groups for f in g]

    @property
    def output_mask(self) -> list[bool]:
        """Per flattened frame: True when this window is the one that outputs it."""
        return [i >= self.n_context for i, g in enumerate(self.groups) for _ in g]


class PendingKeyframes:
    """Keyframe groups waiting for their window, bounded by thinning.

    ``separation(a, b)`` says how far apart two groups are (in keyframe units: 1 = just enough
    for a new keyframe); ``capacity`` is the most groups that may wait.
    """

    def __init__(self, size: int, overlap: int, capacity: int, separation: Callable[[Group, Group], float]) -> None:
        if size < 2:
            raise ValueError(f"window size must be >= 2, got {size}")
        if not 0 <= overlap < size:
            raise ValueError(f"window overlap must be in [0, size), got {overlap} for size {size}")
        if capacity < size - overlap:
            raise ValueError(f"capacity {capacity} cannot hold one window ({size - overlap} new groups)")
        self.size, self.overlap, self.capacity = size, overlap, capacity
        self._separation = separation
        self._groups: list[Group] = []
        self._last_sent: Group | None = None

    def __len__(self) -> int:
        return len(self._groups)

    def clear(self) -> None:
        self._groups.clear()
        self._last_sent = None

    @property
    def oldest(self) -> Group | None:
        return self._groups[0] if self._groups else None

    def push(self, group: Group) -> int:
        """Add the newest keyframe group; returns how many waiting groups were skipped to make room."""
        self._groups.append(group)
        skipped = 0
        while len(self._groups) > self.capacity:
            self._groups.pop(self._thinnest())
            skipped += 1
        return skipped

    def _thinnest(self) -> int:
        """Index of the waiting group (never the newest) whose removal leaves the smallest gap."""
        best, best_gap = 0, float("inf")
        for i in range(len(self._groups) - 1):
            before = self._groups[i - 1] if i > 0 else self._last_sent
            after = self._groups[i + 1]
            gap = self._separation(before, after) if before is not None else float("inf")
            if gap < best_gap:
                best, best_gap = i, gap
        return best

    def new_per_window(self, n_context: int) -> int:
        return self.size - n_context

    def full(self, n_context: int) -> bool:
        """Enough groups for a whole window after ``n_context`` context groups."""
        return len(self._groups) >= self.new_per_window(n_context)

    def take(self, n: int) -> list[Group]:
        """The ``n`` oldest groups (fewer when fewer are waiting)."""
        taken, self._groups = self._groups[:n], self._groups[n:]
        if taken:
            self._last_sent = taken[-1]
        return taken
