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
