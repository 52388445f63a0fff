"""Ground once, track every frame: the policy of one camera's standing query (model-free).

A TrackSet holds one camera's tracks and its Tracker. Track ids are positive integers,
stable across frames and re-groundings and never reused (0 is left for "untracked"). All
times are the frames' stamps in seconds (header stamps, so sim time works), never the wall
clock.

What the caller (one per camera) does per frame, with stamp t and image f:

    if tracks.grounding_due(t):            # nothing tracked, period passed, weak or lost track
        tracks.grounding_started(t)        # remembers the tracked masks to match against
        ... run the standing query on f (asynchronously); when its Grounding g arrives:
        ids = tracks.grounded(t, f, [p.mask for p in g.phrases], [p.text for p in g.phrases])
        ... publish g, phrase i with track id ids[i]
    if tracks.tracking:                    # (at up to the tracking rate)
        for obj in tracks.track(t, f):     # live tracks, then the ones lost now (once each)
            ... publish obj.track_id, obj.label, obj.mask, obj.score, obj.lost,
                tracks.last_grounded (stamp of the frame the tracks were last grounded on)

grounded() matches the new masks to the tracks by mask IoU (greedy, best pair first, at least
`match_iou`) against the masks the tracks had when grounding_started() was called (the frame
the LMM saw), so an identity survives a re-grounding that lands frames later. A new mask
without a match starts a new track; a track without a match ends and is reported lost by the
next track(). The tracker is re-seeded from the grounded frame itself: when the LMM takes a
few frames, tracking resumes from where the objects were then (the colour tracker searches
around that place; SAM 2 takes it as its newest conditioning frame). A grounding that ends
without a result: grounding_failed(); it is due again
when the period has passed since grounding_started() (or at once while a track is weak).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from groundlmm_ros.engine.engine import Engine
from groundlmm_ros.engine.refiners import mask_iou
from groundlmm_ros.engine.trackers import Tracker
from groundlmm_ros.engine.types import Grounding


@dataclass
class TrackedObject:
    track_id: int  # > 0
    label: str  # the phrase it was grounded as
    mask: np.ndarray  # (H, W) bool; all False when lost
    score: float  # the tracker's score, 0..1
    lost: bool  # True exactly once, on the track's last report


class TrackSet:
    """One camera's tracks. reground_period_s: ground again this long after the last grounding
    started; min_score: a tracked object scoring below it asks for a grounding at once (as does
    a lost one); match_iou: the least IoU for a re-grounded mask to keep a track's id."""

    def __init__(
        self,
        tracker: Tracker,
        reground_period_s: float = 2.0,
        min_score: float = 0.5,
        match_iou: float = 0.3,
    ):
        if reground_period_s <= 0 or not 0 <= min_score <= 1 or not 0 < match_iou <= 1:
            raise ValueError(
                f"need reground_period_s > 0, 0 <= min_score <= 1, 0 < match_iou <= 1; got "
                f"{reground_period_s}, {min_score}, {match_iou}"
            )
        self.tracker = tracker
        self.reground_period_s = reground_period_s
        self.min_score = min_score
        self.match_iou = match_iou
        self.labels: dict[int, str] = {}
        self.masks: dict[int, np.ndarray] = {}
        self.last_grounded: float | None = None
        self._next_id = 1
        self._started: float | None = None
        self._pending = False
        self._snapshot: dict[int, np.ndarray] | None = None
        self._weak = False
        self._ended: list[tuple[int, str]] = []

    @property
    def tracking(self) -> bool:
        """Whether track() has anything to report."""
        return bool(self.labels or self._ended)

    def grounding_due(self, stamp: float) -> bool:
        """No grounding in flight, and: nothing tracked, the period passed since the last one
        started, or a track scored below min_score or was lost since the last grounding."""
        if self._pending:
            return False
        return (
            not self.labels
            or self._weak
            or self._started is None
            or stamp - self._started >= self.reground_period_s
        )

    def grounding_started(self, stamp: float) -> None:
        """A grounding of the frame at `stamp` begins; the period restarts from here."""
        self._started = stamp
        self._pending = True
        self._snapshot = dict(self.masks)

    def grounding_failed(self) -> None:
        """The grounding in flight ended without a result: it is due again after the period."""
        self._pending = False
        self._snapshot = None

    def grounded(
        self, stamp: float, frame: np.ndarray, masks: list[np.ndarray], labels: list[str]
    ) -> list[int]:
        """The standing query's phrases on the frame at `stamp`: seeds the tracker. -> the
        track id of each mask, in order. An empty mask gets 0 (untracked)."""
        if len(masks) != len(labels):
            raise ValueError(f"{len(masks)} masks but {len(labels)} labels")
        reference = self._snapshot if self._snapshot is not None else self.masks
        # A camera whose resolution changed matches nothing: its objects start new tracks.
        reference = {i: m for i, m in reference.items() if m.shape == frame.shape[:2]}
        matched = self._match(list(masks), reference)
        ids = []
        for i, (mask, label) in enumerate(zip(masks, labels)):
            if not mask.any():
                ids.append(0)
            elif i in matched:
                ids.append(matched[i])
            else:
                ids.append(self._next_id)
                self._next_id += 1
        kept = {i: (m, label) for i, m, label in zip(ids, masks, labels) if i}
        self._ended += [(i, label) for i, label in self.labels.items() if i not in kept]
        self.tracker.seed(frame, [m for m, _ in kept.values()], list(kept))
        self.labels = {i: label for i, (_, label) in kept.items()}
        self.masks = {i: m for i, (m, _) in kept.items()}
        self.last_grounded = stamp
        self._pending, self._snapshot, self._weak = False, None, False
        return ids

    def track(self, stamp: float, frame: np.ndarray) -> list[TrackedObject]:
        """The tracks on the frame at `stamp`: live ones in id order, then those lost now (a
        lost track is reported once, then dropped)."""
        live, lost = [], []
        results = self.tracker.track(frame) if self.labels else {}
        for i, label in list(self.labels.items()):
            result = results[i]
            if result.lost:
                lost.append(TrackedObject(i, label, result.mask, 0.0, True))
                del self.labels[i], self.masks[i]
                self._weak = True
                continue
            self.masks[i] = result.mask
            self._weak |= result.score < self.min_score
            live.append(TrackedObject(i, label, result.mask, result.score, False))
        empty = np.zeros(frame.shape[:2], bool)
        lost += [TrackedObject(i, label, empty, 0.0, True) for i, label in self._ended]
        self._ended = []
        return live + lost

    def _match(self, masks: list[np.ndarray], reference: dict[int, np.ndarray]) -> dict[int, int]:
        """{index of a new mask: track id} by IoU, greedy from the best pair, >= match_iou."""
        if not masks or not reference:
            return {}
        ids = list(reference)
        iou = mask_iou(np.stack(masks + [reference[i] for i in ids]))[: len(masks), len(masks) :]
        matched: dict[int, int] = {}
        for flat in np.argsort(-iou, axis=None, kind="stable"):
            new, old = divmod(int(flat), len(ids))
            if iou[new, old] < self.match_iou:
                break
            if new not in matched and ids[old] not in matched.values():
                matched[new] = ids[old]
        return matched


@dataclass
class FrameResult:
    grounding: Grounding | None  # the standing query's answer when this frame was grounded
    track_ids: list[int]  # the track id of each of its phrases (empty when not grounded)
    objects: list[TrackedObject]  # what track() reported on this frame


def ground_and_track(
    engine: Engine, tracks: TrackSet, query: str, mode: str, stamp: float, frame: np.ndarray
) -> FrameResult:
    """One frame of a standing query, synchronously (the CPU demo, tests, benchmarks): ground
    it when due, then track. The node does the same with the grounding on its worker."""
    grounding, ids = None, []
    if tracks.grounding_due(stamp):
        tracks.grounding_started(stamp)
        grounding = engine.ground(frame, query, mode)
        masks = [p.mask for p in grounding.phrases]
        ids = tracks.grounded(stamp, frame, masks, [p.text for p in grounding.phrases])
    return FrameResult(grounding, ids, tracks.track(stamp, frame))
