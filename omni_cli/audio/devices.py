"""Sound devices: find them by index or name, check the sound server fast.

PortAudio (through the `sounddevice` package) is loaded lazily, so the rest of the package
(VAD, file I/O) works on machines without it, and a missing library becomes one readable line.

On PulseAudio/PipeWire desktops PortAudio sees only `pulse` and `default`; the real sources
and sinks come from `pactl` and are listed after PortAudio's devices, with their own numbers.
Choosing one opens PortAudio's `pulse` device with PULSE_SOURCE/PULSE_SINK naming it (libpulse
reads them when a stream connects).

Nothing here waits long: calls into PortAudio that can block on a hung sound server run with a
1.5 s deadline, and `sound_server_problem()` asks the server directly, so a missing device, a
wrong name or a dead server is one line within 2 s, before anything heavy (torch) is imported.
"""

from __future__ import annotations

import atexit
import difflib
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Literal, TypeVar


from omni_cli.errors import AudioInputError

DeviceKind = Literal["input", "output"]
T = TypeVar("T")

SOUND_TIMEOUT_S = 1.5  # the longest a device check may block: with start-up, one line within 2 s
PULSE_ENV = {"input": "PULSE_SOURCE", "output": "PULSE_SINK"}
DEVICE_ROLE = {"input": "microphone", "output": "speaker"}  # how messages call a device of each kind


class SoundSystemHung(AudioInputError):
    """PortAudio or the sound server did not answer in time (the calling thread was left behind)."""


_hung: str | None = None  # set once a call was left blocked: later calls fail at once instead of piling up


def within_deadline(call: Callable[[], T], what: str, seconds: float = SOUND_TIMEOUT_S, sticky: bool = True) -> T:
    """Run `call()` on a daemon thread; its result, its exception, or SoundSystemHung after `seconds`.

    Why a thread: a hung PulseAudio server blocks PortAudio inside C code for 30 s or more,
    which nothing in Python can interrupt. The blocked thread is abandoned (it is a daemon,
    so it never keeps the process alive); the user gets a line now. `sticky`: from then on
    every call fails at once (the blocked thread may hold PortAudio's locks).
    """
    global _hung
    if _hung is not None:
        raise SoundSystemHung(_hung)
    outcome: dict[str, Any] = {}
    try:
        # sounddevice points descriptor 2 at /dev/null while PortAudio starts and puts it back after:
        # a start that never returns would leave every later error line unseen.
        stderr_fd: int | None = os.dup(2)
    except OSError:
        stderr_fd = None

    def run() -> None:
        try:
            outcome["value"] = call()
        except BaseException as exc:  # noqa: BLE001 - handed back to the caller's thread
            outcome["error"] = exc

    worker = threading.Thread(target=run, name=f"omni-audio: {what}", daemon=True)
    worker.start()
    worker.join(seconds)
    if stderr_fd is not None:
        if worker.is_alive():
            os.dup2(stderr_fd, 2)
        os.close(stderr_fd)
    if worker.is_alive():
        # PortAudio's own exit handler would wait on the blocked call forever: let the process exit.
        sounddevice = sys.modules.get("sounddevice")
        if sounddevice is not None and hasattr(sounddevice, "_exit_handler"):
            atexit.unregister(sounddevice._exit_handler)
        message = (
            f"the sound system did not answer within {seconds:g} s while {what}; the sound server "
            "(PulseAudio/PipeWire) seems hung: restart it (e.g. systemctl --user restart pipewire-pulse pulseaudio), then run `omni devices`."
        )
        if sticky:
            _hung = message
        raise SoundSystemHung(message)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def load_sounddevice() -> ModuleType:
    """Import `sounddevice` within SOUND_TIMEOUT_S (its first import starts PortAudio, which a hung
    sound server blocks), turning a missing PortAudio library into an AudioInputError."""
    return within_deadline(_import_sounddevice, "loading PortAudio")


def _import_sounddevice() -> ModuleType:
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
    pulse_name: str | None = None  # a PulseAudio source/sink: its name (`name` is its description)
    opens_as: int | None = None  # for a PulseAudio device: the PortAudio device its streams open

    def has(self, kind: DeviceKind) -> bool:
        """True when the device can be used for `kind` (it has channels in that direction)."""
        return (self.max_input_channels if kind == "input" else self.max_output_channels) > 0

    @property
    def portaudio_index(self) -> int:
        """The PortAudio device to open for this row."""
        return self.index if self.opens_as is None else self.opens_as

    @property
    def display_name(self) -> str:
        """Its name, with a PulseAudio device's server name after its description (descriptions need not be unique)."""
        return f"{self.name} ({self.pulse_name})" if self.pulse_name else self.name

    @property
    def label(self) -> str:
        """How error messages name it: `3: USB Mic`, or `7: Monitor of Null Output (omni_out.monitor)`."""
        return f"{self.index}: {self.display_name}"


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
    """All devices PortAudio sees, with the default input/output marked, then the
    PulseAudio/PipeWire sources and sinks when a server answers and PortAudio has ALSA's
    `pulse` device to reach them through.

    Raises AudioInputError (within SOUND_TIMEOUT_S) when PortAudio is missing or hangs.
    """
    sd = load_sounddevice()
    try:
        raw, hostapis = within_deadline(lambda: (sd.query_devices(), sd.query_hostapis()), "listing audio devices")
    except sd.PortAudioError as exc:
        raise AudioInputError(f"cannot list audio devices: {exc}.") from exc
    default_in, default_out = _default_index(sd, "input"), _default_index(sd, "output")
    devices = [
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
    # The ALSA `pulse` device (libasound2-plugins) is the one whose streams follow PULSE_SOURCE/PULSE_SINK.
    gateway = next((d for d in devices if d.name == "pulse"), None)
    if gateway is None:
        return devices
    first = max((d.index for d in devices), default=-1) + 1
    return devices + [
        DeviceInfo(
            index=first + i,
            name=p.description,
            hostapi="PulseAudio",
            max_input_channels=p.channels if p.kind == "input" else 0,
            max_output_channels=p.channels if p.kind == "output" else 0,
            default_samplerate=float(p.rate),
            is_default_input=p.is_default and p.kind == "input",  # the server's default, where PortAudio's default leads
            is_default_output=p.is_default and p.kind == "output",
            pulse_name=p.name,
            opens_as=gateway.index,
        )
        for i, p in enumerate(list_pulse_devices())
    ]


@dataclass(frozen=True)
class PulseDevice:
    """A PulseAudio (or PipeWire-pulse) source or sink as `pactl list` describes it."""

    name: str
    description: str
    kind: DeviceKind
    channels: int
    rate: int
    is_default: bool


def _pactl(*args: str, timeout: float) -> str:
    """Run pactl with C-locale output; its stdout, or CalledProcessError/TimeoutExpired/OSError."""
    env = {**os.environ, "LC_ALL": "C"}
    done = subprocess.run(["pactl", *args], env=env, capture_output=True, text=True, timeout=timeout, check=True)
    return done.stdout


def _parse_pactl_list(text: str, kind: DeviceKind, default: str | None) -> list[PulseDevice]:
    """`pactl list sources|sinks` (C locale) → PulseDevice per block."""
    found = []
    for block in re.split(r"^(?:Source|Sink) #\d+\s*$", text, flags=re.MULTILINE)[1:]:
        fields = dict(re.findall(r"^\t([A-Za-z ]+): (.*)$", block, flags=re.MULTILINE))
        name = fields.get("Name", "").strip()
        if not name:
            continue
        spec = re.search(r"(\d+)ch (\d+)Hz", fields.get("Sample Specification", ""))
        channels, rate = (int(spec.group(1)), int(spec.group(2))) if spec else (2, 48000)
        description = fields.get("Description", name).strip() or name
        found.append(PulseDevice(name, description, kind, channels, rate, name == default))
    return found


def list_pulse_devices(timeout: float = SOUND_TIMEOUT_S) -> list[PulseDevice]:
    """The sound server's sources (inputs) and sinks (outputs); [] without pactl or a server.

    Raises SoundSystemHung when the server does not answer within `timeout` in all.
    """
    if shutil.which("pactl") is None:
        return []
    deadline = time.monotonic() + timeout
    try:
        texts = [_pactl(*args, timeout=max(0.1, deadline - time.monotonic())) for args in (("info",), ("list", "sources"), ("list", "sinks"))]
    except subprocess.TimeoutExpired as exc:
        raise SoundSystemHung(f"the sound server did not answer `pactl` within {timeout:g} s; restart it, then run `omni devices`.") from exc
    except (subprocess.CalledProcessError, OSError):
        return []  # no server running: PortAudio's own devices are all there is
    info = dict(re.findall(r"^([A-Za-z ]+): (.*)$", texts[0], flags=re.MULTILINE))
    return _parse_pactl_list(texts[1], "input", info.get("Default Source")) + _parse_pactl_list(
        texts[2], "output", info.get("Default Sink")
    )


def sound_server_problem(timeout: float = 1.0) -> str | None:
    """One line saying what is wrong with the PulseAudio/PipeWire server, or None when it answers
    (or when none is expected: no pactl, no PULSE_SERVER, no server socket)."""
    runtime = os.environ.get("XDG_RUNTIME_DIR", "")
    expected = "PULSE_SERVER" in os.environ or bool(runtime and os.path.exists(os.path.join(runtime, "pulse", "native")))
    if shutil.which("pactl") is None or not expected:
        return None
    try:
        _pactl("info", timeout=timeout)
    except subprocess.TimeoutExpired:
        return f"the sound server is not answering (no reply within {timeout:g} s); restart it (PulseAudio/PipeWire)."
    except subprocess.CalledProcessError as exc:
        detail = next((line.strip() for line in (exc.stderr or "").splitlines() if line.strip()), "no reply")
        return f"the sound server is not running ({detail}); start it (PulseAudio/PipeWire) and try again."
    except OSError:
        return None
    return None


def _choose_device(devices: list[DeviceInfo], spec: str | int, kind: DeviceKind) -> DeviceInfo:
    """Pick the device `spec` names among `devices`; raise a one-line error listing near matches.

    A number is the `#` of `omni devices`. A name is matched exactly, then as a unique part,
    among PortAudio's devices first and only then among PulseAudio's (by description or name).
    """
    usable = [d for d in devices if d.has(kind)]
    names = ", ".join(d.label for d in usable) or "none"
    if isinstance(spec, int) or re.fullmatch(r"[0-9]+", spec.strip()):  # not str.isdigit: "²" is a digit that int() refuses
        index = int(spec)
        for d in devices:
            if d.index == index:
                if not d.has(kind):
                    raise AudioInputError(f"audio device {index} ({d.name}) has no {kind} channels; {kind} devices: {names}.")
                return d
        raise AudioInputError(f"no audio device with index {index}; {kind} devices: {names}.")
    wanted = spec.strip().lower()
    for tier in ([d for d in usable if d.pulse_name is None], [d for d in usable if d.pulse_name is not None]):
        keys = [(d, [k.lower() for k in (d.name, d.pulse_name) if k]) for d in tier]
        exact = [d for d, ks in keys if wanted in ks]
        if exact:
            return exact[0]
        partial = [d for d, ks in keys if any(wanted in k for k in ks)]
        if len(partial) == 1:
            return partial[0]
        if len(partial) > 1:
            listed = ", ".join(d.label for d in partial)
            raise AudioInputError(f"'{spec}' matches several {kind} devices ({listed}); give the # or a longer name.")
    candidates = {k.lower(): d for d in usable for k in (d.name, d.pulse_name) if k}
    close = difflib.get_close_matches(wanted, list(candidates), n=3, cutoff=0.4)
    hint = ", ".join(dict.fromkeys(candidates[c].pulse_name or candidates[c].name for c in close))
    hint_text = f" Did you mean: {hint}?" if hint else ""
    raise AudioInputError(f"no {kind} device named '{spec}'.{hint_text} {kind.capitalize()} devices: {names}.")


def choose_device(spec: str | int | None, kind: DeviceKind, devices: list[DeviceInfo] | None = None) -> DeviceInfo | None:
    """Resolve `--input-device`/`--output-device`: a `#`, an exact or partial name, or None for the default.

    Returns the chosen row (None: the system default). Choosing a PulseAudio source/sink sets
    PULSE_SOURCE/PULSE_SINK for this process, so the streams opened on its PortAudio device
    (`portaudio_index`) connect to it. Raises AudioInputError, within 2 s, when nothing
    matches (naming near matches), when no device of `kind` exists (saying why, when the sound
    server is the reason), or when the sound system hangs. `devices`: a listing already made
    (one `list_devices()` can serve several choices).
    """
    devices = list_devices() if devices is None else devices
    if spec is None or (isinstance(spec, str) and not spec.strip()):
        if not any(d.has(kind) for d in devices):
            reason = sound_server_problem() or "connect one or start a sound server, then run `omni devices`."
            raise AudioInputError(f"no audio {kind} device found; {reason}")
        return None
    chosen = _choose_device(devices, spec, kind)
    if chosen.pulse_name is not None:
        os.environ[PULSE_ENV[kind]] = chosen.pulse_name
    return chosen


def find_device(spec: str | int | None, kind: DeviceKind) -> int | None:
    """`choose_device`, as the PortAudio index to open (None means "PortAudio's default")."""
    chosen = choose_device(spec, kind)
    return None if chosen is None else chosen.portaudio_index


def stream_settings(
    sd: ModuleType, spec: str | int | None, kind: DeviceKind, wanted_rate: int, forced_rate: int | None = None
) -> tuple[int | None, str, int, int]:
    """`choose_device` then `choose_stream_settings`: (PortAudio index, device name, rate, channels).

    A PulseAudio source or sink is named by its description (its stream opens on the `pulse` device).
    """
    chosen = choose_device(spec, kind)
    index = None if chosen is None else chosen.portaudio_index
    name, rate, channels = choose_stream_settings(sd, index, kind, wanted_rate, forced_rate)
    if chosen is not None and chosen.pulse_name is not None:
        name = chosen.name
    return index, name, rate, channels


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
    what = DEVICE_ROLE[kind]
    for rate, channels in candidates:
        try:
            # Checking opens the device for a moment: through a hung sound server that blocks.
            within_deadline(lambda: check(device=index, samplerate=rate, channels=channels, dtype="float32"), f"checking the {what}")
        except (sd.PortAudioError, ValueError):
            continue
        return name, rate, channels
    tried = ", ".join(f"{r} Hz/{c} ch" for r, c in dict.fromkeys(candidates))
    option = "--input-device" if kind == "input" else "--output-device"
    raise AudioInputError(f"{what} '{name}' accepts none of {tried}; pick another with {option} (see `omni devices`).")


def _cannot_open(kind: DeviceKind, name: str, exc: BaseException) -> AudioInputError:
    what = DEVICE_ROLE[kind]
    return AudioInputError(f"cannot open {what} '{name}': {exc}; check it is connected and not in use (see `omni devices`).")


def open_stream(sd: ModuleType, kind: DeviceKind, index: int | None, name: str, **settings: Any) -> Any:
    """Open and start a float32 sounddevice input or output stream; one-line AudioInputError on failure."""
    factory = sd.InputStream if kind == "input" else sd.OutputStream

    def open_and_start() -> Any:
        stream = factory(device=index, dtype="float32", **settings)
        stream.start()
        return stream

    try:
        return within_deadline(open_and_start, f"opening the {DEVICE_ROLE[kind]}")
    except sd.PortAudioError as exc:
        raise _cannot_open(kind, name, exc) from exc


def close_stream(stream: Any, timeout: float = 2.0) -> None:
    """Stop and close a stream, closing it even when stopping fails; when the sound system does
    not let go within `timeout` (a hung server), the stream is abandoned."""

    def stop_and_close() -> None:
        try:
            stream.stop()
        finally:
            stream.close()

    try:
        # Not sticky: a slow close (an output stream draining on a busy machine) is no reason to refuse later calls.
        within_deadline(stop_and_close, "closing an audio stream", timeout, sticky=False)
    except SoundSystemHung:
        pass
