"""What the node publishes for a finished query, on the worker thread: its one GroundingResult
on `grounding` (also what its goal returns), and while subscribed the RViz overlay, markers and
depth points; the 3D centroids come from the depth frame matching the image."""

from __future__ import annotations

import dataclasses
import time

import numpy as np

from groundlmm_msgs.msg import GroundingResult
from groundlmm_ros.ros import depth, messages, visualization
from groundlmm_ros.ros.conversion import numpy_to_image
from groundlmm_ros.ros.diagnostics import Stats
from groundlmm_ros.ros.worker import Job, Outcome


def log_query_problem(node, job: Job, what: str, reason: str) -> None:
    """A warning that a query was `what` ("rejected", "failed") and why; a standing query's at
    most every 5 s (it repeats on every frame)."""
    # after Ctrl-C: nothing to report, and /rosout is gone
    if not node.context.ok():
        return
    shown = job.query if len(job.query) <= 80 else job.query[:77] + "..."
    if job.source == "standing":
        node.get_logger().warning(
            f"standing query {shown!r} {what}: {reason}", throttle_duration_sec=5.0
        )
    else:
        node.get_logger().warning(f"{what} {job.source} query {shown!r}: {reason}")


class ResultPublisher:
    """One camera's outputs, by name ("grounding", "overlay", "markers", "points"), and the Reply
    of its topic and standing queries: a finished one is published. depth_buffer: its depth
    frames; node: whose logger takes the warnings."""

    def __init__(
        self,
        node,
        camera: str,
        publishers: dict,
        params,
        depth_buffer: depth.DepthBuffer,
        stats: Stats,
    ):
        self._node = node
        self.camera = camera
        self.publishers = publishers
        self._params = params
        self._depth = depth_buffer
        self._stats = stats

    # A topic or standing query's Reply: nobody waits for its start or its tokens, nobody cancels.

    def started(self) -> None:
        pass

    def token(self, partial_answer: str, tokens: int) -> None:
        pass

    def cancel_requested(self) -> bool:
        return False

    def finished(self, outcome: Outcome) -> None:
        self.publish(outcome)

    def tracked(self, outcome: Outcome) -> None:
        self.publish(outcome)

    def publish(self, outcome: Outcome) -> GroundingResult:
        """Publish the outcome's GroundingResult (success false + the reason when it failed) and,
        for a grounding, the outputs somebody subscribes to; returns the GroundingResult."""
        job, params, tracks = outcome.job, self._params, outcome.tracks
        header = outcome.frame.header if outcome.frame is not None else None
        # accepted, then failed: still its one GroundingResult
        if outcome.grounding is None:
            if not outcome.cancelled:
                self._stats.count("errors")
            log_query_problem(self._node, job, "failed", outcome.error)
            result = messages.failed_result(
                job.query,
                job.mode,
                outcome.error,
                header,
                params.model,
                outcome.convert_s + outcome.engine_s,
                "tracked" if tracks is not None and tracks.tracked else "grounded",
            )
            self.publishers["grounding"].publish(result)
            return result
        start = time.perf_counter()
        grounding = outcome.grounding
        points = self._points_3d(outcome)
        centroids = (
            [depth.centroid(p) for p in points]
            if points
            else [np.full(3, np.nan)] * len(grounding.phrases)
        )
        inference_time = outcome.convert_s + outcome.engine_s + time.perf_counter() - start
        result = messages.grounding_result(
            grounding, header, params.model, inference_time, centroids, params.mask_format, tracks
        )
        ids = tracks.ids if tracks else [0] * len(centroids)
        lost = tracks.lost if tracks else [False] * len(centroids)
        # RViz labels each tracked object with its track id; a lost one has nothing to show
        labels = [f"#{i} {p.text}" if i else p.text for p, i in zip(grounding.phrases, ids)]
        shown = [i for i, gone in enumerate(lost) if not gone]
        outputs = self.publishers
        outputs["grounding"].publish(result)
        if outputs["overlay"].get_subscription_count() > 0:
            visible = dataclasses.replace(grounding, phrases=[grounding.phrases[i] for i in shown])
            canvas = visualization.overlay(
                np.ascontiguousarray(outcome.rgb), visible, [labels[i] for i in shown]
            )
            outputs["overlay"].publish(numpy_to_image(canvas, "rgb8", header))
        if outputs["markers"].get_subscription_count() > 0:
            outputs["markers"].publish(
                visualization.markers(
                    grounding, centroids, header, params.marker_lifetime_s, labels
                )
            )
        if points and outputs["points"].get_subscription_count() > 0:
            outputs["points"].publish(depth.pointcloud(points, header))
        self._stats.published(
            self.camera, job.received, outcome.convert_s + time.perf_counter() - start
        )
        return result

    def _points_3d(self, outcome: Outcome) -> list[np.ndarray]:
        """Each phrase's (N, 3) depth points in the image frame; [] (with a logged reason) without
        depth."""
        params = self._params
        if not params.use_depth or not outcome.grounding.phrases:
            return []
        try:
            depth_msg, info = self._depth.match(
                outcome.frame.header, params.depth_stamp_tolerance_s
            )
            points = depth.masks_points(
                [p.mask for p in outcome.grounding.phrases],
                depth_msg,
                info,
                params.depth_unit_divisor,
            )
        except depth.DepthError as error:
            self._stats.count("errors")
            self._node.get_logger().warning(
                f"no 3D centroids for query {outcome.job.query!r}: {error}"
            )
            return []
        empty = [p.text for p, xyz in zip(outcome.grounding.phrases, points) if len(xyz) == 0]
        if empty:
            self._node.get_logger().warning(
                f"no valid depth (0 or NaN) under the mask of {empty}: their centroids are NaN"
            )
        return points
