"""Two processes exchange a GroundingResult with two 640x480 masks over real Fast DDS.

This process publishes the result; dds_peer.py, a separate python process in
the same ROS domain (conftest.py gives each test run its own ROS_DOMAIN_ID),
echoes it back; the masks that return must be bit-identical to those sent.
"""

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import rclpy
from builtin_interfaces.msg import Time
from dds_peer import QOS
from rclpy.executors import SingleThreadedExecutor
from std_msgs.msg import Header

from groundlmm_msgs.msg import GroundedPhrase, GroundingResult
from groundlmm_ros.ros.conversion import image_to_numpy, mask_to_image

pytestmark = pytest.mark.ros

PEER = Path(__file__).with_name("dds_peer.py")
TIMEOUT_S = 60.0  # discovery on a loaded 2-core machine takes seconds, not minutes


def grounding_result():
    header = Header(stamp=Time(sec=1732600000, nanosec=5), frame_id="camera_color_optical_frame")
    rng = np.random.default_rng(0)
    masks = [
        rng.random((480, 640)) < 0.5,
        rng.random((480, 640)) < 0.1,
    ]  # (H, W) bool, noisy on purpose
    return GroundingResult(
        header=header,
        query="What is on the table?",
        mode="describe",
        answer="A red mug and a laptop.",
        model="tiny-random",
        inference_time=0.5,
        phrases=[
            GroundedPhrase(
                phrase=text,
                char_start=start,
                char_end=end,
                score=1.0,
                point_x=10,
                point_y=20,
                mask=mask_to_image(mask, header),
            )
            for (text, start, end), mask in zip([("A red mug", 0, 9), ("a laptop", 14, 22)], masks)
        ],
    ), masks


@pytest.fixture
def ros_node():
    context = rclpy.Context()
    rclpy.init(context=context)
    node = rclpy.create_node("dds_exchange_test", context=context)
    executor = SingleThreadedExecutor(context=context)
    executor.add_node(node)
    yield node, executor
    executor.shutdown()
    node.destroy_node()
    rclpy.shutdown(context=context)


def spin_until(executor, condition, what, peer):
    deadline = time.monotonic() + TIMEOUT_S
    while not condition():
        if peer.poll() is not None:
            pytest.fail(
                f"dds_peer exited with {peer.returncode} while waiting for {what}: "
                f"{peer.stderr.read()}"
            )
        if time.monotonic() > deadline:
            pytest.fail(
                f"no {what} within {TIMEOUT_S} s (ROS_DOMAIN_ID={os.environ.get('ROS_DOMAIN_ID')})"
            )
        executor.spin_once(timeout_sec=0.05)


def test_masks_cross_processes_bit_identical(ros_node):
    node, executor = ros_node
    request_topic, echo_topic = f"grounding_request_{os.getpid()}", f"grounding_echo_{os.getpid()}"
    received = []
    request = node.create_publisher(GroundingResult, request_topic, QOS)
    node.create_subscription(GroundingResult, echo_topic, received.append, QOS)
    # The venv's python (this one), so the child sees the same ROS wheels and domain.
    peer = subprocess.Popen(
        [
            sys.executable,
            str(PEER),
            "--request",
            request_topic,
            "--echo",
            echo_topic,
            "--timeout",
            str(TIMEOUT_S),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        spin_until(
            executor,
            lambda: (
                request.get_subscription_count() >= 1 and node.count_publishers(echo_topic) >= 1
            ),
            "matching with dds_peer",
            peer,
        )
        sent, masks = grounding_result()
        start = time.monotonic()
        request.publish(sent)
        spin_until(executor, lambda: received, "echo from dds_peer", peer)
        round_trip_s = time.monotonic() - start
        assert peer.wait(timeout=TIMEOUT_S) == 0, peer.stderr.read()
    finally:
        if peer.poll() is None:
            peer.kill()
            peer.wait()

    (echo,) = received
    assert (
        echo.model == f"tiny-random (echoed by pid {peer.pid})"
    )  # it really went through the other process
    assert len(echo.phrases) == 2
    for phrase, sent_phrase, mask in zip(echo.phrases, sent.phrases, masks):
        assert bytes(phrase.mask.data) == bytes(sent_phrase.mask.data)
        np.testing.assert_array_equal(image_to_numpy(phrase.mask) == 255, mask)
        assert phrase == sent_phrase
    assert (echo.header, echo.query, echo.answer) == (sent.header, sent.query, sent.answer)
    print(f"two 640x480 masks, there and back over Fast DDS: {round_trip_s * 1e3:.1f} ms")
