"""The node's documented commands, run as written (over real DDS), and its launch-argument table.

docs/node.md's "Run it" block holds the commands; the README's are some of them. The node is
started with the documented command line from the venv, and everything here talks to it as a
participant with no DDS setting would (no FASTDDS_* variable): RViz, a planner, a `ros2` shell.
The `ros2 ...` commands run where ros2cli is installed (it is not on PyPI).
"""

import ast
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from node_harness import Client, NodeProcess, is_rejection, rgb_image, wait_for
from sensor_msgs.msg import Image

pytestmark = [pytest.mark.timeout(180), pytest.mark.ros, pytest.mark.node]

REPO = Path(__file__).resolve().parents[3]
NODE_DOC = (REPO / "docs" / "node.md").read_text()
RUN_IT = NODE_DOC[NODE_DOC.index("## Run it") : NODE_DOC.index("## Topics")]
README = (REPO / "README.md").read_text()
DESCRIBE = "Describe the image in detail."
DEFAULT_ENV = {k: v for k, v in os.environ.items() if not k.startswith("FASTDDS_")}


def bash_commands(text: str) -> list[str]:
    """The commands of the text's first bash block, continuation lines joined, comments
    dropped."""
    block = re.search(r"```bash\n(.*?)```", text, re.S).group(1)
    lines = [
        line.split("#")[0].rstrip() if line.lstrip().startswith("#") or " # " in line else line
        for line in block.replace("\\\n", " ").splitlines()
    ]
    return [" ".join(line.split()) for line in lines if line.strip()]


def command_starting(prefix: str) -> str:
    return next(c for c in bash_commands(RUN_IT) if c.startswith(prefix))


def test_the_readmes_robot_commands_are_the_tested_ones():
    robot = README[README.index("## On a robot") :]
    assert set(bash_commands(robot)) <= set(bash_commands(RUN_IT)), bash_commands(robot)


@pytest.fixture(scope="module")
def node():
    command = shlex.split(command_starting(".venv/bin/groundlmm_node"))
    # The venv running these tests.
    command[0] = str(Path(sys.prefix) / "bin" / "groundlmm_node")
    process = NodeProcess({}, command=command, cwd=REPO, env=DEFAULT_ENV)
    yield process
    process.close()


@pytest.fixture(scope="module")
def client(node):
    client = Client(namespace="/", env=DEFAULT_ENV)
    camera = client.create_publisher(Image, "/camera/color/image_raw")
    seen = wait_for(
        lambda: (
            client.status.get("state") == "active"
            and camera.get_subscription_count() > 0
            and client.query_pub.get_subscription_count() > 0
        ),
        90.0,
        period=0.1,
    )
    if not seen:
        reason = client.not_active_reason()
        client.close()
        raise AssertionError(
            f"a default participant does not see the node: {reason}\n{node.output()}"
        )
    client.camera = camera
    yield client
    client.close()


def test_a_default_participant_sees_the_node_started_as_documented(client):
    client.query("the red mug before any frame")
    answer = client.answer_to("the red mug before any frame")
    # the README's remap shows in the reason: the resolved topic, not `image`
    assert (
        is_rejection(answer)
        and "no image has arrived yet on /camera/color/image_raw" in answer.message
    )
    seen = int(client.status.get("frames_received", "0"))
    client.camera.publish(rgb_image(stamp_s=5.0))
    assert client.wait_status("frames_received", seen + 1)
    client.query("the red mug")
    result = client.answer_to("the red mug")
    assert result is not None and not is_rejection(result), getattr(result, "message", "no answer")
    assert result.model == "demo" and result.header.stamp.sec == 5


ROS2 = shutil.which("ros2")
needs_ros2 = pytest.mark.skipif(
    ROS2 is None,
    reason="ros2cli is not installed (it is not on PyPI): source a ROS 2 "
    "installation to run the README's ros2 commands",
)


def run_readme(prefix: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", "-c", command_starting(prefix)],
        env=DEFAULT_ENV,
        capture_output=True,
        text=True,
        timeout=60,
    )


@needs_ros2
def test_documented_ros2_commands_work_as_written(client):
    client.camera.publish(rgb_image(stamp_s=6.0))
    before = len([r for r in client.results if r.query == DESCRIBE])
    published = run_readme("ros2 topic pub")
    assert published.returncode == 0, published.stderr
    assert wait_for(lambda: len([r for r in client.results if r.query == DESCRIBE]) > before, 20.0)
    goal = run_readme("ros2 action send_goal")
    assert goal.returncode == 0 and "SUCCEEDED" in goal.stdout, goal.stdout + goal.stderr
    parameter = run_readme("ros2 param set")
    assert parameter.returncode == 0 and "successful" in parameter.stdout, (
        parameter.stdout + parameter.stderr
    )
    assert wait_for(
        lambda: (
            sum(r.query == DESCRIBE and r.mode == "describe" for r in client.results) > before + 1
        ),
        20.0,
    )
    assert all(r.successful for r in client.set_parameters(standing_query=""))


def test_launch_table_shows_every_launch_argument_and_its_default():
    """Read without ROS 2 `launch` (not on PyPI): the launch file's ARGUMENTS table, parsed."""
    source = (REPO / "groundlmm_ros" / "launch" / "groundlmm.launch.py").read_text()
    assignment = next(
        n
        for n in ast.parse(source).body
        if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", "") == "ARGUMENTS"
    )
    arguments = {name: default for name, (default, _) in ast.literal_eval(assignment.value).items()}
    table = RUN_IT[RUN_IT.index("Launch arguments") :]
    rows = dict(re.findall(r"^\| `(\w+)` \| (.+?) \|", table, re.M))
    for name, default in arguments.items():
        assert rows.get(name) == f"`{default}`" if default else rows.get(name) == '`""`', (
            name,
            rows.get(name),
        )
    assert rows["params_file"] and rows["use_rviz"] == "`false`"
