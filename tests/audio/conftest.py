"""Audio test fixtures: a fake `sounddevice` module. (The PulseAudio server and test speech fixtures live in tests/conftest.py.)"""

from __future__ import annotations

import pytest


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

