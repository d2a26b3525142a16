"""What `omni chat` shows: the user's turn, the reply as it streams, and a status line.

On a terminal a rich Live region holds the turn in progress and the status line (listening /
hearing / thinking / speaking); finished turns are printed above it and stay in the scrollback.
Before the session starts, a spinner says what is being prepared (devices, torch, the model).
Elsewhere (a pipe, a log file, a test) the same calls print plain lines, the reply streamed
inline, so logs read top-down.

Text from the model or the keyboard is printed without its control characters (`printable`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from rich.cells import cell_len
from rich.console import Console, Group
from rich.live import Live
from rich.spinner import Spinner
from rich.table import Table
from rich.text import Text

from omni_cli.terminal import printable

if TYPE_CHECKING:  # for the annotation only: importing the view loads no audio code
    from omni_cli.audio.devices import DeviceInfo

ERASE_LINE_ABOVE = "\x1b[1A\x1b[2K"  # cursor up one line, clear it

STATUS_STYLES = {
    "listening": "green", "hearing": "bold green", "thinking": "yellow", "speaking": "cyan", "replying": "cyan", "typing": "green", "stopped": "red",
}  # fmt: skip


def devices_table(devices: Sequence[DeviceInfo]) -> Table:
    """`omni devices` as a table: index, name, host API, channels in/out, default rate, default marks.

    A PulseAudio/PipeWire row shows its server name after its description: descriptions need not
    be unique (every null sink is "Null Output"), and either can be passed to --input-device/--output-device.
    """
    table = Table(title="Audio devices")
    for column in ("#", "name", "host API", "in ch", "out ch", "default rate", "default"):
        table.add_column(column, justify="right" if column in ("#", "in ch", "out ch", "default rate") else "left")
    for d in devices:
        marks = [m for m, on in (("input", d.is_default_input), ("output", d.is_default_output)) if on]
        table.add_row(
            str(d.index),
            d.display_name,
            d.hostapi,
            str(d.max_input_channels),
            str(d.max_output_channels),
            f"{d.default_samplerate:.0f} Hz",
            ", ".join(marks),
        )
    return table


class ChatView:
    """Screen output of a chat session; every method is cheap and safe to call between tokens."""

    def __init__(self, console: Console | None = None, live: bool | None = None) -> None:
        self.console = console or Console()
        self.live_mode = self.console.is_terminal if live is None else live
        self._user: Text | None = None
        self._reply: Text | None = None
        self._status = Text("")
        self._state = ""
        self._live: Live | None = None
        self._loading: Live | None = None
        self._plain_reply_open = False

    # -- lifecycle --------------------------------------------------------------------

    def loading(self, what: str | None) -> None:
        """Say what is being prepared before the session starts: a spinner with `what` on a terminal
        (nothing elsewhere); None takes the spinner away (e.g. while a download asks and shows its own progress)."""
        if not self.live_mode:
            return
        if what is None:
            self._stop_loading()
            return
        spinner = Spinner("dots", Text(printable(what), style="dim"), style="yellow")
        if self._loading is None:
            self._loading = Live(spinner, console=self.console, refresh_per_second=12, transient=True)
            self._loading.start(refresh=True)  # drawn now, not at the first tick
        else:
            self._loading.update(spinner, refresh=True)

    def start(self) -> None:
        """Begin showing the live region (terminal only)."""
        self._stop_loading()
        if self.live_mode and self._live is None:
            self._live = Live(self._render(), console=self.console, auto_refresh=True, refresh_per_second=12, transient=True)
            self._live.start()

    def stop(self) -> None:
        """Print a turn still in progress and end the live region (or the loading spinner)."""
        self._stop_loading()
        self._close_turn()
        if self._live is not None:
            self._live.stop()
            self._live = None

    def prompt(self, prompt: str) -> str | None:
        """Read one typed line (the live region pauses meanwhile); None at end of input."""
        live = self._live
        if live is not None:
            live.stop()
            self._live = None
        try:
            line = self.console.input(prompt)
            if self.console.is_terminal and line.strip():
                # The terminal echoed "you> ..."; the turn shows it as "you [n]: ...": take the echo away.
                rows = max(1, -(-cell_len(prompt + line) // max(1, self.console.width)))
                self.console.file.write(ERASE_LINE_ABOVE * rows)
                self.console.file.flush()
            return line
        except EOFError:
            return None
        finally:
            if live is not None:
                self.start()

    # -- content ----------------------------------------------------------------------

    def user_spoken(self, turn: int, seconds: float) -> None:
        """A spoken question was heard (its words are in the model, not on screen)."""
        self._open_turn(Text.assemble((f"you [{turn}]: ", "bold"), (f"(spoken, {seconds:.1f} s)", "italic")))

    def user_typed(self, turn: int, text: str) -> None:
        """A typed question."""
        self._open_turn(Text.assemble((f"you [{turn}]: ", "bold"), printable(text)))

    def reply_text(self, delta: str) -> None:
        """More reply text, shown as soon as it is generated (control characters left out)."""
        delta = printable(delta)
        if self._reply is None:
            self._reply = Text.assemble(("omni: ", "bold magenta"))
        self._reply.append(delta)
        if self.live_mode:
            self._refresh()
        else:
            if not self._plain_reply_open:
                self.console.file.write("omni: ")
                self._plain_reply_open = True
            self.console.file.write(delta)
            self.console.file.flush()

    def reply_end(self, summary: str) -> None:
        """The reply is over; `summary` (latency, tokens, why it stopped) closes the turn."""
        if self._reply is None:
            self._reply = Text.assemble(("omni: ", "bold magenta"), ("(no text)", "italic"))
            if not self.live_mode:
                self.console.file.write("omni: (no text)")
                self._plain_reply_open = True
        self._reply.append(f"\n  [{summary}]", style="dim")
        if not self.live_mode:
            self.console.file.write(("\n" if self._plain_reply_open else "") + f"  [{summary}]\n")
            self.console.file.flush()
            self._plain_reply_open = False
            self._user = self._reply = None
            return
        self._close_turn()

    def status(self, state: str, detail: str = "") -> None:
        """Set the status line: listening / hearing / thinking / speaking / typing, with an optional detail."""
        line = Text.assemble(("● ", STATUS_STYLES.get(state, "white")), (state, "bold"))
        if detail:
            line.append(f"  {detail}", style="dim")
        self._status = line
        if self.live_mode:
            # Drawn now: a line printed next (an error) redraws the live region as last drawn, which
            # the 12-a-second refresh may not have caught up with (it showed "speaking" below it).
            self._refresh(now=True)
        elif state != self._state and state in ("listening", "typing") and not self._plain_reply_open:
            self.console.print(line, highlight=False)
        self._state = state

    def note(self, message: str) -> None:
        """A one-line remark (a device fell back, where the session is saved)."""
        self._print_line(Text(printable(message), style="dim"))

    def error(self, message: str) -> None:
        """A one-line fault; the session goes on where it can."""
        self._print_line(Text(f"omni: {printable(message)}", style="bold red"))

    # -- internals --------------------------------------------------------------------

    def _open_turn(self, user: Text) -> None:
        self._close_turn()
        self._user, self._reply = user, None
        if self.live_mode:
            self._refresh()
        else:
            self.console.print(user, highlight=False)

    def _close_turn(self) -> None:
        """Move the finished turn out of the live region into the scrollback."""
        if self.live_mode and (self._user is not None or self._reply is not None):
            parts = [t for t in (self._user, self._reply) if t is not None]
            self._user = self._reply = None
            if self._live is not None:
                self._live.console.print(Group(*parts))
                self._refresh()
            else:
                self.console.print(Group(*parts))
        elif self._plain_reply_open:
            self.console.file.write("\n")
            self._plain_reply_open = False

    def _print_line(self, text: Text) -> None:
        if not self.live_mode and self._plain_reply_open:
            self.console.file.write("\n")
            self._plain_reply_open = False
        target = self._live.console if self._live is not None else self.console
        target.print(text, highlight=False)

    def _stop_loading(self) -> None:
        if self._loading is not None:
            self._loading.stop()
            self._loading = None

    def _render(self) -> Group:
        parts = [t for t in (self._user, self._reply) if t is not None]
        return Group(*parts, self._status)

    def _refresh(self, now: bool = False) -> None:
        if self._live is not None:
            self._live.update(self._render(), refresh=now)
