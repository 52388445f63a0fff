"""The real-workspace path: `colcon build --symlink-install` in a fresh ROS 2
workspace whose src/ links to this repository's two packages, then what
`source install/setup.bash`, `ros2 run` and `ros2 launch` rely on.

colcon comes from PyPI into the venv (requirements-dev.txt): its bin/ first on PATH
so CMake finds the venv's python, and AMENT_PREFIX_PATH naming the venv, the
underlay that holds the ROS 2 wheels.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.ros, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
VENV = Path(sys.prefix)  # the venv running this test
PACKAGES = ("groundlmm_msgs", "groundlmm_ros")


def venv_env():
    env = dict(
        os.environ,
        AMENT_PREFIX_PATH=str(VENV),
        PATH=f"{VENV / 'bin'}{os.pathsep}{os.environ['PATH']}",
    )
    env.pop("PYTHONPATH", None)
    return env


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A built workspace: <ws>/src/<package> -> this repository's packages, <ws>/install/."""
    ws = tmp_path_factory.mktemp("ws")
    (ws / "src").mkdir()
    for package in PACKAGES:
        (ws / "src" / package).symlink_to(REPO / package, target_is_directory=True)
    build = subprocess.run(
        [
            str(VENV / "bin" / "colcon"),
            "build",
            "--symlink-install",
            "--event-handlers",
            "console_direct-",
            "--cmake-args",
            "-DBUILD_TESTING=OFF",
        ],
        cwd=ws,
        env=venv_env(),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert build.returncode == 0, (
        f"colcon build failed:\n{build.stdout[-3000:]}\n{build.stderr[-3000:]}"
    )
    for package in PACKAGES:
        assert f"Finished <<< {package}" in build.stdout
    return ws


def in_sourced_shell(ws, python_code):
    """Run python_code with the venv's python in a shell that sourced install/setup.bash; its
    stdout as JSON."""
    shell = f'source install/setup.bash && exec "{VENV / "bin" / "python"}" -c "$0"'
    result = subprocess.run(
        ["bash", "-c", shell, python_code],
        cwd=ws,
        env=venv_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_generated_interfaces_import_from_the_install_space(workspace):
    found = in_sourced_shell(
        workspace,
        """
import json
from ament_index_python.packages import get_package_share_directory
import groundlmm_msgs.msg
from groundlmm_msgs.action import Ground
from groundlmm_msgs.msg import GroundingResult
import groundlmm_ros
print(json.dumps({
    "msgs_module": groundlmm_msgs.msg.__file__,
    "result_fields": list(GroundingResult.get_fields_and_field_types()),
    "goal_fields": list(Ground.Goal.get_fields_and_field_types()),
    "msgs_share": get_package_share_directory("groundlmm_msgs"),
    "ros_share": get_package_share_directory("groundlmm_ros"),
    "ros_package": list(groundlmm_ros.__path__),
}))
""",
    )
    install = workspace / "install"
    assert Path(found["msgs_module"]).is_relative_to(
        install / "groundlmm_msgs"
    )  # not the venv's copy
    assert found["result_fields"] == [
        "header",
        "success",
        "message",
        "query",
        "mode",
        "answer",
        "phrases",
        "model",
        "inference_time",
        "source",
        "last_grounded",
    ]
    assert found["goal_fields"] == ["query", "mode", "image", "camera", "track"]
    assert found["msgs_share"] == str(install / "groundlmm_msgs" / "share" / "groundlmm_msgs")
    assert found["ros_share"] == str(install / "groundlmm_ros" / "share" / "groundlmm_ros")
    # --symlink-install: the Python package is the source tree, so edits are live.
    assert [Path(p).resolve() for p in found["ros_package"]] == [
        REPO / "groundlmm_ros" / "groundlmm_ros"
    ]


def test_ros2_run_finds_the_node_executable(workspace):
    # `ros2 run groundlmm_ros groundlmm_node` runs <prefix>/lib/groundlmm_ros/groundlmm_node.
    node = workspace / "install" / "groundlmm_ros" / "lib" / "groundlmm_ros" / "groundlmm_node"
    assert node.is_file() and os.access(node, os.X_OK)
    # It must start the venv's python (the one with the ML stack), not the system's.
    shebang = node.read_text().splitlines()[0]
    assert shebang.startswith("#!") and Path(shebang[2:]).parent == VENV / "bin", shebang
    # The script loads the console_scripts entry point; its module must be there (found, not
    # imported: importing it would load the ML stack).
    entry = in_sourced_shell(
        workspace,
        """
import importlib.metadata, importlib.util, json
point, = [
    e
    for e in importlib.metadata.distribution("groundlmm-ros").entry_points
    if e.name == "groundlmm_node"
]
print(json.dumps({"value": point.value, "origin": importlib.util.find_spec(point.module).origin}))
""",
    )
    assert entry["value"] == "groundlmm_ros.ros.process:main"
    assert (
        Path(entry["origin"]).resolve()
        == REPO / "groundlmm_ros" / "groundlmm_ros" / "ros" / "process.py"
    )


def test_ros2_launch_finds_the_installed_share_files(workspace):
    share = workspace / "install" / "groundlmm_ros" / "share" / "groundlmm_ros"
    assert (share / "package.xml").resolve() == REPO / "groundlmm_ros" / "package.xml"
    for folder in ("launch", "config", "model"):
        for source in sorted((REPO / "groundlmm_ros" / folder).glob("*")):
            assert (share / folder / source.name).resolve() == source.resolve(), (
                f"{folder}/{source.name} not installed"
            )


def test_the_node_profile_is_installed_for_other_processes(workspace):
    found = in_sourced_shell(
        workspace,
        """
import json
from groundlmm_ros.ros.dds import installed_profile
print(json.dumps({"profile": str(installed_profile())}))
""",
    )
    share = workspace / "install" / "groundlmm_ros" / "share" / "groundlmm_ros"
    assert found["profile"] == str(share / "fastdds_profile.xml")
    node_profile = REPO / "groundlmm_ros" / "groundlmm_ros" / "ros" / "fastdds_profile.xml"
    assert Path(found["profile"]).resolve() == node_profile


def test_the_launch_file_offers_the_installed_profile_to_what_it_starts_after(workspace):
    # Performed, nothing started: the launch file's first action (before the node) sets
    # FASTDDS_DEFAULT_PROFILES_FILE for the processes the launch starts from then on.
    pytest.importorskip("launch_ros", reason="ROS 2 launch_ros is not installed (not on PyPI)")
    found = in_sourced_shell(
        workspace,
        """
import json, os
from ament_index_python.packages import get_package_share_directory
from launch import LaunchContext
from launch.launch_description_sources import get_launch_description_from_python_launch_file
os.environ.pop("FASTDDS_DEFAULT_PROFILES_FILE", None)
share = get_package_share_directory("groundlmm_ros")
description = get_launch_description_from_python_launch_file(share + "/launch/groundlmm.launch.py")
context = LaunchContext()
for argument in description.get_launch_arguments():
    context.launch_configurations[argument.name] = ""
context.launch_configurations.update(use_rviz="false", camera_dds_profile="true")
first, node = description.entities[-1].execute(context)
first.execute(context)
print(json.dumps({"first": type(first).__name__, "node": type(node).__name__,
                  "variable": os.environ.get("FASTDDS_DEFAULT_PROFILES_FILE")}))
""",
    )
    share = workspace / "install" / "groundlmm_ros" / "share" / "groundlmm_ros"
    assert found == {
        "first": "SetEnvironmentVariable",
        "node": "Node",
        "variable": str(share / "fastdds_profile.xml"),
    }
