"""`tracking: sam2` over real DDS: the node loads SAM 2's video model at configure (the tiny
random preset, built in code) and tracks a standing query's grounded masks with it: tracked
results come with the frame's header, masks at the image's size and the grounding's track id.
Random weights: nothing here says the masks follow the object (test_sam2_tracker.py covers the
tracker itself)."""

import time

import pytest
from node_harness import stamped_header

from groundlmm_ros.ros.conversion import numpy_to_image
from groundlmm_ros.world.sequences import Mover, Sequence

pytestmark = [pytest.mark.timeout(90), pytest.mark.ros, pytest.mark.node]

FPS = 20.0
QUERY = "the purple circle"


@pytest.fixture(scope="module")
def node():
    from node_harness import NodeProcess

    process = NodeProcess(
        {
            "model": "demo",
            "tracking": "sam2",
            "tracker_model": "tiny-random",
            "track_min_score": 0.0,
            "reground_period_s": 100.0,
            "standing_query": QUERY,
            "standing_mode": "refer",
        }
    )
    yield process
    process.close()


def test_sam2_tracks_the_standing_query_on_later_frames(node, client):
    sequence = Sequence([Mover("purple", "circle", 15, (40, 60), (1.0, 0.0))], seed=1)
    stamps = set()
    deadline = time.monotonic() + 30.0
    t = 0
    while time.monotonic() < deadline:
        image = numpy_to_image(sequence.frame(t).image, "rgb8", stamped_header(50.0 + t / FPS))
        stamps.add((image.header.stamp.sec, image.header.stamp.nanosec))
        client.image_pub.publish(image)
        t += 1
        time.sleep(1 / FPS)
        if sum(r.source == "tracked" for r in client.results) >= 5:
            break
    assert "tracking: sam2" in node.output()
    results = [r for r in client.results if r.query == QUERY]
    tracked = [r for r in results if r.source == "tracked"]
    assert len(tracked) >= 5, [(r.source, r.message) for r in results]
    assert all(r.success for r in results), [r.message for r in results if not r.success]
    (grounded, *_) = [r for r in results if r.source == "grounded"]
    (phrase,) = grounded.phrases
    assert phrase.track_id == 1
    for r in tracked:
        assert (r.header.stamp.sec, r.header.stamp.nanosec) in stamps
        assert r.last_grounded == grounded.header.stamp
        for p in r.phrases:
            assert p.track_id == 1
            assert (p.mask.height, p.mask.width) == (128, 128) or p.lost
