"""Launch groundlmm_node (and optionally RViz).

    ros2 launch groundlmm_ros groundlmm.launch.py model:=difflmm-7b device:=cuda dtype:=float16 \
        image_topic:=/camera/color/image_raw use_rviz:=true

Arguments left empty keep the value from params_file. Every argument is checked before anything
starts, so a bad one (or use_rviz:=true without rviz2) fails the launch without leaving a node
behind.

Camera drivers started after this launch description in the same launch (e.g. a lab's launch
file that includes this one, then the driver's) load the node's Fast DDS profile: this sets
FASTDDS_DEFAULT_PROFILES_FILE unless the environment already names a profile or
camera_dds_profile:=false. With Fast DDS's default profile a driver sends a camera-sized frame
over UDP, and frames are lost (bench/transport.py).
"""

import tempfile
from pathlib import Path

import yaml
from ament_index_python.packages import PackageNotFoundError, get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction, SetEnvironmentVariable
from launch.substitutions import LaunchConfiguration, PathJoinSubstitution
from launch_ros.actions import Node
from launch_ros.substitutions import FindPackageShare

from groundlmm_ros.ros.dds import installed_profile
from groundlmm_ros.ros.params import PARAMETERS
from groundlmm_ros.ros.visualization import rviz_config

ARGUMENTS = {
    "model": ("", "model preset or directory (empty: params_file's)"),
    "device": ("", "torch device, e.g. cuda (empty: params_file's)"),
    "dtype": ("", "auto, float32, float16 or bfloat16 (empty: params_file's)"),
    "namespace": ("", "namespace of the node and its relative topics"),
    "image_topic": (
        "/camera/color/image_raw",
        "colour images (sensor_msgs/Image; + /compressed when compressed)",
    ),
    "depth_topic": (
        "/camera/aligned_depth_to_color/image_raw",
        "depth registered to the colour image",
    ),
    "camera_info_topic": ("/camera/color/camera_info", "the colour camera's CameraInfo"),
    "query_topic": ("query", "std_msgs/String queries"),
    "use_depth": ("", "true: 3D centroids from depth (empty: params_file's)"),
    "camera_dds_profile": (
        "true",
        "true: processes started after this in the same launch (camera drivers) load the node's "
        "Fast DDS profile, unless FASTDDS_DEFAULT_PROFILES_FILE is already set",
    ),
    "rviz_frame": (
        "camera_color_optical_frame",
        "RViz's fixed frame: the frame_id of the camera's images",
    ),
}
NODE_NAME = "groundlmm_node"
SHARE = FindPackageShare("groundlmm_ros")
STRING_PARAMETERS = ("model", "device", "dtype")
BOOLEANS = {
    "true": True,
    "1": True,
    "false": False,
    "0": False,
}  # what launch's own conditions accept


def _boolean(name: str, text: str) -> bool:
    if text.lower() not in BOOLEANS:
        raise ValueError(f"launch argument {name}:={text!r}: expected true or false")
    return BOOLEANS[text.lower()]


def _actions(context):
    names = [*ARGUMENTS, "use_rviz", "params_file"]
    value = {name: LaunchConfiguration(name).perform(context) for name in names}
    overrides = {name: value[name] for name in STRING_PARAMETERS if value[name]}
    if value["use_depth"]:
        overrides["use_depth"] = _boolean("use_depth", value["use_depth"])
    profile = []
    wanted = _boolean("camera_dds_profile", value["camera_dds_profile"])
    if wanted and "FASTDDS_DEFAULT_PROFILES_FILE" not in context.environment:
        profile = [
            SetEnvironmentVariable("FASTDDS_DEFAULT_PROFILES_FILE", str(installed_profile()))
        ]
    rviz = []
    if _boolean("use_rviz", value["use_rviz"]):
        try:
            get_package_share_directory("rviz2")
        except PackageNotFoundError:
            raise RuntimeError(
                "use_rviz:=true but the package 'rviz2' is not installed "
                "(install ros-<distro>-rviz2, or launch with use_rviz:=false)"
            ) from None
        rviz = [
            Node(
                package="rviz2",
                executable="rviz2",
                arguments=["-d", _rviz_config_file(value)],
                output="screen",
            )
        ]
    return [
        *profile,
        Node(
            package="groundlmm_ros",
            executable="groundlmm_node",
            name=NODE_NAME,
            namespace=value["namespace"],
            parameters=[LaunchConfiguration("params_file"), overrides],
            remappings=[
                ("image", value["image_topic"]),
                ("image/compressed", value["image_topic"] + "/compressed"),
                ("depth", value["depth_topic"]),
                ("camera_info", value["camera_info_topic"]),
                ("query", value["query_topic"]),
            ],
            output="screen",
            emulate_tty=True,
        ),
        *rviz,
    ]


def _rviz_config_file(value) -> str:
    """RViz's config for this node's namespace, cameras and frame, in a new temporary folder (the
    installed config/groundlmm.rviz is its template)."""
    template = Path(get_package_share_directory("groundlmm_ros")) / "config" / "groundlmm.rviz"
    node = "/" + "/".join(filter(None, [*value["namespace"].split("/"), NODE_NAME]))
    config = Path(tempfile.mkdtemp(prefix="groundlmm_rviz_")) / "groundlmm.rviz"
    cameras = _cameras(value["params_file"])
    config.write_text(rviz_config(template.read_text(), node, cameras, value["rviz_frame"]))
    return str(config)


def _cameras(params_file: str) -> list[str]:
    """The `cameras` parameter that params_file gives the node (its default if none)."""
    entries = yaml.safe_load(Path(params_file).read_text()) or {}
    for entry in entries.values():
        cameras = ((entry or {}).get("ros__parameters") or {}).get("cameras")
        if cameras:
            return cameras
    return PARAMETERS["cameras"][0]


def generate_launch_description():
    return LaunchDescription(
        [
            *[
                DeclareLaunchArgument(name, default_value=default, description=description)
                for name, (default, description) in ARGUMENTS.items()
            ],
            DeclareLaunchArgument(
                "params_file",
                default_value=PathJoinSubstitution([SHARE, "config", "params.yaml"]),
                description="parameters of groundlmm_node",
            ),
            DeclareLaunchArgument(
                "use_rviz",
                default_value="false",
                description="start RViz with the overlay and markers",
            ),
            OpaqueFunction(function=_actions),
        ]
    )
