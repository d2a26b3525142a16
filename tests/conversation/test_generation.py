"""The model thread: replies generated off the listening thread, one at a time, their faults handed back."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

import pytest

from omni_cli.conversation.generation import Generation, ModelThread


def drain(generation: Generation, timeout: float = 5.0) -> list[object]:
    taken, deadline = [], time.monotonic() + timeout
    while not generation.finished and time.monotonic() < deadline:
        event = generation.get(0.01)
        if event is not None:
            taken.append(event)
    assert generation.finished
    return taken


def test_events_come_in_order_and_a_fault_after_them() -> None:
    def failing(stop: Callable[[], bool]) -> Iterator[object]:
        yield "a"
        yield "b"
        raise RuntimeError("CUDA out of memory")

    thread = ModelThread()
    generation = thread.start(failing, lambda: False)
    assert [generation.get(5.0), generation.get(5.0)] == ["a", "b"]
    with pytest.raises(RuntimeError, match="out of memory"):
        generation.get(5.0)
    assert generation.finished and generation.get(0.0) is None


def test_a_closed_reply_stops_at_its_next_step_and_the_next_waits_for_it() -> None:
    """Two generations never overlap (one set of caches), and close() does not wait for the model."""
    log: list[str] = []
    inside = threading.Event()

    def slow(stop: Callable[[], bool]) -> Iterator[object]:
        try:
            for k in range(1000):
                inside.set()
                if stop():  # the model looks at should_stop() once a token
                    log.append("stopped")
                    return
                time.sleep(0.01)
                yield k
        finally:
            log.append("closed")

    def quick(stop: Callable[[], bool]) -> Iterator[object]:
        log.append("second began")
        yield "x"

    thread = ModelThread()
    first = thread.start(slow, lambda: False)
    assert inside.wait(5.0)
    began = time.monotonic()
    first.close()
    assert time.monotonic() - began < 0.05
    second = thread.start(quick, lambda: False)
    assert drain(second) == ["x"]
    assert log[-1] == "second began" and "closed" in log[:-1]
    assert thread.wait_idle(5.0)


def test_should_stop_reaches_the_model() -> None:
    stopping = threading.Event()
    steps: list[int] = []

    def counting(stop: Callable[[], bool]) -> Iterator[object]:
        for k in range(10_000):
            if stop():
                return
            steps.append(k)
            time.sleep(0.002)
            yield k

    thread = ModelThread()
    generation = thread.start(counting, stopping.is_set)
    assert generation.get(5.0) == 0
    stopping.set()
    drain(generation)
    assert len(steps) < 10_000
