"""What labs run into, over real DDS: a result asked for long after its goal ended, queries sent
while the node is inactive, a whole number for a float parameter. (Camera parameters before
configure: test_node_cameras.py; autostart when configure fails: test_node_load.py.)"""

import time

import pytest
from action_msgs.msg import GoalStatus
from lifecycle_msgs.msg import Transition
from node_harness import NodeProcess, is_rejection, rgb_image

from groundlmm_msgs.action import Ground

pytestmark = [pytest.mark.timeout(180), pytest.mark.ros, pytest.mark.node]

RESULT_TIMEOUT_S = 3


@pytest.fixture(scope="module")
def node():
    process = NodeProcess({"query_mode": "refer", "action_result_timeout_s": RESULT_TIMEOUT_S})
    yield process
    process.close()


def ended_goal(client, query: str) -> int:
    """Send a goal without asking for its result; return its key once it has ended (its
    GroundingResult went out on `grounding`)."""
    (key,) = client.send_goals([Ground.Goal(query=query, mode="refer")], request_result=False)
    answer = client.answer_to(query)
    assert answer is not None and not is_rejection(answer), answer
    return key


def test_a_result_asked_for_after_the_goal_ended_is_returned_until_the_timeout(client):
    client.publish_image(rgb_image(stamp_s=1.0))
    kept = ended_goal(client, "the kept cup")
    time.sleep(1.0)
    client.request_results([kept])
    (record,) = client.wait_goals([kept], lambda r: r[0]["status"] is not None, 20.0)
    assert record["status"] == GoalStatus.STATUS_SUCCEEDED and record["result"].success
    assert record["result"].result.query == "the kept cup"
    # after action_result_timeout_s the server has forgotten the goal: status UNKNOWN, no result
    expired = ended_goal(client, "the expired cup")
    time.sleep(RESULT_TIMEOUT_S + 2.0)
    client.request_results([expired])
    (record,) = client.wait_goals([expired], lambda r: r[0]["status"] is not None, 20.0)
    assert record["status"] == GoalStatus.STATUS_UNKNOWN and not record["result"].success


def test_a_query_sent_while_inactive_is_answered(client):
    assert client.change_state(Transition.TRANSITION_DEACTIVATE)
    try:
        client.query("the cup while inactive")
        answer = client.answer_to("the cup while inactive")
        assert is_rejection(answer) and "the node is inactive, not active" in answer.message
    finally:
        assert client.change_state(Transition.TRANSITION_ACTIVATE)
    assert client.wait_active(20.0)


def test_a_float_parameter_takes_a_whole_number(client):
    results = client.set_parameters(standing_query="the float cup", max_rate_hz=2)
    assert all(r.successful for r in results), [r.reason for r in results]
    assert client.log_containing("standing query 'the float cup' (describe), at most 2.0 Hz")
    (result,) = client.set_parameters(max_rate_hz="fast")
    assert not result.successful
    assert all(r.successful for r in client.set_parameters(standing_query=""))
