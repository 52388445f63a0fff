"""A truncated or corrupt model directory or SAM checkpoint at configure, over real DDS (the node
a process of its own): configure fails with an error naming the file, the node stays
unconfigured, and once the file is fixed it configures again and serves a query. (Its own file:
the node of test_node_faults.py has the same name, and would answer the lifecycle calls too.)
"""

import shutil
from pathlib import Path

import pytest
from action_msgs.msg import GoalStatus
from lifecycle_msgs.msg import Transition
from node_harness import Client, NodeProcess, rgb_image, wait_for

pytestmark = [pytest.mark.ros, pytest.mark.node, pytest.mark.timeout(240)]

DEMO_MODEL = Path(__file__).resolve().parents[2] / "model"


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
            f"ValueError: {sam_checkpoint}: cannot be read as a SAM checkpoint (weights only): "
            "truncated, corrupt or holding code (UnpicklingError)"
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
