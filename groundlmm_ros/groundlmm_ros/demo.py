"""`groundlmm demo`: the node doing its real job on the shipped demo model.

Starts groundlmm_node (model "demo") as its own process, plays a synthetic camera that
publishes held-out scenes on `image`, asks the `~/ground` action one describe question
and one refer query per object about the newest frame, prints every answer with its
grounded phrases (and, for refer, whether the point hit the object: the scene's ground
truth is known), and saves the node's `~/overlay` images into a folder.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import rclpy
from rclpy.action import ActionClient
from rclpy.node import Node
from rclpy.qos import QoSProfile
from sensor_msgs.msg import Image

from groundlmm_msgs.action import Ground
from groundlmm_ros.engine.engine import GCG_QUESTION
from groundlmm_ros.evaluation import held_out_scenes, point_in_mask
from groundlmm_ros.ros.conversion import numpy_to_image, to_rgb8
from groundlmm_ros.world import referring_expression

NODE = "groundlmm_node"
UPSCALE = 3  # the camera publishes the 128 px scenes at 384 px, easier to look at
CAMERA_HZ = 10.0


class DemoClient(Node):
    """Synthetic camera + action client + overlay recorder."""

    def __init__(self):
        super().__init__("groundlmm_demo")
        self.frame: np.ndarray | None = None  # (H, W, 3) uint8 RGB being published
        self.frame_since = None  # rclpy Time of the first message of this frame
        self.camera = self.create_publisher(Image, "image", QoSProfile(depth=2))
        self.create_timer(1.0 / CAMERA_HZ, self.publish_frame)
        self.overlays: list[np.ndarray] = []
        self.create_subscription(
            Image,
            f"{NODE}/overlay",
            lambda m: self.overlays.append(to_rgb8(m)),
            QoSProfile(depth=10),
        )
        self.ground = ActionClient(self, Ground, f"{NODE}/ground")

    def show(self, frame: np.ndarray) -> None:
        self.frame = frame
        self.frame_since = self.get_clock().now()

    def publish_frame(self) -> None:
        if self.frame is not None:
            msg = numpy_to_image(self.frame, "rgb8")
            msg.header.stamp = self.get_clock().now().to_msg()
            msg.header.frame_id = "synthetic_camera"
            self.camera.publish(msg)

    def spin_until(self, future, timeout: float):
        rclpy.spin_until_future_complete(self, future, timeout_sec=timeout)
        if not future.done():
            raise TimeoutError(f"no answer from {NODE} within {timeout:.0f} s")
        return future.result()

    def ask(self, query: str, mode: str, timeout: float = 30.0):
        """One Ground goal on the newest camera frame -> GroundingResult (raises on failure)."""
        handle = self.spin_until(
            self.ground.send_goal_async(Ground.Goal(query=query, mode=mode)), timeout
        )
        if not handle.accepted:
            raise RuntimeError(f"{NODE} rejected the goal {query!r}")
        result = self.spin_until(handle.get_result_async(), timeout).result
        if not result.success:
            raise RuntimeError(f"{NODE} failed on {query!r}: {result.message}")
        return result.result

    def wait_overlay(self, count: int, timeout: float = 3.0) -> np.ndarray | None:
        end = time.monotonic() + timeout
        while len(self.overlays) < count and time.monotonic() < end:
            rclpy.spin_once(self, timeout_sec=0.1)
        return self.overlays[count - 1] if len(self.overlays) >= count else None


def start_node(model: str) -> subprocess.Popen:
    env = {**os.environ, "AMENT_PREFIX_PATH": os.environ.get("AMENT_PREFIX_PATH") or sys.prefix}
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "groundlmm_ros.ros.process",
            "--ros-args",
            "-p",
            f"model:={model}",
            "-p",
            "image_qos_reliability:=reliable",
        ],
        env=env,
    )


def run(
    out_dir: str, n_scenes: int = 3, model: str = "demo", startup_timeout: float = 120.0
) -> None:
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    node_process = start_node(model)
    rclpy.init()
    client = DemoClient()
    try:
        print(f"waiting for {NODE} (model {model!r}) to load ...", flush=True)
        if not client.ground.wait_for_server(timeout_sec=startup_timeout):
            raise TimeoutError(
                f"{NODE} did not offer its ground action within {startup_timeout:.0f} s"
            )
        start = time.monotonic()
        hits = total = asked = 0
        for k, scene in enumerate(held_out_scenes(n_scenes)):
            frame = cv2.resize(
                scene.image, None, fx=UPSCALE, fy=UPSCALE, interpolation=cv2.INTER_NEAREST
            )
            client.show(frame)
            # Let the node receive this frame before asking about "the newest frame".
            end = time.monotonic() + 1.0
            while time.monotonic() < end:
                rclpy.spin_once(client, timeout_sec=0.1)
            print(f'\nscene {k}: ground truth "{scene.caption}"')
            queries = [(GCG_QUESTION, "describe")] + [
                (referring_expression(o), "refer") for o in scene.objects
            ]
            for q, (query, mode) in enumerate(queries):
                result = client.ask(query, mode)
                asked += 1
                print(
                    f"  {mode:8s} {query!r} -> {result.answer!r} "
                    f"({result.inference_time * 1000:.0f} ms)"
                )
                for phrase in result.phrases:
                    line = f"      [{phrase.phrase}] point ({phrase.point_x}, {phrase.point_y})"
                    if mode == "refer":
                        target = scene.objects[q - 1]
                        hit = point_in_mask(
                            (phrase.point_x // UPSCALE, phrase.point_y // UPSCALE), target.mask
                        )
                        hits, total = hits + hit, total + 1
                        line += " inside the object" if hit else " MISSES the object"
                    print(line)
                overlay = client.wait_overlay(asked)  # the node publishes one overlay per result
                if overlay is not None:
                    path = out / f"scene{k}_{q}_{mode}.png"
                    cv2.imwrite(str(path), cv2.cvtColor(overlay, cv2.COLOR_RGB2BGR))
        print(
            f"\nrefer points inside their object: {hits}/{total}; "
            f"{time.monotonic() - start:.0f} s after set-up; overlays in {out}"
        )
    finally:
        client.destroy_node()
        rclpy.try_shutdown()
        node_process.send_signal(signal.SIGINT)
        try:
            node_process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            node_process.kill()
