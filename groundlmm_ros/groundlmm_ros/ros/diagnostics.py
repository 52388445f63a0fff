"""The node's counters and its /diagnostics status."""

from __future__ import annotations

import collections
import threading
import time

import numpy as np
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus

from groundlmm_ros.ros import messages


class Stats:
    """Counters for /diagnostics, updated from callbacks and the worker."""

    def __init__(self):
        self.lock = threading.Lock()
        self.queries_received = self.queries_rejected = self.results_published = 0
        self.frames_received = self.depth_frames_received = self.camera_infos_received = (
            self.errors
        ) = 0
        self.latency_ms = collections.deque(maxlen=100)  # query received -> result published
        self.overhead_ms = collections.deque(
            maxlen=100
        )  # conversion + depth + message building + publishing
        self.results_by_camera = collections.Counter()

    def count(self, name: str) -> None:
        with self.lock:
            setattr(self, name, getattr(self, name) + 1)

    def published(self, camera: str, received: float, overhead_s: float) -> None:
        """A result went out on `camera`'s topic for a query received at monotonic time
        `received`."""
        with self.lock:
            self.results_published += 1
            self.results_by_camera[camera] += 1
            self.latency_ms.append(1000 * (time.monotonic() - received))
            self.overhead_ms.append(1000 * overhead_s)


def status(stamp, name: str, state: str, params, worker, stats: Stats) -> DiagnosticArray:
    """The /diagnostics message: OK while active, WARN otherwise; the counters as values."""
    with stats.lock:
        values = {
            "state": state,
            "model": params.model,
            "queue_length": worker.queue_length if worker else 0,
            "queue_size": params.query_queue_size,
            "frames_received": stats.frames_received,
            "frames_unused": worker.frames_unused if worker else 0,
            "depth_frames_received": stats.depth_frames_received,
            "camera_infos_received": stats.camera_infos_received,
            "queries_received": stats.queries_received,
            "queries_rejected": stats.queries_rejected,
            "results_published": stats.results_published,
            "errors": stats.errors,
            "latency_ms_p50": _median(stats.latency_ms),
            "overhead_ms_p50": _median(stats.overhead_ms),
        }
        for camera, inputs in worker.cameras.items() if worker else ():
            if camera:  # per named camera: how it is served
                values[f"{camera}/queue_length"] = len(inputs.queue)
                values[f"{camera}/frames_unused"] = inputs.frames_unused
                values[f"{camera}/results_published"] = stats.results_by_camera[camera]
    level = DiagnosticStatus.OK if state == "active" else DiagnosticStatus.WARN
    return messages.status_array(stamp, name, params.device, level, state, values)


def _median(samples) -> float:
    return round(float(np.median(samples)), 3) if samples else float("nan")
