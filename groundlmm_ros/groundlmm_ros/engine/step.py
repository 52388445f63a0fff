"""One Engine.ground_batch call while it runs: its requests, each one's stage timings and, once
it has ended, its result. Shared stages (the batched encoder, teacher-forced pass, decoding)
run once for several requests; an exception there ends all of them, one in a request's own
work ends only that request."""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import contextmanager

from groundlmm_ros.engine.types import Cancelled, Grounding, Request


class Stages:
    """Seconds per named stage of one query (`with stage("encode"): ...`), plus "total"."""

    def __init__(self):
        self.start = time.perf_counter()
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - start)

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    def timings(self) -> dict[str, float]:
        return {**self.seconds, "total": time.perf_counter() - self.start}


def raise_if_stopped(request: Request, when: str) -> None:
    """Raise Cancelled if the request's should_stop says so."""
    if request.should_stop is not None and request.should_stop():
        raise Cancelled(f"stopped {when}")


class Step:
    """The requests of one ground_batch call while they run: per request its Stages, its
    expressions' token ids (refer) and, once it has ended, its result (a Grounding or the
    exception that ended it); and which requests' frames the refiner holds, in its order."""

    def __init__(self, requests: list[Request]):
        self.requests = requests
        self.stages = [Stages() for _ in requests]
        self.results: list[Grounding | Exception | None] = [None] * len(requests)
        self.expressions: dict[int, list[list[int]]] = {}
        # Requests whose frames the refiner holds: refiner.refine(embedded.index(i), ...).
        self.embedded: list[int] = []

    def live(self) -> list[int]:
        """Requests that have not ended."""
        return [i for i, result in enumerate(self.results) if result is None]

    def each(self, indices, work: Callable[[int], None]) -> None:
        """work(i) for each request i still on; an exception ends that request only."""
        for i in indices:
            if self.results[i] is None:
                try:
                    work(i)
                except Exception as error:  # the request's result, not the step's
                    self.results[i] = error

    def shared(self, name: str, indices: list[int], work: Callable[[], object]):
        """work() once for the requests `indices` (none: not run), its seconds in each one's
        stage `name`; an exception ends all of them (-> None)."""
        if not indices:
            return None
        start = time.perf_counter()
        try:
            return work()
        except Exception as error:
            for i in indices:
                self.results[i] = error
            return None
        finally:
            seconds = time.perf_counter() - start
            for i in indices:
                self.stages[i].add(name, seconds)
