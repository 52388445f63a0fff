"""Launch groundlmm_node (and optionally RViz).

    ros2 launch groundlmm_ros groundlmm.launch.py model:=difflmm-7b device:=cuda dtype:=float16 \
        image_topic:=/camera/color/image_raw use_rviz:=true

Arguments left empty keep the value from params_file.
"""
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction
from launch.conditions import IfCondition
from launch.substitutions import LaunchConfiguration, PathJoinSubstitution
from launch_ros.actions import Node
from launch_ros.substitutions import FindPackageShare

ARGUMENTS = {
    "model": ("", "model preset or directory (empty: params_file's)"),
    "device": ("", "torch device, e.g. cuda (empty: params_file's)"),
    "dtype": ("", "auto, float32, float16 or bfloat16 (empty: params_file's)"),
    "namespace": ("", "namespace of the node and its relative topics"),
    "image_topic": ("/camera/color/image_raw", "colour images (sensor_msgs/Image; + /compressed when compressed)"),
    "depth_topic": ("/camera/aligned_depth_to_color/image_raw", "depth registered to the colour image"),
    "camera_info_topic": ("/camera/color/camera_info", "the colour camera's CameraInfo"),
    "query_topic": ("query", "std_msgs/String queries"),
    "use_depth": ("", "true: 3D centroids from depth (empty: params_file's)"),
}
STRING_PARAMETERS = ("model", "device", "dtype")


def _node(context):
    value = {name: LaunchConfiguration(name).perform(context) for name in ARGUMENTS}
    overrides = {name: value[name] for name in STRING_PARAMETERS if value[name]}
    if value["use_depth"]:
        overrides["use_depth"] = value["use_depth"].lower() == "true"
    return [Node(
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
    )]


def generate_launch_description():
    share = FindPackageShare("groundlmm_ros")
    return LaunchDescription([
        *[DeclareLaunchArgument(name, default_value=default, description=description)
          for name, (default, description) in ARGUMENTS.items()],
        DeclareLaunchArgument("params_file", default_value=PathJoinSubstitution([share, "config", "params.yaml"]),
                              description="parameters of groundlmm_node"),
        DeclareLaunchArgument("use_rviz", default_value="false", description="start RViz with the overlay and markers"),
        OpaqueFunction(function=_node),
        Node(package="rviz2", executable="rviz2", arguments=["-d", PathJoinSubstitution([share, "config",
                                                                                          "groundlmm.rviz"])],
             condition=IfCondition(LaunchConfiguration("use_rviz")), output="screen"),
    ])
