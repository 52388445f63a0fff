"""Camera frames that arrive: frames per second delivered to a subscription shaped like
groundlmm_node's image subscription (depth 5, keep last, the node's Fast DDS profile), from
camera-like publishers in other processes.

    python bench/transport.py [--seconds 10] [--fps 30] [--cameras 1 2]
                              [--sizes 640x480 1280x720] [--receive-buffer 4194304]

Every case runs in fresh processes: one subscriber (all cameras' topics, as one node serves
them) and one publisher per camera. A publisher does what a camera driver does: publishes an
rgb8 frame at `--fps` with ROS's default QoS (reliable, depth 10) from the start time on,
whoever listens; it is started either with Fast DDS's default profile (no
FASTDDS_DEFAULT_PROFILES_FILE, as realsense2_camera or usb_cam run) or with the node's
profile. The subscriber counts, per camera, the frames stamped within the `--seconds` window
and their latency (stamp -> callback). Cases, for every camera count and size:
  - publisher with the node's profile, best-effort subscription;
  - default publisher, best-effort subscription;
  - default publisher, reliable subscription;
  - default publisher, best-effort subscription whose UDP receive buffer is `--receive-buffer`
    bytes (the node's profile with receiveBufferSize; the kernel caps it at net.core.rmem_max).
The load average is read before each case. The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

PROFILE = Path(__file__).parents[1] / "groundlmm_ros/groundlmm_ros/ros/fastdds_profile.xml"
START_AFTER_S = 8.0  # from starting the processes to the first frame: start-up and discovery
GRACE_S = 1.0  # the subscriber keeps counting this long after the window for frames in flight
DEPTH = 5  # the node's image_qos_depth default
CASES = {
    "node profile publisher": ("node", "best_effort", False),
    "default publisher": ("default", "best_effort", False),
    "default publisher, reliable subscription": ("default", "reliable", False),
    "default publisher, larger receive buffer": ("default", "best_effort", True),
}


def publish(topic: str, width: int, height: int, fps: float, start: float, seconds: float):
    """A camera: frames at `fps` from `start` for `seconds`, ROS's default QoS; prints JSON."""
    import rclpy
    from sensor_msgs.msg import Image

    rclpy.init()
    node = rclpy.create_node("camera_" + topic.replace("/", "_"))
    publisher = node.create_publisher(Image, topic, 10)
    pixels = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    msg = Image(height=height, width=width, encoding="rgb8", step=3 * width)
    msg.data = pixels.tobytes()
    msg.header.frame_id = "camera_color_optical_frame"
    time.sleep(max(0.0, start - time.time()))
    matched = publisher.get_subscription_count()
    frames = int(round(fps * seconds))
    for k in range(frames):
        time.sleep(max(0.0, start + k / fps - time.time()))
        now = time.time()
        msg.header.stamp.sec, msg.header.stamp.nanosec = int(now), int((now % 1) * 1e9)
        publisher.publish(msg)
    late = time.time() - (start + (frames - 1) / fps)
    print(json.dumps({"sent": frames, "matched_at_start": matched, "late_s": round(late, 3)}))
    node.destroy_node()
    rclpy.try_shutdown()


def subscribe(topics: list[str], reliability: str, start: float, seconds: float):
    """The node's image subscription on each topic; prints per-topic counts and latencies."""
    import rclpy
    from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy
    from sensor_msgs.msg import Image

    rclpy.init()
    node = rclpy.create_node("transport_subscriber")
    qos = QoSProfile(
        depth=DEPTH,
        history=HistoryPolicy.KEEP_LAST,
        reliability=ReliabilityPolicy.RELIABLE
        if reliability == "reliable"
        else ReliabilityPolicy.BEST_EFFORT,
    )
    latencies: dict[str, list[float]] = {topic: [] for topic in topics}
    newest: dict[str, Image] = {}

    def on_image(topic: str, msg: Image) -> None:
        received = time.time()
        newest[topic] = msg  # as the node keeps each camera's newest frame
        stamp = msg.header.stamp.sec + msg.header.stamp.nanosec * 1e-9
        if start <= stamp < start + seconds:
            latencies[topic].append(1000 * (received - stamp))

    for topic in topics:
        node.create_subscription(Image, topic, lambda msg, t=topic: on_image(t, msg), qos)
    while time.time() < start + seconds + GRACE_S:
        rclpy.spin_once(node, timeout_sec=0.05)
    print(json.dumps({topic: latencies[topic] for topic in topics}))
    node.destroy_node()
    rclpy.try_shutdown()


def profile_with_receive_buffer(size: int, folder: str) -> str:
    """A copy of the node's profile whose UDP transport has a `size`-byte receive buffer."""
    text = re.sub(r"\s*<receiveBufferSize>\d+</receiveBufferSize>", "", PROFILE.read_text())
    text = text.replace(
        "<type>UDPv4</type>",
        f"<type>UDPv4</type>\n        <receiveBufferSize>{size}</receiveBufferSize>",
    )
    path = os.path.join(folder, "receive_buffer_profile.xml")
    Path(path).write_text(text)
    return path


def environment(profile: str | None) -> dict:
    """This environment without Fast DDS settings, plus `profile` when given."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FASTDDS_")}
    if profile:
        env["FASTDDS_DEFAULT_PROFILES_FILE"] = profile
    return env


def run_case(case: str, cameras: int, size: str, args, folder: str) -> dict:
    publisher_profile, reliability, larger_buffer = CASES[case]
    width, height = (int(v) for v in size.split("x"))
    topics = [f"cam{k}/image" for k in range(cameras)]
    start = time.time() + START_AFTER_S
    timing = ["--start", str(start), "--seconds", str(args.seconds)]
    me = [sys.executable, __file__]
    subscriber_profile = (
        profile_with_receive_buffer(args.receive_buffer, folder) if larger_buffer else str(PROFILE)
    )
    load = os.getloadavg()[0]
    subscriber = subprocess.Popen(
        [*me, "--role", "subscriber", "--topics", *topics, "--reliability", reliability, *timing],
        env=environment(subscriber_profile),
        stdout=subprocess.PIPE,
        text=True,
    )
    publishers = [
        subprocess.Popen(
            [*me, "--role", "publisher", "--topics", topic, "--sizes", size, "--fps"]
            + [str(args.fps), *timing],
            env=environment(str(PROFILE) if publisher_profile == "node" else None),
            stdout=subprocess.PIPE,
            text=True,
        )
        for topic in topics
    ]
    timeout = START_AFTER_S + args.seconds + GRACE_S + 60
    sent = [json.loads(p.communicate(timeout=timeout)[0].splitlines()[-1]) for p in publishers]
    received = json.loads(subscriber.communicate(timeout=timeout)[0].splitlines()[-1])
    delivered = [len(received[topic]) for topic in topics]
    latencies = [ms for topic in topics for ms in received[topic]]
    return {
        "case": case,
        "cameras": cameras,
        "image": size,
        "sent": [s["sent"] for s in sent],
        "delivered": delivered,
        "delivered_per_s": [round(d / args.seconds, 1) for d in delivered],
        "delivered_fraction": round(sum(delivered) / sum(s["sent"] for s in sent), 3),
        "latency_ms_p50": round(float(np.percentile(latencies, 50)), 1) if latencies else None,
        "latency_ms_p95": round(float(np.percentile(latencies, 95)), 1) if latencies else None,
        "matched_at_start": all(s["matched_at_start"] for s in sent),
        "publisher_late_s": max(s["late_s"] for s in sent),
        "load_average": round(load, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--fps", type=float, default=30.0)
    parser.add_argument("--cameras", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--sizes", nargs="+", default=["640x480", "1280x720"])
    parser.add_argument("--receive-buffer", type=int, default=4 * 1024 * 1024)
    parser.add_argument("--cases", nargs="+", choices=sorted(CASES), default=list(CASES))
    parser.add_argument("--role", choices=["bench", "publisher", "subscriber"], default="bench")
    parser.add_argument("--topics", nargs="+")
    parser.add_argument("--reliability", choices=["best_effort", "reliable"])
    parser.add_argument("--start", type=float)
    args = parser.parse_args()
    if args.role == "publisher":
        width, height = (int(v) for v in args.sizes[0].split("x"))
        return publish(args.topics[0], width, height, args.fps, args.start, args.seconds)
    if args.role == "subscriber":
        return subscribe(args.topics, args.reliability, args.start, args.seconds)
    os.environ.setdefault("ROS_DOMAIN_ID", str(1 + os.getpid() % 200))
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for size in args.sizes:
            for cameras in args.cameras:
                for case in args.cases:
                    rows.append(run_case(case, cameras, size, args, folder))
                    print(json.dumps(rows[-1]), file=sys.stderr)
    print(
        json.dumps(
            {
                "fps": args.fps,
                "seconds": args.seconds,
                "receive_buffer": args.receive_buffer,
                "rmem_max": int(Path("/proc/sys/net/core/rmem_max").read_text()),
                "cpus": os.cpu_count(),
                "rows": rows,
            }
        )
    )


if __name__ == "__main__":
    main()
