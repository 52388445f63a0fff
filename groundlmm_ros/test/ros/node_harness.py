"""Test helpers: groundlmm_node in its own process, and a client node in another.

The two talk over real DDS (the run's ROS_DOMAIN_ID comes from conftest.py). The test process
itself holds no DDS participant here: `Client` drives node_client.py over a socket, and every call
it makes is bounded; a call that does not come back in time kills the client process and fails the
test (a DDS wait or teardown can block while holding the GIL, where no in-process timeout fires). On
a failed wait the node's log helps: `NodeProcess.output()`.
"""

from __future__ import annotations

import ctypes
import itertools
import os
import pickle
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from multiprocessing.connection import Connection
from pathlib import Path

import yaml
from action_msgs.msg import GoalStatus
from diagnostic_msgs.msg import DiagnosticStatus
from gated_node import Gate
from images import random_rgb
from lifecycle_msgs.msg import Transition
from lifecycle_msgs.srv import ChangeState, GetState
from rcl_interfaces.msg import Parameter, ParameterType, ParameterValue
from rcl_interfaces.srv import SetParameters
from sensor_msgs.msg import Image
from std_msgs.msg import Header, String

from groundlmm_msgs.action import Ground
from groundlmm_ros.ros.conversion import numpy_to_image

HERE = Path(__file__).resolve().parent
NAMESPACE = "/lab"
NODE_NAME = "groundlmm_node"
# What every test node shares: tiny model, quick status, reliable images (no test flakes from a lost
# frame).
BASE_PARAMS = {
    "model": "tiny-random",
    "image_qos_reliability": "reliable",
    "status_period_s": 0.2,
    "max_new_tokens": 8,
}
TERMINAL = {GoalStatus.STATUS_SUCCEEDED, GoalStatus.STATUS_ABORTED, GoalStatus.STATUS_CANCELED}


def _die_with_the_test_process() -> None:
    """preexec_fn: SIGKILL this child when the test process dies (also when a watchdog kills it),
    and SIGINT as a terminal or ros2 launch leaves it, whatever the test run's own: a background
    job of a non-interactive shell ignores SIGINT, and its children would inherit that."""
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start(command: list[str], log_path: str, env: dict | None = None, **kwargs) -> subprocess.Popen:
    """A child process whose output goes to log_path and that does not outlive the test process."""
    with open(log_path, "w") as log:
        return subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            preexec_fn=_die_with_the_test_process,
            **kwargs,
        )


class NodeProcess:
    """`python -m groundlmm_ros.ros.process` with a params file; stop() sends SIGINT like Ctrl-C.

    gated=True runs gated_node.py instead: the same node whose model waits at a gate the test
    opens (node.gate: a gated_node.Gate), so a test fills the queue deterministically. `command`
    replaces the whole command line (params then unused)."""

    def __init__(
        self,
        params: dict,
        gated: bool = False,
        hold_configure: bool = False,
        hang_at_exit: bool = False,
        command: list[str] | None = None,
        cwd: Path | None = None,
        env: dict | None = None,
    ):
        self._dir = tempfile.TemporaryDirectory(prefix="groundlmm_node_test_")
        # the model's gate (gated=True): node.gate.open(), .close(), .allow_batches(), .started()
        self.gate = Gate(Path(self._dir.name))
        params_file = os.path.join(self._dir.name, "params.yaml")
        with open(params_file, "w") as f:
            yaml.safe_dump({"/**": {"ros__parameters": {**BASE_PARAMS, **params}}}, f)
        self.log_path = os.path.join(self._dir.name, "node.log")
        for flag, wanted in (("hold_configure", hold_configure), ("hang_at_exit", hang_at_exit)):
            if wanted:
                self.gate.flag(flag).touch()
        program = (
            [str(HERE / "gated_node.py"), str(self.gate.folder)]
            if gated
            else ["-m", "groundlmm_ros.ros.process"]
        )
        command = command or [
            sys.executable,
            *program,
            "--ros-args",
            "-r",
            f"__ns:={NAMESPACE}",
            "--params-file",
            params_file,
        ]
        env = dict(env or os.environ, OMP_NUM_THREADS="1", RCUTILS_LOGGING_BUFFERED_STREAM="0")
        self.process = start(command, self.log_path, env, cwd=cwd)

    def output(self) -> str:
        with open(self.log_path) as f:
            return f.read()

    def rss_mb(self) -> float:
        with open(f"/proc/{self.process.pid}/status") as f:
            kb = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
        return kb / 1024

    def stop(self, signum: int = signal.SIGINT, timeout: float = 15.0) -> int:
        """The signal (SIGINT: Ctrl-C), then the exit code (SIGKILL and -9 if it does not exit
        within timeout)."""
        if self.process.poll() is None:
            self.process.send_signal(signum)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def close(self) -> None:
        self.stop()
        self._dir.cleanup()


def wait_for(predicate, timeout: float = 10.0, period: float = 0.02):
    """predicate()'s first truthy value, or None after timeout seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(period)
    return None


class ClientGone(AssertionError):
    pass


class Publisher:
    """A publisher of the client process, by name."""

    def __init__(self, client: Client, name: str):
        self._client, self.name = client, name

    def publish(self, msg) -> None:
        self._client.call("publish", self.name, msg)

    def get_subscription_count(self) -> int:
        return self._client.call("subscription_count", self.name)


class Client:
    """A test-side node in its own process (node_client.py); what it receives is mirrored here."""

    def __init__(
        self,
        image_reliability: str = "reliable",
        namespace: str = NAMESPACE,
        env: dict | None = None,
    ):
        self.lock = threading.Lock()
        self.results: list = []  # GroundingResult
        self.rejections: list = []  # DiagnosticStatus
        self.logs: list[str] = []
        self.status: dict[str, str] = {}
        self.status_count = 0
        self.overlays: list = []
        self.markers: list = []
        self.clouds: list = []
        self.spin_errors: list[str] = []
        self.received: list[tuple[str, object]] = []  # (subscription name, msg): see subscribe()
        self._replies: dict[int, tuple] = {}
        self._reply_ready = threading.Condition(self.lock)
        self._call_ids = itertools.count()
        self._send_lock = threading.Lock()
        self._publisher_ids = itertools.count()
        ours, theirs = socket.socketpair()
        self._log = tempfile.NamedTemporaryFile(
            prefix="groundlmm_test_client_", suffix=".log", delete=False
        )
        self.process = start(
            [
                sys.executable,
                str(HERE / "node_client.py"),
                str(theirs.fileno()),
                namespace,
                NODE_NAME,
                image_reliability,
            ],
            self._log.name,
            env,
            pass_fds=[theirs.fileno()],
        )
        theirs.close()
        self._conn = Connection(ours.detach())
        self._gone = ""
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.image_pub, self.query_pub = Publisher(self, "image"), Publisher(self, "query")
        self.depth_pub, self.info_pub = Publisher(self, "depth"), Publisher(self, "camera_info")

    def _read(self) -> None:
        """Events and replies from the client process (a plain socket read: it cannot hold the
        GIL)."""
        while True:
            try:
                kind, *rest = self._conn.recv()
            except (EOFError, OSError, pickle.UnpicklingError):
                break
            with self.lock:
                if kind == "reply":
                    self._replies[rest[0]] = tuple(rest[1:])
                    self._reply_ready.notify_all()
                elif rest[0] == "status":
                    self.status = rest[1]
                    self.status_count += 1
                else:
                    getattr(self, rest[0]).append(rest[1])
        with self.lock:
            self._gone = self._gone or f"the client process ended (exit code {self.process.poll()})"
            self._reply_ready.notify_all()

    def call(self, method: str, *args, timeout: float = 30.0, **kwargs):
        """Run method in the client process; at most timeout seconds, else the process is killed."""
        call_id = next(self._call_ids)
        with self._send_lock:
            if self._gone:
                raise ClientGone(f"{method}: {self._gone}")
            self._conn.send(("call", call_id, method, args, kwargs))
        with self.lock:
            if not self._reply_ready.wait_for(
                lambda: call_id in self._replies or self._gone, timeout
            ):
                self._gone = (
                    f"the client process did not answer {method} within {timeout} s and was killed"
                )
                self.process.kill()
            if call_id not in self._replies:
                raise ClientGone(f"{method}: {self._gone}\n{self.client_log()}")
            error, value = self._replies.pop(call_id)
        if error:
            raise AssertionError(f"{method} failed in the client process: {error}")
        return value

    def client_log(self) -> str:
        return Path(self._log.name).read_text()[-3000:]

    # ---- waiting ------------------------------------------------------------------------------

    wait_for = staticmethod(wait_for)

    def wait_active(self, timeout: float = 60.0) -> bool:
        """The node reports itself active and both input topics are matched."""
        return bool(
            wait_for(
                lambda: (
                    self.status.get("state") == "active"
                    and self.image_pub.get_subscription_count() > 0
                    and self.query_pub.get_subscription_count() > 0
                ),
                timeout,
                period=0.1,
            )
        )

    def not_active_reason(self) -> str:
        try:
            counts = (
                self.image_pub.get_subscription_count(),
                self.query_pub.get_subscription_count(),
            )
        except ClientGone as error:
            counts = str(error)
        return (
            f"state {self.status.get('state')!r} after {self.status_count} status messages; "
            f"subscribers to image, query {counts}; client errors {self.spin_errors[-3:]}"
        )

    def wait_status(self, key: str, at_least: int, timeout: float = 5.0) -> bool:
        return bool(wait_for(lambda: int(self.status.get(key, "-1")) >= at_least, timeout))

    def answer_to(self, query: str, timeout: float = 20.0):
        """The GroundingResult or rejection DiagnosticStatus for `query` (None if none came in
        time)."""

        def find():
            with self.lock:
                return next((r for r in self.results if r.query == query), None) or next(
                    (r for r in self.rejections if status_value(r, "query") == query), None
                )

        return wait_for(find, timeout)

    def answers(self, queries) -> dict[str, list]:
        """Every answer (GroundingResult or rejection) that came for each of `queries`."""
        found = {query: [] for query in queries}
        with self.lock:
            for answer in [*self.results, *self.rejections]:
                query = answer.query if hasattr(answer, "query") else status_value(answer, "query")
                if query in found:
                    found[query].append(answer)
        return found

    def log_containing(self, fragment: str, timeout: float = 5.0) -> str | None:
        def find():
            with self.lock:
                return next((line for line in self.logs if fragment in line), None)

        return wait_for(find, timeout)

    # ---- sending ------------------------------------------------------------------------------

    def create_publisher(
        self, msg_type, topic: str, depth: int = 5, reliability: str = "reliable"
    ) -> Publisher:
        name = f"extra{next(self._publisher_ids)}"
        self.call("create_publisher", name, msg_type, topic, depth, reliability)
        return Publisher(self, name)

    def destroy_publisher(self, publisher: Publisher) -> None:
        self.call("destroy_publisher", publisher.name)

    def subscribe(self, msg_type, topic: str) -> str:
        """Subscribe (reliable, deep) in the client process; what arrives goes to `received`,
        tagged with the name returned (the topic)."""
        self.call("subscribe", topic, msg_type, topic)
        return topic

    def publisher_count(self, topic: str) -> int:
        return self.call("publisher_count", topic)

    def received_on(self, topic: str) -> list:
        with self.lock:
            return [msg for name, msg in self.received if name == topic]

    def publish_image(self, msg) -> None:
        """Publish a frame and wait until the node counted it."""
        seen = int(self.status.get("frames_received", "0"))
        self.image_pub.publish(msg)
        assert self.wait_status("frames_received", seen + 1), "node did not count the frame"

    def query(self, text: str) -> None:
        self.query_pub.publish(String(data=text))

    def send_goals(self, goals: list, request_result: bool = True) -> list[int]:
        """Send Ground goals at once (from the client process); their keys for goals() and
        cancel_goals(). Without request_result their results wait for request_results(keys)."""
        assert self.call("action_server_ready", 10.0, timeout=20.0), "no ~/ground action server"
        return self.call("send_goals", goals, request_result)

    def request_results(self, keys: list[int]) -> None:
        self.call("request_results", keys)

    def goals(self, keys: list[int]) -> list[dict]:
        """Each goal so far: accepted, response_s, status (GoalStatus, once its result came),
        result, feedbacks."""
        return self.call("goals", keys)

    def cancel_goals(self, keys: list[int]) -> None:
        self.call("cancel_goals", keys)

    def wait_goals(self, keys: list[int], done, timeout: float) -> list[dict]:
        """goals(keys) once done(records) holds, or the last records after timeout."""
        records = self.goals(keys)
        deadline = time.monotonic() + timeout
        while not done(records) and time.monotonic() < deadline:
            time.sleep(0.05)
            records = self.goals(keys)
        return records

    def ground(
        self,
        query: str,
        mode: str = "refer",
        image=None,
        timeout: float = 20.0,
        cancel_after_feedback: bool = False,
    ):
        """Send a Ground goal; (status, result, feedbacks). Status is action_msgs GoalStatus."""
        goal = Ground.Goal(query=query, mode=mode, image=image if image is not None else Image())
        keys = self.send_goals([goal])
        record = self.wait_goals(keys, lambda r: r[0]["accepted"] is not None, timeout)[0]
        assert record["accepted"], "goal not accepted"
        if cancel_after_feedback:
            record = self.wait_goals(
                keys, lambda r: r[0]["feedbacks"] or r[0]["status"] is not None, timeout
            )[0]
            assert record["feedbacks"], "no feedback before cancel"
            self.cancel_goals(keys)
        record = self.wait_goals(keys, lambda r: r[0]["status"] is not None, timeout)[0]
        assert record["status"] is not None, "no action result"
        return record["status"], record["result"], record["feedbacks"]

    def change_state(self, transition_id: int, timeout: float = 60.0) -> bool:
        """A lifecycle transition; configure builds the model, which can take tens of seconds on
        a loaded machine."""
        request = ChangeState.Request(transition=Transition(id=transition_id))
        return self._service(ChangeState, "change_state", request, timeout).success

    def state(self) -> str:
        return self._service(GetState, "get_state", GetState.Request()).current_state.label

    def reconfigure(self, timeout: float = 60.0, **parameters) -> None:
        """Set parameters read at configure, then deactivate, cleanup, configure and activate the
        node; returns once it reports itself active."""
        results = self.set_parameters(**parameters) if parameters else []
        assert all(r.successful for r in results), [r.reason for r in results]
        for transition in (
            Transition.TRANSITION_DEACTIVATE,
            Transition.TRANSITION_CLEANUP,
            Transition.TRANSITION_CONFIGURE,
            Transition.TRANSITION_ACTIVATE,
        ):
            assert self.change_state(transition, timeout), f"transition {transition} failed"
        assert self.wait_for(lambda: self.status.get("state") == "active", timeout), self.status

    def set_parameters(self, **values) -> list:
        parameters = [
            Parameter(name=name, value=_parameter_value(value)) for name, value in values.items()
        ]
        return self._service(
            SetParameters, "set_parameters", SetParameters.Request(parameters=parameters)
        ).results

    def _service(self, srv_type, name: str, request, timeout: float = 30.0):
        return self.call("call_service", srv_type, name, request, timeout, timeout=timeout + 15.0)

    def close(self) -> None:
        """Shut the client down; kill it if that takes more than 10 s (a hung DDS teardown)."""
        try:
            if not self._gone:
                self.call("close", timeout=10.0)
        except ClientGone:
            pass
        try:
            self.process.wait(5.0)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._conn.close()
        os.unlink(self._log.name)


def connect(node: NodeProcess, timeout: float = 60.0, **client_options) -> Client:
    """A Client that sees `node` active. On failure it is closed first and the error says what was
    missing."""
    client = Client(**client_options)
    if not client.wait_active(timeout):
        reason = client.not_active_reason()
        client.close()
        raise AssertionError(f"node did not become active: {reason}\n{node.output()}")
    return client


def _parameter_value(value) -> ParameterValue:
    if isinstance(value, bool):
        return ParameterValue(type=ParameterType.PARAMETER_BOOL, bool_value=value)
    if isinstance(value, int):
        return ParameterValue(type=ParameterType.PARAMETER_INTEGER, integer_value=value)
    if isinstance(value, float):
        return ParameterValue(type=ParameterType.PARAMETER_DOUBLE, double_value=value)
    return ParameterValue(type=ParameterType.PARAMETER_STRING, string_value=value)


def status_value(status: DiagnosticStatus, key: str) -> str | None:
    """The value of `key` in a DiagnosticStatus (a rejection's "query", "camera", ...)."""
    return next((kv.value for kv in status.values if kv.key == key), None)


def stamped_header(stamp_s: float, frame_id: str = "camera_optical") -> Header:
    header = Header(frame_id=frame_id)
    header.stamp.sec, header.stamp.nanosec = int(stamp_s), int(round((stamp_s % 1) * 1e9))
    return header


def rgb_image(
    width: int = 96,
    height: int = 64,
    stamp_s: float = 1.0,
    frame_id: str = "camera_optical",
    seed: int = 0,
) -> Image:
    """A random rgb8 frame (images.random_rgb) with a distinct stamp and frame_id."""
    return numpy_to_image(
        random_rgb(height, width, seed), "rgb8", stamped_header(stamp_s, frame_id)
    )


def is_rejection(answer) -> bool:
    """A query's answer that is no grounding: a rejection on ~/rejected (never accepted) or a
    GroundingResult with success false (accepted, then failed). Both carry the reason in
    .message."""
    return isinstance(answer, DiagnosticStatus) or not answer.success
