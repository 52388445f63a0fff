"""The second process of test_dds_exchange.py: echoes GroundingResult messages over DDS.

Subscribes to --request, republishes each message on --echo with its pid
appended to `model` (proof the message went through this process), waits
until the echo is acknowledged, and exits 0 after --count messages, or 1 when
--timeout seconds pass first. Reliable + transient-local QoS on both topics,
so a subscriber that matches late still gets what was sent.
"""

import argparse
import os
import sys
import time

import rclpy
from rclpy.duration import Duration
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy

from groundlmm_msgs.msg import GroundingResult

QOS = QoSProfile(
    depth=4, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL
)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--request", required=True, help="topic to receive GroundingResult messages on"
    )
    parser.add_argument("--echo", required=True, help="topic to send them back on")
    parser.add_argument("--count", type=int, default=1, help="messages to echo before exiting")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds before giving up")
    args = parser.parse_args()
    deadline = time.monotonic() + args.timeout

    rclpy.init()
    node = rclpy.create_node("dds_peer")
    echo = node.create_publisher(GroundingResult, args.echo, QOS)
    echoed = []

    def on_request(msg):
        msg.model += f" (echoed by pid {os.getpid()})"
        echo.publish(msg)
        echoed.append(msg)

    node.create_subscription(GroundingResult, args.request, on_request, QOS)
    while len(echoed) < args.count and time.monotonic() < deadline:
        rclpy.spin_once(node, timeout_sec=0.1)
    acked = len(echoed) == args.count and echo.wait_for_all_acked(
        Duration(seconds=max(0.0, deadline - time.monotonic()))
    )
    node.destroy_node()
    rclpy.shutdown()
    if not acked:
        print(
            f"dds_peer: echoed {len(echoed)} of {args.count} messages, acknowledged: {acked}, "
            f"within {args.timeout} s",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
