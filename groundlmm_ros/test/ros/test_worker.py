"""The node's Worker in-process, with the tiny random engine behind the gate the node tests use
(gated_node.py): the queue limit, exactly one finish per job, cancel (queued and running), the
standing query's rate and stop, and with several cameras: one batch per step with one job per
camera, fair shares, per-camera queues. No DDS: the behaviours hold without it (the node tests
show them over DDS)."""

import threading

import numpy as np
import pytest
from gated_node import Gate, GatedEngine
from sensor_msgs.msg import Image

from groundlmm_ros.models.presets import build_engine
from groundlmm_ros.ros.worker import Job, Worker

# every wait below is bounded; none of them depends on the machine's speed
WAIT_S = 10.0


@pytest.fixture(scope="module")
def tiny_engine():
    return build_engine("tiny-random", refiner="threshold")


def frame(width=8, height=6):
    return Image(
        height=height,
        width=width,
        encoding="rgb8",
        step=width * 3,
        data=np.zeros(height * width * 3, np.uint8).tobytes(),
    )


class Finished:
    """Every job's outcome, as its Reply's finished() gave it, with a way to wait for a number of
    them."""

    def __init__(self):
        self.outcomes = []
        self._changed = threading.Condition()

    def add(self, outcome):
        with self._changed:
            self.outcomes.append(outcome)
            self._changed.notify_all()

    def wait_for(self, count: int):
        with self._changed:
            assert self._changed.wait_for(lambda: len(self.outcomes) >= count, WAIT_S), (
                f"{len(self.outcomes)} of {count} jobs finished"
            )
        return self.outcomes


class Reply:
    """A job's Reply: its outcome goes to `finished`; cancel_requested asks `cancel`."""

    def __init__(self, finished: Finished, cancel=lambda: False):
        self.finished_outcomes, self.cancel = finished, cancel

    def started(self):
        pass

    def token(self, partial_answer, tokens):
        pass

    def cancel_requested(self):
        return self.cancel()

    def finished(self, outcome):
        self.finished_outcomes.add(outcome)


def serving(engine, gate_folder, image_topics: dict[str, str]):
    gate, finished = Gate(gate_folder), Finished()
    errors = []
    worker = Worker(
        GatedEngine(engine, gate),
        cameras={camera: (topic, Reply(finished)) for camera, topic in image_topics.items()},
        queue_size=3,
        max_image_pixels=10_000,
        max_new_tokens=8,
        log_error=errors.append,
    )
    worker.start()
    yield worker, gate, finished, errors
    gate.open()
    worker.stop("test over", timeout=WAIT_S)


@pytest.fixture
def running(tiny_engine, tmp_path):
    yield from serving(tiny_engine, tmp_path, {"": "/camera/image"})


@pytest.fixture
def two_cameras(tiny_engine, tmp_path):
    yield from serving(
        tiny_engine, tmp_path, {"head": "/lab/head/image", "wrist": "/lab/wrist/image"}
    )


def started(gate, count: int = 1):
    assert gate.wait_started(count, WAIT_S), f"the engine started {gate.started()}"


def test_a_full_queue_refuses_and_every_queued_job_finishes_once(running):
    worker, gate, finished, _ = running
    assert "no image has arrived yet on /camera/image" in worker.submit(
        Job("first", "describe", "topic", Reply(finished))
    )
    worker.put_frame(frame())
    assert worker.submit(Job("running", "describe", "topic", Reply(finished))) == ""
    started(gate)  # it left the queue and blocks in the engine
    for k in range(3):
        assert worker.submit(Job(f"queued {k}", "describe", "topic", Reply(finished))) == ""
    assert worker.submit(Job("one too many", "describe", "topic", Reply(finished))).startswith(
        "query queue is full (3 waiting"
    )
    assert worker.queue_length == 3
    gate.open()
    outcomes = finished.wait_for(4)
    assert [o.job.query for o in outcomes] == ["running", "queued 0", "queued 1", "queued 2"]
    assert all(o.grounding is not None and not o.error for o in outcomes)
    assert "one too many" not in gate.started() and len(finished.outcomes) == 4


def test_cancel_stops_a_running_job_and_skips_a_queued_one(running):
    worker, gate, finished, _ = running
    worker.put_frame(frame())
    cancel_running, cancel_queued = threading.Event(), threading.Event()
    assert (
        worker.submit(Job("running", "describe", "action", Reply(finished, cancel_running.is_set)))
        == ""
    )
    started(gate)
    assert (
        worker.submit(Job("queued", "describe", "action", Reply(finished, cancel_queued.is_set)))
        == ""
    )
    assert worker.submit(Job("next", "describe", "topic", Reply(finished))) == ""
    cancel_running.set()
    cancel_queued.set()
    gate.open()
    running_outcome, queued_outcome, next_outcome = finished.wait_for(3)
    assert running_outcome.cancelled and running_outcome.grounding is None
    assert queued_outcome.cancelled and queued_outcome.error == "cancelled"
    assert gate.started() == ["running", "next"]  # the cancelled queued job never reached the model
    assert next_outcome.grounding is not None


def test_stop_cancels_the_running_job_and_ends_the_queued_ones(running):
    worker, gate, finished, _ = running
    worker.put_frame(frame())
    worker.submit(Job("running", "describe", "topic", Reply(finished)))
    started(gate)
    worker.submit(Job("queued", "refer", "topic", Reply(finished)))
    stopper = threading.Thread(target=worker.stop, args=("node deactivated", WAIT_S))
    stopper.start()
    gate.open()
    stopper.join(WAIT_S)
    assert not stopper.is_alive()
    running_outcome, queued_outcome = finished.wait_for(2)
    assert running_outcome.cancelled and running_outcome.error == "cancelled: node deactivated"
    assert queued_outcome.error == "not run: node deactivated" and gate.started() == ["running"]
    assert (
        worker.submit(Job("late", "describe", "topic", Reply(finished)))
        == "node is not serving: node deactivated"
    )


def test_standing_query_runs_once_per_new_frame_within_its_rate(running):
    worker, gate, finished, _ = running
    gate.open()
    worker.set_standing("the mug", "refer", 0.0)  # 0: as fast as the model allows
    worker.put_frame(frame())
    finished.wait_for(1)
    worker.put_frame(frame())
    outcomes = finished.wait_for(2)
    assert [(o.job.query, o.job.source) for o in outcomes] == [("the mug", "standing")] * 2
    # No new frame, no run: a topic query goes next, and nothing else.
    worker.submit(Job("topic", "describe", "topic", Reply(finished)))
    assert [o.job.query for o in finished.wait_for(3)] == ["the mug", "the mug", "topic"]
    # At 1/1000 Hz the next standing run is 1000 s away, whatever frames arrive.
    worker.set_standing("the cup", "refer", 0.001)
    worker.put_frame(frame())
    finished.wait_for(4)
    worker.put_frame(frame())
    worker.submit(Job("after", "describe", "topic", Reply(finished)))
    assert [o.job.query for o in finished.wait_for(5)][3:] == ["the cup", "after"]
    assert len(gate.started()) == 5


def test_elongated_and_oversized_frames_are_refused_before_the_model(running):
    worker, gate, finished, _ = running
    gate.open()
    worker.submit(
        Job("thin", "describe", "action", Reply(finished), image=frame(width=700, height=1))
    )
    worker.submit(
        Job("huge", "describe", "action", Reply(finished), image=frame(width=200, height=100))
    )
    thin, huge = finished.wait_for(2)
    assert thin.error.startswith("bad image: image of 700x1 pixels is more elongated than 20:1")
    assert "exceeds max_image_pixels=10000" in huge.error
    assert gate.started() == []


def test_one_step_batches_one_job_of_each_camera_on_its_own_frame(two_cameras):
    worker, gate, finished, _ = two_cameras
    assert worker.submit(Job("q", "describe", "topic", Reply(finished), camera="base")).startswith(
        "no camera 'base': this node's cameras are 'head', 'wrist' (parameter cameras)"
    )
    assert "no image has arrived yet on /lab/wrist/image" in worker.submit(
        Job("q", "describe", "topic", Reply(finished), camera="wrist")
    )
    worker.put_frame(frame(width=8), "head")
    worker.put_frame(frame(width=10), "wrist")
    assert (
        worker.submit(Job("head first", "describe", "topic", Reply(finished), camera="head")) == ""
    )
    started(gate)  # running alone: nothing else was waiting
    for k in range(3):  # while it runs: a queue per camera, each with its own limit
        assert (
            worker.submit(Job(f"head {k}", "describe", "topic", Reply(finished), camera="head"))
            == ""
        )
        assert (
            worker.submit(Job(f"wrist {k}", "refer", "topic", Reply(finished), camera="wrist"))
            == ""
        )
    assert "query queue is full" in worker.submit(
        Job("late", "refer", "topic", Reply(finished), camera="head")
    )
    assert worker.queue_length == 6
    gate.open()
    outcomes = finished.wait_for(7)
    assert gate.batches() == [["head first"]] + [[f"head {k}", f"wrist {k}"] for k in range(3)]
    for outcome in outcomes:
        assert outcome.grounding is not None, outcome.error
        width = {"head": 8, "wrist": 10}[outcome.job.camera]
        assert outcome.rgb.shape[1] == width and outcome.frame.width == width


def test_standing_queries_of_two_cameras_share_the_model_evenly(two_cameras):
    worker, gate, finished, _ = two_cameras
    gate.open()
    worker.set_standing("the mug", "refer", 0.0, camera="head")
    worker.set_standing("the cup", "describe", 0.0, camera="wrist")
    for _ in range(5):  # each step: both cameras have a new frame
        worker.put_frame(frame(), "head")
        worker.put_frame(frame(), "wrist")
        count = len(finished.outcomes)
        finished.wait_for(count + 2)
    cameras = [o.job.camera for o in finished.outcomes]
    assert cameras.count("head") == cameras.count("wrist") == 5
    assert all(o.job.source == "standing" for o in finished.outcomes)
    # A camera with a burst of topic queries does not starve the other's standing query.
    gate.close()
    # the step with both standing jobs: held at the gate
    worker.put_frame(frame(), "head")
    worker.put_frame(frame(), "wrist")
    started(gate, 10 + 2)
    count = len(gate.batches())
    for k in range(3):
        worker.submit(Job(f"burst {k}", "refer", "topic", Reply(finished), camera="head"))
    worker.put_frame(frame(), "wrist")
    gate.open()
    finished.wait_for(10 + 2 + 1 + 3)
    assert gate.batches()[count] == ["burst 0", "the cup"]  # the wrist's next frame, same step
