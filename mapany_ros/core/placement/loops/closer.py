"""Loop closure: recognise a revisited place, verify it with the backend, and close it in the graph.

1. **Candidates**, for every new keyframe: old keyframes (at least ``min_gap_keyframes`` back)
   where the graph thinks the robot is - within ``search_radius_m`` plus three sigmas of the new
   keyframe's position uncertainty - and, so that large drift is caught too, the old keyframes
   whose global image descriptor is most alike (:mod:`.descriptors`).
2. **Verification** by the backend itself: the old keyframe, a neighbour of it, the new keyframe
   and its predecessor go into one window through ``infer``, without any pose prior (a prior would
   pull the model towards the drifted estimate the loop is to correct). The views of the two places
   must share surfaces: a fraction ``min_overlap`` of one place's points must lie on the other's
   depth. The relative pose is the model's, refined so the four depth maps agree, at the scale
   their depth has against the depth the map stored for those keyframes.
3. **Closing**: a verified loop whose implied correction of the map agrees with another verified
   loop close to it (two places matched the same way) enters the graph as a between factor of the
   two keyframes; a single one waits for its confirmation. So one false match - a look-alike place
   the model could fit - cannot bend the map, while a real revisit, which matches keyframe after
   keyframe, closes after its second match.

Candidates and verification run only when the backend is idle (the pipeline asks for a job between
windows), so loop closure never delays a live window: a window only remembers its keyframes and,
for those that look for candidates, what the search needs from that moment (the graph's poses,
the position's uncertainty); the search itself, the keyframes' descriptors and JPEGs are made
while the backend is idle (:meth:`LoopCloser.idle_work`), in the same order and on the same data,
so they find what a search during the window would have found.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np

from mapany_ros.core.alignment import rigidify
from mapany_ros.core.backends.base import WindowPrediction
from mapany_ros.core.frames import Frame
from mapany_ros.core.geometry import invert, is_rigid, rotation_angle
from mapany_ros.core.placement.loops.memory import KeyframeMemory, StoredKeyframe, small_depth
from mapany_ros.core.placement.multiview import ViewStack
from mapany_ros.core.placement.refine import refine_window_poses
from mapany_ros.core.placement.view_check import agreement_matrix

#: A view that refinement had to move beyond this (chi-square, 6 dof, 99.9 %) to agree makes the
#: verification window untrustworthy.
REJECT_CHI2 = 22.46
#: Candidate searches that may wait for an idle backend (each holds a copy of the pose table).
MAX_WAITING_SEARCHES = 8


@dataclass
class LoopConfig:
    """Knobs of loop closure (one node parameter each)."""

    enabled: bool = True
    #: An old keyframe must be at least this many keyframes older than the new one.
    min_gap_keyframes: int = 15
    #: Old keyframes within this distance (plus three sigmas of drift) are position candidates.
    search_radius_m: float = 1.0
    #: Cameras whose optical axes differ by more than this see different things: not a candidate.
    max_view_angle_deg: float = 60.0
    position_candidates: int = 1
    appearance_candidates: int = 1
    #: Appearance candidates need at least this cosine similarity of their descriptors.
    min_similarity: float = 0.3
    #: Fraction of one place's points that must lie on the other's surfaces for a verified loop.
    min_overlap: float = 0.5
    #: Two loops confirm each other when their corrections of the map agree this well.
    confirm_m: float = 0.15
    confirm_deg: float = 3.0
    #: A loop waits at most this many keyframes for its confirmation.
    confirm_window: int = 10
    #: Width of the images kept for verification (JPEG in memory).
    image_width: int = 512
    descriptor: str = "gradients"
    #: Candidates waiting for verification; the newest win.
    max_queue: int = 8
    #: Candidates are looked for at every n-th keyframe (verification costs a backend call each).
    every_keyframes: int = 4
    #: Loop factor noise: this times the model's per-view sigmas (a loop ties two views).
    sigma_factor: float = 2.0


@dataclass
class LoopCandidate:
    old_kid: int
    new_kid: int
    source: str  # "position" or "appearance"
    score: float


@dataclass
class LoopJob:
    """A candidate with the frames to show the backend and where each keyframe's views are."""

    candidate: LoopCandidate
    frames: list[Frame]
    #: Per frame: (keyframe id, view of that keyframe).
    owners: list[tuple[int, int]]
    stored: dict[int, StoredKeyframe]


@dataclass
class LoopMeasurement:
    """A verified loop: keyframe ``new``'s base seen from keyframe ``old``'s base."""

    old_kid: int
    new_kid: int
    T_old_new: np.ndarray
    overlap: float
    scale: float
    source: str


@dataclass
class LoopStats:
    candidates: int = 0
    verified: int = 0
    rejected: int = 0
    closed: int = 0
    last_message: str = ""


def _axis(T_base_camera: np.ndarray) -> np.ndarray:
    return T_base_camera[:3, 2]


class LoopCloser:
    """Finds and verifies loops; the placer closes them in its graph (see module docstring)."""

    def __init__(self, config: LoopConfig, view_sigma_m: float, view_sigma_rad: float) -> None:
        self.config = config
        self.memory = KeyframeMemory(config.image_width, config.descriptor)
        self.stats = LoopStats()
        self._queue: deque[LoopCandidate] = deque(maxlen=config.max_queue)
        self._tried: set[tuple[int, int]] = set()
        self._waiting: list[tuple[LoopMeasurement, np.ndarray]] = []  # verified, unconfirmed (with correction)
        self.view_sigmas = np.array([view_sigma_rad] * 3 + [view_sigma_m] * 3)
        #: Searches to run while the backend is idle, oldest first: (keyframe, the poses then, position
        #: sigma, the loop memory's row count then: the descriptors its appearance search sees).
        self._searches: deque[tuple[int, dict[int, np.ndarray], float, int]] = deque()
        #: While a waiting search runs: the memory's row count when its window asked (None: all rows).
        self._as_of_rows: int | None = None

    # ------------------------------------------------------------------ memory
    def remember(self, kid: int, stamp_ns: int, views: list[tuple[Frame, np.ndarray, object, object]],
                 descriptors: np.ndarray | None = None) -> None:
        if self.config.enabled and kid not in self.memory.keyframes:
            self.memory.add(kid, stamp_ns, views, descriptors)

    # ------------------------------------------------------------------ candidates
    def searches(self, kid: int) -> bool:
        """Whether keyframe ``kid`` (remembered) looks for candidates (every ``every_keyframes``-th)."""
        cfg = self.config
        return cfg.enabled and kid in self.memory.keyframes and not kid % max(1, cfg.every_keyframes)

    def search_later(self, kid: int, poses: dict[int, np.ndarray], position_sigma_m: float) -> None:
        """:meth:`propose` for ``kid`` as of now, run by :meth:`idle_work` (``poses`` is copied:
        its entries are replaced, never changed in place, so a shallow copy is a snapshot; the memory's
        descriptors are seen as they are now, stored later ones left out of the search and its mean)."""
        self._searches.append((kid, dict(poses), position_sigma_m, self.memory.rows))
        if len(self._searches) > MAX_WAITING_SEARCHES:  # a backend never idle: the oldest runs now, as it would have
            self._run_searches(len(self._searches) - MAX_WAITING_SEARCHES)

    def _run_searches(self, limit: int | None = None) -> None:
        n = len(self._searches) if limit is None else min(limit, len(self._searches))
        for _ in range(n):
            kid, poses, sigma, rows = self._searches.popleft()
            self._as_of_rows = rows
            try:
                self.propose(kid, poses, sigma)
            finally:
                self._as_of_rows = None

    def idle_work(self) -> None:
        """What windows left for when the backend is idle: the candidate searches, in order, then the
        remaining keyframes' descriptors and JPEGs."""
        self._run_searches()
        self.memory.settle()

    def propose(self, kid: int, poses: dict[int, np.ndarray], position_sigma_m: float, every: bool = False) -> None:
        """Queue the candidates of a new keyframe: by position (``poses``: keyframe id -> T_map_base,
        the graph's latest) and by appearance. Keyframes of a loaded map (negative ids) are always
        old enough. ``every``: whatever ``every_keyframes`` says (relocalising)."""
        cfg = self.config
        new = self.memory.keyframes.get(kid)
        if not cfg.enabled or new is None or (kid % max(1, cfg.every_keyframes) and not every):
            return
        before = max(kid - cfg.min_gap_keyframes, 0)
        found: list[LoopCandidate] = []
        if kid in poses:
            old = [k for k in poses if k < before and k in self.memory.keyframes]
            if old:
                here = poses[kid]
                centres = np.stack([poses[k][:3, 3] for k in old])
                dist = np.linalg.norm(centres - here[:3, 3], axis=1)
                radius = cfg.search_radius_m + 3.0 * position_sigma_m
                axes_new = [here[:3, :3] @ _axis(v.T_base_camera) for v in new.views]
                for i in np.argsort(dist):
                    if dist[i] > radius or sum(c.source == "position" for c in found) >= cfg.position_candidates:
                        break
                    k = old[i]
                    axes_old = [poses[k][:3, :3] @ _axis(v.T_base_camera) for v in self.memory.keyframes[k].views]
                    best = max(float(a @ b) for a in axes_new for b in axes_old)
                    if best >= np.cos(np.radians(cfg.max_view_angle_deg)):
                        found.append(LoopCandidate(k, kid, "position", float(dist[i])))
        for k, sim in self.memory.similar(new.descriptors, before, cfg.appearance_candidates, self._as_of_rows):
            if sim >= cfg.min_similarity:
                found.append(LoopCandidate(k, kid, "appearance", sim))
        for c in found:
            if (c.old_kid, c.new_kid) not in self._tried:
                self._tried.add((c.old_kid, c.new_kid))
                self._queue.append(c)
                self.stats.candidates += 1

    def submit(self, candidate: LoopCandidate) -> None:
        """Queue a candidate found elsewhere (verification decides, as for any other)."""
        self._tried.add((candidate.old_kid, candidate.new_kid))
        self._queue.append(candidate)
        self.stats.candidates += 1

    @property
    def pending(self) -> bool:
        """Work for an idle backend: candidates to verify, or searches and images left by windows."""
        return bool(self._queue) or bool(self._searches) or self.memory.unsettled > 0

    @property
    def has_candidates(self) -> bool:
        return bool(self._queue)

    def next_job(self) -> LoopJob | None:
        """The newest candidate with the frames to verify it: both keyframes and a neighbour of each."""
        mem = self.memory.keyframes
        while self._queue:
            c = self._queue.pop()
            old_n = c.old_kid + 1 if c.old_kid + 1 in mem else c.old_kid - 1
            new_n = c.new_kid - 1
            kids = [k for k in (c.old_kid, old_n, new_n, c.new_kid) if k in mem]
            if c.old_kid not in mem or c.new_kid not in mem or len(kids) < 3:
                continue
            frames, owners = [], []
            for k in kids:
                for n, view in enumerate(mem[k].views):
                    frames.append(view.frame())
                    owners.append((k, n))
            return LoopJob(c, frames, owners, {k: mem[k] for k in kids})
        return None

    # ------------------------------------------------------------------ verification
    def verify(self, job: LoopJob, prediction: WindowPrediction) -> LoopMeasurement | str:
        """The loop the backend sees in ``job``'s window, or why it is not one."""
        c = job.candidate
        views = prediction.views
        if len(views) != len(job.frames):
            return f"backend returned {len(views)} views for {len(job.frames)} frames"
        usable = [i for i, v in enumerate(views) if is_rigid(rigidify(v.T_world_camera)) and bool(v.valid.any())]
        old_side = {c.old_kid, c.old_kid + 1, c.old_kid - 1}
        place = [0 if job.owners[i][0] in old_side else 1 for i in range(len(views))]
        if not {place[i] for i in usable} == {0, 1}:
            return "no usable view of one of the places"
        # Scale: the window's depth against the depth the map stored for the same views.
        ratios = []
        for i in usable:
            k, n = job.owners[i]
            stored = job.stored[k].views[n].depth
            mine = small_depth(views[i].depth, views[i].valid)
            ok = np.isfinite(stored) & np.isfinite(mine) & (mine > 0)
            if ok.sum() >= 20:
                ratios.append(float(np.median(stored[ok] / mine[ok])))
        if not ratios:
            return "no depth to measure the window's scale against"
        scale = float(np.median(ratios))
        stack = ViewStack(views, usable, 1000, normals=True)
        refined = refine_window_poses(views, stack, usable, prior_sigma_m=self.view_sigmas[3] / scale,
                                      prior_sigma_rad=self.view_sigmas[0], depth_sigma=0.01, move_points=False)
        moved = max(refined.correction_chi2.values(), default=0.0)
        if moved > REJECT_CHI2:  # a view had to move far to agree: one of the four is wrong, trust none
            return f"a view disagrees with the others (moved {np.sqrt(moved):.1f} sigmas to agree)"
        T = np.stack([rigidify(refined.views[i].T_world_camera) for i in usable])
        A = agreement_matrix(stack, T, tolerance=0.08)
        # The two candidate keyframes themselves must see each other's surfaces, both ways.
        slot = {job.owners[i][0]: a for a, i in enumerate(usable) if job.owners[i][1] == 0}
        if c.old_kid not in slot or c.new_kid not in slot:
            return "the candidate keyframes themselves gave no usable view"
        both = [A[slot[c.old_kid], slot[c.new_kid]], A[slot[c.new_kid], slot[c.old_kid]]]
        overlap = min(both) if all(np.isfinite(both)) else 0.0
        if overlap < self.config.min_overlap:
            return f"the places share no surface ({overlap:.0%} of points agree, need {self.config.min_overlap:.0%})"

        def base(kid: int) -> np.ndarray | None:
            for i in usable:
                k, n = job.owners[i]
                if k == kid:
                    T_wc = rigidify(refined.views[i].T_world_camera)
                    T_wc[:3, 3] *= scale
                    return T_wc @ invert(job.stored[k].views[n].T_base_camera)
            return None

        old, new = base(c.old_kid), base(c.new_kid)
        if old is None or new is None:
            return "the candidate keyframes themselves gave no usable view"
        return LoopMeasurement(c.old_kid, c.new_kid, invert(old) @ new, float(overlap), scale, c.source)

    # ------------------------------------------------------------------ confirmation
    def confirm(self, loop: LoopMeasurement, T_map_old: np.ndarray, T_map_new: np.ndarray
                ) -> list[LoopMeasurement]:
        """Loops ready to enter the graph: ``loop`` and the waiting ones it agrees with (or none yet).

        A loop implies a correction of the map at the new keyframe (where the old keyframe and the
        loop put it, against where the graph has it); two loops of one revisit imply the same one.
        """
        cfg = self.config
        correction = (T_map_old @ loop.T_old_new) @ invert(T_map_new)
        self._waiting = [(w, C) for w, C in self._waiting if loop.new_kid - w.new_kid <= cfg.confirm_window]
        agreeing = []
        for w, C in self._waiting:
            d = invert(C) @ correction
            # Compare where both corrections move the new keyframe: the rotation part of a correction
            # far from the origin would otherwise turn into a large translation difference.
            shift = np.linalg.norm(C[:3, :3] @ T_map_new[:3, 3] + C[:3, 3] - correction[:3, :3] @ T_map_new[:3, 3]
                                   - correction[:3, 3])
            if shift <= cfg.confirm_m and np.degrees(rotation_angle(d)) <= cfg.confirm_deg:
                agreeing.append(w)
        if not agreeing:
            self._waiting.append((loop, correction))
            return []
        self._waiting = [(w, C) for w, C in self._waiting if w not in agreeing]
        return [*agreeing, loop]

    def sigmas(self) -> np.ndarray:
        return self.config.sigma_factor * self.view_sigmas

