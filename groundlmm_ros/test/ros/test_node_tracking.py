"""Ground, then track, over real DDS: groundlmm_node (the shipped demo model, the colour tracker)
in its own process. A standing refer query is grounded on one frame, then every later frame
gets a tracked result on `grounding`, at most `tracking_rate_hz`, with the frame's header and
the same track id and 3D centroids from the depth frame; a re-grounding comes once
`reground_period_s` of frame stamps has passed.
A Ground goal with `track` gets tracked feedback until it is cancelled, and ends canceled."""

import time

import numpy as np
import pytest
from action_msgs.msg import GoalStatus
from node_harness import stamped_header
from sensor_msgs.msg import CameraInfo, Image

from groundlmm_msgs.action import Ground
from groundlmm_ros.ros.conversion import numpy_to_image
from groundlmm_ros.world.sequences import Mover, Sequence

pytestmark = [pytest.mark.timeout(90), pytest.mark.ros, pytest.mark.node]

# frames per second, on the frames' stamps and as published
FPS = 20.0
TRACKING_RATE_HZ = 8.0
REGROUND_PERIOD_S = 1.0
DEPTH_M = 1.5
QUERY = "the purple circle"
# The purple circle drifts right; the green square stays clear of it.
SEQUENCE = Sequence(
    [
        Mover("purple", "circle", 15, (30, 60), (1.0, 0.3)),
        Mover("green", "square", 14, (100, 25), (-0.2, 0.5)),
    ],
    seed=2,
)


@pytest.fixture(scope="module")
def node():
    from node_harness import NodeProcess

    process = NodeProcess(
        {
            "model": "demo",
            "query_mode": "refer",
            "tracking": "colour",
            "tracking_rate_hz": TRACKING_RATE_HZ,
            "reground_period_s": REGROUND_PERIOD_S,
            "use_depth": True,
        }
    )
    yield process
    process.close()


def frame(t: int) -> Image:
    return numpy_to_image(SEQUENCE.frame(t).image, "rgb8", stamped_header(100.0 + t / FPS))


def stream(client, frames: range) -> dict:
    """Publish the frames at FPS (stamps 1 / FPS apart), each after its depth frame (a wall
    DEPTH_M away); -> header stamp -> frame number."""
    stamps = {}
    start = time.monotonic()
    for t in frames:
        image = frame(t)
        stamps[(image.header.stamp.sec, image.header.stamp.nanosec)] = t
        wall = np.full(SEQUENCE.size, DEPTH_M, np.float32)
        client.depth_pub.publish(numpy_to_image(wall, "32FC1", image.header))
        client.image_pub.publish(image)
        time.sleep(max(0.0, start + (t - frames.start + 1) / FPS - time.monotonic()))
    return stamps


def stamp_key(stamp) -> tuple[int, int]:
    return (stamp.sec, stamp.nanosec)


def test_standing_query_is_grounded_then_tracked_at_the_tracking_rate(node, client):
    results = client.set_parameters(standing_query=QUERY, standing_mode="refer", max_rate_hz=0.0)
    assert all(r.successful for r in results), [r.reason for r in results]
    height, width = SEQUENCE.size
    k = [100.0, 0.0, width / 2, 0.0, 100.0, height / 2, 0.0, 0.0, 1.0]
    client.info_pub.publish(CameraInfo(header=frame(0).header, width=width, height=height, k=k))
    assert client.wait_status("camera_infos_received", 1), "node did not count camera_info"
    before = len(client.results)
    start = time.monotonic()
    stamps = stream(client, range(0, 80))
    seconds = time.monotonic() - start
    client.set_parameters(standing_query="")
    time.sleep(0.5)
    results = [r for r in client.results[before:] if r.query == QUERY]
    grounded = [r for r in results if r.source == "grounded"]
    tracked = [r for r in results if r.source == "tracked"]
    assert grounded and tracked, [(r.source, r.message) for r in results]
    assert all(r.success for r in results), [r.message for r in results if not r.success]
    # every result is of a frame sent, with its header; no frame gets two
    assert all(stamp_key(r.header.stamp) in stamps for r in results)
    assert len({stamp_key(r.header.stamp) for r in results}) == len(results)
    assert all(r.header.frame_id == "camera_optical" for r in results)
    # at most the tracking rate (one more for the window's edges), and it tracked most of it
    assert TRACKING_RATE_HZ * seconds / 3 <= len(tracked) <= TRACKING_RATE_HZ * seconds + 1
    # one object, one track id across frames and re-groundings
    first = grounded[0]
    (phrase,) = first.phrases
    assert phrase.track_id > 0 and not phrase.lost
    assert {p.track_id for r in results for p in r.phrases} == {phrase.track_id}
    assert first.last_grounded == first.header.stamp
    for r in tracked:
        (p,) = r.phrases
        assert p.phrase == QUERY and 0 < p.score <= 1 and p.bbox.width > 0
        assert stamp_key(r.last_grounded) in {stamp_key(g.header.stamp) for g in grounded}
        assert stamps[stamp_key(r.header.stamp)] > stamps[stamp_key(r.last_grounded)]
    # depth works on tracked masks as on grounded ones: centroids on the wall, and ~/points
    depths = [r.phrases[0].centroid.z for r in tracked if np.isfinite(r.phrases[0].centroid.z)]
    assert depths and all(z == pytest.approx(DEPTH_M) for z in depths)
    clouds = {stamp_key(c.header.stamp) for c in client.clouds}
    assert clouds & {stamp_key(r.header.stamp) for r in tracked}
    # re-grounded once the period passed on the frames' clock, not before
    grounded_at = [stamps[stamp_key(g.header.stamp)] / FPS for g in grounded]
    assert len(grounded) >= 2, grounded_at
    gaps = [b - a for a, b in zip(grounded_at, grounded_at[1:])]
    assert all(gap >= REGROUND_PERIOD_S - 1e-6 for gap in gaps), grounded_at


def test_a_goal_that_tracks_gets_tracked_feedback_until_cancelled(node, client):
    client.image_pub.publish(frame(0))
    keys = client.send_goals([Ground.Goal(query=QUERY, mode="refer", track=True)])

    def tracked_feedback(records):
        return sum(f.tracked.source == "tracked" for f in records[0]["feedbacks"]) >= 3

    t = 1
    deadline = time.monotonic() + 30.0
    while not tracked_feedback(client.goals(keys)) and time.monotonic() < deadline:
        client.image_pub.publish(frame(t))
        t += 1
        time.sleep(1 / FPS)
    records = client.goals(keys)
    assert tracked_feedback(records), records
    client.cancel_goals(keys)
    (record,) = client.wait_goals(keys, lambda r: r[0]["status"] is not None, 20.0)
    assert record["status"] == GoalStatus.STATUS_CANCELED
    feedback = [f.tracked for f in record["feedbacks"] if f.tracked.query]
    # first the grounding, then tracked frames of the same object
    assert feedback[0].source == "grounded" and feedback[0].success
    track_id = feedback[0].phrases[0].track_id
    assert track_id > 0
    assert all(f.source == "tracked" for f in feedback[1:])
    assert {p.track_id for f in feedback for p in f.phrases} == {track_id}
    # the goal's result is its last tracked frame (compared without the NaN centroids)
    last = record["result"].result
    assert record["result"].message == "cancelled" and last.source == "tracked"
    assert last.header == feedback[-1].header and last.last_grounded == feedback[0].header.stamp
    assert [p.mask for p in last.phrases] == [p.mask for p in feedback[-1].phrases]
