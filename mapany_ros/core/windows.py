"""Sliding windows of keyframe groups with overlap.

The backend sees ``size`` groups at a time. The first ``overlap`` groups of every window after
the first are context carried over from the previous window: they tie consecutive windows to
one frame of reference but are not output again, so each keyframe is output exactly once.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mapany_ros.core.frames import Frame


@dataclass
class Window:
    """Frame groups for one backend call; ``n_context`` leading groups are not output."""

    index: int
    groups: list[list[Frame]]
    n_context: int

    @property
    def frames(self) -> list[Frame]:
        """The groups flattened, context first, in the order the backend receives them."""
        return [f for g in self.groups for f in g]

    @property
    def output_mask(self) -> list[bool]:
        """Per flattened frame: True when this window is the one that outputs it."""
        return [i >= self.n_context for i, g in enumerate(self.groups) for _ in g]


@dataclass
class WindowBuilder:
    size: int = 8
    overlap: int = 2
    _context: list[list[Frame]] = field(default_factory=list, init=False)
    _new: list[list[Frame]] = field(default_factory=list, init=False)
    _count: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        if self.size < 2:
            raise ValueError(f"window size must be >= 2, got {self.size}")
        if not 0 <= self.overlap < self.size:
            raise ValueError(f"window overlap must be in [0, size), got {self.overlap} for size {self.size}")

    def reset(self) -> None:
        self._context.clear()
        self._new.clear()

    @property
    def pending(self) -> int:
        """Keyframe groups waiting for their window."""
        return len(self._new)

    def push(self, group: list[Frame]) -> Window | None:
        """Add a keyframe group; return a window when it is full."""
        self._new.append(group)
        if len(self._context) + len(self._new) >= self.size:
            return self.flush()
        return None

    def flush(self) -> Window | None:
        """Emit the waiting groups now (with context), e.g. when input stops or stalls."""
        if not self._new:
            return None
        groups = self._context + self._new
        if sum(len(g) for g in groups) < 2:
            return None  # a multi-view backend needs two views; wait for more
        window = Window(self._count, groups, len(self._context))
        self._count += 1
        self._context = groups[-self.overlap :] if self.overlap else []
        self._new = []
        return window
