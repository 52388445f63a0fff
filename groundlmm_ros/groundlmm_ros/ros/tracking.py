"""Ground, then track, on the worker's side: a query's grounded objects followed on its camera's
frames (`Tracking`), the frames' stamps as tracking's clock, and a tracked frame as a Grounding
that results, overlay, markers and depth take as they take a grounded one."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from groundlmm_ros.engine.types import GroundedPhrase, Grounding

if TYPE_CHECKING:
    from groundlmm_ros.engine.tracking import TrackedObject, TrackSet
    from groundlmm_ros.ros.worker import Job, Outcome


@dataclass
class Tracking:
    """One query's grounded objects, followed on its camera's frames: the standing query's
    (`standing`: grounded again when its tracks say so) or a goal's (until cancelled)."""

    tracks: TrackSet
    standing: bool = False
    # The job whose grounding seeded the tracks: its query, mode and Reply.
    job: Job | None = None
    # The grounding's answer and its phrases' spans by track id: a tracked result's.
    answer: str = ""
    spans: dict[int, tuple[int, int]] = field(default_factory=dict)
    # The header stamp of the frame grounded on (builtin_interfaces/Time).
    grounded_stamp: object = None
    # The frame message last grounded or tracked (a frame is tracked once).
    last_frame: object = None
    # monotonic time before which no frame is tracked (tracking_rate_hz)
    next: float = 0.0
    # its latest result, a goal's result when it is cancelled
    last: Outcome | None = None


def stamp_s(frame) -> float:
    """A frame's header stamp in seconds (tracking's clock: sim time works)."""
    return frame.header.stamp.sec + frame.header.stamp.nanosec * 1e-9


def tracked_grounding(tracking: Tracking, objects: list[TrackedObject], size) -> Grounding:
    """The tracked objects as a Grounding of the tracking's query: each object a phrase (no heat
    map; its point the mask's pixel nearest its mean), so results, overlay, markers and depth
    take them as they take grounded phrases."""
    # imported here: engine.engine brings torch, which the node loads only at configure
    from groundlmm_ros.engine.engine import mask_bbox

    phrases = []
    for obj in objects:
        rows, columns = np.nonzero(obj.mask)
        point = (0, 0)
        if rows.size:
            nearest = np.argmin((rows - rows.mean()) ** 2 + (columns - columns.mean()) ** 2)
            point = (int(columns[nearest]), int(rows[nearest]))
        start, end = tracking.spans.get(obj.track_id, (0, 0))
        phrases.append(
            GroundedPhrase(
                obj.label, start, end, [], None, point, obj.mask, obj.score, mask_bbox(obj.mask)
            )
        )
    job = tracking.job
    return Grounding(job.query, job.mode, tracking.answer, [], phrases, size)
