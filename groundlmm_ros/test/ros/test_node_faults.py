"""Faults groundlmm_node survives, over real DDS (the node and each client a process of its own):
a client killed while its goal runs, a model step that runs out of memory, and a corrupt model
directory or SAM checkpoint at configure. In each the node stays up, says why, and serves the
next good query. (A camera driver that dies and comes back: test_node_camera_restart.py; bag
replay on a simulated clock: test_node_sim_time.py.)
"""

import shutil
from pathlib import Path

import pytest
from action_msgs.msg import GoalStatus
from lifecycle_msgs.msg import Transition
from node_harness import Client, NodeProcess, rgb_image, wait_for

from groundlmm_msgs.action import Ground

pytestmark = [pytest.mark.ros, pytest.mark.node, pytest.mark.timeout(240)]

DEMO_MODEL = Path(__file__).resolve().parents[2] / "model"


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


@pytest.fixture
def model_dir(tmp_path):
    """A copy of the shipped demo model directory, for the test to break."""
    return Path(shutil.copytree(DEMO_MODEL, tmp_path / "demo_model"))


def test_a_corrupt_model_directory_or_checkpoint_fails_configure_naming_the_file(
    model_dir, tmp_path
):
    config, weights = model_dir / "config.json", model_dir / "model.safetensors"
    good_config, good_weights = config.read_bytes(), weights.read_bytes()
    sam_checkpoint = tmp_path / "sam_vit_b_01ec64.pth"
    sam_checkpoint.write_bytes(b"not a checkpoint" * 64)
    node = NodeProcess({"model": str(model_dir), "autostart": False})
    client = Client()
    try:

        def configure_fails_saying(line: str) -> None:
            assert not client.change_state(Transition.TRANSITION_CONFIGURE)
            prefix = f"configure failed: cannot build model '{model_dir}': {line}"
            assert wait_for(lambda: prefix in node.output(), 60.0), node.output()
            assert client.state() == "unconfigured"

        config.write_text('{"model_type": "llava", ')
        configure_fails_saying(f"ValueError: {config}: not valid JSON")
        config.write_bytes(good_config)
        weights.write_bytes(good_weights[: len(good_weights) // 2])
        configure_fails_saying(f"CheckpointError: {weights}: ")
        weights.write_bytes(good_weights)
        assert all(r.successful for r in client.set_parameters(sam_checkpoint=str(sam_checkpoint)))
        configure_fails_saying(
            f"ValueError: {sam_checkpoint}: cannot be read as a SAM checkpoint, truncated or "
            "corrupt (UnpicklingError)"
        )
        # fixed: the node configures and serves
        assert all(r.successful for r in client.set_parameters(sam_checkpoint=""))
        assert client.change_state(Transition.TRANSITION_CONFIGURE), node.output()
        assert client.change_state(Transition.TRANSITION_ACTIVATE), node.output()
        status, result, _ = client.ground("the circle", image=rgb_image())
        assert status == GoalStatus.STATUS_SUCCEEDED, result.message
        assert node.process.poll() is None
    finally:
        client.close()
        node.close()
