"""Errors meant for people: each message is one line saying what went wrong and what to do."""

from __future__ import annotations


class OmniError(Exception):
    """Base of every error the CLI prints as a single line instead of a traceback."""


class ConfigError(OmniError):
    """A config.json is missing, malformed, or does not describe the weights next to it."""


class CheckpointError(OmniError):
    """Weights are missing, extra, the wrong shape, or in a format we cannot read safely."""


class AudioInputError(OmniError):
    """An audio file or device cannot give us usable speech."""


def one_line(exc: BaseException) -> str:
    """An exception as one line for people: its message's first non-empty line, or its type's name when it has none.

    Library errors often carry multi-line messages (or none at all); our messages must stay one line.
    """
    for line in str(exc).splitlines():
        if line.strip():
            return line.strip()
    return type(exc).__name__
