"""The launch file, params.yaml and the RViz config agree with the node.

The launch file is loaded with ROS 2 `launch`'s own loader where `launch` is
installed (a ROS 2 installation); ros2/launch is not on PyPI, so in the
PyPI-wheel venv that test skips and says so.
"""
import dataclasses
import importlib
from pathlib import Path

import pytest
import yaml

from groundlmm_ros.ros.params import PARAMETERS, NodeParams, check_parameters, markdown_table

PACKAGE = Path(__file__).resolve().parents[1]
LAUNCH_FILE = PACKAGE / "launch" / "groundlmm.launch.py"


def _ros_launch():
    try:
        launch = importlib.import_module("launch")
    except ImportError:
        launch = None
    if not hasattr(launch, "LaunchDescription"):  # absent, or an unrelated namespace package
        pytest.skip("ROS 2 `launch` is not installed (it is not on PyPI; source a ROS 2 installation, or pip "
                    "install ros2/launch and ros2/launch_ros from source, to run this test)")
    return importlib.import_module("launch.launch_description_sources")


def test_launch_file_loads_with_ros_launch_and_declares_its_arguments():
    sources = _ros_launch()
    description = sources.get_launch_description_from_python_launch_file(str(LAUNCH_FILE))
    arguments = {argument.name for argument in description.get_launch_arguments()}
    assert {"model", "device", "namespace", "image_topic", "depth_topic", "params_file", "use_rviz"} <= arguments


def test_params_yaml_sets_every_parameter_to_its_default():
    values = yaml.safe_load((PACKAGE / "config" / "params.yaml").read_text())["/**"]["ros__parameters"]
    assert list(values) == list(PARAMETERS)
    for name, value in values.items():
        default = PARAMETERS[name][0]
        assert type(value) is type(default) and value == default, name
    assert check_parameters(values) == ""


def test_readme_parameter_table_is_the_generated_one():
    readme = (PACKAGE.parent / "README.md").read_text()
    begin, end = readme.index("<!-- parameters:begin"), readme.index("<!-- parameters:end -->")
    table = readme[readme.index("\n", begin) + 1:end].strip()
    assert table == markdown_table(), "README's parameter table is stale: python -m groundlmm_ros.ros.params"
    assert len(table.splitlines()) == len(PARAMETERS) + 2


def test_node_params_have_one_field_per_parameter_and_limits_have_one_knob():
    params = NodeParams(**{name: default for name, (default, _) in PARAMETERS.items()})
    assert [f.name for f in dataclasses.fields(params)] == list(PARAMETERS)
    assert params.max_new_tokens == 64 and params.engine_kwargs() == {}
    problem = check_parameters({"engine_options": '{"max_new_tokens": 512, "nms_iou": 0.75}'})
    assert "use the node parameter max_new_tokens" in problem
    assert check_parameters({"engine_options": '{"nms_iou": 0.75}'}) == ""


def test_rviz_config_shows_the_overlay_and_markers():
    config = yaml.safe_load((PACKAGE / "config" / "groundlmm.rviz").read_text())
    displays = {d["Class"]: d for d in config["Visualization Manager"]["Displays"]}
    assert displays["rviz_default_plugins/Image"]["Topic"]["Value"] == "/groundlmm_node/overlay"
    assert displays["rviz_default_plugins/MarkerArray"]["Topic"]["Value"] == "/groundlmm_node/markers"
