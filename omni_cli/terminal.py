"""Keeping the terminal clean: native libraries' stderr goes to a log, control characters stay out of printed text.

ALSA, PortAudio and PulseAudio print straight to file descriptor 2 (`ALSA lib pcm.c:...
underrun occurred`, `Expression '...' failed in 'src/hostapi/alsa/...'`), from their own
threads, whenever they like; inside rich's live region every such line leaves copies of the
region behind. `NativeStderr` points descriptor 2 at a file while it is entered, and Python's
own `sys.stderr` (our `omni: error:` lines, warnings, tracebacks) keeps writing to the
terminal through a duplicate of the original descriptor.

Model text may hold any character its tokenizer decodes, ESC and NUL among them, which a
terminal would obey: `printable()` takes the control characters out before text is printed.

Imports nothing heavy: the chat command enters `NativeStderr` before PortAudio loads.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from types import TracebackType
from typing import TextIO

NATIVE_LOG_NAME = "native.log"

# C0 controls but tab and newline, DEL, and C1 controls (0x9b is a one-byte CSI to some terminals).
_CONTROL = {c: None for c in (*range(0x00, 0x20), *range(0x7F, 0xA0)) if c not in (0x09, 0x0A)}


def printable(text: str) -> str:
    """`text` without control characters (newlines and tabs are kept), safe to write to a terminal."""
    return text.translate(_CONTROL)


class NativeStderr:
    """While entered, whatever is written to file descriptor 2 goes to a file, not the terminal.

    Until `keep_in(path)` it goes to an unnamed temporary file (the session folder does not
    exist yet while the devices are checked and the model loads); from then on into `path`,
    what came before copied in first. `sys.stderr`, when it is the process's real stderr, is
    replaced by a stream on a duplicate of the original descriptor, so Python's own output still
    reaches the terminal; under a test runner (sys.stderr already captured) it is left alone.
    Where descriptor 2 cannot be duplicated (closed), nothing is redirected.
    """

    def __init__(self) -> None:
        self.path: Path | None = None
        self._terminal_fd: int | None = None
        self._capture_fd: int | None = None
        self._python_stderr: TextIO | None = None
        self._replaced_stderr: TextIO | None = None

    def __enter__(self) -> NativeStderr:
        _flush(sys.stderr)
        try:
            self._terminal_fd = os.dup(2)
        except OSError:
            return self
        with tempfile.TemporaryFile() as capture:  # unnamed: nothing left behind if the session never starts
            self._capture_fd = os.dup(capture.fileno())
        if _is_fd2(sys.stderr):
            self._replaced_stderr = sys.stderr
            encoding = getattr(sys.stderr, "encoding", None) or "utf-8"
            self._python_stderr = open(  # noqa: SIM115 - closed in __exit__
                self._terminal_fd, "w", encoding=encoding, errors="backslashreplace", buffering=1, closefd=False
            )
            sys.stderr = self._python_stderr
        os.dup2(self._capture_fd, 2)
        return self

    def keep_in(self, path: Path) -> None:
        """From now on write native messages to `path` (appended), starting with those captured so far."""
        if self._capture_fd is None:
            return
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        earlier = _read_all(self._capture_fd)
        if earlier:
            os.write(fd, earlier)
        os.dup2(fd, 2)
        os.close(self._capture_fd)
        self._capture_fd, self.path = fd, Path(path)

    def captured(self) -> bool:
        """True once the native libraries have written anything."""
        return self._capture_fd is not None and os.fstat(self._capture_fd).st_size > 0

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if self._terminal_fd is None:
            return
        _flush(sys.stderr)
        os.dup2(self._terminal_fd, 2)
        if self._python_stderr is not None:
            if sys.stderr is self._python_stderr:
                sys.stderr = self._replaced_stderr
            self._python_stderr.close()
            self._python_stderr = None
        os.close(self._terminal_fd)
        self._terminal_fd = None
        if self._capture_fd is not None:
            os.close(self._capture_fd)
            self._capture_fd = None


def _is_fd2(stream: object) -> bool:
    try:
        return stream.fileno() == 2  # type: ignore[attr-defined]
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is an OSError and a ValueError
        return False


def _flush(stream: object) -> None:
    try:
        stream.flush()  # type: ignore[attr-defined]
    except (AttributeError, OSError, ValueError):
        pass


def _read_all(fd: int) -> bytes:
    """The whole file behind `fd`, read without moving its offset (writers append)."""
    size = os.fstat(fd).st_size
    return os.pread(fd, size, 0) if size else b""
