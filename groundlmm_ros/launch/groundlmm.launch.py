"""Launch groundlmm_node (and optionally RViz).

    ros2 launch groundlmm_ros groundlmm.launch.py model:=difflmm-7b device:=cuda dtype:=float16 \
        image_topic:=/camera/color/image_raw use_rviz:=true

Arguments left empty keep the value from params_file. Every argument is checked before anything
starts, so a bad one (or use_rviz:=true without rviz2) fails the launch without leaving a node
behind.
"""

from ament_index_python.packages import PackageNotFoundError, get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction
from launch.substitutions import LaunchConfiguration, PathJoinSubstitution
from launch_ros.actions import Node
from launch_ros.substitutions import FindPackageShare

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
}
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
    value = {name: LaunchConfiguration(name).perform(context) for name in [*ARGUMENTS, "use_rviz"]}
    overrides = {name: value[name] for name in STRING_PARAMETERS if value[name]}
    if value["use_depth"]:
        overrides["use_depth"] = _boolean("use_depth", value["use_depth"])
    rviz = []
    if _boolean("use_rviz", value["use_rviz"]):
        try:
            get_package_share_directory("rviz2")
        except PackageNotFoundError:
            raise RuntimeError(
                "use_rviz:=true but the package 'rviz2' is not installed "
                "(install ros-<distro>-rviz2, or launch with use_rviz:=false)"
            ) from None
        config = PathJoinSubstitution([SHARE, "config", "groundlmm.rviz"])
        rviz = [
            Node(package="rviz2", executable="rviz2", arguments=["-d", config], output="screen")
        ]
    return [
        Node(
            package="groundlmm_ros",
            executable="groundlmm_node",
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
