"""Audio test fixtures: a private PulseAudio server as the machine's sound card, and test speech."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for sound_server

from sound_server import SoundServer, start_sound_server  # noqa: E402

from omni_cli.audio.io import load_audio  # noqa: E402
from omni_cli.errors import AudioInputError  # noqa: E402


@pytest.fixture(scope="session")
def sound_server() -> Iterator[SoundServer]:
    """A PulseAudio server with virtual mic `omni_mic` and speaker `omni_out`, made PortAudio's default.

    Skips with the reason where no server can start (PulseAudio or PortAudio not installed).
    """
    from omni_cli.audio.devices import load_sounddevice, rescan_devices

    try:
        load_sounddevice()
    except AudioInputError as exc:
        pytest.skip(f"no PortAudio: {exc}")
    server, reason = start_sound_server()
    if server is None:
        pytest.skip(f"no sound server: {reason}")
    try:
        with server.as_default():
            # PortAudio scanned devices at import, maybe before the server existed.
            rescan_devices()
            yield server
    finally:
        server.stop()
        rescan_devices()


@pytest.fixture(scope="session")
def espeak_wav(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A sentence spoken by espeak-ng (22.05 kHz WAV); skips where espeak-ng is not installed."""
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng not installed; run .ci/sound-server.sh")
    path = tmp_path_factory.mktemp("espeak") / "sentence.wav"
    subprocess.run(["espeak-ng", "-w", str(path), "What is the tallest mountain in Europe?"], check=True, capture_output=True)
    return path


@pytest.fixture(scope="session")
def question_16k(question_wavs: list[Path]) -> list[np.ndarray]:
    """The real spoken questions at 16 kHz mono float32."""
    return [load_audio(path) for path in question_wavs]


class FakeStream:
    """Stands in for sounddevice.InputStream/OutputStream: records settings, exposes the callback."""

    def __init__(self, owner: FakeSoundDevice, **settings: object) -> None:
        self.owner = owner
        self.settings = settings
        self.callback = settings["callback"]
        self.active = False
        self.latency = 0.01
        owner.streams.append(self)

    def start(self) -> None:
        if self.owner.start_error is not None:
            raise self.owner.PortAudioError(self.owner.start_error)
        self.active = True

    def stop(self) -> None:
        self.active = False

    def close(self) -> None:
        self.active = False


class FakeSoundDevice:
    """A `sounddevice` module double: a fixed device list, a set of accepted rates, fake streams."""

    class PortAudioError(Exception):
        pass

    def __init__(self, devices: list[dict[str, object]], default: tuple[int, int], rates: tuple[int, ...]) -> None:
        self.devices = [{**d, "index": i, "hostapi": 0} for i, d in enumerate(devices)]
        self.default = type("Default", (), {"device": list(default)})()
        self.rates = rates
        self.start_error: str | None = None
        self.streams: list[FakeStream] = []

    def query_hostapis(self) -> list[dict[str, object]]:
        return [{"name": "Fake"}]

    def query_devices(self, device: int | None = None, kind: str | None = None) -> object:
        if device is None and kind is None:
            return self.devices
        index = device if device is not None else self.default.device[0 if kind == "input" else 1]
        if index is None or index < 0:
            raise self.PortAudioError(f"no default {kind} device")
        return self.devices[index]

    def _check(self, samplerate: int, **_: object) -> None:
        if samplerate not in self.rates:
            raise self.PortAudioError("Invalid sample rate [PaErrorCode -9997]")

    def check_input_settings(self, device: int | None = None, samplerate: int = 0, **kw: object) -> None:
        self._check(samplerate)

    def check_output_settings(self, device: int | None = None, samplerate: int = 0, **kw: object) -> None:
        self._check(samplerate)

    def InputStream(self, **settings: object) -> FakeStream:  # noqa: N802 - mirrors sounddevice
        return FakeStream(self, **settings)

    def OutputStream(self, **settings: object) -> FakeStream:  # noqa: N802 - mirrors sounddevice
        return FakeStream(self, **settings)


FAKE_DEVICES = [
    {"name": "USB Headset Mic", "max_input_channels": 1, "max_output_channels": 0, "default_samplerate": 44100.0},
    {"name": "Built-in Speakers", "max_input_channels": 0, "max_output_channels": 2, "default_samplerate": 48000.0},
    {"name": "USB Headset Phones", "max_input_channels": 0, "max_output_channels": 2, "default_samplerate": 44100.0},
]


@pytest.fixture
def fake_sounddevice(monkeypatch: pytest.MonkeyPatch):
    """Install a FakeSoundDevice (mic 0, speakers 1 and 2; 44.1/48 kHz only) behind omni_cli.audio."""
    import omni_cli.audio.devices as devices
    import omni_cli.audio.mic as mic
    import omni_cli.audio.player as player

    def install(
        devices_list: list[dict[str, object]] = FAKE_DEVICES,
        default: tuple[int, int] = (0, 1),
        rates: tuple[int, ...] = (44100, 48000),
    ) -> FakeSoundDevice:
        fake = FakeSoundDevice(devices_list, default, rates)
        for module in (devices, mic, player):
            monkeypatch.setattr(module, "load_sounddevice", lambda: fake)
        return fake

    return install

