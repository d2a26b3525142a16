"""The model slot: one reply at a time, first come first served, told when waiting, refused beyond the limit."""

from __future__ import annotations

import threading
import time

import pytest

from omni_cli.pipeline import Done
from omni_cli.serve.model_slot import ModelBusy, ModelSlot, SlotClosed, TurnWithdrawn


def test_turns_wait_in_order_and_are_told_how_many_are_ahead() -> None:
    slot = ModelSlot(pipeline=object(), max_waiting=4)
    order: list[str] = []
    notices: dict[str, int] = {}
    first_holds = threading.Event()
    release = threading.Event()

    def turn(name: str) -> None:
        with slot.hold(on_wait=lambda ahead: notices.__setitem__(name, ahead)):
            order.append(name)
            if name == "a":
                first_holds.set()
                release.wait(5)

    a = threading.Thread(target=turn, args=("a",))
    a.start()
    assert first_holds.wait(5)
    b = threading.Thread(target=turn, args=("b",))
    b.start()
    while slot.waiting() < 1:
        time.sleep(0.01)
    c = threading.Thread(target=turn, args=("c",))
    c.start()
    while slot.waiting() < 2:
        time.sleep(0.01)
    assert order == ["a"]  # nobody else ran while "a" held the model
    release.set()
    for t in (a, b, c):
        t.join(5)
    assert order == ["a", "b", "c"]
    assert notices == {"b": 1, "c": 2}
    assert not slot.busy


def test_beyond_the_waiting_limit_a_turn_is_refused_with_a_line() -> None:
    slot = ModelSlot(pipeline=object(), max_waiting=0)
    with slot.hold():
        with pytest.raises(ModelBusy, match="the model is busy: one reply is being generated and 0 more are waiting"):
            with slot.hold():
                pass
    with slot.hold():  # free again
        pass


def test_a_waiting_turn_whose_client_left_leaves_the_queue() -> None:
    slot = ModelSlot(pipeline=object(), max_waiting=2, poll_s=0.01)
    gone = threading.Event()
    result: list[str] = []

    def waiter() -> None:
        try:
            with slot.hold(gone.is_set):
                result.append("ran")
        except TurnWithdrawn:
            result.append("withdrawn")

    with slot.hold():
        t = threading.Thread(target=waiter)
        t.start()
        while slot.waiting() < 1:
            time.sleep(0.01)
        gone.set()
        t.join(2)
        assert result == ["withdrawn"] and slot.waiting() == 0


def test_closing_stops_the_reply_in_progress_and_refuses_new_ones(tiny_pipeline) -> None:
    slot = ModelSlot(tiny_pipeline)
    reply = slot.respond("Talk for a long time.")
    next(reply)  # the reply holds the model now
    assert slot.busy
    slot.close()
    rest = list(reply)
    assert isinstance(rest[-1], Done) and rest[-1].stopped == "interrupted"
    assert not slot.busy
    with pytest.raises(SlotClosed):
        next(slot.respond("Another."))


def test_a_reply_iterator_closed_early_frees_the_model(tiny_pipeline) -> None:
    slot = ModelSlot(tiny_pipeline)
    from omni_cli.config import ReplyOptions, SamplingConfig

    view = slot.for_conversation(options=ReplyOptions(sampling=SamplingConfig(max_new_tokens=3, ignore_stop=True), speak=False))
    assert view.sample_rate == tiny_pipeline.sample_rate and view.context_budget == tiny_pipeline.context_budget
    reply = view.respond("Hello.", [])
    next(reply)
    assert slot.busy
    reply.close()
    assert not slot.busy
    assert list(view.respond("Hello.", []))[-1].tokens == 3  # the conversation's options apply
