"""The DDS side of node_harness.Client, in a process of its own.

    python node_client.py FD NAMESPACE NODE IMAGE_RELIABILITY

A DDS wait or teardown that blocks (Fast DDS can hang in rcl_node_fini while holding the GIL,
where no Python timeout runs) then blocks only this process, which the test process kills. FD is a
socket to the test process carrying pickled tuples: from the test ("call", id, method, args,
kwargs); to it ("reply", id, error, value) and ("event", kind, value) for every message this node
receives.
"""

from __future__ import annotations

import functools
import itertools
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from multiprocessing.connection import Connection

import rclpy
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus
from rcl_interfaces.msg import Log
from rclpy.action import ActionClient
from rclpy.executors import SingleThreadedExecutor
from rclpy.qos import QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import CameraInfo, Image, PointCloud2
from std_msgs.msg import String
from visualization_msgs.msg import MarkerArray

from groundlmm_msgs.action import Ground
from groundlmm_msgs.msg import GroundingResult

RELIABILITY = {"reliable": ReliabilityPolicy.RELIABLE, "best_effort": ReliabilityPolicy.BEST_EFFORT}


@dataclass
class GoalRecord:
    sent: float = field(default_factory=time.monotonic)
    response_s: float | None = None  # goal sent -> goal response
    accepted: bool | None = None
    status: int | None = None  # action_msgs/GoalStatus, once the result came
    result: object = None
    feedbacks: list = field(default_factory=list)
    handle: object = None


class ClientNode:
    def __init__(self, conn: Connection, namespace: str, node_name: str, image_reliability: str):
        self._conn = conn
        self._send_lock = threading.Lock()
        rclpy.init()
        self.node = rclpy.create_node("tester", namespace=namespace)
        self._node_logger = f"{namespace}/{node_name}".strip("/").replace("/", ".")
        many = QoSProfile(depth=1000, reliability=ReliabilityPolicy.RELIABLE)
        for kind, msg_type, topic, qos in (
            ("results", GroundingResult, "grounding", many),
            ("rejections", DiagnosticStatus, f"{node_name}/rejected", many),
            ("overlays", Image, f"{node_name}/overlay", 10),
            ("markers", MarkerArray, f"{node_name}/markers", 10),
            ("clouds", PointCloud2, f"{node_name}/points", 10),
        ):
            self.node.create_subscription(msg_type, topic, functools.partial(self._emit, kind), qos)
        self.node.create_subscription(Log, "/rosout", self._on_log, many)
        self.node.create_subscription(DiagnosticArray, "/diagnostics", self._on_status, 10)
        self._publishers = {
            "image": self.node.create_publisher(
                Image, "image", QoSProfile(depth=5, reliability=RELIABILITY[image_reliability])
            ),
            "query": self.node.create_publisher(
                String, "query", 1000
            ),  # a flood must not overwrite queries
            "depth": self.node.create_publisher(Image, "depth", QoSProfile(depth=5)),
            "camera_info": self.node.create_publisher(
                CameraInfo, "camera_info", QoSProfile(depth=5)
            ),
        }
        self._node_name = node_name
        # ROS's default service QoS keeps 10 responses: a client that sends 100 goals at once needs
        # a history as deep as its burst, or responses not yet taken are overwritten (the node's
        # side keeps 1000)
        self._action = ActionClient(
            self.node,
            Ground,
            f"{node_name}/ground",
            goal_service_qos_profile=many,
            result_service_qos_profile=many,
            cancel_service_qos_profile=many,
        )
        self._goals: dict[int, GoalRecord] = {}
        self._goal_ids = itertools.count()
        self.executor = SingleThreadedExecutor()
        self.executor.add_node(self.node)
        threading.Thread(target=self._spin, daemon=True).start()

    def _spin(self) -> None:
        while rclpy.ok():
            try:
                self.executor.spin_once(timeout_sec=0.05)
            except (
                Exception
            ) as error:  # the context shut down between ok() and spin_once, or a real fault
                if rclpy.ok():
                    self._emit("spin_errors", repr(error))

    def _emit(self, kind: str, value) -> None:
        with self._send_lock:
            self._conn.send(("event", kind, value))

    def _on_log(self, msg: Log) -> None:
        if msg.name == self._node_logger:  # the logger of the node under test only
            self._emit("logs", msg.msg)

    def _on_status(self, msg: DiagnosticArray) -> None:
        for status in msg.status:
            if status.name.startswith(
                f"{self.node.get_namespace().rstrip('/')}/{self._node_name}:"
            ):
                self._emit("status", {kv.key: kv.value for kv in status.values})

    # ---- what the test calls -------------------------------------------------------------------

    def create_publisher(
        self, name: str, msg_type, topic: str, depth: int, reliability: str
    ) -> None:
        self._publishers[name] = self.node.create_publisher(
            msg_type, topic, QoSProfile(depth=depth, reliability=RELIABILITY[reliability])
        )

    def destroy_publisher(self, name: str) -> None:
        self.node.destroy_publisher(self._publishers.pop(name))

    def subscribe(self, name: str, msg_type, topic: str) -> None:
        """Every message on `topic` comes to the test as ("received", (name, msg))."""
        many = QoSProfile(depth=1000, reliability=ReliabilityPolicy.RELIABLE)
        self.node.create_subscription(
            msg_type, topic, lambda msg: self._emit("received", (name, msg)), many
        )

    def publisher_count(self, topic: str) -> int:
        return self.node.count_publishers(self.node.resolve_topic_name(topic))

    def publish(self, name: str, msg) -> None:
        self._publishers[name].publish(msg)

    def subscription_count(self, name: str) -> int:
        return self._publishers[name].get_subscription_count()

    def action_server_ready(self, timeout: float) -> bool:
        return self._action.wait_for_server(timeout_sec=timeout)

    def send_goals(self, goals: list, request_result: bool = True) -> list[int]:
        """Send every goal at once; their records fill in as responses, feedback and results
        arrive (without request_result, results only after request_results)."""
        keys = []
        for goal in goals:
            key, record = next(self._goal_ids), GoalRecord()
            self._goals[key] = record
            sent = self._action.send_goal_async(
                goal, feedback_callback=lambda fb, r=record: r.feedbacks.append(fb.feedback)
            )
            sent.add_done_callback(
                functools.partial(self._on_goal_response, record, request_result)
            )
            keys.append(key)
        return keys

    def _on_goal_response(self, record: GoalRecord, request_result: bool, future) -> None:
        record.response_s = time.monotonic() - record.sent
        record.handle = future.result()
        record.accepted = record.handle.accepted
        if record.accepted and request_result:
            self._request_result(record)

    def _request_result(self, record: GoalRecord) -> None:
        record.handle.get_result_async().add_done_callback(
            functools.partial(self._on_result, record)
        )

    def request_results(self, keys: list[int]) -> None:
        """Ask for the results of goals sent with request_result=False."""
        for key in keys:
            self._request_result(self._goals[key])

    @staticmethod
    def _on_result(record: GoalRecord, future) -> None:
        record.result = future.result().result
        record.status = future.result().status

    def cancel_goals(self, keys: list[int]) -> None:
        for key in keys:
            self._goals[key].handle.cancel_goal_async()

    def goals(self, keys: list[int]) -> list[dict]:
        """Each goal's record so far (without its handle)."""
        return [
            {
                "accepted": r.accepted,
                "response_s": r.response_s,
                "status": r.status,
                "result": r.result,
                "feedbacks": list(r.feedbacks),
            }
            for r in (self._goals[key] for key in keys)
        ]

    def node_names(self) -> list[str]:
        return [
            f"{namespace.rstrip('/')}/{name}"
            for name, namespace in self.node.get_node_names_and_namespaces()
        ]

    def call_service(self, srv_type, name: str, request, timeout: float):
        client = self.node.create_client(srv_type, f"{self._node_name}/{name}")
        try:
            if not client.wait_for_service(timeout_sec=10.0):
                raise AssertionError(f"no service {name}")
            future = client.call_async(request)
            deadline = time.monotonic() + timeout
            while not future.done() and time.monotonic() < deadline:
                time.sleep(0.01)
            if not future.done():
                raise AssertionError(f"{name} did not answer within {timeout} s")
            return future.result()
        finally:
            self.node.destroy_client(client)

    def close(self) -> None:
        self._action.destroy()
        self.node.destroy_node()
        rclpy.shutdown()


def serve(conn: Connection, client: ClientNode) -> None:
    """Run the test's calls one at a time until "close" or until the test process goes away."""
    while True:
        try:
            _, call_id, method, args, kwargs = conn.recv()
        except (EOFError, OSError):
            return
        try:
            value, error = getattr(client, method)(*args, **kwargs), None
        except Exception as exception:  # goes back to the test, which raises it
            value, error = (
                None,
                f"{type(exception).__name__}: {exception}\n{traceback.format_exc()}",
            )
        with client._send_lock:
            conn.send(("reply", call_id, error, value))
        if method == "close":
            return


def main() -> None:
    fd, namespace, node_name, image_reliability = sys.argv[1:]
    conn = Connection(int(fd))
    serve(conn, ClientNode(conn, namespace, node_name, image_reliability))


if __name__ == "__main__":
    main()
