"""The one thread that runs the engine, the newest-frame slot and the bounded query queue.

ROS callbacks only call `put_frame` and `submit` (cheap, never the model).
Every submitted job gets exactly one `finish(outcome)` call, on the worker
thread: with a Grounding, or with the reason there is none (bad image, model
error, cancelled, node deactivated). A job that cannot be queued is refused
by `submit` at once with its reason and is never finished.
"""

from __future__ import annotations

import collections
import threading
import time
import traceback
import unicodedata
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from groundlmm_ros.engine.types import MODES, Cancelled, Grounding, InputError
from groundlmm_ros.ros.conversion import ImageConversionError, to_rgb8

# Frames more elongated than this are refused before the model runs: the models resize by one side
# (CLIP by the shortest, SAM by the longest), so a 7000x1 frame becomes a zero-row or a gigantic
# image.
MAX_ASPECT_RATIO = 20


@dataclass
class Job:
    query: str
    mode: str
    source: str  # "topic", "action" or "standing": who asked
    image: object = None  # Image/CompressedImage to ground on; None = the newest frame
    on_token: Callable[[str, int], None] | None = None  # partial answer, tokens so far
    cancel_requested: Callable[[], bool] = lambda: False
    reply: Callable[..., None] | None = None  # the node's: resolves an action goal after finish
    on_start: Callable[[], None] | None = None  # called on the worker thread when its turn comes
    received: float = field(default_factory=time.monotonic)


@dataclass
class Outcome:
    job: Job
    frame: object = None  # the Image/CompressedImage grounded on (its header is the result's)
    rgb: np.ndarray | None = None  # (H, W, 3) uint8 RGB view of frame
    grounding: Grounding | None = None
    error: str = ""  # why grounding is None
    cancelled: bool = False
    convert_s: float = 0.0  # message -> rgb array
    engine_s: float = 0.0  # engine.ground


def query_problem(query: str, mode: str, max_length: int) -> str:
    """Why a query cannot be run ('' if it can)."""
    if mode not in MODES:
        return f"unknown mode {mode!r}: expected one of {', '.join(MODES)}"
    if not query.strip():
        return "empty query"
    if len(query) > max_length:
        return f"query has {len(query)} characters, more than max_query_length={max_length}"
    # rclpy decodes invalid UTF-8 in a string field to U+FFFD instead of failing.
    if "\ufffd" in query:
        return "query is not valid UTF-8 text (it holds replacement characters U+FFFD)"
    control = next(
        (c for c in query if unicodedata.category(c) == "Cc" and c not in "\t\n\r"), None
    )
    if control is not None:
        return f"query contains the control character U+{ord(control):04X}"
    return ""


class Worker:
    """Owns the engine while serving: one thread, newest frame, bounded queue, standing query.
    finish(outcome) is called once per job, on the worker thread."""

    def __init__(
        self,
        engine,
        finish: Callable[[Outcome], None],
        *,
        queue_size: int,
        image_topic: str,
        max_image_pixels: int,
        max_new_tokens: int,
        log_error: Callable[[str], None],
    ):
        self._engine = engine
        self._finish = finish
        self._queue_size = queue_size
        self._image_topic = image_topic  # the resolved name, for the "no image yet" reason
        self._max_image_pixels = max_image_pixels
        self._max_new_tokens = max_new_tokens
        self._log_error = log_error
        self._wake = threading.Condition()
        self._queue: collections.deque[Job] = collections.deque()
        self._frame = None  # newest Image/CompressedImage
        self._frame_version = 0  # frames put so far
        self._frame_used = True
        self._standing: tuple[str, str, float] = ("", "describe", 0.0)  # query, mode, max_rate_hz
        self._standing_version = 0  # frame version of the last standing run
        self._standing_next = 0.0  # monotonic time before which no standing run starts
        self._stopping = ""  # reason, once stop() was called
        self.frames_unused = 0  # frames replaced by a newer one before any query used them
        self._thread = threading.Thread(target=self._loop, name="groundlmm-worker", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, reason: str, timeout: float) -> None:
        """Cancel the running job at its next token, finish queued ones with `reason`, join."""
        with self._wake:
            self._stopping = reason
            self._wake.notify_all()
        self._thread.join(timeout)
        if self._thread.is_alive():
            self._log_error(f"worker did not stop within {timeout} s")

    @property
    def queue_length(self) -> int:
        return len(self._queue)

    def put_frame(self, msg) -> None:
        with self._wake:
            if not self._frame_used:
                self.frames_unused += 1
            self._frame, self._frame_used = msg, False
            self._frame_version += 1
            self._wake.notify_all()

    def set_standing(self, query: str, mode: str, max_rate_hz: float) -> None:
        with self._wake:
            self._standing = (query, mode, max_rate_hz)
            self._standing_next = 0.0
            self._wake.notify_all()

    def submit(self, job: Job) -> str:
        """Queue a job; '' when queued, else why it was refused (then it is never finished)."""
        with self._wake:
            if self._stopping:
                return f"node is not serving: {self._stopping}"
            if job.image is None and self._frame is None:
                return (
                    f"no image has arrived yet on {self._image_topic}: "
                    "publish one there, or send one with the goal"
                )
            if len(self._queue) >= self._queue_size:
                return (
                    f"query queue is full ({self._queue_size} waiting, parameter query_queue_size)"
                )
            self._queue.append(job)
            self._wake.notify_all()
            return ""

    def _next_job(self) -> Job | None:
        """The next queued job, else a due standing job; waits; None once stopping."""
        with self._wake:
            while not self._stopping:
                if self._queue:
                    return self._queue.popleft()
                query, mode, rate = self._standing
                now = time.monotonic()
                if query and self._frame_version > self._standing_version:
                    if now >= self._standing_next:
                        self._standing_version = self._frame_version
                        self._standing_next = now + (1.0 / rate if rate > 0 else 0.0)
                        return Job(query, mode, "standing")
                    self._wake.wait(self._standing_next - now)
                else:
                    self._wake.wait()
            return None

    def _loop(self) -> None:
        while (job := self._next_job()) is not None:
            try:
                outcome = self._serve(job)
            except (
                Exception
            ) as error:  # a bug in the path around the model costs this query, not the worker
                self._log_error(
                    f"unexpected error on query {job.query!r}:\n{traceback.format_exc()}"
                )
                outcome = Outcome(job, error=f"internal error: {type(error).__name__}: {error}")
            self._finish_job(outcome)
        with self._wake:
            queued, self._queue = list(self._queue), collections.deque()
        for job in queued:
            self._finish_job(Outcome(job, error=f"not run: {self._stopping}"))

    def _should_stop(self, job: Job) -> bool:
        return bool(self._stopping) or job.cancel_requested()

    def _serve(self, job: Job) -> Outcome:
        if job.on_start is not None:
            job.on_start()
        with self._wake:
            frame = job.image if job.image is not None else self._frame
            if job.image is None:
                self._frame_used = True
        outcome = Outcome(job, frame=frame)
        if job.cancel_requested():  # cancelled while it waited in the queue: never run
            outcome.cancelled, outcome.error = True, "cancelled"
            return outcome
        start = time.perf_counter()
        try:
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
        except ImageConversionError as error:
            outcome.error = f"bad image: {error}"
            return outcome
        outcome.rgb = rgb
        outcome.convert_s = time.perf_counter() - start
        start = time.perf_counter()
        try:
            outcome.grounding = self._engine.ground(
                rgb,
                job.query,
                job.mode,
                on_token=job.on_token,
                should_stop=lambda: self._should_stop(job),
                max_new_tokens=self._max_new_tokens,
            )
        except Cancelled:
            outcome.cancelled = True
            outcome.error = f"cancelled: {self._stopping}" if self._stopping else "cancelled"
        except InputError as error:
            outcome.error = f"input refused by the engine: {error}"
        except Exception as error:  # the model must never take the node down
            self._log_error(f"model error on query {job.query!r}:\n{traceback.format_exc()}")
            outcome.error = f"model error: {type(error).__name__}: {error}"
        outcome.engine_s = time.perf_counter() - start
        return outcome

    def _finish_job(self, outcome: Outcome) -> None:
        try:
            self._finish(outcome)
        except Exception:  # a failed finish must not stop the worker
            self._log_error(f"finishing a job failed:\n{traceback.format_exc()}")
