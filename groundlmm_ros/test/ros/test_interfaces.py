"""Every groundlmm_msgs interface survives CDR serialization unchanged, and documents its fields
where `ros2 interface show` and the generated interfaces show them.

Each message is filled with values that differ from its defaults in every
field (checked, so a field added later and forgotten here fails the test),
serialized with rclpy.serialization and deserialized into an equal message.
"""

import math
from pathlib import Path

import numpy as np
import pytest
from builtin_interfaces.msg import Time
from geometry_msgs.msg import Point
from rclpy.serialization import deserialize_message, serialize_message
from rosidl_adapter.parser import parse_action_string, parse_message_string
from sensor_msgs.msg import RegionOfInterest
from std_msgs.msg import Header
from unique_identifier_msgs.msg import UUID

from groundlmm_msgs.action import Ground
from groundlmm_msgs.msg import GroundedPhrase, GroundingResult
from groundlmm_ros.ros.conversion import mask_to_image, numpy_to_image

HEADER = Header(
    stamp=Time(sec=1732600000, nanosec=123456789), frame_id="camera_color_optical_frame"
)
GOAL_ID = UUID(uuid=list(range(1, 17)))


def grounded_phrase(x, y):
    mask = np.zeros((48, 64), bool)
    mask[y : y + 10, x : x + 12] = True
    return GroundedPhrase(
        phrase="the red mug — 红色杯子",  # non-ASCII: strings go over the wire as UTF-8
        char_start=4,
        char_end=19,
        score=0.875,
        point_x=x + 6,
        point_y=y + 5,
        bbox=RegionOfInterest(x_offset=x, y_offset=y, width=12, height=10, do_rectify=True),
        mask=mask_to_image(mask, HEADER),
        centroid=Point(x=0.25, y=-0.5, z=1.125),
        track_id=7,
        lost=True,
    )


def grounding_result():
    return GroundingResult(
        header=HEADER,
        success=True,
        message="a note that a success leaves empty; here only to be round-tripped",
        query="What is on the table?",
        mode="describe",
        answer="The red mug stands next to a laptop.",
        phrases=[grounded_phrase(3, 4), grounded_phrase(30, 20)],
        model="difflmm-tiny-demo",
        inference_time=0.25,
        source="tracked",
        last_grounded=Time(sec=1732599999, nanosec=987654321),
    )


def camera_image():
    pixels = np.arange(48 * 64 * 3, dtype=np.uint32).astype(np.uint8).reshape(48, 64, 3)
    return numpy_to_image(pixels, "rgb8", HEADER)


def goal():
    return Ground.Goal(
        query="the red mug", mode="refer", image=camera_image(), camera="wrist", track=True
    )


def result():
    return Ground.Result(result=grounding_result(), success=True, message="grounded 2 phrases")


def feedback():
    return Ground.Feedback(partial_answer="The red mug", tokens=3, tracked=grounding_result())


MESSAGES = {
    "GroundedPhrase": lambda: grounded_phrase(3, 4),
    "GroundingResult": grounding_result,
    "Ground.Goal": goal,
    "Ground.Result": result,
    "Ground.Feedback": feedback,
    "SendGoal.Request": lambda: Ground.Impl.SendGoalService.Request(goal_id=GOAL_ID, goal=goal()),
    "SendGoal.Response": lambda: Ground.Impl.SendGoalService.Response(
        accepted=True, stamp=Time(sec=5, nanosec=6)
    ),
    "GetResult.Request": lambda: Ground.Impl.GetResultService.Request(goal_id=GOAL_ID),
    "GetResult.Response": lambda: Ground.Impl.GetResultService.Response(status=4, result=result()),
    "FeedbackMessage": lambda: Ground.Impl.FeedbackMessage(goal_id=GOAL_ID, feedback=feedback()),
}


@pytest.mark.parametrize("name", MESSAGES)
def test_serialize_deserialize_round_trip(name):
    msg = MESSAGES[name]()
    default = type(msg)()
    for field in msg.get_fields_and_field_types():
        assert getattr(msg, field) != getattr(default, field), (
            f"{name}.{field} is left at its default"
        )
    wire = serialize_message(msg)
    assert isinstance(wire, bytes) and len(wire) > 0
    received = deserialize_message(wire, type(msg))
    assert received == msg
    assert received is not msg


def test_masks_arrive_byte_for_byte():
    received = deserialize_message(serialize_message(grounding_result()), GroundingResult)
    first, second = received.phrases
    assert (first.mask.encoding, first.mask.height, first.mask.width, first.mask.step) == (
        "mono8",
        48,
        64,
        64,
    )
    mask = np.frombuffer(second.mask.data, np.uint8).reshape(48, 64)
    assert mask.sum() == 255 * 12 * 10 and mask[20:30, 30:42].min() == 255
    assert second.mask.header == HEADER


def test_nan_centroid_means_no_depth():
    phrase = grounded_phrase(3, 4)
    phrase.centroid = Point(x=math.nan, y=math.nan, z=math.nan)
    received = deserialize_message(serialize_message(phrase), GroundedPhrase)
    assert all(
        math.isnan(value)
        for value in (received.centroid.x, received.centroid.y, received.centroid.z)
    )


INTERFACE_FILES = sorted((Path(__file__).resolve().parents[3] / "groundlmm_msgs").glob("*/*.*"))


@pytest.mark.parametrize("path", INTERFACE_FILES, ids=lambda path: path.name)
def test_every_comment_is_a_line_of_its_own(path):
    # `ros2 interface show` parses each line of a nested message alone (GroundedPhrase inside
    # GroundingResult) and cuts a trailing comment to a bare "#": a comment line it prints or
    # drops whole, an indented or empty one it prints as a stray "#".
    lines = path.read_text().splitlines()
    for number, line in enumerate(lines, 1):
        if not line.strip() or line == "---":
            continue
        spec = parse_message_string("groundlmm_msgs", path.stem, line)
        elements = spec.fields + spec.constants
        where = f"{path.name}:{number}: {line!r}"
        if elements:
            assert not elements[0].annotations.get("comment"), f"trailing comment: {where}"
        else:
            assert spec.annotations["comment"], f"not a comment line of its own: {where}"


@pytest.mark.parametrize("path", INTERFACE_FILES, ids=lambda path: path.name)
def test_every_field_has_its_comment_in_the_generated_interface(path):
    # rosidl_adapter's parse is what generates the IDL: a field's comment there is the one
    # above it.
    if path.suffix == ".action":
        action = parse_action_string("groundlmm_msgs", path.stem, path.read_text())
        specs = [action.goal, action.result, action.feedback]
    else:
        specs = [parse_message_string("groundlmm_msgs", path.stem, path.read_text())]
    for spec in specs:
        for field in spec.fields:
            assert field.annotations.get("comment"), f"{path.name}: {field.name} has no comment"
