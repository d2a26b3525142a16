"""StopRequest: the first Ctrl-C asks, the second stops at once, later ones cannot break the unwinding."""

from __future__ import annotations

import os
import signal

import pytest

from omni_cli.stop_request import StopRequest


def test_first_signal_asks_second_stops_later_ones_are_ignored_and_the_handler_is_put_back(capfd: pytest.CaptureFixture[str]) -> None:
    before = signal.getsignal(signal.SIGINT)
    with StopRequest(announce="stopping after this step\n") as stop:
        assert not stop.is_requested()
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.is_requested() and stop.requested
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)  # while the second one unwinds: ignored
    assert signal.getsignal(signal.SIGINT) is before
    assert capfd.readouterr().err == "stopping after this step\n"  # said once, at the first signal


def test_sigterm_is_taken_only_when_asked_for() -> None:
    before = signal.getsignal(signal.SIGTERM)
    with StopRequest((signal.SIGINT, signal.SIGTERM)) as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested
    assert signal.getsignal(signal.SIGTERM) is before
    with StopRequest():
        assert signal.getsignal(signal.SIGTERM) is before


def test_a_stop_at_once_inside_a_held_block_waits_for_its_end() -> None:
    written: list[str] = []
    with StopRequest() as stop:
        os.kill(os.getpid(), signal.SIGINT)  # the first asks
        with pytest.raises(KeyboardInterrupt):
            with stop.held():  # a file being written
                os.kill(os.getpid(), signal.SIGINT)  # the second would stop at once: it waits
                written.append("the whole file")
        os.kill(os.getpid(), signal.SIGINT)  # later ones are ignored while that unwinds
        with stop.held():
            written.append("nothing held back now")
    assert written == ["the whole file", "nothing held back now"]
