"""Many cameras on one groundlmm_node: results per second, each camera's share, latency; and the
bytes of a result with full and with cropped masks.

    python bench/cameras.py [--model demo] [--device cpu] [--cameras 1 2 4] [--seconds 30]
                            [--mode refer] [--fps 30]

1. Node: for each camera count N, groundlmm_node in its own process with cameras cam0..cam{N-1},
   each with a standing query (`--mode`, no rate limit: once per new frame). This process
   publishes a 640x480 frame on every camera at `--fps` (as cameras do, whatever the model's
   pace: faster than the model, so every camera has a new frame at every step) and, after a
   warm-up, counts each camera's results for `--seconds`: results/s (all cameras together),
   each camera's share, latency p50/p95 (frame stamp -> its result received here: the frame's
   wait for its step included), and results/s over one camera's.
2. Engine: in this process, one step of N requests (one image each) through
   Engine.ground_batch at once vs the same N one at a time: what batching itself gives here.
3. Bytes: the serialized GroundingResult of a 640x480 result with 10 masks, mask_format `full`
   vs `cropped`.
The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time

import numpy as np
import rclpy
from node import (
    HEIGHT,
    MASKS,
    RELIABLE,
    WIDTH,
    node_process,
    percentiles,
    spin_in_background,
    ten_mask_grounding,
)
from rclpy.serialization import serialize_message
from sensor_msgs.msg import Image
from std_msgs.msg import Header

from groundlmm_msgs.msg import GroundingResult
from groundlmm_ros.engine.types import Request
from groundlmm_ros.ros import messages
from groundlmm_ros.ros.conversion import numpy_to_image

QUERIES = {"refer": "the red mug", "describe": "Describe the image in detail."}
WARM_UP_S = 10.0  # results before this are not counted (first steps, DDS discovery)


def camera_names(count: int) -> list[str]:
    return [f"cam{k}" for k in range(count)]


def scene(seed: int) -> np.ndarray:
    """A 640x480 RGB frame of the shipped demo's world (the objects the demo model knows)."""
    from groundlmm_ros.world.scenes import make_scenes

    image = make_scenes(1, seed=seed)[0].image
    return np.asarray(
        np.kron(image, np.ones((HEIGHT // image.shape[0] + 1, WIDTH // image.shape[1] + 1, 1)))[
            :HEIGHT, :WIDTH
        ],
        np.uint8,
    )


def node_figures(count: int, args) -> dict:
    """Run a node with `count` cameras under standing load; its throughput, shares, latency."""
    cameras = camera_names(count)
    parameters = {
        "model": args.model,
        "device": args.device,
        "cameras": cameras,
        "image_qos_reliability": "reliable",
        "max_new_tokens": args.max_new_tokens,
        **{
            camera: {
                "standing_query": QUERIES[args.mode],
                "standing_mode": args.mode,
                "max_rate_hz": 0.0,
            }
            for camera in cameras
        },
    }
    with node_process(parameters):
        return _load(cameras, args)


def _load(cameras: list[str], args) -> dict:
    client = rclpy.create_node("bench_cameras")
    arrivals: dict[str, list[float]] = {camera: [] for camera in cameras}  # latency s, counted
    failures: list[str] = []
    counting, stop = threading.Event(), threading.Event()
    frames = {camera: scene(seed=k) for k, camera in enumerate(cameras)}

    def publish_frame(camera: str) -> None:
        header = Header(frame_id=f"{camera}_optical")
        now = time.time()
        header.stamp.sec, header.stamp.nanosec = int(now), int((now % 1) * 1e9)
        publishers[camera].publish(numpy_to_image(frames[camera], "rgb8", header))

    def on_result(camera: str, msg: GroundingResult) -> None:
        if not msg.success:
            failures.append(msg.message)
        elif counting.is_set():
            stamp = msg.header.stamp.sec + msg.header.stamp.nanosec * 1e-9
            arrivals[camera].append(time.time() - stamp)

    for camera in cameras:
        client.create_subscription(
            GroundingResult,
            f"{camera}/grounding",
            lambda msg, camera=camera: on_result(camera, msg),
            RELIABLE,
        )
    publishers = {
        camera: client.create_publisher(Image, f"{camera}/image", 2) for camera in cameras
    }
    executor = spin_in_background(client)
    deadline = time.monotonic() + 180
    while not all(p.get_subscription_count() for p in publishers.values()):
        assert time.monotonic() < deadline, "groundlmm_node did not come up"
        time.sleep(0.1)

    def publish_frames() -> None:
        while not stop.wait(1.0 / args.fps):
            for camera in cameras:
                publish_frame(camera)

    camera_thread = threading.Thread(target=publish_frames, daemon=True)
    camera_thread.start()
    time.sleep(WARM_UP_S)
    counting.set()
    time.sleep(args.seconds)
    counting.clear()
    stop.set()
    camera_thread.join()
    executor.shutdown()
    client.destroy_node()
    assert not failures, f"results failed: {failures[:3]}"
    total = sum(len(latencies) for latencies in arrivals.values())
    assert total, "no result in the measured window"
    p50, p95 = percentiles([1000 * s for latencies in arrivals.values() for s in latencies])
    return {
        "results_per_s": round(total / args.seconds, 3),
        "shares": {camera: round(len(arrivals[camera]) / total, 3) for camera in cameras},
        "latency_ms_p50": p50,
        "latency_ms_p95": p95,
    }


def engine_figures(count: int, args) -> dict:
    """ms for one step of `count` requests: batched vs one at a time (median of --repeats)."""
    from groundlmm_ros.models.presets import build_engine

    engine = build_engine(args.model, device=args.device, max_new_tokens=args.max_new_tokens)
    requests = [Request(scene(seed=k), QUERIES[args.mode], args.mode) for k in range(count)]

    def timed(step) -> float:
        samples = []
        for _ in range(args.repeats + 1):  # the first warms up
            start = time.perf_counter()
            step()
            samples.append(1000 * (time.perf_counter() - start))
        return float(np.median(samples[1:]))

    batched = timed(lambda: engine.ground_batch(requests))
    alone = timed(lambda: [engine.ground_batch([r]) for r in requests])
    return {
        "step_ms_batched": round(batched, 1),
        "step_ms_one_at_a_time": round(alone, 1),
        "batching_speedup": round(alone / batched, 3),
    }


def result_bytes() -> dict:
    """Serialized bytes of one 640x480, 10-mask GroundingResult per mask_format."""
    grounding = ten_mask_grounding()
    header = Header(frame_id="camera_color_optical_frame")
    centroids = [np.full(3, np.nan)] * MASKS
    sizes = {
        mask_format: len(
            serialize_message(
                messages.grounding_result(grounding, header, "demo", 0.1, centroids, mask_format)
            )
        )
        for mask_format in messages.MASK_FORMATS
    }
    return {
        "bytes_full": sizes["full"],
        "bytes_cropped": sizes["cropped"],
        "bytes_ratio": round(sizes["full"] / sizes["cropped"], 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cameras", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--mode", choices=sorted(QUERIES), default="refer")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--fps", type=float, default=30.0, help="frames per second per camera")
    parser.add_argument("--repeats", type=int, default=5, help="engine steps timed per count")
    args = parser.parse_args()
    os.environ.setdefault("ROS_DOMAIN_ID", str(1 + os.getpid() % 200))
    rclpy.init()
    figures = {"model": args.model, "device": args.device, "mode": args.mode, "fps": args.fps}
    for count in args.cameras:
        figures[f"node_{count}_cameras"] = node_figures(count, args)
        print(f"{count} cameras: {figures[f'node_{count}_cameras']}", file=sys.stderr)
    rclpy.try_shutdown()
    one = figures.get("node_1_cameras", {}).get("results_per_s")
    for count in args.cameras:
        if one:
            node = figures[f"node_{count}_cameras"]
            node["results_per_s_over_one_camera"] = round(node["results_per_s"] / one, 3)
        figures[f"engine_{count}_requests"] = engine_figures(count, args)
    figures.update(result_bytes(), image=f"{WIDTH}x{HEIGHT}", masks=MASKS)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
