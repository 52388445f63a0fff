"""Test helpers: groundlmm_node in its own process, and a client node in the test process.

The two talk over real DDS (the run's ROS_DOMAIN_ID comes from conftest.py).
Every wait is bounded; on a failed wait the node's log helps: `NodeProcess.output()`.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
import rclpy
import yaml
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus
from groundlmm_msgs.action import Ground
from groundlmm_msgs.msg import GroundingResult
from lifecycle_msgs.srv import ChangeState, GetState
from rcl_interfaces.msg import Log, Parameter, ParameterType, ParameterValue
from rcl_interfaces.srv import SetParameters
from rclpy.action import ActionClient
from rclpy.executors import SingleThreadedExecutor
from rclpy.qos import QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import CameraInfo, Image, PointCloud2
from std_msgs.msg import Header, String
from visualization_msgs.msg import MarkerArray

from groundlmm_ros.ros.conversion import numpy_to_image

NAMESPACE = "/lab"
NODE = f"{NAMESPACE}/groundlmm_node"
# What every test node shares: tiny model, quick status, reliable images (no test flakes from a lost frame).
BASE_PARAMS = {
    "model": "tiny-random",
    "image_qos_reliability": "reliable",
    "status_period_s": 0.2,
    "max_new_tokens": 8,
}


class NodeProcess:
    """`python -m groundlmm_ros.ros.node` with a params file; stop() sends SIGINT like Ctrl-C."""

    def __init__(self, params: dict):
        self._dir = tempfile.TemporaryDirectory(prefix="groundlmm_node_test_")
        params_file = os.path.join(self._dir.name, "params.yaml")
        with open(params_file, "w") as f:
            yaml.safe_dump({"/**": {"ros__parameters": {**BASE_PARAMS, **params}}}, f)
        self.log_path = os.path.join(self._dir.name, "node.log")
        env = dict(os.environ, OMP_NUM_THREADS="1", RCUTILS_LOGGING_BUFFERED_STREAM="0")
        with open(self.log_path, "w") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "groundlmm_ros.ros.node", "--ros-args", "-r", f"__ns:={NAMESPACE}",
                 "--params-file", params_file], stdout=log, stderr=subprocess.STDOUT, env=env)

    def output(self) -> str:
        with open(self.log_path) as f:
            return f.read()

    def rss_mb(self) -> float:
        with open(f"/proc/{self.process.pid}/status") as f:
            kb = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
        return kb / 1024

    def stop(self, timeout: float = 15.0) -> int:
        """SIGINT, then the exit code (SIGKILL and -9 if it does not exit within timeout)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def close(self) -> None:
        self.stop()
        self._dir.cleanup()


class Client:
    """A test-side node in its own rclpy Context, spun by a background thread; records what arrives."""

    def __init__(self, image_reliability=ReliabilityPolicy.RELIABLE):
        self.context = rclpy.Context()
        rclpy.init(context=self.context)
        self.node = rclpy.create_node("tester", namespace=NAMESPACE, context=self.context)
        self.lock = threading.Lock()
        self.results: list[GroundingResult] = []
        self.rejections: list[DiagnosticStatus] = []
        self.logs: list[str] = []
        self.status: dict[str, str] = {}
        self.status_count = 0
        self.overlays: list[Image] = []
        self.markers: list[MarkerArray] = []
        self.clouds: list[PointCloud2] = []
        self.spin_errors: list[str] = []
        # Every subscription is made here, before the spin thread starts: none is added while it spins.
        many = QoSProfile(depth=1000, reliability=ReliabilityPolicy.RELIABLE)
        self._keep(GroundingResult, "grounding", self.results, many)
        self._keep(DiagnosticStatus, "groundlmm_node/rejected", self.rejections, many)
        self._keep(Image, "groundlmm_node/overlay", self.overlays, 10)
        self._keep(MarkerArray, "groundlmm_node/markers", self.markers, 10)
        self._keep(PointCloud2, "groundlmm_node/points", self.clouds, 10)
        self.node.create_subscription(Log, "/rosout", self._on_log, many)
        self.node.create_subscription(DiagnosticArray, "/diagnostics", self._on_status, 10)
        self.image_pub = self.node.create_publisher(Image, "image", QoSProfile(depth=5, reliability=image_reliability))
        self.query_pub = self.node.create_publisher(String, "query", 1000)  # a flood must not overwrite unacknowledged queries
        self.depth_pub = self.node.create_publisher(Image, "depth", QoSProfile(depth=5))
        self.info_pub = self.node.create_publisher(CameraInfo, "camera_info", QoSProfile(depth=5))
        self.action = ActionClient(self.node, Ground, "groundlmm_node/ground")
        self.executor = SingleThreadedExecutor(context=self.context)
        self.executor.add_node(self.node)
        self._thread = threading.Thread(target=self._spin, daemon=True)
        self._thread.start()

    def _spin(self) -> None:
        while self.context.ok():
            try:
                self.executor.spin_once(timeout_sec=0.05)
            except Exception as error:  # the context shut down between ok() and spin_once, or a real fault
                if self.context.ok():
                    self.spin_errors.append(repr(error))  # shown by not_active_reason(); keep spinning

    def _keep(self, msg_type, topic, into: list, qos) -> None:
        def keep(msg):
            with self.lock:
                into.append(msg)
        self.node.create_subscription(msg_type, topic, keep, qos)

    def _on_log(self, msg: Log) -> None:
        if msg.name == NODE.strip("/").replace("/", "."):  # the logger of the node under test only
            with self.lock:
                self.logs.append(msg.msg)

    def _on_status(self, msg: DiagnosticArray) -> None:
        for status in msg.status:
            if status.name.startswith(NODE):
                with self.lock:
                    self.status = {kv.key: kv.value for kv in status.values}
                    self.status_count += 1

    # ---- waiting ------------------------------------------------------------------------------

    @staticmethod
    def wait_for(predicate, timeout: float = 10.0, period: float = 0.02):
        """predicate()'s first truthy value, or None after timeout seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            time.sleep(period)
        return None

    def wait_active(self, timeout: float = 60.0) -> bool:
        """The node reports itself active and both input topics are matched."""
        return bool(self.wait_for(lambda: self.status.get("state") == "active"
                                  and self.image_pub.get_subscription_count() > 0
                                  and self.query_pub.get_subscription_count() > 0, timeout))

    def not_active_reason(self) -> str:
        return (f"state {self.status.get('state')!r} after {self.status_count} status messages; "
                f"subscribers to image {self.image_pub.get_subscription_count()}, "
                f"to query {self.query_pub.get_subscription_count()}; spin thread alive "
                f"{self._thread.is_alive()}, spin errors {self.spin_errors[-3:]}")

    def wait_status(self, key: str, at_least: int, timeout: float = 5.0) -> bool:
        return bool(self.wait_for(lambda: int(self.status.get(key, "-1")) >= at_least, timeout))

    def answer_to(self, query: str, timeout: float = 20.0):
        """The GroundingResult or rejection DiagnosticStatus for `query` (None if none came in time)."""
        def find():
            with self.lock:
                return (next((r for r in self.results if r.query == query), None)
                        or next((r for r in self.rejections if _value(r, "query") == query), None))
        return self.wait_for(find, timeout)

    def log_containing(self, fragment: str, timeout: float = 5.0) -> str | None:
        def find():
            with self.lock:
                return next((line for line in self.logs if fragment in line), None)
        return self.wait_for(find, timeout)

    # ---- sending ------------------------------------------------------------------------------

    def publish_image(self, msg: Image) -> None:
        """Publish a frame and wait until the node counted it."""
        seen = int(self.status.get("frames_received", "0"))
        self.image_pub.publish(msg)
        assert self.wait_status("frames_received", seen + 1), "node did not count the frame"

    def query(self, text: str) -> None:
        self.query_pub.publish(String(data=text))

    def ground(self, query: str, mode: str = "refer", image: Image | None = None, timeout: float = 20.0,
               on_feedback=None, cancel_after_feedback: bool = False):
        """Send a Ground goal; (status, result, feedbacks). Status is action_msgs GoalStatus."""
        assert self.action.wait_for_server(timeout_sec=10.0), "no ~/ground action server"
        feedbacks = []
        goal = Ground.Goal(query=query, mode=mode, image=image if image is not None else Image())
        sent = self.action.send_goal_async(goal, feedback_callback=lambda fb: feedbacks.append(fb.feedback))
        handle = self.wait_for(lambda: sent.done() and sent.result(), timeout)
        assert handle is not None and handle.accepted, "goal not accepted"
        if cancel_after_feedback:
            assert self.wait_for(lambda: feedbacks, timeout), "no feedback before cancel"
            handle.cancel_goal_async()
        result = handle.get_result_async()
        assert self.wait_for(result.done, timeout), "no action result"
        return result.result().status, result.result().result, feedbacks

    def change_state(self, transition_id: int) -> bool:
        return self._call(ChangeState, "groundlmm_node/change_state",
                          ChangeState.Request(transition=_transition(transition_id))).success

    def state(self) -> str:
        return self._call(GetState, "groundlmm_node/get_state", GetState.Request()).current_state.label

    def set_parameters(self, **values) -> list:
        parameters = [Parameter(name=name, value=_parameter_value(value)) for name, value in values.items()]
        return self._call(SetParameters, "groundlmm_node/set_parameters",
                          SetParameters.Request(parameters=parameters)).results

    def _call(self, srv_type, name: str, request, timeout: float = 30.0):
        client = self.node.create_client(srv_type, name)
        try:
            assert client.wait_for_service(timeout_sec=10.0), f"no service {name}"
            future = client.call_async(request)
            assert self.wait_for(future.done, timeout), f"{name} did not answer"
            return future.result()
        finally:
            self.node.destroy_client(client)

    def close(self) -> None:
        self.action.destroy()
        self.node.destroy_node()
        rclpy.shutdown(context=self.context)
        self._thread.join(2.0)


def connect(node: NodeProcess, timeout: float = 60.0) -> Client:
    """A Client that sees `node` active. On failure it is closed first (a live DDS thread at interpreter
    exit aborts the whole run) and the error says what was missing."""
    client = Client()
    if not client.wait_active(timeout):
        reason = client.not_active_reason()
        client.close()
        raise AssertionError(f"node did not become active: {reason}\n{node.output()}")
    return client


def _transition(transition_id: int):
    from lifecycle_msgs.msg import Transition
    return Transition(id=transition_id)


def _parameter_value(value) -> ParameterValue:
    if isinstance(value, bool):
        return ParameterValue(type=ParameterType.PARAMETER_BOOL, bool_value=value)
    if isinstance(value, int):
        return ParameterValue(type=ParameterType.PARAMETER_INTEGER, integer_value=value)
    if isinstance(value, float):
        return ParameterValue(type=ParameterType.PARAMETER_DOUBLE, double_value=value)
    return ParameterValue(type=ParameterType.PARAMETER_STRING, string_value=value)


def _value(status: DiagnosticStatus, key: str) -> str | None:
    return next((kv.value for kv in status.values if kv.key == key), None)


def rgb_image(width: int = 96, height: int = 64, stamp_s: float = 1.0, frame_id: str = "camera_optical",
              seed: int = 0) -> Image:
    """A random rgb8 frame with a distinct stamp and frame_id."""
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    header = Header(frame_id=frame_id)
    header.stamp.sec, header.stamp.nanosec = int(stamp_s), int(round((stamp_s % 1) * 1e9))
    return numpy_to_image(pixels, "rgb8", header)


def is_rejection(answer) -> bool:
    """A query's answer that is no grounding: a rejection on ~/rejected (never accepted) or a
    GroundingResult with success false (accepted, then failed). Both carry the reason in .message."""
    return isinstance(answer, DiagnosticStatus) or not answer.success
