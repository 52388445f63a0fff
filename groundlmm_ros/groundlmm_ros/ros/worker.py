"""The one thread that runs the engine for every camera: per camera a newest-frame slot, a
bounded query queue and a standing query.

ROS callbacks only call `put_frame` and `submit` (cheap, never the model).
A job's answer goes back through its `Reply`, on the worker thread: `started` when its turn
comes, `token` as its answer grows, and exactly one `finished(outcome)`: with a Grounding, or
with the reason there is none (bad image, model error, cancelled, node deactivated). A job that
cannot be queued is refused by `submit` at once with its reason and is never finished.

Fair by construction: each step takes at most one job from every camera that has one (its next
queued query, else its standing query when due) and grounds them together in one
`Engine.ground_batch`, so no camera waits for another camera's queue, and the model's
batched stages (the image encoder, the teacher-forced pass) serve all of them at once.

Ground, then track: a job with a `Tracking` (the standing query's when the node tracks, or a
goal's that asked for it) seeds that Tracking's TrackSet with its grounding; from then on
every new frame of its camera is tracked (at most `tracking_rate_hz`) on this same thread,
before the next model step (so one thread owns the GPU), and goes to the Reply's `tracked`.
A standing query is grounded again when its TrackSet says so; a goal's tracking ends when the
goal is cancelled (its one `finished` then comes, with its last result).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import gc
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Protocol

import numpy as np

from groundlmm_ros.engine.types import Cancelled, Grounding, InputError, Request
from groundlmm_ros.ros.conversion import ImageConversionError, to_rgb8
from groundlmm_ros.ros.messages import Tracks
from groundlmm_ros.ros.tracking import Tracking, stamp_s, tracked_grounding

if TYPE_CHECKING:
    from groundlmm_ros.engine.tracking import TrackSet

# Frames more elongated than this are refused before the model runs: the models resize by one side
# (CLIP by the shortest, SAM by the longest), so a 7000x1 frame becomes a zero-row or a gigantic
# image.
MAX_ASPECT_RATIO = 20
# The one camera of a node without named cameras: its topics are the plain `image`, `query`, ...
DEFAULT_CAMERA = ""


class Reply(Protocol):
    """Where one job's answer goes; the worker calls it on its thread."""

    def started(self) -> None:
        """The job's turn came: the worker took it from the queue."""

    def token(self, partial_answer: str, tokens: int) -> None:
        """The answer so far, while the model writes it."""

    def cancel_requested(self) -> bool:
        """Whether the asker gave up: checked before the job runs and between its tokens."""

    def finished(self, outcome: Outcome) -> None:
        """The job's end, once: its grounding or the reason there is none."""

    def tracked(self, outcome: Outcome) -> None:
        """A job with a Tracking: its objects on a later frame (outcome.tracks.tracked), or, for
        a goal, its grounding (the goal goes on tracking until cancelled)."""


@dataclass
class Job:
    query: str
    mode: str
    # "topic", "action" or "standing": who asked
    source: str
    reply: Reply
    # whose frame it grounds on and whose topics get its result
    camera: str = DEFAULT_CAMERA
    # Image/CompressedImage to ground on; None = the newest frame
    image: object = None
    received: float = field(default_factory=time.monotonic)
    # where its grounding goes on being tracked (None: a plain query)
    tracking: Tracking | None = None


@dataclass
class Outcome:
    job: Job
    # the Image/CompressedImage grounded on (its header is the result's)
    frame: object = None
    # (H, W, 3) uint8 RGB view of frame
    rgb: np.ndarray | None = None
    grounding: Grounding | None = None
    # why grounding is None
    error: str = ""
    cancelled: bool = False
    # seconds: message -> rgb array, and in engine.ground_batch (or tracking)
    convert_s: float = 0.0
    engine_s: float = 0.0
    # the phrases' track ids and whether it is a tracked frame (None: no tracking)
    tracks: Tracks | None = None


class CameraInputs:
    """One camera's side of the worker (guarded by the worker's lock): the newest frame, the
    queries waiting for it, its standing query."""

    def __init__(
        self, name: str, image_topic: str, reply: Reply, tracks: TrackSet | None, rate: float
    ):
        self.name = name
        # where its standing query's results go
        self.reply = reply
        self.image_topic = image_topic  # the resolved name, for the "no image yet" reason
        self.queue: collections.deque[Job] = collections.deque()
        self.frame = None  # newest Image/CompressedImage
        self.frame_version = 0  # frames put so far
        self.frame_used = True
        self.frames_unused = 0  # frames replaced by a newer one before any query used them
        self.standing: tuple[str, str, float] = ("", "describe", 0.0)  # query, mode, max_rate_hz
        self.standing_version = 0  # frame version of the last standing run
        # the worker's clock at the last standing run; None: none since the query was set
        self.standing_last: float | None = None
        # With tracking: the standing query's Tracking, then the goals' that track.
        self.tracking_period = 1.0 / rate if rate > 0 else 0.0
        self.trackings = [Tracking(tracks, standing=True)] if tracks is not None else []
        # the standing query changed: ground it before tracking on
        self.requery = False

    def put_frame(self, msg) -> None:
        if not self.frame_used:
            self.frames_unused += 1
        self.frame, self.frame_used = msg, False
        self.frame_version += 1

    def set_standing(self, query: str, mode: str, max_rate_hz: float) -> None:
        self.standing = (query, mode, max_rate_hz)
        self.standing_last = None
        self.requery = True

    def _standing_pending(self) -> bool:
        """A new frame for the standing query; with tracking, also its grounding is due."""
        if not self.standing[0] or self.frame_version <= self.standing_version:
            return False
        if not self.trackings or self.requery:
            return True
        return self.trackings[0].tracks.grounding_due(stamp_s(self.frame))

    def take(self, now: float) -> Job | None:
        """Its next queued job, else its standing job when due (once per new frame)."""
        if self.queue:
            return self.queue.popleft()
        query, mode, _ = self.standing
        if not self._standing_pending() or self._standing_wait(now) > 0:
            return None
        self.standing_version = self.frame_version
        self.standing_last = now
        if not self.trackings:
            return Job(query, mode, "standing", self.reply, camera=self.name)
        tracking = self.trackings[0]
        tracking.tracks.grounding_started(stamp_s(self.frame))
        self.requery = False
        # grounded on this very frame: the one its tracks are seeded on
        self.frame_used = True
        return Job(query, mode, "standing", self.reply, self.name, self.frame, tracking=tracking)

    def _tracking_pending(self, tracking: Tracking) -> bool:
        if tracking.standing and (not self.standing[0] or self.requery):
            return False
        new_frame = self.frame is not None and self.frame is not tracking.last_frame
        return new_frame and tracking.tracks.tracking

    def take_tracking(self, now: float) -> list[tuple[Tracking, object]]:
        """(tracking, frame) for each of its Trackings due to track its newest frame."""
        due = [
            (tracking, self.frame)
            for tracking in self.trackings
            if self._tracking_pending(tracking) and now >= tracking.next
        ]
        for tracking, frame in due:
            tracking.last_frame, tracking.next = frame, now + self.tracking_period
            self.frame_used = True
        return due

    def due_in(self, now: float) -> float | None:
        """Seconds until its standing job or a tracking is due; None when nothing is pending."""
        waits = [t.next - now for t in self.trackings if self._tracking_pending(t)]
        if self._standing_pending():
            waits.append(self._standing_wait(now))
        return min(waits) if waits else None

    def _standing_wait(self, now: float) -> float:
        """Seconds of the clock until max_rate_hz allows the next standing run. A clock that went
        back (a replayed bag starting over) allows it at once."""
        rate, last = self.standing[2], self.standing_last
        if rate <= 0 or last is None or now < last:
            return 0.0
        return last + 1.0 / rate - now


class Worker:
    """Owns the engine while serving: one thread; per camera the newest frame, a bounded queue
    and a standing query. cameras: camera name -> (its resolved image topic, the Reply of its
    standing query); their order is the cameras' order. clock: seconds now, by which max_rate_hz
    spaces the standing runs (the node's clock: simulated time under use_sim_time); while one is
    pending the worker reads it again whenever a frame arrives and when the wait it computed (as
    wall seconds) ends."""

    def __init__(
        self,
        engine,
        *,
        cameras: dict[str, tuple[str, Reply]],
        queue_size: int,
        max_image_pixels: int,
        max_new_tokens: int,
        log_error: Callable[[str], None],
        clock: Callable[[], float] = time.monotonic,
        new_tracks: Callable[[], TrackSet] | None = None,
        tracking_rate_hz: float = 0.0,
    ):
        self._engine = engine
        self._clock = clock
        self._queue_size = queue_size
        self._max_image_pixels = max_image_pixels
        self._max_new_tokens = max_new_tokens
        self._log_error = log_error
        self._wake = threading.Condition()
        self.new_tracks = new_tracks
        self.cameras = {
            name: CameraInputs(
                name, topic, reply, new_tracks() if new_tracks else None, tracking_rate_hz
            )
            for name, (topic, reply) in cameras.items()
        }
        self._stopping = ""  # reason, once stop() was called
        self._thread = threading.Thread(target=self._loop, name="groundlmm-worker", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, reason: str, timeout: float) -> None:
        """Cancel the running jobs at their next token, finish queued ones with `reason`, join."""
        with self._wake:
            self._stopping = reason
            self._wake.notify_all()
        self._thread.join(timeout)
        if self._thread.is_alive():
            self._log_error(f"worker did not stop within {timeout} s")

    @property
    def queue_length(self) -> int:
        return sum(len(camera.queue) for camera in self.cameras.values())

    @property
    def frames_unused(self) -> int:
        return sum(camera.frames_unused for camera in self.cameras.values())

    def put_frame(self, msg, camera: str = DEFAULT_CAMERA) -> None:
        with self._wake:
            self.cameras[camera].put_frame(msg)
            self._wake.notify_all()

    def set_standing(
        self, query: str, mode: str, max_rate_hz: float, camera: str = DEFAULT_CAMERA
    ) -> None:
        with self._wake:
            self.cameras[camera].set_standing(query, mode, max_rate_hz)
            self._wake.notify_all()

    def submit(self, job: Job) -> str:
        """Queue a job; '' when queued, else why it was refused (then it is never finished)."""
        with self._wake:
            if self._stopping:
                return f"node is not serving: {self._stopping}"
            camera = self.cameras.get(job.camera)
            if camera is None:
                return (
                    f"no camera {job.camera!r}: this node's cameras are "
                    f"{', '.join(repr(name) for name in self.cameras)} (parameter cameras)"
                )
            if job.image is None and camera.frame is None:
                return (
                    f"no image has arrived yet on {camera.image_topic}: "
                    "publish one there, or send one with the goal"
                )
            if len(camera.queue) >= self._queue_size:
                return (
                    f"query queue is full ({self._queue_size} waiting, parameter query_queue_size)"
                )
            camera.queue.append(job)
            self._wake.notify_all()
            return ""

    def _next_work(self) -> tuple[list, list[Job], list[Outcome]] | None:
        """What to do next, waiting until there is some: the (tracking, frame) pairs to track,
        one job from each camera that has one (see CameraInputs.take), and the last outcomes
        of the goals' trackings that were cancelled. None once stopping."""
        with self._wake:
            while not self._stopping:
                now = self._clock()
                ended = self._cancelled_trackings()
                tracking = [
                    t for camera in self.cameras.values() for t in camera.take_tracking(now)
                ]
                jobs = [job for camera in self.cameras.values() if (job := camera.take(now))]
                if tracking or jobs or ended:
                    return tracking, jobs, ended
                waits = [camera.due_in(now) for camera in self.cameras.values()]
                waits = [w for w in waits if w is not None]
                # a tracking goal's cancel is noticed within a tenth of a second
                if any(len(camera.trackings) > 1 for camera in self.cameras.values()):
                    waits.append(0.1)
                self._wake.wait(min(waits) if waits else None)
            return None

    def _cancelled_trackings(self) -> list[Outcome]:
        """Drop the goals' trackings whose goal was cancelled (or all of them, once stopping):
        their last outcomes, to finish the goals with."""
        ended = []
        for camera in self.cameras.values():
            for tracking in camera.trackings[1:]:
                if self._stopping or tracking.job.reply.cancel_requested():
                    camera.trackings.remove(tracking)
                    last = tracking.last
                    last.cancelled = not self._stopping
                    last.error = (
                        f"tracking ended: {self._stopping}" if self._stopping else "cancelled"
                    )
                    ended.append(last)
        return ended

    def _loop(self) -> None:
        while (work := self._next_work()) is not None:
            tracking, jobs, ended = work
            for outcome in ended:
                self._finish_job(outcome)
            for each, frame in tracking:
                self._track(each, frame)
            if jobs:
                self._step(jobs)
        with self._wake:
            ended = self._cancelled_trackings()
            queued = [job for camera in self.cameras.values() for job in camera.queue]
            for camera in self.cameras.values():
                camera.queue.clear()
        for outcome in ended:
            self._finish_job(outcome)
        for job in queued:
            self._finish_job(Outcome(job, error=f"not run: {self._stopping}"))

    def _step(self, jobs: list[Job]) -> None:
        """One model step: ground the jobs in one batch, finish them (a goal that tracks
        finishes when cancelled)."""
        try:
            outcomes = self._serve(jobs)
        # a bug in the path around the model costs these queries, not the worker
        except Exception as error:
            self._log_error(
                f"unexpected error on queries {[job.query for job in jobs]!r}:\n"
                f"{traceback.format_exc()}"
            )
            reason = f"internal error: {type(error).__name__}: {error}"
            outcomes = [Outcome(job, error=reason) for job in jobs]
        for outcome in outcomes:
            if outcome.job.tracking is not None and self._seed(outcome):
                outcome.job.reply.tracked(outcome)
            else:
                self._finish_job(outcome)

    def _seed(self, outcome: Outcome) -> bool:
        """Seed the job's Tracking with its grounding (outcome.tracks: the phrases' track ids);
        True when the job is a goal that now goes on tracking."""
        job, tracking = outcome.job, outcome.job.tracking
        if outcome.grounding is None:
            tracking.tracks.grounding_failed()
            return False
        phrases = outcome.grounding.phrases
        try:
            masks, labels = [p.mask for p in phrases], [p.text for p in phrases]
            ids = tracking.tracks.grounded(stamp_s(outcome.frame), outcome.rgb, masks, labels)
        except Exception:
            self._log_error(f"seeding the tracker failed:\n{traceback.format_exc()}")
            tracking.tracks.grounding_failed()
            return False
        outcome.tracks = Tracks(ids, [False] * len(ids))
        tracking.job, tracking.answer = job, outcome.grounding.answer
        tracking.spans = {i: (p.char_start, p.char_end) for i, p in zip(ids, phrases) if i}
        tracking.grounded_stamp = outcome.frame.header.stamp
        tracking.last_frame, tracking.last = outcome.frame, outcome
        if tracking.standing:
            return False
        with self._wake:
            self.cameras[job.camera].trackings.append(tracking)
        return True

    def _track(self, tracking: Tracking, frame) -> None:
        """Track the frame, hand the result (or why there is none) to the Reply's tracked."""
        job = dataclasses.replace(tracking.job, received=time.monotonic())
        outcome = Outcome(job, frame=frame, tracks=Tracks([], [], True, tracking.grounded_stamp))
        start = time.perf_counter()
        try:
            outcome.rgb = self._convert(frame)
            outcome.convert_s = time.perf_counter() - start
            objects = tracking.tracks.track(stamp_s(frame), outcome.rgb)
            outcome.grounding = tracked_grounding(tracking, objects, outcome.rgb.shape[:2])
            outcome.tracks.ids = [obj.track_id for obj in objects]
            outcome.tracks.lost = [obj.lost for obj in objects]
        except ImageConversionError as error:
            outcome.error = f"bad image: {error}"
        # a tracker's failure costs this frame, not the worker
        except Exception as error:
            self._log_error(f"tracking failed:\n{traceback.format_exc()}")
            outcome.error = f"tracking failed: {type(error).__name__}: {error}"
        outcome.engine_s = time.perf_counter() - start - outcome.convert_s
        if outcome.grounding is not None:
            tracking.last = outcome
        try:
            job.reply.tracked(outcome)
        except Exception:
            self._log_error(f"publishing a tracked result failed:\n{traceback.format_exc()}")

    def _should_stop(self, job: Job) -> bool:
        return bool(self._stopping) or job.reply.cancel_requested()

    def _serve(self, jobs: list[Job]) -> list[Outcome]:
        """The jobs' outcomes, in order; those with a usable frame grounded in one batch."""
        outcomes = [self._prepare(job) for job in jobs]
        ready = [outcome for outcome in outcomes if outcome.rgb is not None]
        if not ready:
            return outcomes
        requests = [
            Request(
                outcome.rgb,
                outcome.job.query,
                outcome.job.mode,
                on_token=outcome.job.reply.token,
                should_stop=functools.partial(self._should_stop, outcome.job),
                max_new_tokens=self._max_new_tokens,
            )
            for outcome in ready
        ]
        start = time.perf_counter()
        try:
            results = self._engine.ground_batch(requests)
        except Exception as error:  # the model must never take the node down
            results = [error] * len(ready)
        engine_s = time.perf_counter() - start  # every job of the batch waited this long for it
        out_of_memory = [result for result in results if is_out_of_memory(result)]
        if out_of_memory:
            for error in out_of_memory:
                # its traceback holds the failed step's frames, and so their tensors
                error.__traceback__ = None
            # what the failed step held goes back to the device before the next step
            release_cached_memory()
            self._log_error(
                f"out of memory in a model step of {len(ready)} queries "
                f"({len(out_of_memory)} failed): {out_of_memory[0]}; cached memory freed, "
                "the next step runs"
            )
        for outcome, result in zip(ready, results, strict=True):
            outcome.engine_s = engine_s
            if isinstance(result, Grounding):
                outcome.grounding = result
            else:
                self._failed(outcome, result)
        return outcomes

    def _prepare(self, job: Job) -> Outcome:
        """The job's turn has come: its frame, converted and checked (outcome.rgb), or the reason
        it cannot run (outcome.error)."""
        job.reply.started()
        with self._wake:
            camera = self.cameras[job.camera]
            frame = job.image if job.image is not None else camera.frame
            if job.image is None:
                camera.frame_used = True
        outcome = Outcome(job, frame=frame)
        # cancelled while it waited in the queue: never run
        if job.reply.cancel_requested():
            outcome.cancelled, outcome.error = True, "cancelled"
            return outcome
        start = time.perf_counter()
        try:
            outcome.rgb = self._convert(frame)
        except ImageConversionError as error:
            outcome.error = f"bad image: {error}"
            return outcome
        outcome.convert_s = time.perf_counter() - start
        return outcome

    def _convert(self, frame) -> np.ndarray:
        """The frame as (H, W, 3) uint8 RGB; ImageConversionError when it cannot be grounded."""
        pixels = frame.height * frame.width if hasattr(frame, "height") else 0
        if pixels > self._max_image_pixels:
            raise ImageConversionError(
                f"image of {frame.width}x{frame.height} = {pixels} pixels exceeds "
                f"max_image_pixels={self._max_image_pixels}"
            )
        rgb = to_rgb8(frame)
        if rgb.shape[0] * rgb.shape[1] > self._max_image_pixels:
            raise ImageConversionError(
                f"image of {rgb.shape[1]}x{rgb.shape[0]} pixels exceeds "
                f"max_image_pixels={self._max_image_pixels}"
            )
        height, width = rgb.shape[:2]
        if max(height, width) > MAX_ASPECT_RATIO * min(height, width):
            raise ImageConversionError(
                f"image of {width}x{height} pixels is more elongated than "
                f"{MAX_ASPECT_RATIO}:1, which the models cannot resize"
            )
        return rgb

    def _failed(self, outcome: Outcome, error: Exception) -> None:
        """Why the engine gave this job no grounding, as its outcome says it."""
        job = outcome.job
        if isinstance(error, Cancelled):
            outcome.cancelled = True
            outcome.error = f"cancelled: {self._stopping}" if self._stopping else "cancelled"
        elif isinstance(error, InputError):
            outcome.error = f"input refused by the engine: {error}"
        elif is_out_of_memory(error):
            outcome.error = f"out of memory: {type(error).__name__}: {error}"
        else:
            trace = "".join(traceback.format_exception(error))
            self._log_error(f"model error on query {job.query!r}:\n{trace}")
            outcome.error = f"model error: {type(error).__name__}: {error}"

    def _finish_job(self, outcome: Outcome) -> None:
        try:
            outcome.job.reply.finished(outcome)
        # a failed reply must not stop the worker
        except Exception:
            self._log_error(f"finishing a job failed:\n{traceback.format_exc()}")


def is_out_of_memory(result) -> bool:
    """Whether a step's result is torch's out-of-memory error (CUDA's or another device's)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(result, torch.OutOfMemoryError)


def release_cached_memory() -> None:
    """Collect what has no reference left and hand the cached GPU memory back to the device
    (torch is imported only where a model runs)."""
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()
