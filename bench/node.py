"""groundlmm_node benchmark: end-to-end latency over DDS, and the node's own overhead per result.

    python bench/node.py [--queries 30] [--repeats 50]

1. Latency: groundlmm_node (tiny random model, refer mode) in its own process;
   this process publishes one 640x480 frame, then sends queries one at a time
   and times query published -> GroundingResult received.
2. Overhead: what the node adds around the model for a 640x480 image with 10
   masks: rgb8 conversion, message building, publishing (to a subscriber in
   another process). A GroundingNode in this process runs its own result path
   (`node.results[""].publish`, what a finished topic query calls) on a Grounding of 10 masks:
   with only `grounding` subscribed (overhead_ms_*), then with depth to 3D on and every
   output subscribed (overlay, markers, points: overhead_ms_all_outputs_*).
The last line is JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import rclpy
import yaml
from diagnostic_msgs.msg import DiagnosticArray
from rclpy.executors import SingleThreadedExecutor
from rclpy.parameter import Parameter
from rclpy.qos import QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import CameraInfo, Image, PointCloud2
from std_msgs.msg import Header, String
from visualization_msgs.msg import MarkerArray

from groundlmm_msgs.msg import GroundingResult
from groundlmm_ros.engine.types import GroundedPhrase, Grounding
from groundlmm_ros.ros.conversion import numpy_to_image, to_rgb8
from groundlmm_ros.ros.node import GroundingNode
from groundlmm_ros.ros.process import use_node_dds_profile
from groundlmm_ros.ros.worker import DEFAULT_CAMERA, Job, Outcome

WIDTH, HEIGHT, MASKS = 640, 480, 10
RELIABLE = QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE)
OUTPUTS = {
    "grounding": GroundingResult,
    "groundlmm_node/overlay": Image,
    "groundlmm_node/markers": MarkerArray,
    "groundlmm_node/points": PointCloud2,
}


def frame(stamp_sec: int = 1) -> Image:
    pixels = np.random.default_rng(0).integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)
    header = Header(frame_id="camera_color_optical_frame")
    header.stamp.sec = stamp_sec
    return numpy_to_image(pixels, "rgb8", header)


def percentiles(samples_ms: list[float]) -> tuple[float, float]:
    return round(float(np.percentile(samples_ms, 50)), 2), round(
        float(np.percentile(samples_ms, 95)), 2
    )


def spin_in_background(node) -> SingleThreadedExecutor:
    executor = SingleThreadedExecutor(context=node.context)
    executor.add_node(node)
    threading.Thread(target=executor.spin, daemon=True).start()
    return executor


def wait_for(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.002)
    return False


@contextlib.contextmanager
def node_process(parameters: dict):
    """groundlmm_node with these parameters in its own process while the body runs (SIGINT at
    the end); if the body fails, the node's log goes to stderr."""
    with tempfile.TemporaryDirectory() as tmp:
        params = os.path.join(tmp, "params.yaml")
        with open(params, "w") as f:
            yaml.safe_dump({"/**": {"ros__parameters": parameters}}, f)
        with open(os.path.join(tmp, "node.log"), "w") as log:
            process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "groundlmm_ros.ros.process",
                    "--ros-args",
                    "--params-file",
                    params,
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
            try:
                yield process
            except BaseException:
                log.flush()
                print(Path(log.name).read_text()[-3000:], file=sys.stderr)
                raise
            finally:
                process.send_signal(signal.SIGINT)
                process.wait(30)


def end_to_end(queries: int) -> dict:
    """Query -> result latency through a groundlmm_node process, ms."""
    parameters = {
        "model": "tiny-random",
        "query_mode": "refer",
        "image_qos_reliability": "reliable",
    }
    with node_process(parameters):
        return _time_queries(queries)


def _time_queries(queries: int) -> dict:
    client = rclpy.create_node("bench_client")
    arrived: dict[str, tuple[float, bool, str]] = {}  # query -> (arrival time, success, message)
    client.create_subscription(
        GroundingResult,
        "grounding",
        lambda msg: arrived.setdefault(msg.query, (time.perf_counter(), msg.success, msg.message)),
        RELIABLE,
    )
    status: dict[str, str] = {}
    client.create_subscription(
        DiagnosticArray,
        "/diagnostics",
        lambda msg: status.update({kv.key: kv.value for kv in msg.status[0].values}),
        10,
    )
    image_pub = client.create_publisher(Image, "image", RELIABLE)
    query_pub = client.create_publisher(String, "query", RELIABLE)
    executor = spin_in_background(client)
    assert wait_for(
        lambda: image_pub.get_subscription_count() and query_pub.get_subscription_count(), 120
    ), "groundlmm_node did not come up"
    image_pub.publish(frame())
    time.sleep(0.5)
    latencies = []
    for i in range(queries + 3):  # the first 3 warm up
        query = f"the red mug {i}"
        sent = time.perf_counter()
        query_pub.publish(String(data=query))
        assert wait_for(lambda: query in arrived, 60), f"no result for {query!r}"
        assert arrived[query][1], (
            f"{query!r} failed: {arrived[query][2]}"
        )  # time answers, not failures
        if i >= 3:
            latencies.append(1000 * (arrived[query][0] - sent))
    time.sleep(1.5)  # one more /diagnostics period
    executor.shutdown()
    client.destroy_node()
    p50, p95 = percentiles(latencies)
    # the node's own view: query received -> result published (the model's time included)
    return {
        "latency_ms_p50": p50,
        "latency_ms_p95": p95,
        "latency_queries": queries,
        "node_latency_ms_p50": float(status.get("latency_ms_p50", "nan")),
    }


def ten_mask_grounding() -> Grounding:
    rng = np.random.default_rng(1)
    phrases = []
    for i in range(MASKS):
        x, y = int(rng.integers(0, WIDTH - 160)), int(rng.integers(0, HEIGHT - 120))
        mask = np.zeros((HEIGHT, WIDTH), bool)  # (H, W) image pixels
        mask[y : y + 120, x : x + 160] = True
        phrases.append(
            GroundedPhrase(
                f"object {i}",
                0,
                8,
                [i],
                np.zeros((HEIGHT, WIDTH), np.float32),
                (x + 80, y + 60),
                mask,
                0.9,
                (x, y, 160, 120),
            )
        )
    return Grounding(
        "Describe the image.", "describe", "objects", list(range(MASKS)), phrases, (HEIGHT, WIDTH)
    )


def node_overhead(repeats: int, subscriber_env: dict) -> dict:
    """ms the node spends per 10-mask result outside the model."""
    node = GroundingNode(parameter_overrides=[Parameter("autostart", value=False)])
    image, grounding = frame(), ten_mask_grounding()
    depth_header = Header(frame_id=image.header.frame_id, stamp=image.header.stamp)
    results = {}
    for label, use_depth, topics in (
        ("overhead_ms", False, ["grounding"]),
        ("overhead_ms_all_outputs", True, list(OUTPUTS)),
    ):
        node.set_parameters([Parameter("use_depth", value=use_depth)])
        assert (
            node.trigger_configure().name == "SUCCESS" and node.trigger_activate().name == "SUCCESS"
        )
        depth_buffer = node._depth[DEFAULT_CAMERA]
        depth_buffer.add_depth(
            numpy_to_image(np.full((HEIGHT, WIDTH), 1200, np.uint16), "16UC1", depth_header)
        )
        depth_buffer.set_info(
            CameraInfo(width=WIDTH, height=HEIGHT, k=[500.0, 0, 319.5, 0, 500.0, 239.5, 0, 0, 1])
        )
        subscriber = subprocess.Popen(
            [sys.executable, __file__, "--subscribe", *topics], env=subscriber_env
        )
        try:
            samples = _time_deliveries(node, topics, image, grounding, repeats)
        finally:
            subscriber.send_signal(signal.SIGINT)
            subscriber.wait(30)
        results[f"{label}_p50"], results[f"{label}_p95"] = percentiles(samples)
        assert (
            node.trigger_deactivate().name == "SUCCESS" and node.trigger_cleanup().name == "SUCCESS"
        )
    node.destroy_node()
    return results


def _time_deliveries(node, topics, image, grounding, repeats: int) -> list[float]:
    results = node.results[DEFAULT_CAMERA]
    outputs = [results.publishers[name] for name in ("grounding", "overlay", "markers", "points")][
        : len(topics)
    ]
    assert wait_for(lambda: all(p.get_subscription_count() for p in outputs), 60), (
        "subscriber not matched"
    )
    samples = []
    for i in range(repeats + 3):
        start = time.perf_counter()
        rgb = to_rgb8(image)
        convert_s = time.perf_counter() - start
        results.publish(
            Outcome(
                Job("Describe the image.", "describe", "topic", results),
                frame=image,
                rgb=rgb,
                grounding=grounding,
                convert_s=convert_s,
            )
        )
        if i >= 3:
            samples.append(1000 * (time.perf_counter() - start))
        time.sleep(0.02)  # results do not come faster than the model gives them
    return samples


def subscribe(topics: list[str]) -> None:
    """--subscribe mode: a separate process that receives the node's outputs."""
    rclpy.init()
    node = rclpy.create_node("bench_subscriber")
    for topic in topics:
        node.create_subscription(OUTPUTS[topic], topic, lambda msg: None, RELIABLE)
    try:
        rclpy.spin(node)
    except (KeyboardInterrupt, rclpy.executors.ExternalShutdownException):
        pass
    rclpy.try_shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--subscribe", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.subscribe:
        return subscribe(args.subscribe)
    os.environ.setdefault("ROS_DOMAIN_ID", str(1 + os.getpid() % 200))
    subscriber_env = dict(
        os.environ
    )  # the subscriber loads no profile of its own, as RViz or a planner does
    use_node_dds_profile()  # this process plays the node for the overhead figures
    rclpy.init()
    figures = {
        **end_to_end(args.queries),
        **node_overhead(args.repeats, subscriber_env),
        "image": f"{WIDTH}x{HEIGHT}",
        "masks_for_overhead": MASKS,
        "fastdds_transports": os.environ.get("FASTDDS_BUILTIN_TRANSPORTS", ""),
        "fastdds_profile": os.path.basename(os.environ.get("FASTDDS_DEFAULT_PROFILES_FILE", "")),
    }
    rclpy.try_shutdown()
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
