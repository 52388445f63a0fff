"""groundlmm_node whose model waits at a gate the test controls: load tests fill the queue
deterministically instead of by outrunning the machine (test support only; the engine is the real
one).

    python gated_node.py GATE_DIR --ros-args ...

Every Engine.ground call first appends a line to GATE_DIR/started, then waits until GATE_DIR/open
exists (or the query is cancelled: Cancelled, as the engine raises between tokens), then runs the
real engine. While GATE_DIR/hold_configure exists, building the model waits (after creating
GATE_DIR/configuring): the test can interrupt the node in the middle of configure. Every wait ends
after GATE_TIMEOUT_S with an error, so a test that forgets the gate fails instead of hanging.
With GATE_DIR/hang_at_exit, stopping the node's worker (the first step of its teardown) first blocks
in a C call that holds the GIL, as a deadlocked DDS teardown does.
"""

import ctypes
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

    def ground(self, image, query, mode="describe", *, should_stop=None, **options):
        with open(self._gate / "started", "a") as f:
            f.write(query + "\n")
        stop = should_stop or (lambda: False)
        wait_while(lambda: not (self._gate / "open").exists(), "ground() waited at the gate", stop)
        return self._engine.ground(image, query, mode, should_stop=should_stop, **options)


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
