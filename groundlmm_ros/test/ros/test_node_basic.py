"""groundlmm_node in its own process over real DDS, tiny random model: results, the action,
the standing query, lifecycle transitions, the shipped demo model, and a clean Ctrl-C.

One node serves the whole module (start-up imports torch and transformers);
tests run in file order, the first one before any frame has been sent.
"""

import time

import numpy as np
import pytest
from action_msgs.msg import GoalStatus
from lifecycle_msgs.msg import Transition
from node_harness import NodeProcess, is_rejection, rgb_image

from groundlmm_msgs.action import Ground
from groundlmm_ros.ros.conversion import numpy_to_image
from groundlmm_ros.world.scenes import make_scenes, referring_expression

pytestmark = [pytest.mark.timeout(120), pytest.mark.ros, pytest.mark.node]


@pytest.fixture(scope="module")
def node():
    # describe goals may generate up to 200 tokens: long enough to cancel one mid-answer
    process = NodeProcess({"query_mode": "refer", "max_new_tokens": 200})
    yield process
    process.close()


def test_query_before_any_frame_is_rejected_with_reason(client):
    client.query("the red mug")
    answer = client.answer_to("the red mug")
    assert is_rejection(answer) and "no image has arrived yet on /lab/image:" in answer.message
    status, result, _ = client.ground("the red mug")
    assert status == GoalStatus.STATUS_ABORTED
    assert not result.success and "no image has arrived" in result.message


def test_image_and_query_give_exactly_one_result(client):
    image = rgb_image(width=96, height=64, stamp_s=12.25, frame_id="cam_optical")
    client.publish_image(image)
    client.query("the cup")
    result = client.answer_to("the cup")
    assert result is not None and not is_rejection(result), getattr(result, "message", "no answer")
    assert result.header == image.header
    assert result.mode == "refer" and result.model == "tiny-random" and result.inference_time > 0
    assert len(result.phrases) == 1
    mask = result.phrases[0].mask
    assert (mask.height, mask.width, mask.encoding) == (
        64,
        96,
        "mono8",
    ) and mask.header == image.header
    assert set(np.unique(np.frombuffer(mask.data, np.uint8))) <= {0, 255}
    assert np.isnan(result.phrases[0].centroid.z)  # no depth on this node
    overlay = client.wait_for(lambda: client.overlays, 5.0)
    assert overlay and (overlay[-1].height, overlay[-1].width, overlay[-1].encoding) == (
        64,
        96,
        "rgb8",
    )
    time.sleep(0.5)
    assert sum(r.query == "the cup" for r in client.results) == 1


def test_action_feedback_and_result(client):
    image = rgb_image(width=80, height=60, stamp_s=20.5, seed=3)
    status, result, feedbacks = client.ground("Describe the image.", mode="describe", image=image)
    assert status == GoalStatus.STATUS_SUCCEEDED and result.success, result.message
    assert result.result.header == image.header and result.result.query == "Describe the image."
    assert feedbacks, "no feedback while generating"
    assert [f.tokens for f in feedbacks] == sorted(f.tokens for f in feedbacks)
    assert result.result.answer.startswith(feedbacks[-1].partial_answer.strip()[:10])
    for phrase in result.result.phrases:
        assert (phrase.mask.height, phrase.mask.width) == (60, 80)


def test_action_cancel_stops_generation(client):
    # seed 5: an answer that runs to max_new_tokens (long enough to cancel mid-answer)
    image = rgb_image(width=80, height=60, stamp_s=21.0, seed=5)
    status, result, feedbacks = client.ground(
        "Describe the image.", mode="describe", image=image, cancel_after_feedback=True
    )
    assert (
        status == GoalStatus.STATUS_CANCELED and not result.success and "cancel" in result.message
    )
    # the goal was accepted: its result carries the failed GroundingResult that also went out on
    # `grounding`
    failed = result.result
    assert not failed.success and failed.message == result.message and not failed.phrases
    assert (
        failed.query == "Describe the image."
        and failed.mode == "describe"
        and failed.header.stamp.sec == 21
    )
    assert feedbacks[-1].tokens < 200
    # the worker is free again
    status, result, _ = client.ground("the mug", image=image)
    assert status == GoalStatus.STATUS_SUCCEEDED


def test_a_goal_asking_to_track_is_refused_with_tracking_off(client):
    keys = client.send_goals([Ground.Goal(query="the cup", mode="refer", track=True)])
    (record,) = client.wait_goals(keys, lambda r: r[0]["status"] is not None, 20.0)
    assert record["status"] == GoalStatus.STATUS_ABORTED
    assert "tracking is off (parameter tracking)" in record["result"].message


def test_standing_query_repeats_within_max_rate(client):
    # set one by one, in this order (the query last, so it never runs in another mode)
    assert all(
        r.successful
        for r in client.set_parameters(
            standing_mode="refer", max_rate_hz=2.0, standing_query="the standing cup"
        )
    )
    start = time.monotonic()
    frame = 0
    # frames at ~10 Hz, stamped with their publish time: a loaded machine that starves this loop
    # then cannot squeeze the stamps of frames 0.5 s apart together
    while time.monotonic() - start < 3.0:
        client.image_pub.publish(rgb_image(stamp_s=100 + time.monotonic() - start, seed=frame))
        frame += 1
        time.sleep(0.1)
    assert all(r.successful for r in client.set_parameters(standing_query=""))
    with client.lock:
        # (the first run may use the frame left from an earlier test: stamp < 100)
        received = [
            r for r in client.results if r.query == "the standing cup" and r.header.stamp.sec >= 100
        ]
    stamps = [r.header.stamp.sec + r.header.stamp.nanosec * 1e-9 for r in received]
    assert 3 <= len(received) <= 7, stamps
    # consecutive standing results at least ~1/max_rate_hz apart (0.1 s of delivery jitter allowed)
    assert min(np.diff(stamps)) >= 0.4 - 1e-6, stamps
    time.sleep(0.6)
    count = sum(r.query == "the standing cup" for r in client.results)
    client.image_pub.publish(rgb_image(stamp_s=200.0))
    time.sleep(0.8)
    assert sum(r.query == "the standing cup" for r in client.results) == count


def test_lifecycle_transitions_and_back(client, node):
    assert client.state() == "active"
    assert client.change_state(Transition.TRANSITION_DEACTIVATE)
    assert client.state() == "inactive"
    # the camera stops; the query topic stays, to answer that the node is not active
    assert client.wait_for(lambda: client.image_pub.get_subscription_count() == 0, 5.0)
    status, result, _ = client.ground("the mug", image=rgb_image())
    assert status == GoalStatus.STATUS_ABORTED and "not active" in result.message
    assert client.change_state(Transition.TRANSITION_CLEANUP)
    assert client.state() == "unconfigured"
    assert client.log_containing("model freed")
    assert client.change_state(Transition.TRANSITION_CONFIGURE)
    assert client.state() == "inactive"
    assert client.change_state(Transition.TRANSITION_ACTIVATE)
    assert client.wait_active(20.0)
    client.publish_image(rgb_image(stamp_s=300.0))
    client.query("the cup again")
    result = client.answer_to("the cup again")
    assert result is not None and not is_rejection(result)


def test_shipped_demo_model_grounds_a_synthetic_scene(client):
    """Reconfigure to the shipped demo model (a miniature DiffLMM trained on these scenes)."""
    client.reconfigure(model="demo")
    assert client.wait_active(30.0)
    scene = make_scenes(1, seed=12345)[0]
    image = numpy_to_image(scene.image, "rgb8", rgb_image(stamp_s=400.0).header)
    status, result, feedbacks = client.ground("Describe the image.", mode="describe", image=image)
    assert status == GoalStatus.STATUS_SUCCEEDED and result.result.model == "demo" and feedbacks
    grounding = result.result
    assert grounding.answer and grounding.phrases
    for phrase in grounding.phrases:
        assert grounding.answer[phrase.char_start : phrase.char_end] == phrase.phrase
        assert (phrase.mask.height, phrase.mask.width) == scene.image.shape[:2]
    status, result, _ = client.ground(
        referring_expression(scene.objects[0]), mode="refer", image=image
    )
    assert status == GoalStatus.STATUS_SUCCEEDED and len(result.result.phrases) == 1


def test_sigint_mid_answer_shuts_down_cleanly(client, node):
    client.reconfigure(model="tiny-random")
    goal = Ground.Goal(
        query="Describe the image.", mode="describe", image=rgb_image(80, 60, 21.0, seed=5)
    )
    keys = client.send_goals([goal])  # a 200-token answer
    assert (
        len(client.wait_goals(keys, lambda r: len(r[0]["feedbacks"]) >= 3, 20.0)[0]["feedbacks"])
        >= 3
    )
    start = time.monotonic()
    assert node.stop() == 0, node.output()
    assert time.monotonic() - start < 5.0
    assert "Traceback" not in node.output(), node.output()
