"""A camera driver that dies and comes back: groundlmm_node (tiny random model, its own process)
keeps its standing query and grounds it on the new driver's frames, over real DDS.

Each driver is a process of its own that publishes frames as a driver does (ROS's default QoS);
the first one is killed with SIGKILL, as a crashing driver ends, and the second one stamps its
frames from its own start (earlier stamps than the first one's), as a driver on its own clock or
a replayed bag does.
"""

import signal
import sys
import time

import pytest
from node_harness import HERE, NAMESPACE, NodeProcess, connect, start, wait_for

pytestmark = [pytest.mark.ros, pytest.mark.node, pytest.mark.timeout(180)]

STANDING = "the standing mug"
# node_harness (in argv[1]) imports images, from the folder above
DRIVER = """
import os, sys, time
sys.path[:0] = [sys.argv[1], os.path.dirname(sys.argv[1])]
import rclpy
from sensor_msgs.msg import Image
from node_harness import rgb_image
frame_id, first_stamp = sys.argv[2], float(sys.argv[3])
rclpy.init()
node = rclpy.create_node("camera_driver")
publisher = node.create_publisher(Image, sys.argv[4], 10)
start = time.monotonic()
for frame in range(600):
    publisher.publish(rgb_image(stamp_s=first_stamp + frame / 10, frame_id=frame_id, seed=frame))
    time.sleep(max(0.0, start + (frame + 1) / 10 - time.monotonic()))
"""


@pytest.fixture
def node():
    process = NodeProcess(
        {"standing_query": STANDING, "standing_mode": "refer", "max_rate_hz": 0.0}
    )
    yield process
    process.close()


def driver(frame_id: str, first_stamp: float, log_path: str):
    """A camera driver process publishing 10 frames/s on the node's image topic for 60 s."""
    command = [sys.executable, "-c", DRIVER, str(HERE), frame_id, str(first_stamp)]
    return start([*command, f"{NAMESPACE}/image"], log_path)


def standing_results(client, frame_id: str) -> list:
    with client.lock:
        return [r for r in client.results if r.query == STANDING and r.header.frame_id == frame_id]


def quiet(client, frame_id: str, seconds: float) -> bool:
    """No new standing result from that driver's frames for `seconds`."""
    before = len(standing_results(client, frame_id))
    time.sleep(seconds)
    return len(standing_results(client, frame_id)) == before


def test_standing_query_resumes_on_a_restarted_drivers_frames(node, tmp_path):
    client = connect(node)
    first = driver("first_driver", 1000.0, str(tmp_path / "first.log"))
    second = None
    try:
        assert wait_for(lambda: len(standing_results(client, "first_driver")) >= 3, 60), (
            node.output()
        )
        first.send_signal(signal.SIGKILL)
        first.wait(10)
        # The frames already received are grounded once each; then no result comes (a node
        # that ran the standing query again on the last frame would never fall quiet).
        assert wait_for(lambda: quiet(client, "first_driver", 1.5), 30, period=0), node.output()

        second = driver("second_driver", 10.0, str(tmp_path / "second.log"))
        assert wait_for(lambda: len(standing_results(client, "second_driver")) >= 3, 60), (
            node.output()
        )
        resumed = standing_results(client, "second_driver")
        assert all(r.success for r in resumed), [r.message for r in resumed]
        assert all(r.header.stamp.sec < 1000 for r in resumed)
        assert node.process.poll() is None
    finally:
        for process in (first, second):
            if process is not None and process.poll() is None:
                process.kill()
                process.wait(10)
        client.close()
