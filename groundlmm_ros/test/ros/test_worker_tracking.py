"""The Worker's ground-then-track loop in-process (no DDS; the node tests show it over DDS): the
shipped demo model grounds a standing refer query, the colour tracker follows the object on
every later frame; when it leaves the frame its track ends with one lost phrase, and the
re-grounding that follows at once starts a new track id."""

import threading

import pytest
from node_harness import stamped_header

from groundlmm_ros.engine.trackers import ColourTracker
from groundlmm_ros.engine.tracking import TrackSet
from groundlmm_ros.models.presets import build_engine
from groundlmm_ros.ros.conversion import numpy_to_image
from groundlmm_ros.ros.worker import Worker
from groundlmm_ros.world.sequences import Mover, Sequence

# every wait below is bounded; none of them depends on the machine's speed
WAIT_S = 30.0
FPS = 30.0
QUERY = "the purple circle"


class Replies:
    """The standing query's Reply: its grounded (finished) and tracked outcomes, in order."""

    def __init__(self):
        self.outcomes = []
        self._changed = threading.Condition()

    def started(self):
        pass

    def token(self, partial_answer, tokens):
        pass

    def cancel_requested(self):
        return False

    def finished(self, outcome):
        with self._changed:
            self.outcomes.append(outcome)
            self._changed.notify_all()

    tracked = finished

    def wait_for(self, frame):
        """The outcomes so far, once one of them is of this frame."""
        with self._changed:
            assert self._changed.wait_for(
                lambda: any(o.frame is frame for o in self.outcomes), WAIT_S
            ), f"no result for the frame stamped {frame.header.stamp}"
            return list(self.outcomes)


@pytest.fixture
def tracking_worker():
    replies, errors = Replies(), []
    worker = Worker(
        build_engine("demo"),
        cameras={"": ("/camera/image", replies)},
        queue_size=3,
        max_image_pixels=10_000_000,
        max_new_tokens=64,
        log_error=errors.append,
        # a period longer than the test: only a lost track asks for a grounding
        new_tracks=lambda: TrackSet(ColourTracker(), reground_period_s=100.0, min_score=0.0),
        tracking_rate_hz=0.0,
    )
    worker.start()
    yield worker, replies, errors
    worker.stop("test over", timeout=WAIT_S)


def test_a_track_that_leaves_ends_lost_once_and_a_new_grounding_gets_a_new_id(tracking_worker):
    worker, replies, errors = tracking_worker
    # The purple circle leaves through the right border by frame 16; the green square stays.
    sequence = Sequence(
        [
            Mover("purple", "circle", 15, (60, 60), (6.0, 0.0), bounce=False),
            Mover("green", "square", 14, (30, 100), (0.0, 0.0)),
        ],
        seed=2,
    )
    worker.set_standing(QUERY, "refer", 0.0)
    frames = [
        numpy_to_image(sequence.frame(t).image, "rgb8", stamped_header(t / FPS)) for t in range(24)
    ]
    for image in frames:
        worker.put_frame(image)
        outcomes = replies.wait_for(image)
    assert not errors, errors
    assert all(o.grounding is not None and not o.error for o in outcomes)
    grounded = [o for o in outcomes if not o.tracks.tracked]
    tracked = [o for o in outcomes if o.tracks.tracked]
    # grounded on the first frame, every later frame tracked once
    assert grounded[0].frame is frames[0] and grounded[0].tracks.ids == [1]
    assert [o.frame for o in tracked] == frames[1:]
    # track 1 is reported lost once, with an empty mask, and never again
    reports = [(i, o) for i, o in enumerate(tracked) if 1 in o.tracks.ids]
    index, ended = reports[-1]
    assert ended.tracks.ids == [1] and ended.tracks.lost == [True]
    assert not ended.grounding.phrases[0].mask.any() and ended.grounding.phrases[0].score == 0.0
    # until then the circle's track, on the circle
    assert [i for i, _ in reports] == list(range(index + 1))
    for t, o in enumerate(tracked[:index], start=1):
        assert o.tracks.ids == [1] and o.tracks.lost == [False]
        (phrase,) = o.grounding.phrases
        truth = sequence.frame(t).masks[0]
        assert (phrase.mask & truth).sum() / (phrase.mask | truth).sum() > 0.5
        assert o.tracks.last_grounded == frames[0].header.stamp
    # the lost report's frame is grounded again at once; what it finds is a new track
    again = grounded[1]
    assert again.frame is ended.frame and again.tracks.ids == [2]
    assert tracked[index + 1].tracks.ids == [2]
    assert tracked[index + 1].tracks.last_grounded == again.frame.header.stamp
