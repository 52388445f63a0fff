"""One Ground action goal from acceptance to its one terminal state: the Reply of its job.

The node accepts every goal and queues it with the worker at once (as
ros2/examples' server_queue_goals queues goal handles), so a waiting goal holds
no executor thread. When its turn comes the worker calls `started`, which hands
the goal to the executor (EXECUTING); its execute callback then holds one
executor thread only while the model answers it. A goal that was never queued
starts at once and ends ABORTED with the reason.

A goal with `track` goes on after its grounding: the grounding and then each tracked frame
come as feedback `tracked` (and on `grounding`) until the goal is cancelled; it then ends
CANCELED with the last of them as its result (its execute callback holds its executor thread
all that time).
"""

from __future__ import annotations

import threading

from groundlmm_msgs.action import Ground
from groundlmm_msgs.msg import GroundingResult


class GoalRun:
    """results: the ResultPublisher of the goal's camera (None for a goal refused at once), which
    publishes the goal's GroundingResult on `grounding` too."""

    def __init__(self, goal_handle, context, results):
        self.handle = goal_handle
        # why it was never queued ('' once queued)
        self.refused = ""
        self._context = context
        self._results = results
        # the worker's Outcome, once finished
        self._outcome = None
        # the GroundingResult published for it (None if that failed)
        self._result = None
        self._finished = threading.Event()
        self._started = False
        self._lock = threading.Lock()

    # ---- the Reply of its job (on the worker thread) -----------------------------------------

    def started(self) -> None:
        """Hand the goal to the executor, once: when the worker takes it, or at once when it was
        refused."""
        with self._lock:
            if self._started:
                return
            self._started = True
        # after Ctrl-C the goal can no longer change state
        if self._context.ok():
            self.handle.execute()

    def token(self, partial_answer: str, tokens: int) -> None:
        if self._context.ok():
            self.handle.publish_feedback(
                Ground.Feedback(partial_answer=partial_answer, tokens=tokens)
            )

    def cancel_requested(self) -> bool:
        return self.handle.is_cancel_requested

    def tracked(self, outcome) -> None:
        """A goal that tracks: its grounding, then each tracked frame, published on `grounding`
        and as feedback."""
        result = self._results.publish(outcome)
        if outcome.grounding is not None:
            self._result = result
        if self._context.ok():
            self.handle.publish_feedback(Ground.Feedback(tracked=result))

    def finished(self, outcome) -> None:
        """Publish its GroundingResult (a tracking goal's last one went out already), then let
        the execute callback end the goal with it (also when publishing failed: the goal is
        never lost)."""
        try:
            if outcome.tracks is None:
                self._result = self._results.publish(outcome)
        finally:
            self._outcome = outcome
            self._finished.set()
            self.started()

    # ---- the action's execute callback (on an executor thread) --------------------------------

    def execute(self) -> Ground.Result:
        """Sets the goal's terminal state, returns its result."""
        if self.refused:
            self._end(self.handle.abort)
            return Ground.Result(success=False, message=self.refused)
        while not self._finished.wait(0.5) and self._context.ok():
            pass
        outcome = self._outcome
        # Ctrl-C before the worker finished it
        if outcome is None:
            self._end(self.handle.abort)
            return Ground.Result(success=False, message="the node is shutting down")
        if self._result is not None and self._result.success and not outcome.error:
            self._end(self.handle.succeed)
            return Ground.Result(result=self._result, success=True)
        self._end(
            self.handle.canceled
            if outcome.cancelled and self.handle.is_cancel_requested
            else self.handle.abort
        )
        # the same failed GroundingResult that went out on `grounding` (empty if delivering it
        # failed); a tracking goal's last tracked result
        return Ground.Result(
            result=self._result or GroundingResult(),
            success=False,
            message=outcome.error or "delivering the result failed",
        )

    def _end(self, transition) -> None:
        """Set the terminal state. After Ctrl-C the state still changes (so rclpy does not set it
        again) but publishing it fails by design: nothing to report then."""
        try:
            transition()
        except Exception:
            if self._context.ok():
                raise
