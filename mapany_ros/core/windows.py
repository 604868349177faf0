"""Keyframe groups waiting for the backend, and the windows they are sent in.

Every window after the first starts with ``overlap`` context groups that an earlier window has
already *placed* in the map; they tie the new window to the map and are not output again, so each
keyframe is output exactly once. Context is chosen when a window is sent, from what placement
accepted, so a failed or rejected window never leaves the next one without an anchor.

When the backend falls behind, waiting keyframes are thinned (never whole windows dropped): the
one whose removal leaves the smallest gap goes, so a window still spans from the placed context
to the newest keyframe with evenly spread views.
"""

from __future__ import annotations

from collections import deque
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
    """Keyframe groups waiting for the backend, cut into windows as they arrive.

    The new keyframes of each window are decided in message time: a window is cut when a whole
    window's worth has arrived, or (:meth:`cut`) when the oldest uncut one has waited too long -
    never by when the backend happens to be free, so a stream is cut the same way at any replay
    rate and offline. ``separation(a, b)`` says how far apart two groups are (in keyframe units:
    1 = just enough for a new keyframe); beyond ``capacity`` waiting groups the one whose removal
    leaves the smallest gap is skipped (never the newest).
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
        self.clear()

    def clear(self) -> None:
        self._open: list[Group] = []
        self._cut: deque[list[Group]] = deque()
        self._windows = 0
        self._last_sent: Group | None = None

    def __len__(self) -> int:
        """Groups waiting, cut into windows or not."""
        return len(self._open) + sum(len(w) for w in self._cut)

    @property
    def windows_ready(self) -> int:
        return len(self._cut)

    @property
    def oldest_uncut(self) -> Group | None:
        return self._open[0] if self._open else None

    @property
    def uncut(self) -> int:
        return len(self._open)

    @property
    def first_window(self) -> bool:
        """No window was cut yet: the next one has no context and needs ``size`` new groups."""
        return self._windows == 0

    def push(self, group: Group) -> list[Group]:
        """Add the newest keyframe group; returns the waiting groups skipped to make room."""
        self._open.append(group)
        if len(self._open) >= self.size - (0 if self.first_window else self.overlap):
            self.cut()
        skipped = []
        while len(self) > self.capacity:
            skipped.append(self._skip_thinnest())
        return skipped

    def cut(self) -> None:
        """The uncut groups become a window (a partial one when fewer than a window's worth)."""
        if self._open:
            self._cut.append(self._open)
            self._open = []
            self._windows += 1

    def take(self) -> list[Group]:
        """The new groups of the next window, oldest first ([] when none is cut)."""
        if not self._cut:
            return []
        taken = self._cut.popleft()
        self._last_sent = taken[-1]
        return taken

    def _skip_thinnest(self) -> Group:
        """Drop the waiting group (never the newest) whose removal leaves the smallest gap."""
        lists = [*self._cut, self._open]
        flat = [(li, i) for li, lst in enumerate(lists) for i in range(len(lst))]
        groups = [lists[li][i] for li, i in flat]
        best, best_gap = 0, float("inf")
        for k in range(len(groups) - 1):
            before = groups[k - 1] if k > 0 else self._last_sent
            gap = self._separation(before, groups[k + 1]) if before is not None else float("inf")
            if gap < best_gap:
                best, best_gap = k, gap
        li, i = flat[best]
        skipped = lists[li].pop(i)
        self._cut = deque(w for w in self._cut if w)
        return skipped
