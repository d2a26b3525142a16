"""What `omni chat` checks before torch is imported and weights are loaded.

A session folder already in use, a missing microphone or a wrong device name must be one line
within 2 s of pressing Enter, not after half a minute of loading: this module imports no torch
(only the device code, whose every call into the sound system has a deadline).
"""

from __future__ import annotations

from omni_cli.config import ChatOptions


def preflight(options: ChatOptions) -> None:
    """Fail fast: the session folder is taken or cannot be written, or the microphone (or a named speaker) does not exist.

    Raises an OmniError with one line saying what to do (without a microphone: typing, `--text`).
    Nothing is written: the session folder appears with the session's first transcript line.
    """
    from omni_cli.audio.devices import choose_device, list_devices
    from omni_cli.chat.transcript import refuse_used_session_dir
    from omni_cli.errors import AudioInputError

    refuse_used_session_dir(options.session_dir)
    if options.text and options.output_device is None:
        return
    devices = list_devices()  # once for both checks: each listing asks PortAudio and the sound server
    if not options.text:
        try:
            choose_device(options.input_device, "input", devices)
        except AudioInputError as exc:
            if options.input_device is None:  # no microphone at all: say how to talk without one
                raise AudioInputError(f"{exc} To type your questions instead: omni chat --text.") from exc
            raise
    if options.output_device is not None:
        choose_device(options.output_device, "output", devices)
