"""Noticing, within about a second, that the sound system went away under the open microphone or speaker.

When the PulseAudio/PipeWire server dies, PortAudio stops both streams at once (their `active`
turns False); when it hangs, the callbacks stop coming. Either way a conversation must say so
in one line and stop showing "● speaking", instead of waiting out a reply's length or a
microphone timeout. `SoundWatch.problem()` is cheap while the streams run (it reads a few
attributes), so a chat loop can call it between tokens; it asks the server only when a stream
stopped or the microphone stalled, and at most once per `ask_every_s`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol

from omni_cli.audio.devices import sound_server_problem


class WatchedStream(Protocol):
    """What the watch reads from `Microphone` and `Player`."""

    device_name: str

    @property
    def active(self) -> bool: ...


class WatchedMicrophone(WatchedStream, Protocol):
    """`Microphone`: also when its audio callback last ran (time.monotonic())."""

    last_callback: float | None


class SoundWatch:
    """Tells why the open microphone and/or speaker stopped, or None while they run.

    A microphone whose callbacks stall (`stall_s`) while its stream still counts as running and
    the server answers is not reported: that is a busy machine, and the chat's own microphone
    timeout decides.
    """

    def __init__(
        self,
        mic: WatchedMicrophone | None,
        speaker: WatchedStream | None,
        stall_s: float = 0.5,
        ask_every_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        server_problem: Callable[[], str | None] | None = None,
    ) -> None:
        self.mic = mic
        self.speaker = speaker
        self.stall_s = stall_s
        self.ask_every_s = ask_every_s
        self.clock = clock
        self.server_problem = server_problem or sound_server_problem
        self._next_ask = float("-inf")

    def problem(self) -> str | None:
        """One line saying what went away (the server's state when it has one), or None."""
        now = self.clock()
        stopped = [(what, s) for what, s in (("microphone", self.mic), ("speaker", self.speaker)) if s is not None and not s.active]
        last = self.mic.last_callback if self.mic is not None else None
        stalled = last is not None and now - last > self.stall_s
        if not (stopped or stalled) or now < self._next_ask:
            return None
        self._next_ask = now + self.ask_every_s
        problem = self.server_problem()
        if problem is None and stopped:
            what, stream = stopped[0]
            problem = f"the {what} '{stream.device_name}' stopped (unplugged, or taken by another program?); check it with `omni devices`."
        return problem
