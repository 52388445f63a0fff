"""The RViz config the launch file writes: the template's displays on the topics of the node's
namespace, name and cameras, and the camera's frame as the fixed frame."""

from pathlib import Path

import yaml

from groundlmm_ros.ros.node import CAMERA_OUTPUTS, camera_topic
from groundlmm_ros.ros.visualization import rviz_config

TEMPLATE = (Path(__file__).resolve().parents[2] / "config" / "groundlmm.rviz").read_text()


def displays(config: str) -> dict[str, dict]:
    loaded = yaml.safe_load(config)["Visualization Manager"]["Displays"]
    return {display["Name"]: display for display in loaded}


def test_each_camera_gets_the_outputs_on_its_own_topics_under_the_namespace():
    cameras = ["head", "wrist"]
    config = rviz_config(TEMPLATE, "/robot/groundlmm_node", cameras, "head_optical")
    shown = displays(config)
    assert yaml.safe_load(config)["Visualization Manager"]["Global Options"]["Fixed Frame"] == (
        "head_optical"
    )
    for camera in cameras:
        for name, output in (
            ("Grounding overlay", "overlay"),
            ("Grounded phrases", "markers"),
            ("Mask points", "points"),
        ):
            # the node's private topic of that output: ~/<camera>/<output>
            private = camera_topic(camera, CAMERA_OUTPUTS[output][1], private=True)
            topic = shown[f"{name} ({camera})"]["Topic"]["Value"]
            assert topic == "/robot/groundlmm_node/" + private.removeprefix("~/")
    # the template's other settings are kept: QoS of each display, the grid
    assert shown["Grounding overlay (wrist)"]["Topic"]["Reliability Policy"] == "Reliable"
    assert "Grid" in shown and len(shown) == 1 + 3 * len(cameras)


def test_the_plain_camera_without_namespace_is_the_template():
    config = rviz_config(TEMPLATE, "/groundlmm_node", [""], "camera_color_optical_frame")
    assert yaml.safe_load(config) == yaml.safe_load(TEMPLATE)
