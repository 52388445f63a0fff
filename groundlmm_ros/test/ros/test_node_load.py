"""groundlmm_node under bursts, over real DDS: 100 goals at once, a mixed burst of topic queries,
goals and a standing query, Ctrl-C / SIGTERM while importing, configuring and answering, and
autostart when configure fails.

The node's model is the tiny random one behind a gate (gated_node.py): with the gate closed the
model holds the query it runs, so the queue fills the same way on any machine.
"""

import signal
import time

import pytest
from action_msgs.msg import GoalStatus
from diagnostic_msgs.msg import DiagnosticStatus
from node_harness import TERMINAL, NodeProcess, connect, rgb_image, wait_for
from sensor_msgs.msg import Image

from groundlmm_msgs.action import Ground

pytestmark = [pytest.mark.timeout(240), pytest.mark.ros, pytest.mark.node, pytest.mark.slow]

QUEUE = 10


@pytest.fixture(scope="module")
def node():
    process = NodeProcess({"query_mode": "refer", "query_queue_size": QUEUE}, gated=True)
    yield process
    process.close()


def goal(query: str) -> Ground.Goal:
    return Ground.Goal(query=query, mode="refer", image=Image())  # on the newest frame


def hold_the_model(client, node, query: str) -> list[int]:
    """Close the gate and start one goal on it: the model then holds it until the gate opens."""
    node.gate.close()
    started = len(node.gate.started())
    keys = client.send_goals([goal(query)])
    assert node.gate.wait_started(started + 1), node.output()
    return keys


def statuses(records) -> list:
    return [r["status"] for r in records]


def test_100_goals_at_once_each_get_a_response_and_one_terminal_status(client, node):
    client.publish_image(rgb_image(stamp_s=1.0))
    held = hold_the_model(client, node, "the held mug")
    queries = [f"burst mug {i}" for i in range(100)]
    keys = client.send_goals([goal(q) for q in queries])
    records = client.wait_goals(keys, lambda rs: all(r["accepted"] is not None for r in rs), 10.0)
    assert all(r["accepted"] for r in records), [r["accepted"] for r in records]
    assert max(r["response_s"] for r in records) < 2.0, sorted(r["response_s"] for r in records)[
        -5:
    ]
    # the model is still held: the queue took 10, the other 90 end ABORTED at once
    records = client.wait_goals(
        keys, lambda rs: statuses(rs).count(GoalStatus.STATUS_ABORTED) >= 90, 10.0
    )
    aborted = [r for r in records if r["status"] == GoalStatus.STATUS_ABORTED]
    assert len(aborted) == 90, statuses(records)
    assert all(
        r["result"].message.startswith(f"query queue is full ({QUEUE} waiting") for r in aborted
    )
    queued = [key for key, r in zip(keys, records) if r["status"] is None]
    assert len(queued) == QUEUE
    # cancel the running goal (stops at once) and two waiting ones (never run)
    client.cancel_goals(held + queued[:2])
    assert (
        client.wait_goals(held, lambda rs: rs[0]["status"] is not None, 10.0)[0]["status"]
        == GoalStatus.STATUS_CANCELED
    )
    node.gate.open()
    records = client.wait_goals(keys, lambda rs: all(r["status"] in TERMINAL for r in rs), 60.0)
    assert all(r["status"] in TERMINAL for r in records), statuses(
        records
    )  # none UNKNOWN, none missing
    by_key = dict(zip(keys, records))
    assert [by_key[k]["status"] for k in queued[:2]] == [GoalStatus.STATUS_CANCELED] * 2
    succeeded = [r for r in records if r["status"] == GoalStatus.STATUS_SUCCEEDED]
    assert len(succeeded) == QUEUE - 2
    for r in succeeded:
        assert (
            r["result"].success
            and r["result"].result.query in queries
            and len(r["result"].result.phrases) == 1
        )
    # the model ran the succeeded ones last (a goal cancelled while it waited never reaches the
    # model)
    assert set(node.gate.started()[-(QUEUE - 2) :]) == {r["result"].result.query for r in succeeded}
    # and each goal's query has exactly one answer on the topics too (grounding or ~/rejected)
    time.sleep(0.5)
    assert all(len(answers) == 1 for answers in client.answers(queries).values())


def test_mixed_burst_ends_with_one_answer_per_query(client, node):
    node.gate.close()
    started = len(node.gate.started())
    client.publish_image(rgb_image(stamp_s=2.0, seed=1))
    # the standing query takes this frame at once and is held
    assert all(
        r.successful
        for r in client.set_parameters(
            standing_mode="refer", max_rate_hz=0.0, standing_query="the standing mug"
        )
    )
    assert node.gate.wait_started(started + 1) and node.gate.started()[-1] == "the standing mug", (
        node.gate.started()[-3:]
    )
    assert client.log_containing(
        "'the standing mug' (refer), as fast as the model allows"
    )  # max_rate_hz 0
    topic_queries = [f"mixed topic mug {i}" for i in range(200)]
    goal_queries = [f"mixed goal mug {i}" for i in range(100)]
    keys = client.send_goals([goal(q) for q in goal_queries[:50]])
    for query in topic_queries[:100]:
        client.query(query)
    keys += client.send_goals([goal(q) for q in goal_queries[50:]])
    for query in topic_queries[100:]:
        client.query(query)
    everything = topic_queries + goal_queries

    def rejected() -> int:
        return sum(
            isinstance(a, DiagnosticStatus)
            for answers in client.answers(everything).values()
            for a in answers
        )

    # the model held: 10 of the 300 wait in the queue, the other 290 are rejected at once
    assert wait_for(lambda: rejected() >= 300 - QUEUE, 30.0), rejected()
    assert all(r.successful for r in client.set_parameters(standing_query=""))
    node.gate.open()
    records = client.wait_goals(keys, lambda rs: all(r["status"] in TERMINAL for r in rs), 60.0)
    assert all(r["status"] in TERMINAL for r in records), statuses(records)
    assert wait_for(lambda: all(client.answers(everything).values()), 30.0)
    time.sleep(0.5)
    answers = client.answers(everything)
    assert all(len(a) == 1 for a in answers.values()), {
        q: len(a) for q, a in answers.items() if len(a) != 1
    }
    grounded = [q for q, a in answers.items() if not isinstance(a[0], DiagnosticStatus)]
    assert len(grounded) == QUEUE and rejected() == 300 - QUEUE
    for query, record in zip(
        goal_queries, records
    ):  # a goal's status says what its topic answer says
        succeeded = not isinstance(answers[query][0], DiagnosticStatus)
        assert record["status"] == (
            GoalStatus.STATUS_SUCCEEDED if succeeded else GoalStatus.STATUS_ABORTED
        )
    standing = [
        r for r in client.results if r.query == "the standing mug" and r.header.stamp.sec == 2
    ]
    assert len(standing) == 1 and standing[0].success


def test_sigterm_with_a_standing_query_running_exits_within_5_s(client, node):
    node.gate.close()
    started = len(node.gate.started())
    client.publish_image(rgb_image(stamp_s=3.0, seed=2))
    assert all(r.successful for r in client.set_parameters(standing_query="the mug at SIGTERM"))
    assert node.gate.wait_started(started + 1), node.output()  # the model holds it
    assert "/lab/groundlmm_node" in client.call("node_names")
    start = time.monotonic()
    assert node.stop(signal.SIGTERM) == 0, node.output()
    assert time.monotonic() - start < 5.0
    assert "Traceback" not in node.output() and "never retrieved" not in node.output(), (
        node.output()
    )
    # it left the ROS graph as it exited (a participant that just vanishes stays listed for its 20 s
    # lease)
    assert wait_for(lambda: "/lab/groundlmm_node" not in client.call("node_names"), 5.0)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_during_configure_exits_cleanly(signum):
    node = NodeProcess({}, gated=True, hold_configure=True)
    try:
        assert wait_for(lambda: node.gate.flag("configuring").exists(), 60.0), node.output()
        assert "loading model" in node.output()
        start = time.monotonic()
        assert node.stop(signum) == 0, node.output()
        assert time.monotonic() - start < 5.0
        assert "Traceback" not in node.output(), node.output()
    finally:
        node.close()


@pytest.mark.parametrize("delay_s", [0.2, 0.4])
def test_ctrl_c_while_the_modules_import_exits_quietly(delay_s):
    node = NodeProcess({})
    try:
        time.sleep(delay_s)
        assert node.stop() == 0, node.output()
        assert "Traceback" not in node.output(), node.output()
    finally:
        node.close()


def test_exit_within_5_s_when_the_teardown_hangs_holding_the_gil():
    node = NodeProcess({}, gated=True, hang_at_exit=True)
    try:
        # a query held at the gate: stopping the worker cancels it, and then it hangs
        client = connect(node)
        try:
            client.publish_image(rgb_image())
            client.query("the mug at exit")
            assert node.gate.wait_started(1), node.output()
        finally:
            client.close()
        start = time.monotonic()
        code = node.stop(signal.SIGTERM)
        assert time.monotonic() - start < 5.0 and code != -signal.SIGKILL, (code, node.output())
        # cut off by the exit timer, which says so and shows where it hung
        assert (
            code == 1
            and "Timeout (0:00:04)!" in node.output()
            and "hanging_teardown" in node.output()
        )
    finally:
        node.close()


def test_autostart_ends_the_process_when_configure_fails():
    node = NodeProcess({"model": "/no/such/model"})
    try:
        assert node.process.wait(60.0) == 1, node.output()
        output = node.output()
        assert "configure failed: cannot build model '/no/such/model'" in output
        assert "autostart" in output and "Traceback" not in output, output
    finally:
        node.close()
