"""groundlmm_node whose model waits at a gate the test controls: load tests fill the queue
deterministically instead of by outrunning the machine (test support only; the engine is the real
one).

    python gated_node.py GATE_DIR --ros-args ...

Every Engine.ground_batch call (one model step) first appends a line per query to
GATE_DIR/started and its queries, a JSON list, as a line to GATE_DIR/batches; then it waits until
GATE_DIR/open exists, or it takes a permit (a file GATE_DIR/permit-*, one step each), or every
query is cancelled (Cancelled, as the engine gives between tokens); then it runs the real engine.
While GATE_DIR/hold_configure exists, building the model waits (after creating
GATE_DIR/configuring): the test can interrupt the node in the middle of configure. Every wait ends
after GATE_TIMEOUT_S with an error, so a test that forgets the gate fails instead of hanging.
With GATE_DIR/hang_at_exit, stopping the node's worker (the first step of its teardown) first blocks
in a C call that holds the GIL, as a deadlocked DDS teardown does.
"""

import ctypes
import json
import sys
import time
from pathlib import Path

import groundlmm_ros.models.presets as presets
from groundlmm_ros.engine.types import Cancelled
from groundlmm_ros.ros import node

GATE_TIMEOUT_S = 60.0


def wait_while(condition, what: str, should_stop=lambda: False) -> None:
    deadline = time.monotonic() + GATE_TIMEOUT_S
    while condition():
        if should_stop():
            raise Cancelled()
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"gated_node: {what} for {GATE_TIMEOUT_S} s; the test never released it"
            )
        time.sleep(0.005)


class GatedEngine:
    """The real engine behind a gate; every other attribute is the engine's."""

    def __init__(self, engine, gate: Path):
        self._engine, self._gate = engine, gate

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def _take_permit(self) -> bool:
        for permit in sorted(self._gate.glob("permit-*")):
            permit.unlink()
            return True
        return False

    def ground_batch(self, requests):
        with open(self._gate / "started", "a") as f:
            f.write("".join(request.query + "\n" for request in requests))
        with open(self._gate / "batches", "a") as f:
            f.write(json.dumps([request.query for request in requests]) + "\n")

        def all_stopped():
            return all(request.should_stop and request.should_stop() for request in requests)

        try:
            wait_while(
                lambda: not ((self._gate / "open").exists() or self._take_permit()),
                "ground_batch() waited at the gate",
                all_stopped,
            )
        except Cancelled as cancelled:
            return [cancelled] * len(requests)
        return self._engine.ground_batch(requests)


def main() -> None:
    gate = Path(sys.argv.pop(1))
    build_engine = presets.build_engine

    def gated_build_engine(*args, **kwargs):
        (gate / "configuring").touch()
        wait_while(lambda: (gate / "hold_configure").exists(), "configure was held")
        return GatedEngine(build_engine(*args, **kwargs), gate)

    presets.build_engine = (
        gated_build_engine  # node.py imports build_engine from presets at configure
    )
    if (gate / "hang_at_exit").exists():
        stop_serving = node.GroundingNode._stop_serving

        def hanging_teardown(self, *args, **kwargs):
            ctypes.PyDLL(None).sleep(60)  # PyDLL: the GIL stays held for the whole call
            stop_serving(self, *args, **kwargs)

        node.GroundingNode._stop_serving = hanging_teardown
    node.main()


if __name__ == "__main__":
    main()
