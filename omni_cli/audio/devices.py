"""Sound devices: find them by index or name, and convert between their rate and ours.

PortAudio (through the `sounddevice` package) is loaded lazily, so the rest of the package
(VAD, file I/O) works on machines without it, and a missing library becomes one readable line.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from math import gcd
from types import ModuleType
from typing import Any, Literal

import numpy as np
from scipy.signal import resample_poly

from omni_cli.errors import AudioInputError

DeviceKind = Literal["input", "output"]


def load_sounddevice() -> ModuleType:
    """Import `sounddevice`, turning a missing PortAudio library into an AudioInputError."""
    try:
        import sounddevice
    except OSError as exc:  # sounddevice raises OSError when libportaudio cannot be loaded
        raise AudioInputError(
            f"the PortAudio library is missing ({exc}); install it (Debian/Ubuntu: apt-get install libportaudio2)."
        ) from exc
    return sounddevice


def rescan_devices() -> None:
    """Make PortAudio enumerate devices again (e.g. after a sound server started)."""
    sd = load_sounddevice()
    # Documented way to refresh sounddevice's device list: terminate and re-initialize PortAudio.
    sd._terminate()
    sd._initialize()


@dataclass(frozen=True)
class DeviceInfo:
    """One PortAudio device as `omni devices` shows it."""

    index: int
    name: str
    hostapi: str
    max_input_channels: int
    max_output_channels: int
    default_samplerate: float
    is_default_input: bool
    is_default_output: bool

    def has(self, kind: DeviceKind) -> bool:
        """True when the device can be used for `kind` (it has channels in that direction)."""
        return (self.max_input_channels if kind == "input" else self.max_output_channels) > 0


def _default_index(sd: ModuleType, kind: DeviceKind) -> int | None:
    """Index of PortAudio's default device for `kind`, or None when there is none."""
    pair = sd.default.device
    index = pair[0] if kind == "input" else pair[1]
    try:
        index = int(index)
    except (TypeError, ValueError):
        return None
    return index if index >= 0 else None


def list_devices() -> list[DeviceInfo]:
    """All devices PortAudio sees, with the default input/output marked."""
    sd = load_sounddevice()
    try:
        raw = sd.query_devices()
        hostapis = sd.query_hostapis()
    except sd.PortAudioError as exc:
        raise AudioInputError(f"cannot list audio devices: {exc}.") from exc
    default_in, default_out = _default_index(sd, "input"), _default_index(sd, "output")
    return [
        DeviceInfo(
            index=int(d["index"]),
            name=str(d["name"]),
            hostapi=str(hostapis[d["hostapi"]]["name"]),
            max_input_channels=int(d["max_input_channels"]),
            max_output_channels=int(d["max_output_channels"]),
            default_samplerate=float(d["default_samplerate"]),
            is_default_input=int(d["index"]) == default_in,
            is_default_output=int(d["index"]) == default_out,
        )
        for d in raw
    ]


def _choose_device(devices: list[DeviceInfo], spec: str | int, kind: DeviceKind) -> int:
    """Pick the device `spec` names among `devices`; raise a one-line error listing near matches."""
    usable = [d for d in devices if d.has(kind)]
    names = ", ".join(f"{d.index}: {d.name}" for d in usable) or "none"
    if isinstance(spec, int) or spec.strip().isdigit():
        index = int(spec)
        for d in devices:
            if d.index == index:
                if not d.has(kind):
                    raise AudioInputError(f"audio device {index} ({d.name}) has no {kind} channels; {kind} devices: {names}.")
                return index
        raise AudioInputError(f"no audio device with index {index}; {kind} devices: {names}.")
    wanted = spec.strip().lower()
    exact = [d for d in usable if d.name.lower() == wanted]
    if exact:
        return exact[0].index
    partial = [d for d in usable if wanted in d.name.lower()]
    if len(partial) == 1:
        return partial[0].index
    if len(partial) > 1:
        listed = ", ".join(f"{d.index}: {d.name}" for d in partial)
        raise AudioInputError(f"'{spec}' matches several {kind} devices ({listed}); give the index or a longer name.")
    close = difflib.get_close_matches(wanted, [d.name.lower() for d in usable], n=3, cutoff=0.4)
    hint = ", ".join(d.name for d in usable if d.name.lower() in close)
    hint_text = f" Did you mean: {hint}?" if hint else ""
    raise AudioInputError(f"no {kind} device named '{spec}'.{hint_text} {kind.capitalize()} devices: {names}.")


def find_device(spec: str | int | None, kind: DeviceKind) -> int | None:
    """Resolve `--input-device`/`--output-device`: an index, an exact or partial name, or None for the default.

    Returns the PortAudio index (None means "PortAudio's default"). Raises AudioInputError when
    nothing matches, naming near matches, or when no device of `kind` exists at all.
    """
    devices = list_devices()
    if spec is None or (isinstance(spec, str) and not spec.strip()):
        if not any(d.has(kind) for d in devices):
            raise AudioInputError(f"no audio {kind} device found; connect one or start a sound server, then run `omni devices`.")
        return None
    return _choose_device(devices, spec, kind)


def choose_stream_settings(
    sd: ModuleType, index: int | None, kind: DeviceKind, wanted_rate: int, forced_rate: int | None = None
) -> tuple[str, int, int]:
    """(device name, rate, channels) to open a stream with: `wanted_rate` in mono if the device
    takes it, else its default rate (mono, then all its channels); `forced_rate` overrides.

    Raises AudioInputError naming what was tried when PortAudio accepts none of them.
    """
    try:
        info = sd.query_devices(index, kind=kind) if index is None else sd.query_devices(index)
    except sd.PortAudioError as exc:
        raise _cannot_open(kind, "default" if index is None else str(index), exc) from exc
    name = str(info["name"])
    default_rate = int(info["default_samplerate"])
    max_channels = max(1, int(info[f"max_{kind}_channels"]))
    if forced_rate is not None:
        candidates = [(int(forced_rate), 1), (int(forced_rate), max_channels)]
    else:
        candidates = [(wanted_rate, 1), (default_rate, 1), (default_rate, max_channels)]
    check = sd.check_input_settings if kind == "input" else sd.check_output_settings
    for rate, channels in candidates:
        try:
            check(device=index, samplerate=rate, channels=channels, dtype="float32")
        except (sd.PortAudioError, ValueError):
            continue
        return name, rate, channels
    tried = ", ".join(f"{r} Hz/{c} ch" for r, c in dict.fromkeys(candidates))
    what, option = ("microphone", "--input-device") if kind == "input" else ("speaker", "--output-device")
    raise AudioInputError(f"{what} '{name}' accepts none of {tried}; pick another with {option} (see `omni devices`).")


def _cannot_open(kind: DeviceKind, name: str, exc: BaseException) -> AudioInputError:
    what = "microphone" if kind == "input" else "speaker"
    return AudioInputError(f"cannot open {what} '{name}': {exc}; check it is connected and not in use (see `omni devices`).")


def open_stream(sd: ModuleType, kind: DeviceKind, index: int | None, name: str, **settings: Any) -> Any:
    """Open and start a float32 sounddevice input or output stream; one-line AudioInputError on failure."""
    factory = sd.InputStream if kind == "input" else sd.OutputStream
    try:
        stream = factory(device=index, dtype="float32", **settings)
        stream.start()
    except sd.PortAudioError as exc:
        raise _cannot_open(kind, name, exc) from exc
    return stream


def close_stream(stream: Any) -> None:
    """Stop and close a stream, closing it even when stopping fails."""
    try:
        stream.stop()
    finally:
        stream.close()


class StreamResampler:
    """Convert a stream of blocks between two rates, giving the same samples as one resample_poly call.

    Each block is resampled together with enough of the previous input that the polyphase
    filter never sees a block edge; output that would still depend on future input is held
    back (about half the filter, under a millisecond) until the next block or `flush()`.
    Why: resampling each block alone clicks at every block boundary.
    """

    def __init__(self, rate_in: int, rate_out: int) -> None:
        g = gcd(int(rate_in), int(rate_out))
        self.rate_in, self.rate_out = int(rate_in), int(rate_out)
        self.up, self.down = self.rate_out // g, self.rate_in // g
        # resample_poly's default filter has 10 * max(up, down) taps on each side at the
        # upsampled rate; in input samples that is the context one output sample needs.
        self._half = int(np.ceil(10 * max(self.up, self.down) / self.up)) + 1
        self._buffer = np.zeros(0, dtype=np.float32)
        self._buffer_start = 0  # absolute input index of _buffer[0]; always a multiple of `down`
        self._next_out = 0  # absolute index of the next output sample to emit
        self._consumed = 0  # absolute input samples received

    @property
    def passthrough(self) -> bool:
        """True when both rates are equal and blocks pass unchanged."""
        return self.up == self.down

    def _render(self, final: bool) -> np.ndarray:
        if self._buffer.size == 0:
            return np.zeros(0, dtype=np.float32)
        end_in = self._consumed
        # Last output index whose filter support lies inside the received input (or any, at the end).
        if final:
            last_out = (end_in * self.up - 1) // self.down
        else:
            last_out = ((end_in - self._half) * self.up) // self.down
        if last_out < self._next_out:
            return np.zeros(0, dtype=np.float32)
        # Pad zeros on the right only when flushing; resample_poly of the whole signal pads the same way.
        out = resample_poly(self._buffer, self.up, self.down).astype(np.float32)
        first_local = self._next_out - self._buffer_start * self.up // self.down
        count = last_out - self._next_out + 1
        chunk = out[first_local : first_local + count]
        self._next_out += chunk.size
        # Keep only the input still needed as left context for the next output sample.
        keep_from = max(0, (self._next_out * self.down) // self.up - self._half)
        keep_from -= keep_from % self.down
        keep_from = max(keep_from, self._buffer_start)
        self._buffer = self._buffer[keep_from - self._buffer_start :]
        self._buffer_start = keep_from
        return chunk

    def process(self, block: np.ndarray) -> np.ndarray:
        """Feed one input block; return the output samples that are now final."""
        block = np.asarray(block, dtype=np.float32).reshape(-1)
        if self.passthrough:
            return block
        self._buffer = np.concatenate([self._buffer, block])
        self._consumed += block.size
        return self._render(final=False)

    def flush(self) -> np.ndarray:
        """Return the held-back tail as if the stream ended here, then start a fresh stream."""
        if self.passthrough:
            return np.zeros(0, dtype=np.float32)
        tail = self._render(final=True)
        self.reset()
        return tail

    def reset(self) -> None:
        """Forget all input (e.g. playback was cut); the next block starts a new stream."""
        self._buffer = np.zeros(0, dtype=np.float32)
        self._buffer_start = self._next_out = self._consumed = 0
