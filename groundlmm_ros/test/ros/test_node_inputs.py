"""groundlmm_node under bad input, a query flood, and depth to 3D, over real DDS, tiny random model.

Each bad input must give a clear log line or a rejection that names the
problem, and the node must then answer a good query. One node (with depth,
small limits) serves the module; tests run in file order (camera_info first
arrives in the plane test).
"""

import time

import cv2
import numpy as np
import pytest
from action_msgs.msg import GoalStatus
from diagnostic_msgs.msg import DiagnosticStatus
from images import random_rgb
from node_harness import (
    TERMINAL,
    Client,
    NodeProcess,
    is_rejection,
    rgb_image,
    stamped_header,
    status_value,
)
from rclpy.serialization import serialize_message
from sensor_msgs.msg import CameraInfo, CompressedImage, Image
from std_msgs.msg import Header, String

from groundlmm_msgs.action import Ground
from groundlmm_msgs.msg import GroundingResult
from groundlmm_ros.ros.conversion import numpy_to_image

pytestmark = [pytest.mark.timeout(180), pytest.mark.ros, pytest.mark.node]

WIDTH, HEIGHT = 96, 64
FX, FY, CX, CY = 80.0, 90.0, 47.5, 31.5
PARAMS = {
    "query_mode": "refer",
    "use_depth": True,
    "max_image_pixels": 20000,
    "max_query_length": 60,
    "query_queue_size": 5,
    "marker_lifetime_s": 1.5,
}


@pytest.fixture(scope="module")
def node():
    process = NodeProcess(PARAMS, gated=True)  # the gate stays open but in the flood test
    process.gate.open()
    yield process
    process.close()


def header(stamp_s: float) -> Header:
    return stamped_header(stamp_s, "camera_color_optical_frame")


def publish_depth(client: Client, depth: np.ndarray, encoding: str, stamp_s: float) -> None:
    seen = int(client.status.get("depth_frames_received", "0"))
    client.depth_pub.publish(numpy_to_image(depth, encoding, header(stamp_s)))
    assert client.wait_status("depth_frames_received", seen + 1), (
        "node did not count the depth frame"
    )


def publish_camera_info(client: Client) -> None:
    info = CameraInfo(
        header=header(0.0), width=WIDTH, height=HEIGHT, k=[FX, 0.0, CX, 0.0, FY, CY, 0.0, 0.0, 1.0]
    )
    client.info_pub.publish(info)
    assert client.wait_status("camera_infos_received", 1), "node did not count camera_info"


def ground_frame(client: Client, stamp_s: float, query: str):
    """Publish a frame with this stamp, query it, return the answer (result or rejection)."""
    client.publish_image(
        rgb_image(WIDTH, HEIGHT, stamp_s, "camera_color_optical_frame", seed=int(stamp_s))
    )
    client.query(query)
    return client.answer_to(query)


def assert_answers_good_query(client: Client, tag: str) -> None:
    status, result, _ = client.ground(f"the good cup {tag}", image=rgb_image(WIDTH, HEIGHT, 5.0))
    assert status == GoalStatus.STATUS_SUCCEEDED and result.success, result.message


# ---- depth ------------------------------------------------------------------------------------


def test_depth_without_camera_info_gives_nan_and_a_log_line(client):
    publish_depth(client, np.full((HEIGHT, WIDTH), 1500, np.uint16), "16UC1", 10.0)
    result = ground_frame(client, 10.0, "the cup without info")
    assert not is_rejection(result) and np.isnan(result.phrases[0].centroid.z)
    assert client.log_containing("no camera_info received yet")


@pytest.mark.parametrize(
    "encoding, depth, metres",
    [
        (
            "16UC1",
            np.full((HEIGHT, WIDTH), 1500, np.uint16),
            1.5,
        ),  # millimetres / depth_unit_divisor
        ("32FC1", np.full((HEIGHT, WIDTH), 0.8, np.float32), 0.8),  # metres
    ],
)
def test_depth_plane_gives_the_known_centroid(client, encoding, depth, metres):
    publish_camera_info(client)
    stamp = 20.0 + metres
    publish_depth(client, depth, encoding, stamp)
    result = ground_frame(client, stamp, f"the plane cup {encoding}")
    assert not is_rejection(result), result.message
    mask = np.frombuffer(result.phrases[0].mask.data, np.uint8).reshape(HEIGHT, WIDTH) > 0
    assert mask.any()
    rows, cols = np.nonzero(mask)
    # a fronto-parallel plane: every pixel at z = metres, so the median point is the median pixel
    # deprojected
    expected = ((np.median(cols) - CX) * metres / FX, (np.median(rows) - CY) * metres / FY, metres)
    centroid = result.phrases[0].centroid
    assert np.allclose([centroid.x, centroid.y, centroid.z], expected, atol=0.01), (
        centroid,
        expected,
    )
    marker_array = client.wait_for(
        lambda: [
            m
            for m in client.markers
            if m.markers and m.markers[0].header.stamp == result.header.stamp
        ],
        5.0,
    )
    sphere = marker_array[-1].markers[0]
    assert sphere.header.frame_id == "camera_color_optical_frame"
    assert (sphere.lifetime.sec, sphere.lifetime.nanosec) == (1, 500_000_000)
    assert np.isclose(sphere.pose.position.z, metres, atol=1e-6)
    cloud = client.wait_for(
        lambda: [c for c in client.clouds if c.header.stamp == result.header.stamp], 5.0
    )
    assert cloud[-1].width == mask.sum()


@pytest.mark.parametrize(
    "case, depth, encoding, stamp_gap, log_fragment",
    [
        (
            "wrong size",
            np.full((32, 48), 1000, np.uint16),
            "16UC1",
            0.0,
            "depth image is 48x32 but the colour image is 96x64",
        ),
        (
            "all zero",
            np.zeros((HEIGHT, WIDTH), np.uint16),
            "16UC1",
            0.0,
            "no valid depth (0 or NaN) under the mask",
        ),
        (
            "all NaN",
            np.full((HEIGHT, WIDTH), np.nan, np.float32),
            "32FC1",
            0.0,
            "no valid depth (0 or NaN) under the mask",
        ),
        (
            "colour as depth",
            np.zeros((HEIGHT, WIDTH, 3), np.uint8),
            "rgb8",
            0.0,
            "depth encoding 'rgb8' is not supported",
        ),
        (
            "stale stamp",
            np.full((HEIGHT, WIDTH), 1000, np.uint16),
            "16UC1",
            1.0,
            "no depth frame within depth_stamp_tol",
        ),
    ],
)
def test_bad_depth_gives_nan_centroid_and_a_log_line(
    client, case, depth, encoding, stamp_gap, log_fragment
):
    stamp = 40.0 + 5 * len(client.results)  # far from every earlier depth frame
    publish_depth(client, depth, encoding, stamp + stamp_gap)
    result = ground_frame(client, stamp, f"the cup, {case}")
    assert not is_rejection(result), result.message
    assert np.isnan(result.phrases[0].centroid.z)
    assert client.log_containing(log_fragment), client.logs[-5:]
    assert_answers_good_query(client, case)


# ---- bad images and queries -------------------------------------------------------------------


def _image(encoding="rgb8", width=WIDTH, height=HEIGHT, step=None, data_len=None) -> Image:
    channels = 3 if encoding in ("rgb8", "yuv_weird") else 1
    step = width * channels * (4 if encoding == "32FC1" else 1) if step is None else step
    data = bytes(height * step if data_len is None else data_len)
    return Image(
        header=header(3.0), width=width, height=height, encoding=encoding, step=step, data=data
    )


@pytest.mark.parametrize(
    "case, image, message_fragment",
    [
        ("unknown encoding", _image("yuv_weird"), "unknown encoding 'yuv_weird'"),
        ("step below width", _image(step=WIDTH), f"step={WIDTH} is below width * bytes per pixel"),
        ("data too short", _image(data_len=100), "data has 100 bytes, expected height * step"),
        ("depth as colour", _image("32FC1"), "names no colours"),
        ("oversized", _image(width=200, height=200), "exceeds max_image_pixels=20000"),
        ("7000 x 1", _image(width=7000, height=1), "7000x1 pixels is more elongated than 20:1"),
    ],
)
def test_bad_goal_image_is_rejected_with_reason(client, case, image, message_fragment):
    status, result, _ = client.ground(f"the cup, {case}", image=image)
    assert status == GoalStatus.STATUS_ABORTED and not result.success
    assert "bad image" in result.message and message_fragment in result.message, result.message
    assert client.log_containing(message_fragment)
    assert_answers_good_query(client, case)


def test_empty_frame_on_topic_is_rejected_with_reason(client):
    client.publish_image(Image(header=header(4.0), encoding="rgb8"))
    client.query("the cup in an empty frame")
    answer = client.answer_to("the cup in an empty frame")
    assert is_rejection(answer) and "empty image" in answer.message
    assert_answers_good_query(client, "empty frame")


def test_bad_goal_mode_is_rejected_with_reason(client):
    status, result, _ = client.ground("the cup", mode="explain", image=rgb_image(WIDTH, HEIGHT))
    assert status == GoalStatus.STATUS_ABORTED and "unknown mode 'explain'" in result.message
    assert_answers_good_query(client, "bad mode")


@pytest.mark.parametrize(
    "case, query, message_fragment",
    [
        ("empty", "", "empty query"),
        ("blank", "  \t ", "empty query"),
        ("too long", "the cup " * 10, "more than max_query_length=60"),
        ("control character", "the cup\x07", "control character U+0007"),
        ("zero-width only", "\u200b\u200d", "empty query"),
        # refused by the engine before the model runs: no text for the model to read
        ("special tokens", "the cup; </s>", "'</s>', decodes to no text"),
    ],
)
def test_bad_query_is_rejected_with_reason(client, case, query, message_fragment):
    client.publish_image(rgb_image(WIDTH, HEIGHT, 6.0))
    client.query(query)
    answer = client.answer_to(query)
    assert is_rejection(answer) and message_fragment in answer.message, answer
    assert client.log_containing(message_fragment)
    assert_answers_good_query(client, case)


def test_query_of_invalid_utf8_is_rejected_with_reason(client):
    # what a C++ publisher can send: a std_msgs/String whose bytes are not UTF-8
    raw = serialize_message(String(data="cup XX")).replace(b"XX", b"\xff\xfe")
    client.query_pub.publish(raw)
    answer = client.answer_to("cup \ufffd\ufffd")
    assert is_rejection(answer) and "not valid UTF-8" in answer.message
    assert_answers_good_query(client, "utf8")


def test_incompatible_qos_is_logged_with_the_fix(client):
    image_pub = client.create_publisher(Image, "image", reliability="best_effort")
    query_pub = client.create_publisher(String, "query", reliability="best_effort")
    try:
        assert client.log_containing("set the parameter image_qos_reliability:=best_effort", 10.0)
        assert client.log_containing("publish queries with RELIABLE reliability", 10.0)
    finally:
        client.destroy_publisher(image_pub)
        client.destroy_publisher(query_pub)
    assert_answers_good_query(client, "qos")


def test_model_that_raises_is_reported_and_the_node_recovers(client):
    """A model on the meta device (weights never materialised) raises in every forward pass."""
    client.reconfigure(device="meta")
    assert client.wait_active(10.0)
    answer = ground_frame(client, 7.0, "the cup on a broken model")
    # accepted, then failed: its one GroundingResult says so (not a ~/rejected status)
    assert isinstance(answer, GroundingResult) and not answer.success, answer
    assert answer.message.startswith("model error: RuntimeError") and not answer.phrases
    assert answer.header.stamp.sec == 7 and answer.query == "the cup on a broken model"
    assert client.log_containing("model error on query 'the cup on a broken model'")
    client.reconfigure(device="cpu")
    assert_answers_good_query(client, "after the model error")


def test_compressed_images_and_undecodable_ones(client):
    client.reconfigure(image_transport="compressed")
    compressed_pub = client.create_publisher(CompressedImage, "image/compressed")
    try:
        assert client.wait_for(lambda: compressed_pub.get_subscription_count() > 0, 10.0)
        pixels = random_rgb(HEIGHT, WIDTH, 7)
        png = CompressedImage(
            header=header(9.0), format="png", data=cv2.imencode(".png", pixels)[1].tobytes()
        )
        answers = []
        for msg, query in (
            (
                CompressedImage(header=header(9.5), format="jpeg", data=b"not a jpeg"),
                "the cup, bad jpeg",
            ),
            (png, "the cup, png"),
        ):
            seen = int(client.status.get("frames_received", "0"))
            compressed_pub.publish(msg)
            assert client.wait_status("frames_received", seen + 1)
            client.query(query)  # runs on the newest frame when its turn comes: wait for it
            answers.append(client.answer_to(query))
        assert is_rejection(answers[0]) and "not an image OpenCV can decode" in answers[0].message
        result = answers[1]
        assert not is_rejection(result) and result.header == png.header
        assert (result.phrases[0].mask.height, result.phrases[0].mask.width) == (HEIGHT, WIDTH)
    finally:
        client.destroy_publisher(compressed_pub)
        client.reconfigure(image_transport="raw")


# ---- fuzz -------------------------------------------------------------------------------------

ENCODINGS = [
    "rgb8",
    "bgr8",
    "mono8",
    "mono16",
    "16UC1",
    "32FC1",
    "rgba8",
    "yuv422",
    "bayer_rggb8",
    "8UC3",
    "jpeg",
    "",
    "rgb8\x00",
    "x" * 300,
]


def fuzz_image(rng, encodings=ENCODINGS) -> Image:
    """A frame that is usually malformed: any size from 0 to 7000 a side, step and data that may
    not fit."""
    width, height = (int(rng.choice([0, 1, 2, 7000, int(rng.integers(1, 200))])) for _ in range(2))
    step = int(rng.choice([0, width, 3 * width, int(rng.integers(0, 1 << 31))]))
    size = int(rng.choice([0, min(height * step, 30000), int(rng.integers(0, 30000))]))
    return Image(
        header=header(float(rng.uniform(0, 100))),
        width=width,
        height=height,
        encoding=str(rng.choice(encodings)),
        is_bigendian=int(rng.integers(0, 2)),
        step=step,
        data=rng.bytes(size),
    )


def fuzz_text(rng) -> str:
    alphabet = ["a", " ", "\x00", "\x07", "\n", "\ufffd", "\u202e", "é", "🙂", "\t"]
    return "".join(rng.choice(alphabet, int(rng.choice([0, 1, 10, 61, 5000]))))


def test_fuzz_of_malformed_messages_and_goals_keeps_every_goal_answered(client, node):
    """10,000 messages (frames, depth, camera_info, queries, ~1,000 goals), mostly malformed,
    seeded: the node stays up, every goal gets its response and one terminal status, and a good
    query is answered."""
    rng = np.random.default_rng(20261201)
    goals, keys = [], []
    log_start = len(node.output())
    for i in range(10000):
        kind = rng.choice(
            ["image", "depth", "camera_info", "query", "goal"], p=[0.3, 0.2, 0.1, 0.3, 0.1]
        )
        if kind == "image":
            client.image_pub.publish(fuzz_image(rng))
        elif kind == "depth":
            client.depth_pub.publish(fuzz_image(rng, ["16UC1", "32FC1", "mono16", "rgb8", ""]))
        elif kind == "camera_info":
            client.info_pub.publish(
                CameraInfo(
                    header=header(float(rng.uniform(0, 100))),
                    width=int(rng.integers(0, 8000)),
                    height=int(rng.integers(0, 8000)),
                    k=rng.normal(0, 1e3, 9).tolist(),
                    d=rng.normal(0, 1, int(rng.integers(0, 20))).tolist(),
                )
            )
        elif kind == "query":
            client.query(fuzz_text(rng))
        else:
            image = fuzz_image(rng) if rng.random() < 0.7 else rgb_image(WIDTH, HEIGHT, seed=i)
            goals.append(
                Ground.Goal(
                    query=fuzz_text(rng) or "the cup",
                    image=image,
                    mode=str(rng.choice(["refer", "describe", "", "explain"])),
                )
            )
            if len(goals) % 20 == 0:  # goals go out in bursts of 20
                keys += client.send_goals(goals[-20:])
    keys += client.send_goals(goals[len(keys) :])
    records = client.wait_goals(keys, lambda rs: all(r["status"] in TERMINAL for r in rs), 120.0)
    assert node.process.poll() is None, node.output()[-3000:]
    missing = {
        "no response": sum(r["accepted"] is None for r in records),
        "no terminal status": sum(r["status"] not in TERMINAL for r in records),
    }
    stuck = [
        (g.query[:40], g.mode, g.image.width, g.image.height, g.image.encoding[:10])
        for g, r in zip(goals, records)
        if r["status"] not in TERMINAL
    ][:10]
    errors = [
        line
        for line in node.output()[log_start:].splitlines()
        if "error" in line.lower() or "exception" in line.lower()
    ][:20]
    assert all(r["accepted"] for r in records) and all(r["status"] in TERMINAL for r in records), (
        len(goals),
        missing,
        stuck,
        errors,
    )
    for goal, record in zip(goals, records):
        if record["status"] != GoalStatus.STATUS_SUCCEEDED:
            assert record["result"].message, goal  # a failed goal says why
    log = node.output()[log_start:]  # no model error: bad input is refused before the model
    assert "Traceback" not in log, log[log.find("Traceback") - 300 :][:3000]
    assert_answers_good_query(client, "after the fuzz")


# ---- flood ------------------------------------------------------------------------------------


def test_flood_of_200_queries_each_answered_or_rejected_once(client, node):
    client.publish_image(rgb_image(WIDTH, HEIGHT, 8.0))
    rss_before = node.rss_mb()
    # the model holds the first query until the gate opens: the queue fills, whatever the speed
    node.gate.close()
    started = len(node.gate.started())
    queries = [f"flood cup {i}" for i in range(200)]
    client.query(queries[0])
    assert node.gate.wait_started(started + 1), node.output()
    for query in queries[1:]:
        client.query(query)

    def counts():
        found = client.answers(queries)
        return (
            [
                q
                for q, answers in found.items()
                for a in answers
                if not isinstance(a, DiagnosticStatus)
            ],
            [a for answers in found.values() for a in answers if isinstance(a, DiagnosticStatus)],
        )

    # with the model held, the queue takes 5 and each of the other 194 is rejected at once
    assert client.wait_for(lambda: len(counts()[1]) >= 194, 30.0), [len(c) for c in counts()]
    assert client.wait_status("queue_length", 5)
    assert counts()[0] == []
    node.gate.open()
    assert client.wait_for(lambda: sum(map(len, counts())) >= 200, 60.0), [len(c) for c in counts()]
    time.sleep(0.5)
    answered, rejected = counts()
    assert sorted(answered + [status_value(r, "query") for r in rejected]) == sorted(
        queries
    )  # each once, none vanished
    assert len(answered) == 6 and queries[0] in answered  # the held one + the 5 queued
    assert node.rss_mb() - rss_before < 150, (rss_before, node.rss_mb())
    full = [r for r in rejected if r.message.startswith("query queue is full (5 waiting")]
    assert len(full) == 194
    assert_answers_good_query(client, "after the flood")
