"""Ground once, track every frame, on the shipped demo model with the colour tracker: a standing
refer query's mask follows its object through motion and occlusion, its track id survives
re-groundings, and an object that leaves ends its track with one "lost" report."""

import numpy as np
import pytest

from groundlmm_ros.engine.trackers import ColourTracker, shift
from groundlmm_ros.engine.tracking import TrackSet, ground_and_track
from groundlmm_ros.models.presets import build_engine
from groundlmm_ros.world.sequences import Mover, Sequence

FPS = 30.0


@pytest.fixture(scope="module")
def demo():
    return build_engine("demo")


def iou(a, b):
    return (a & b).sum() / max((a | b).sum(), 1)


def follow(engine, sequence, query, frames, period_s):
    """The standing refer query over `frames` frames stamped at FPS -> (results, tracks)."""
    tracks = TrackSet(ColourTracker(), reground_period_s=period_s)
    results = [
        ground_and_track(engine, tracks, query, "refer", t / FPS, sequence.frame(t).image)
        for t in range(frames)
    ]
    return results, tracks


def test_a_tracked_mask_follows_its_object_and_keeps_its_id(demo):
    # The purple circle drifts right; the green square, drawn later, passes over it (at most
    # 39 % of it hidden), the orange triangle crosses the view.
    movers = [
        Mover("purple", "circle", 15, (30, 60), (1.5, 0.5)),
        Mover("green", "square", 14, (110, 20), (-0.3, 1.8)),
        Mover("orange", "triangle", 14, (100, 100), (-1.2, -0.8)),
    ]
    sequence = Sequence(movers, seed=2)
    target = 0
    results, tracks = follow(demo, sequence, "the purple circle", 60, period_s=0.7)
    ious = []
    for t, result in enumerate(results):
        (obj,) = result.objects
        assert not obj.lost and obj.mask.shape == (128, 128)
        ious.append(iou(obj.mask, sequence.frame(t).masks[target]))
    assert np.mean(ious) >= 0.7, ious
    # Grounded on frames 0, 21 and 42 (0.7 s apart): the same track through two re-groundings.
    grounded = [t for t, r in enumerate(results) if r.grounding is not None]
    assert grounded == [0, 21, 42]
    assert [results[t].track_ids for t in grounded] == [[1], [1], [1]]
    assert {r.objects[0].track_id for r in results} == {1}
    assert tracks.last_grounded == pytest.approx(42 / FPS)
    # The square hid part of it on some frames.
    visible = [sequence.frame(t).masks[target].sum() for t in range(60)]
    assert min(visible) < 0.7 * max(visible)


def test_an_object_that_leaves_ends_its_track_once_and_a_new_one_gets_a_new_id(demo):
    movers = [
        Mover("green", "square", 16, (30, 90), (0.6, -0.4)),
        # Leaves through the right border around frame 20.
        Mover("purple", "circle", 15, (90, 40), (3.0, 0.0), bounce=False),
        # Another purple circle comes in from the left around frame 30.
        Mover("purple", "circle", 15, (-80, 60), (3.0, 0.0), bounce=False),
    ]
    sequence = Sequence(movers, seed=3)
    results, _ = follow(demo, sequence, "the purple circle", 60, period_s=1.0)
    first = results[0].track_ids
    assert first == [1]
    lost = [(t, o.track_id) for t, r in enumerate(results) for o in r.objects if o.lost]
    assert [i for _, i in lost].count(1) == 1
    (gone,) = [t for t, i in lost if i == 1]
    assert not sequence.frame(gone).masks[1].any() or sequence.frame(gone).masks[1].sum() < 50
    # Id 1 is never reported after its loss; the newcomer is tracked under a new id.
    assert all(o.track_id != 1 for r in results[gone + 1 :] for o in r.objects)
    last = sequence.frame(59)
    (obj,) = [o for o in results[59].objects if not o.lost]
    assert iou(obj.mask, last.masks[2]) > 0.7
    assert obj.track_id > 1


def test_grounding_is_due_by_the_frame_clock_and_at_once_for_a_weak_track():
    image = np.full((64, 64, 3), 128, np.uint8)
    image[10:30, 10:30] = (220, 30, 30)
    square = np.zeros((64, 64), bool)
    square[10:30, 10:30] = True
    tracks = TrackSet(ColourTracker(), reground_period_s=2.0, min_score=0.5)
    assert tracks.grounding_due(100.0) and not tracks.tracking
    tracks.grounding_started(100.0)
    assert not tracks.grounding_due(100.5)  # one grounding in flight at a time
    assert tracks.grounded(100.0, image, [square], ["the red square"]) == [1]
    assert not tracks.grounding_due(101.9) and tracks.grounding_due(102.0)
    # A failed grounding: due again once the period has passed since it started.
    tracks.grounding_started(102.0)
    tracks.grounding_failed()
    assert not tracks.grounding_due(103.9) and tracks.grounding_due(104.0)
    # Half of it hidden: the score falls below 0.5 and a grounding is due before the period.
    hidden = image.copy()
    hidden[10:30, 10:21] = 128
    (obj,) = tracks.track(103.0, hidden)
    assert obj.score < 0.5 and not obj.lost
    assert tracks.grounding_due(103.0)
    # Wholly hidden: lost, reported once, and nothing left to track until the next grounding.
    (obj,) = tracks.track(103.1, np.full((64, 64, 3), 128, np.uint8))
    assert obj.lost and obj.track_id == 1 and not obj.mask.any()
    assert tracks.track(103.2, image) == [] and not tracks.tracking


def test_regrounded_masks_match_tracks_by_iou_and_unmatched_tracks_end():
    image = np.full((64, 64, 3), 128, np.uint8)
    image[5:20, 5:20] = (220, 30, 30)
    image[40:60, 40:60] = (40, 70, 225)
    red, blue = np.zeros((2, 64, 64), bool)
    red[5:20, 5:20] = True
    blue[40:60, 40:60] = True
    tracks = TrackSet(ColourTracker())
    assert tracks.grounded(0.0, image, [red, blue], ["red", "blue"]) == [1, 2]
    # Given in the other order, slightly off: each keeps its id.
    assert tracks.grounded(1.0, image, [shift(blue, 2, 1), shift(red, 1, 0)], ["b", "r"]) == [2, 1]
    # Only the blue one is found again; a new object gets id 3, never a reused one.
    green = np.zeros((64, 64), bool)
    green[5:15, 40:55] = True
    image[5:15, 40:55] = (30, 170, 40)
    assert tracks.grounded(2.0, image, [blue, green], ["b", "g"]) == [2, 3]
    objects = tracks.track(2.1, image)
    assert [(o.track_id, o.lost) for o in objects] == [(2, False), (3, False), (1, True)]
    assert [(o.track_id, o.lost) for o in tracks.track(2.2, image)] == [(2, False), (3, False)]
    # An empty mask is untracked (0).
    assert tracks.grounded(3.0, image, [np.zeros((64, 64), bool)], ["nothing"]) == [0]


def test_bad_seeds_are_refused():
    tracker = ColourTracker()
    image = np.zeros((32, 32, 3), np.uint8)
    with pytest.raises(ValueError, match="size"):
        tracker.seed(image, [np.ones((16, 16), bool)], [1])
    with pytest.raises(ValueError, match="distinct"):
        tracker.seed(image, [np.ones((32, 32), bool)] * 2, [1, 1])
    with pytest.raises(ValueError, match="empty"):
        tracker.seed(image, [np.zeros((32, 32), bool)], [1])
