"""One node, two cameras (`cameras: [left, right]`), over real DDS: each camera's queries answered
on its own topic with its own frame's header, the action goal naming its camera, per-camera
standing queries, fair shares when one camera floods the model, a batched step (both
cameras' jobs at once) giving what each job gives alone, and after a reconfigure to
`mask_format: cropped` masks that decode to the pixels the full ones had; a camera's standing query
set before configure or at run time, kept across a reconfigure, and named in the start-up line.

The node is gated (gated_node.py): a test lets model steps through one permit at a time, so every
step's jobs are known in advance instead of depending on the machine's speed. Each test has a
node of its own.
"""

import numpy as np
import pytest
from action_msgs.msg import GoalStatus
from lifecycle_msgs.msg import Transition
from node_harness import (
    Client,
    NodeProcess,
    is_rejection,
    rgb_image,
    stamped_header,
    wait_for,
)
from sensor_msgs.msg import Image
from std_msgs.msg import String

from groundlmm_msgs.action import Ground
from groundlmm_msgs.msg import GroundingResult
from groundlmm_ros.ros.conversion import numpy_to_image
from groundlmm_ros.ros.messages import phrase_mask

pytestmark = [pytest.mark.timeout(180), pytest.mark.ros, pytest.mark.node]

CAMERAS = ("left", "right")
FRAMES = {  # each camera's frame: its own size, stamp and frame_id
    "left": dict(width=96, height=64, stamp_s=1.0, frame_id="left_optical", seed=1),
    "right": dict(width=80, height=60, stamp_s=2.0, frame_id="right_optical", seed=2),
}


@pytest.fixture
def node():
    process = NodeProcess(
        {
            "cameras": list(CAMERAS),
            "query_mode": "refer",
            "query_queue_size": 10,
            "refiner": "colour",
        },
        gated=True,
    )
    process.gate.open()
    yield process
    process.close()


class Cameras:
    """The test's side of both cameras: an image and a query publisher each, a subscription to
    each camera's grounding topic."""

    def __init__(self, client: Client):
        self.client = client
        self.images = {c: client.create_publisher(Image, f"{c}/image") for c in CAMERAS}
        self.queries = {c: client.create_publisher(String, f"{c}/query", 1000) for c in CAMERAS}
        for camera in CAMERAS:
            client.subscribe(GroundingResult, f"{camera}/grounding")

    def ready(self) -> bool:
        publishers = [*self.images.values(), *self.queries.values()]
        return (
            self.client.status.get("state") == "active"
            and all(p.get_subscription_count() > 0 for p in publishers)
            and all(self.client.publisher_count(f"{c}/grounding") > 0 for c in CAMERAS)
        )

    def frame(self, camera: str, pixels: np.ndarray | None = None, **changes) -> Image:
        """Publish the camera's frame (its random one, or `pixels`); once the node counted it,
        return it."""
        spec = {**FRAMES[camera], **changes}
        msg = (
            rgb_image(**spec)
            if pixels is None
            else numpy_to_image(pixels, "rgb8", stamped_header(spec["stamp_s"], spec["frame_id"]))
        )
        seen = int(self.client.status.get("frames_received", "0"))
        self.images[camera].publish(msg)
        assert self.client.wait_status("frames_received", seen + 1), "frame not counted"
        return msg

    def query(self, camera: str, text: str) -> None:
        self.queries[camera].publish(String(data=text))

    def results(self, camera: str) -> list[GroundingResult]:
        return self.client.received_on(f"{camera}/grounding")

    def wait_results(self, counts: dict[str, int], timeout: float = 60.0) -> bool:
        return bool(
            wait_for(lambda: all(len(self.results(c)) >= n for c, n in counts.items()), timeout)
        )


@pytest.fixture
def cameras(node):
    client = Client()
    try:
        cams = Cameras(client)
        assert wait_for(cams.ready, 60.0, period=0.1), f"not ready\n{node.output()}"
        yield cams
    finally:
        client.close()


def goal(query: str, camera: str, mode: str = "refer") -> Ground.Goal:
    return Ground.Goal(query=query, mode=mode, camera=camera)


def finished_goals(client: Client, goals: list, timeout: float = 60.0) -> list[dict]:
    keys = client.send_goals(goals)
    records = client.wait_goals(keys, lambda rs: all(r["status"] is not None for r in rs), timeout)
    assert all(r["status"] is not None for r in records), records
    return records


def test_each_camera_answers_on_its_own_topic_with_its_frames_header(node, cameras):
    client = cameras.client
    assert client.image_pub.get_subscription_count() == 0  # the plain `image` is nobody's now
    frames = {camera: cameras.frame(camera) for camera in CAMERAS}
    for k in range(3):  # interleaved
        cameras.query("left", f"the left mug {k}")
        cameras.query("right", f"the right bowl {k}")
    assert cameras.wait_results({"left": 3, "right": 3}), node.output()
    for camera in CAMERAS:
        results = cameras.results(camera)
        assert sorted(r.query for r in results) == [
            f"the {camera} {'mug' if camera == 'left' else 'bowl'} {k}" for k in range(3)
        ]
        for result in results:
            assert result.success, result.message
            assert result.header == frames[camera].header
            mask = result.phrases[0].mask
            assert (mask.width, mask.height) == (FRAMES[camera]["width"], FRAMES[camera]["height"])
    assert client.results == []  # nothing on the plain `grounding`

    named, first, unknown = finished_goals(
        client, [goal("the right cup", "right"), goal("the first cup", ""), goal("a cup", "base")]
    )
    assert named["status"] == GoalStatus.STATUS_SUCCEEDED, named["result"].message
    assert named["result"].result.header == frames["right"].header
    assert any(r.query == "the right cup" for r in cameras.results("right"))
    assert first["status"] == GoalStatus.STATUS_SUCCEEDED  # empty: the first camera, left
    assert first["result"].result.header == frames["left"].header
    assert unknown["status"] == GoalStatus.STATUS_ABORTED
    assert "no camera 'base': this node's cameras are 'left', 'right'" in unknown["result"].message

    cameras.query("right", "bad\x07query")
    rejected = client.answer_to("bad\x07query")
    assert is_rejection(rejected) and {kv.key: kv.value for kv in rejected.values}["camera"] == (
        "right"
    )


def test_standing_queries_are_per_camera_parameters(node, cameras):
    client = cameras.client
    (plain,) = client.set_parameters(standing_query="the mug")
    assert not plain.successful and "left.standing_query" in plain.reason
    (bad,) = client.set_parameters(**{"left.standing_mode": "point"})
    assert not bad.successful and "left.standing_mode='point'" in bad.reason
    results = client.set_parameters(**{"right.standing_query": "the cup", "right.max_rate_hz": 0.0})
    assert all(r.successful for r in results), results
    before = len(cameras.results("right"))
    frame = cameras.frame("right")
    assert wait_for(lambda: len(cameras.results("right")) > before, 30.0), node.output()
    standing = cameras.results("right")[before]
    assert standing.query == "the cup" and standing.header == frame.header
    assert not [r for r in cameras.results("left") if r.query == "the cup"]


def test_a_flooding_camera_does_not_starve_the_other(node, cameras):
    """right's standing query (once per new frame) while left has 10 topic queries waiting: every
    step serves both, so right's share stays at half."""
    client = cameras.client
    cameras.frame("left")
    results = client.set_parameters(**{"right.standing_query": "the cup", "right.max_rate_hz": 0.0})
    assert all(r.successful for r in results), results
    cameras.frame("right")
    assert wait_for(lambda: cameras.results("right"), 30.0), node.output()
    node.gate.close()
    steps = len(node.gate.batches())
    cameras.frame("right")  # its standing job: the step now waiting at the gate
    assert wait_for(lambda: len(node.gate.batches()) > steps, 20.0), node.output()
    for k in range(10):
        cameras.query("left", f"flood {k}")
    assert client_status_at_least(cameras.client, "left/queue_length", 10), node.output()
    for _ in range(8):  # one step each: a new right frame, then one permit
        cameras.frame("right")
        waiting = len(node.gate.batches())
        node.gate.allow_batches(1)
        assert wait_for(lambda n=waiting: len(node.gate.batches()) > n, 20.0), node.output()
    node.gate.open()
    assert cameras.wait_results({"left": 10}), node.output()
    window = [q for batch in node.gate.batches()[steps:][:9] for q in batch]
    assert window.count("the cup") / len(window) >= 0.4, window
    assert node.gate.batches()[steps + 1] == ["flood 0", "the cup"]


def client_status_at_least(client: Client, key: str, value: int) -> bool:
    return client.wait_status(key, value, timeout=20.0)


def same_grounding(one: GroundingResult, other: GroundingResult, size) -> None:
    assert one.success and other.success, (one.message, other.message)
    assert one.answer == other.answer and len(one.phrases) == len(other.phrases)
    for a, b in zip(one.phrases, other.phrases):
        assert (a.phrase, a.char_start, a.char_end) == (b.phrase, b.char_start, b.char_end)
        assert (a.point_x, a.point_y, a.bbox) == (b.point_x, b.point_y, b.bbox)
        assert a.score == pytest.approx(b.score, abs=1e-5)
        assert np.array_equal(phrase_mask(a, size), phrase_mask(b, size))


def test_a_batched_step_gives_what_each_job_gives_alone(node, cameras):
    client = cameras.client
    size = (FRAMES["left"]["height"], FRAMES["left"]["width"])
    for camera in CAMERAS:  # the same pixels on both cameras
        cameras.frame(camera, **{k: FRAMES["left"][k] for k in ("width", "height", "seed")})
    describe = "Describe the image."
    # Alone: one job per step (the gate is open, nothing else waits).
    cameras.query("left", "the red mug")
    assert wait_for(lambda: any(r.query == "the red mug" for r in cameras.results("left")), 30.0)
    (alone_described,) = finished_goals(client, [goal(describe, "left", "describe")])
    alone = next(r for r in cameras.results("left") if r.query == "the red mug")
    # Batched: a blocking step first, so both cameras' jobs wait and go in the same steps.
    node.gate.close()
    steps = len(node.gate.batches())
    cameras.query("left", "blocker")
    assert wait_for(lambda: len(node.gate.batches()) > steps, 20.0), node.output()
    cameras.query("left", "the red mug")
    cameras.query("right", "the red mug")
    keys = client.send_goals([goal(describe, camera, "describe") for camera in CAMERAS])
    assert client_status_at_least(client, "left/queue_length", 2), node.output()
    assert client_status_at_least(client, "right/queue_length", 2), node.output()
    node.gate.open()
    records = client.wait_goals(keys, lambda rs: all(r["status"] is not None for r in rs), 60.0)
    assert node.gate.batches()[steps:] == [
        ["blocker"],
        ["the red mug", "the red mug"],
        [describe, describe],
    ]
    batched = [
        [r for r in cameras.results(camera) if r.query == "the red mug"][-1] for camera in CAMERAS
    ]
    for result in batched:
        same_grounding(result, alone, size)
    for record in records:
        assert record["status"] == GoalStatus.STATUS_SUCCEEDED, record["result"].message
        same_grounding(record["result"].result, alone_described["result"].result, size)


def test_after_a_reconfigure_to_cropped_masks_each_decodes_to_the_full_pixels(node, cameras):
    client = cameras.client
    size = (FRAMES["left"]["height"], FRAMES["left"]["width"])
    # Four colour quadrants: the colour refiner's region (and so its bbox) is one of them.
    quadrants = np.zeros((*size, 3), np.uint8)
    quadrants[:32, :48], quadrants[:32, 48:] = (200, 30, 30), (30, 200, 30)
    quadrants[32:, :48], quadrants[32:, 48:] = (30, 30, 200), (200, 200, 30)

    def grounded_once_more() -> GroundingResult:
        count = len([r for r in cameras.results("left") if r.query == "the blue bowl"])
        cameras.frame("left", quadrants)
        cameras.query("left", "the blue bowl")
        assert wait_for(
            lambda: len([r for r in cameras.results("left") if r.query == "the blue bowl"]) > count,
            30.0,
        ), node.output()
        return [r for r in cameras.results("left") if r.query == "the blue bowl"][-1]

    full = grounded_once_more()
    client.reconfigure(mask_format="cropped")
    assert wait_for(cameras.ready, 60.0, period=0.1), node.output()
    # the cameras' own parameters were declared again at configure
    assert all(r.successful for r in client.set_parameters(**{"left.max_rate_hz": 2.0}))
    cropped = grounded_once_more()
    assert full.success and cropped.success, (full.message, cropped.message)
    (full_phrase,), (cropped_phrase,) = full.phrases, cropped.phrases
    box = cropped_phrase.bbox
    assert box == full_phrase.bbox and 0 < box.width * box.height < size[0] * size[1]
    assert (cropped_phrase.mask.width, cropped_phrase.mask.height) == (box.width, box.height)
    assert (full_phrase.mask.width, full_phrase.mask.height) == (size[1], size[0])
    assert np.array_equal(phrase_mask(cropped_phrase, size), phrase_mask(full_phrase, size))


def test_camera_parameters_before_configure_and_across_a_reconfigure():
    node = NodeProcess({"cameras": ["left", "right"], "autostart": False})
    client = Client()
    try:
        assert wait_for(lambda: "/lab/groundlmm_node" in client.call("node_names"), 60.0)
        # unconfigured: a camera's standing query can be set; the plain one would do nothing
        (result,) = client.set_parameters(**{"left.standing_query": "the mug"})
        assert result.successful, (result.reason, node.output())
        (plain,) = client.set_parameters(standing_query="the mug")
        assert not plain.successful and "left.standing_query" in plain.reason
        for transition in (Transition.TRANSITION_CONFIGURE, Transition.TRANSITION_ACTIVATE):
            assert client.change_state(transition), node.output()
        assert wait_for(lambda: "camera 'left': standing query 'the mug'" in node.output(), 10.0)
        assert "camera 'right': no standing query" in node.output()
        # set at run time, kept when the node is configured again
        (result,) = client.set_parameters(**{"right.standing_query": "the bowl"})
        assert result.successful, result.reason
        client.reconfigure()
        assert wait_for(lambda: "camera 'right': standing query 'the bowl'" in node.output(), 10.0)
    finally:
        client.close()
        node.close()
