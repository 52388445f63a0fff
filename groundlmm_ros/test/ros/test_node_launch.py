"""The launch file, params.yaml and the RViz config agree with the node.

The launch file is loaded with ROS 2 `launch`'s own loader where `launch` is
installed (a ROS 2 installation); ros2/launch is not on PyPI, so in the
PyPI-wheel venv that test skips and says so.
"""

import dataclasses
import importlib
import importlib.util
from pathlib import Path

import pytest
import yaml

from groundlmm_ros.ros.params import PARAMETERS, NodeParams, check_parameters

PACKAGE = Path(__file__).resolve().parents[2]
LAUNCH_FILE = PACKAGE / "launch" / "groundlmm.launch.py"


def _ros_launch():
    try:
        launch = importlib.import_module("launch")
    except ImportError:
        launch = None
    if not hasattr(launch, "LaunchDescription") or importlib.util.find_spec("launch_ros") is None:
        pytest.skip(
            "ROS 2 `launch` and `launch_ros` are not installed (not on PyPI, and launch_ros "
            "also needs "
            "composition_interfaces, which is not on PyPI either): "
            "source a ROS 2 installation to run this"
        )
    return importlib.import_module("launch.launch_description_sources")


def test_launch_file_loads_with_ros_launch_and_declares_its_arguments():
    sources = _ros_launch()
    description = sources.get_launch_description_from_python_launch_file(str(LAUNCH_FILE))
    arguments = {argument.name for argument in description.get_launch_arguments()}
    assert {
        "model",
        "device",
        "namespace",
        "image_topic",
        "depth_topic",
        "params_file",
        "use_rviz",
    } <= arguments


def _node_actions(**arguments):
    """What the launch file starts for these arguments (performed, nothing started); the
    booleans false unless given (camera_dds_profile:=true needs the package installed:
    test_colcon_workspace.py)."""
    sources = _ros_launch()
    from launch import LaunchContext

    description = sources.get_launch_description_from_python_launch_file(str(LAUNCH_FILE))
    context = LaunchContext()
    for argument in description.get_launch_arguments():
        context.launch_configurations[argument.name] = arguments.get(argument.name, "")
    for boolean in ("use_rviz", "camera_dds_profile"):
        context.launch_configurations[boolean] = arguments.get(boolean, "false")
    opaque = description.entities[-1]
    return opaque.execute(context)


def test_launch_boolean_arguments_are_checked_before_anything_starts():
    assert len(_node_actions(use_depth="1")) == 1
    with pytest.raises(ValueError, match="use_depth:='yes': expected true or false"):
        _node_actions(use_depth="yes")
    try:
        importlib.import_module("ament_index_python.packages").get_package_share_directory("rviz2")
    except LookupError:
        with pytest.raises(RuntimeError, match="'rviz2' is not installed"):
            _node_actions(use_rviz="true")
    else:
        assert len(_node_actions(use_rviz="true")) == 2


def test_a_profile_the_environment_names_is_left_to_the_camera_drivers(monkeypatch):
    monkeypatch.setenv("FASTDDS_DEFAULT_PROFILES_FILE", "/lab/own_profile.xml")
    (node,) = _node_actions(camera_dds_profile="true")
    assert type(node).__name__ == "Node"
    with pytest.raises(ValueError, match="camera_dds_profile:='yes': expected true or false"):
        _node_actions(camera_dds_profile="yes")


def test_params_yaml_sets_every_parameter_to_its_default():
    values = yaml.safe_load((PACKAGE / "config" / "params.yaml").read_text())["/**"][
        "ros__parameters"
    ]
    assert list(values) == list(PARAMETERS)
    for name, value in values.items():
        default = PARAMETERS[name][0]
        assert type(value) is type(default) and value == default, name
    assert check_parameters(values) == ""


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
    assert (
        displays["rviz_default_plugins/MarkerArray"]["Topic"]["Value"] == "/groundlmm_node/markers"
    )
