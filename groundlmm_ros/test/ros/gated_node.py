"""groundlmm_node whose model waits at a gate the test controls: tests fill the queue
deterministically instead of by outrunning the machine (test support only; the engine is the real
one). The node runs it as its engine, through GroundingNode's engine factory:

    python gated_node.py GATE_DIR --ros-args ...

The gate is a folder (Gate), so a test process and a node process share it. Every
Engine.ground_batch call (one model step) first appends a line per query to GATE_DIR/started and
its queries, a JSON list, as a line to GATE_DIR/batches; then it waits until GATE_DIR/open exists,
or it takes a permit (a file GATE_DIR/permit-*, one step each), or every query is cancelled
(Cancelled, as the engine gives between tokens); then it runs the real engine. While
GATE_DIR/hold_configure exists, building the model waits (after creating GATE_DIR/configuring):
the test can interrupt the node in the middle of configure. Every wait ends after GATE_TIMEOUT_S
with an error, so a test that forgets the gate fails instead of hanging. With
GATE_DIR/hang_at_exit, a model step held at the gate when the node stops its worker (the first
step of its teardown) blocks in a C call that holds the GIL, as a deadlocked DDS teardown does.
While GATE_DIR/out_of_memory exists, a model step that passes the gate takes it away and raises
torch.OutOfMemoryError instead of running, as a step that outgrows the GPU's memory does.
"""

import ctypes
import itertools
import json
import sys
import time
from pathlib import Path

import torch

from groundlmm_ros.engine.types import Cancelled
from groundlmm_ros.models.presets import build_engine
from groundlmm_ros.ros import process

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


class Gate:
    """The gate's folder, from both sides: the test opens, closes and permits steps and reads
    which queries started; the gated engine records its steps and waits."""

    def __init__(self, folder: Path):
        self.folder = folder
        self._permits = itertools.count()

    def flag(self, name: str) -> Path:
        """GATE_DIR/name: "hold_configure", "configuring", "hang_at_exit", "open",
        "out_of_memory"."""
        return self.folder / name

    def open(self) -> None:
        self.flag("open").touch()

    def close(self) -> None:
        self.flag("open").unlink(missing_ok=True)

    def allow_batches(self, count: int = 1) -> None:
        """Let `count` more model steps through the closed gate (one permit file each)."""
        for _ in range(count):
            (self.folder / f"permit-{next(self._permits)}").touch()

    def started(self) -> list[str]:
        """The queries the model has started on, in order."""
        path = self.folder / "started"
        return path.read_text().splitlines() if path.exists() else []

    def batches(self) -> list[list[str]]:
        """The queries of each model step, in order (whole lines: the node may be writing one)."""
        path = self.folder / "batches"
        lines = path.read_text().split("\n")[:-1] if path.exists() else []
        return [json.loads(line) for line in lines]

    def wait_started(self, count: int, timeout: float = 20.0) -> bool:
        """Whether the model started on `count` queries within timeout seconds."""
        deadline = time.monotonic() + timeout
        while len(self.started()) < count:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True

    # ---- the engine's side ---------------------------------------------------------------------

    def record(self, queries: list[str]) -> None:
        # The step's line first: a test that saw its queries started (wait_started) then reads
        # the step in batches().
        with open(self.folder / "batches", "a") as f:
            f.write(json.dumps(queries) + "\n")
        with open(self.folder / "started", "a") as f:
            f.write("".join(query + "\n" for query in queries))

    def passes(self) -> bool:
        """Open, or a permit taken."""
        if self.flag("open").exists():
            return True
        for permit in sorted(self.folder.glob("permit-*")):
            permit.unlink()
            return True
        return False


class GatedEngine:
    """The real engine behind a gate; every other attribute is the engine's."""

    def __init__(self, engine, gate: Gate):
        self._engine, self._gate = engine, gate

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def ground_batch(self, requests):
        self._gate.record([request.query for request in requests])

        def all_stopped():
            return all(request.should_stop and request.should_stop() for request in requests)

        try:
            wait_while(
                lambda: not self._gate.passes(), "ground_batch() waited at the gate", all_stopped
            )
        except Cancelled as cancelled:
            if self._gate.flag("hang_at_exit").exists():
                hanging_teardown()
            return [cancelled] * len(requests)
        out_of_memory = self._gate.flag("out_of_memory")
        if out_of_memory.exists():
            out_of_memory.unlink()
            raise torch.OutOfMemoryError(
                "CUDA out of memory. Tried to allocate 20.00 GiB (raised by gated_node)"
            )
        return self._engine.ground_batch(requests)


def hanging_teardown() -> None:
    # PyDLL: the GIL stays held for the whole call
    ctypes.PyDLL(None).sleep(60)


def gated_engine_factory(gate: Gate):
    """A GroundingNode engine factory: the presets' engine behind `gate`, built once the test
    lets configure go on."""

    def build(*args, **kwargs):
        gate.flag("configuring").touch()
        wait_while(lambda: gate.flag("hold_configure").exists(), "configure was held")
        return GatedEngine(build_engine(*args, **kwargs), gate)

    return build


def main() -> None:
    gate = Gate(Path(sys.argv.pop(1)))
    process.main(engine_factory=gated_engine_factory(gate))


if __name__ == "__main__":
    main()
