"""Faults groundlmm_node survives, over real DDS (the node and each client a process of its own):
a client killed while its goal runs and a model step that runs out of memory. In each the node
stays up, says why, and serves the next good query. (A corrupt model at configure:
test_node_configure_faults.py; a camera driver that dies and comes back:
test_node_camera_restart.py; bag replay on a simulated clock: test_node_sim_time.py.)
"""

import pytest
from action_msgs.msg import GoalStatus
from node_harness import Client, NodeProcess, rgb_image

from groundlmm_msgs.action import Ground

pytestmark = [pytest.mark.ros, pytest.mark.node, pytest.mark.timeout(240)]


@pytest.fixture(scope="module")
def node():
    # two cameras, so that one model step holds two jobs
    process = NodeProcess({"cameras": ["left", "right"], "query_mode": "refer"}, gated=True)
    yield process
    process.close()


@pytest.fixture(scope="module")
def client(node):
    """A client that sees the node active (its cameras are named: no plain image topic)."""
    client = Client()
    if not client.wait_for(lambda: client.status.get("state") == "active", 60.0, period=0.1):
        client.close()
        raise AssertionError(f"node did not become active\n{node.output()}")
    yield client
    client.close()


def goal(query: str, camera: str = "left") -> Ground.Goal:
    return Ground.Goal(query=query, mode="refer", camera=camera, image=rgb_image())


def ended(client: Client, keys: list[int], timeout: float = 30.0) -> list[dict]:
    records = client.wait_goals(keys, lambda r: all(g["status"] is not None for g in r), timeout)
    assert all(g["status"] is not None for g in records), records
    return records


def test_a_client_killed_while_its_goal_runs(node, client):
    victim = Client()
    try:
        victim.send_goals([goal("the victim's mug")])
        assert node.gate.wait_started(1), node.output()
    finally:
        victim.process.kill()
        victim.process.wait(10)
        victim.close()
    published = int(client.status.get("left/results_published", "0"))
    node.gate.allow_batches(1)
    # the orphaned goal ends as any goal does: its result goes out on left/grounding
    assert client.wait_status("left/results_published", published + 1, timeout=20.0), node.output()
    node.gate.allow_batches(1)
    (record,) = ended(client, client.send_goals([goal("the next client's mug")]))
    assert record["status"] == GoalStatus.STATUS_SUCCEEDED, record["result"].message
    assert node.process.poll() is None
    assert client.status.get("errors") == "0", client.status
    assert "Traceback" not in node.output()


def test_out_of_memory_fails_its_steps_jobs_and_the_next_step_runs(node, client):
    started = len(node.gate.started())
    (blocker,) = client.send_goals([goal("the blocking mug")])
    assert node.gate.wait_started(started + 1), node.output()
    queued = client.send_goals([goal("the left mug", "left"), goal("the right mug", "right")])
    assert client.wait_status("queue_length", 2, timeout=20.0), client.status
    # the blocker's step runs; the next one takes both cameras' jobs and waits at the gate
    node.gate.allow_batches(1)
    assert node.gate.wait_started(started + 3), node.output()
    assert node.gate.batches()[-1] == ["the left mug", "the right mug"]
    node.gate.flag("out_of_memory").touch()
    node.gate.allow_batches(1)
    records = ended(client, queued)
    for record in records:
        assert record["status"] == GoalStatus.STATUS_ABORTED
        assert record["result"].message == (
            "out of memory: OutOfMemoryError: CUDA out of memory. Tried to allocate 20.00 GiB "
            "(raised by gated_node)"
        )
    assert client.log_containing("out of memory in a model step of 2 queries (2 failed)"), (
        node.output()
    )
    node.gate.open()
    try:
        (record,) = ended(client, client.send_goals([goal("the mug after it", "right")]))
    finally:
        node.gate.close()
    assert record["status"] == GoalStatus.STATUS_SUCCEEDED, record["result"].message
    assert ended(client, [blocker])[0]["status"] == GoalStatus.STATUS_SUCCEEDED
    assert node.process.poll() is None
