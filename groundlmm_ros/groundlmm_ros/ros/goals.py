"""One Ground action goal from acceptance to its one terminal state.

The node accepts every goal and queues it with the worker at once (as
ros2/examples' server_queue_goals queues goal handles), so a waiting goal holds
no executor thread. When its turn comes the worker calls `start`, which hands
the goal to the executor (EXECUTING); its execute callback then holds one
executor thread only while the model answers it. A goal that was never queued
starts at once and ends ABORTED with the reason.
"""

from __future__ import annotations

import threading

from groundlmm_msgs.action import Ground
from groundlmm_msgs.msg import GroundingResult


class GoalRun:
    def __init__(self, goal_handle, context):
        self.handle = goal_handle
        self.refused = ""  # why it was never queued ('' once queued)
        self._context = context
        self._outcome = None  # the worker's Outcome, once finished
        self._result = None  # the GroundingResult the node published for it (None if that failed)
        self._finished = threading.Event()
        self._started = False
        self._lock = threading.Lock()

    def start(self) -> None:
        """Hand the goal to the executor, once: when the worker takes it, or at once when it was
        refused."""
        with self._lock:
            if self._started:
                return
            self._started = True
        if self._context.ok():  # after Ctrl-C the goal can no longer change state
            self.handle.execute()

    def finish(self, outcome, result: GroundingResult | None) -> None:
        """The node's reply once the worker finished the job (every queued job gets one, also when
        the worker stops): its outcome and the GroundingResult published for it."""
        self._outcome, self._result = outcome, result
        self._finished.set()
        self.start()

    def _end(self, transition) -> None:
        """Set the terminal state. After Ctrl-C the state still changes (so rclpy does not set it
        again) but publishing it fails by design: nothing to report then."""
        try:
            transition()
        except Exception:
            if self._context.ok():
                raise

    def feedback(self, partial_answer: str, tokens: int) -> None:
        if self._context.ok():
            self.handle.publish_feedback(
                Ground.Feedback(partial_answer=partial_answer, tokens=tokens)
            )

    def execute(self) -> Ground.Result:
        """The goal's execute callback, on an executor thread: sets its terminal state, returns its
        result."""
        if self.refused:
            self._end(self.handle.abort)
            return Ground.Result(success=False, message=self.refused)
        while not self._finished.wait(0.5) and self._context.ok():
            pass
        outcome = self._outcome
        if outcome is None:  # Ctrl-C before the worker finished it
            self._end(self.handle.abort)
            return Ground.Result(success=False, message="the node is shutting down")
        if self._result is not None and self._result.success:
            self._end(self.handle.succeed)
            return Ground.Result(result=self._result, success=True)
        self._end(
            self.handle.canceled
            if outcome.cancelled and self.handle.is_cancel_requested
            else self.handle.abort
        )
        # the same failed GroundingResult that went out on `grounding` (empty if delivering it
        # failed)
        return Ground.Result(
            result=self._result or GroundingResult(),
            success=False,
            message=outcome.error or "delivering the result failed",
        )
