"""Microphone and device selection: fake PortAudio for the logic, a PulseAudio virtual mic for real capture."""

from __future__ import annotations

import importlib.abc
import sys
import time
from types import SimpleNamespace

import numpy as np
import pytest
from scipy.signal import resample_poly

from omni_cli.audio.devices import find_device, list_devices, load_sounddevice
from omni_cli.audio.stream_resampler import StreamResampler
from omni_cli.audio.mic import Microphone
from omni_cli.audio.vad import Endpointer, SpeechEnd, SpeechStart
from omni_cli.errors import AudioInputError

RATE = 16000
NO_STATUS = SimpleNamespace(input_overflow=False, output_underflow=False)


# -- device selection -----------------------------------------------------------------------


def test_find_device_by_index_name_or_part_of_a_name(fake_sounddevice) -> None:
    fake_sounddevice()
    assert find_device(None, "input") is None  # None: PortAudio's default
    assert find_device(0, "input") == 0 and find_device("2", "output") == 2
    assert find_device("built-in speakers", "output") == 1
    assert find_device("phones", "output") == 2
    assert find_device("usb", "input") == 0  # "USB Headset Phones" has no input, so no ambiguity


def test_find_device_errors_name_what_exists(fake_sounddevice) -> None:
    fake_sounddevice()
    with pytest.raises(AudioInputError, match="'e' matches several output devices"):
        find_device("e", "output")
    with pytest.raises(AudioInputError, match="Did you mean: USB Headset Mic") as info:
        find_device("usb headset mik", "input")
    assert "\n" not in str(info.value)
    with pytest.raises(AudioInputError, match=r"device 1 \(Built-in Speakers\) has no input channels"):
        find_device(1, "input")
    with pytest.raises(AudioInputError, match="no audio device with index 7"):
        find_device(7, "output")
    fake_sounddevice(devices_list=[], default=(-1, -1))
    with pytest.raises(AudioInputError, match="no audio input device found"):
        find_device(None, "input")


def test_list_devices_marks_the_defaults(fake_sounddevice) -> None:
    fake_sounddevice(default=(0, 2))
    devices = list_devices()
    assert [d.name for d in devices] == ["USB Headset Mic", "Built-in Speakers", "USB Headset Phones"]
    assert [(d.is_default_input, d.is_default_output) for d in devices] == [(True, False), (False, False), (False, True)]
    assert devices[1].max_output_channels == 2 and devices[0].default_samplerate == 44100.0


def test_missing_portaudio_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    class NoPortAudio(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):  # noqa: ANN001 - importlib protocol
            if name == "sounddevice":
                raise OSError("PortAudio library not found")
            return None

    monkeypatch.delitem(sys.modules, "sounddevice", raising=False)
    monkeypatch.setattr(sys, "meta_path", [NoPortAudio(), *sys.meta_path])
    with pytest.raises(AudioInputError, match="apt-get install libportaudio2"):
        load_sounddevice()


@pytest.mark.parametrize(("rate_in", "rate_out"), [(48000, 16000), (44100, 16000), (16000, 44100), (22050, 16000)])
def test_stream_resampler_matches_one_shot_resampling(rate_in: int, rate_out: int) -> None:
    rng = np.random.default_rng(rate_in)
    signal = rng.standard_normal(rate_in // 2).astype(np.float32)
    resampler = StreamResampler(rate_in, rate_out)
    cuts = np.cumsum(rng.integers(1, 900, size=400))
    pieces = [resampler.process(block) for block in np.split(signal, cuts[cuts < signal.size])]
    streamed = np.concatenate([*pieces, resampler.flush()])
    expected = resample_poly(signal, resampler.up, resampler.down)
    assert streamed.size == expected.size
    np.testing.assert_allclose(streamed, expected, atol=1e-6)


# -- the microphone's data path, with fake PortAudio ----------------------------------------


def test_16k_device_blocks_make_frames_as_copies(fake_sounddevice) -> None:
    fake = fake_sounddevice(rates=(16000, 44100))
    with Microphone(frame_ms=30) as mic:
        (stream,) = fake.streams
        assert mic.device_rate == 16000 and stream.settings["blocksize"] == 160  # 10 ms blocks: 20 ms of input latency
        block = np.zeros((160, 1), np.float32)
        for k in range(3):
            block[:, 0] = np.arange(160 * k, 160 * (k + 1), dtype=np.float32) / 480
            stream.callback(block, 160, None, NO_STATUS)
            block[:] = 0  # PortAudio reuses its buffer; the queued frame must not change
            assert k == 2 or mic.read(timeout=0.01) is None  # a frame once three blocks came
        frame = mic.read(timeout=1)
        np.testing.assert_array_equal(frame, np.arange(480, dtype=np.float32) / 480)
        assert mic.read(timeout=0.01) is None


def test_device_rate_is_resampled_to_16k_frames(fake_sounddevice) -> None:
    fake = fake_sounddevice()  # the fake mic takes 44.1 and 48 kHz only
    signal = np.sin(2 * np.pi * 1000 * np.arange(44100) / 44100).astype(np.float32)
    with Microphone(frame_ms=20) as mic:
        (stream,) = fake.streams
        assert mic.device_rate == 44100 and stream.settings["samplerate"] == 44100
        size = stream.settings["blocksize"]
        for start in range(0, signal.size - size + 1, size):
            stream.callback(signal[start : start + size, None], size, None, NO_STATUS)
        got = []
        while (frame := mic.read(timeout=0)) is not None:
            assert frame.shape == (320,) and frame.dtype == np.float32
            got.append(frame)
    captured = np.concatenate(got)
    expected = resample_poly(signal, 160, 441)
    assert captured.size >= RATE - 2 * 320  # a second in, about a second out (minus a partial frame)
    np.testing.assert_allclose(captured, expected[: captured.size], atol=1e-5)


def test_overflows_and_a_full_queue_are_counted_not_raised(fake_sounddevice) -> None:
    fake = fake_sounddevice(rates=(16000,))
    with Microphone(frame_ms=10, max_queue_s=0.05) as mic:  # room for 5 frames
        (stream,) = fake.streams
        for _ in range(8):
            stream.callback(np.zeros((160, 1), np.float32), 160, None, SimpleNamespace(input_overflow=True))
        assert mic.overflows == 8 and mic.dropped_frames == 3
        assert mic.clear() == 5


def test_open_errors_are_one_line(fake_sounddevice) -> None:
    fake = fake_sounddevice()
    fake.start_error = "Device unavailable [PaErrorCode -9985]"
    with pytest.raises(AudioInputError, match="cannot open microphone 'USB Headset Mic': Device unavailable") as info:
        Microphone().start()
    assert "\n" not in str(info.value)
    fake_sounddevice(rates=(8000,))
    with pytest.raises(AudioInputError, match="accepts none of 16000 Hz/1 ch, 44100 Hz/1 ch"):
        Microphone().start()
    fake_sounddevice(default=(-1, 1))  # devices, but no default input
    with pytest.raises(AudioInputError, match="no default input device"):
        Microphone().start()


# -- real capture from the PulseAudio virtual microphone ------------------------------------


@pytest.mark.sound
def test_the_server_is_portaudios_default_device(sound_server) -> None:
    devices = list_devices()
    defaults = [d for d in devices if d.is_default_input and d.is_default_output]
    assert defaults and defaults[0].max_input_channels > 0 and defaults[0].max_output_channels > 0
    assert find_device(defaults[0].name, "input") == defaults[0].index


@pytest.mark.sound
@pytest.mark.parametrize("device_rate", [None, 48000])
def test_microphone_hears_one_question_from_the_virtual_mic(sound_server, question_wavs, question_16k, device_rate) -> None:
    reference = question_16k[1]
    endpointer = Endpointer()
    events = []
    with Microphone(device_rate=device_rate) as mic:
        assert mic.device_rate == (device_rate or RATE)
        # Capture starts asynchronously: play only once frames flow, or the onset may be lost.
        first = mic.read(timeout=2.0)
        assert first is not None, "the microphone delivered nothing"
        events += endpointer.feed(first)
        player = sound_server.play_into_mic(question_wavs[1])
        deadline = time.monotonic() + reference.size / RATE + 2.0
        while time.monotonic() < deadline and not any(isinstance(e, SpeechEnd) for e in events):
            frame = mic.read(timeout=1.0)
            assert frame is not None, "the microphone stopped delivering frames"
            events += endpointer.feed(frame)
        assert player.wait(5) == 0
    events += endpointer.flush()
    assert [type(e) for e in events] == [SpeechStart, SpeechEnd]
    utterance = events[1].audio
    assert not events[1].forced
    # The whole question is in the utterance, sample for sample (up to the resampling chain).
    assert utterance.size >= reference.size
    scores = np.correlate(utterance, reference, mode="valid")
    lag = int(np.argmax(scores))
    segment = utterance[lag : lag + reference.size]
    correlation = segment @ reference / (np.linalg.norm(segment) * np.linalg.norm(reference))
    assert correlation > 0.95, correlation


def test_frames_are_put_on_the_clock_by_their_samples_not_by_late_callbacks() -> None:
    """Callbacks 5-40 ms late at random (a busy machine): each block's end still lands within 2 ms of when it was captured."""
    from omni_cli.audio.mic import SampleClock

    clock, rng = SampleClock(16000), np.random.default_rng(0)
    errors = []
    for k in range(1, 300):
        captured = 100.0 + k * 0.03
        errors.append(clock.block_end(captured + 0.005 + rng.uniform(0.0, 0.035), 480) - captured)
    assert max(abs(e - 0.005) for e in errors[30:]) < 0.002  # the least delayed callback's 5 ms remain: the input latency's share
    clock.restart()  # after lost samples, counting starts again
    assert clock.block_end(200.0, 480) == pytest.approx(200.0)
