"""Bag replay on a simulated clock: groundlmm_node with use_sim_time and a /clock publisher (a
process of its own, as `ros2 bag play --clock` is) spaces its standing query by max_rate_hz in
simulated seconds, matches depth frames by the messages' stamps and stamps its results and its
/diagnostics in simulated time, over real DDS.

The clock only moves when the test moves it, so wall time passing shows nothing but itself.
"""

import os
import sys

import numpy as np
import pytest
from diagnostic_msgs.msg import DiagnosticArray
from node_harness import NodeProcess, connect, rgb_image, stamped_header, start, wait_for
from sensor_msgs.msg import CameraInfo

from groundlmm_ros.ros.conversion import numpy_to_image

pytestmark = [pytest.mark.ros, pytest.mark.node, pytest.mark.timeout(180)]

STANDING = "the replayed mug"
# Publishes /clock every 20 ms, as a bag player does: the file argv[1] holds "SECONDS RATE", the
# simulated time when the file was written and how fast it runs from then (0: paused).
CLOCK = """
import sys, time
import rclpy
from rosgraph_msgs.msg import Clock
rclpy.init()
node = rclpy.create_node("bag_clock")
publisher = node.create_publisher(Clock, "/clock", 10)
setting = None
while True:
    text = open(sys.argv[1]).read()
    if text != setting:
        setting, since = text, time.monotonic()
        start, rate = map(float, text.split())
    seconds = start + rate * (time.monotonic() - since)
    msg = Clock()
    msg.clock.sec, msg.clock.nanosec = int(seconds), int(round(seconds % 1 * 1e9))
    publisher.publish(msg)
    time.sleep(0.02)
"""


@pytest.fixture
def node():
    process = NodeProcess(
        {
            "use_sim_time": True,
            "standing_query": STANDING,
            "standing_mode": "refer",
            "max_rate_hz": 1.0,
            "use_depth": True,
            "depth_stamp_tolerance_s": 0.05,
        }
    )
    yield process
    process.close()


class SimClock:
    """The /clock publisher process and the simulated time it publishes."""

    def __init__(self, folder):
        self.path = os.path.join(folder, "clock")
        self.set(0.0, 1.0)
        self.process = start([sys.executable, "-c", CLOCK, self.path], self.path + ".log")

    def set(self, seconds: float, rate: float = 0.0) -> None:
        with open(self.path + ".new", "w") as f:
            f.write(f"{seconds} {rate}")
        os.replace(self.path + ".new", self.path)

    def close(self) -> None:
        self.process.kill()
        self.process.wait(10)


def depth_frame(stamp_s: float):
    return numpy_to_image(np.ones((64, 96), np.float32), "32FC1", stamped_header(stamp_s))


def standing_results(client) -> list:
    with client.lock:
        return [r for r in client.results if r.query == STANDING]


def stamps(results) -> list[float]:
    return [r.header.stamp.sec + r.header.stamp.nanosec * 1e-9 for r in results]


def test_the_standing_query_rate_depth_and_stamps_follow_the_sim_clock(node, tmp_path):
    clock = SimClock(str(tmp_path))
    # the clock runs while the node starts: its status timer ticks in simulated time
    client = connect(node)
    try:
        diagnostics = client.subscribe(DiagnosticArray, "/diagnostics")
        k = [100.0, 0.0, 48.0, 0.0, 100.0, 32.0, 0.0, 0.0, 1.0]
        client.info_pub.publish(CameraInfo(header=stamped_header(100.0), width=96, height=64, k=k))
        client.depth_pub.publish(depth_frame(100.0))
        assert client.wait_status("depth_frames_received", 1), client.status
        assert client.wait_status("camera_infos_received", 1), client.status
        clock.set(100.0)
        # the node's clock stands at 100 s once its status says so
        assert wait_for(
            lambda: any(m.header.stamp.sec == 100 for m in client.received_on(diagnostics)), 20
        ), node.output()

        client.image_pub.publish(rgb_image(stamp_s=100.0, seed=1))
        assert wait_for(lambda: len(standing_results(client)) == 1, 30), node.output()
        # 0.2 s from its nearest depth frame: outside depth_stamp_tolerance_s, by the stamps
        client.image_pub.publish(rgb_image(stamp_s=100.2, seed=2))
        # 2.5 wall seconds (more than 1 / max_rate_hz) pass, and 0.5 simulated ones: not due
        assert wait_for(lambda: len(standing_results(client)) > 1, 1.5) is None
        clock.set(100.5)
        assert wait_for(lambda: len(standing_results(client)) > 1, 1.0) is None
        clock.set(101.0)
        assert wait_for(lambda: len(standing_results(client)) == 2, 30), node.output()
        # a bag that starts over: the clock goes back, and the standing query runs at once
        clock.set(50.0)
        client.image_pub.publish(rgb_image(stamp_s=50.0, seed=3))
        assert wait_for(lambda: len(standing_results(client)) == 3, 30), node.output()

        results = standing_results(client)
        assert all(r.success for r in results), [r.message for r in results]
        assert stamps(results) == pytest.approx([100.0, 100.2, 50.0])
        output = node.output()
        assert "of the image stamp 100.000" not in output
        assert "of the image stamp 100.200 (nearest is 0.200 s away)" in output, output
        sim_stamps = [m.header.stamp.sec for m in client.received_on(diagnostics)]
        assert sim_stamps and max(sim_stamps) < 1000, sim_stamps
        assert node.process.poll() is None
    finally:
        client.close()
        clock.close()
