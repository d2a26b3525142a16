"""Player: the queue/callback logic driven by hand, then real playback into a PulseAudio null sink."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import soundfile as sf
from scipy.signal import resample_poly

from omni_cli.audio.player import Player
from omni_cli.errors import AudioInputError

RATE = 16000
NO_STATUS = SimpleNamespace(input_overflow=False, output_underflow=False)


def render_blocks(player: Player, count: int, block: int = 64, channels: int = 1) -> np.ndarray:
    """What the device would receive over `count` callbacks (first channel)."""
    out = []
    for _ in range(count):
        buffer = np.full((block, channels), np.nan, dtype=np.float32)
        player.render(buffer)
        assert np.all(buffer == buffer[:, :1])  # every channel carries the same mono signal
        out.append(buffer[:, 0].copy())
    return np.concatenate(out)


def test_chunks_play_in_order_across_blocks_then_silence() -> None:
    player = Player()
    chunks = [np.arange(n, dtype=np.float32) / 1000 + k for k, n in enumerate((100, 250, 30))]
    for chunk in chunks:
        player.play(chunk)
    played = render_blocks(player, 8, channels=2)
    np.testing.assert_array_equal(played[:380], np.concatenate(chunks))
    np.testing.assert_array_equal(played[380:], 0.0)


def test_stop_silences_the_next_block_and_drops_the_queue() -> None:
    player = Player()
    player.play(np.ones(1000, np.float32))
    player.play(np.ones(1000, np.float32))
    assert render_blocks(player, 1).min() == 1.0
    player.stop()
    np.testing.assert_array_equal(render_blocks(player, 40), 0.0)  # nothing of the 1936 left samples
    assert not player.playing
    player.play(np.full(10, 0.5, np.float32))  # a new reply after the barge-in plays normally
    np.testing.assert_array_equal(render_blocks(player, 1)[:10], 0.5)


def test_underruns_count_starvation_only_while_audio_is_expected() -> None:
    player = Player()
    render_blocks(player, 3)  # idle before any audio: not an underrun
    assert player.underruns == 0
    player.play(np.ones(100, np.float32))
    render_blocks(player, 4)  # ran dry during the reply: one starvation episode, however long
    assert player.underruns == 1
    player.play(np.ones(100, np.float32))
    render_blocks(player, 4)
    assert player.underruns == 2
    player.play(np.ones(100, np.float32))
    player.finish()  # the end of a reply is not an underrun
    render_blocks(player, 4)
    assert player.underruns == 2
    player.render(np.zeros((64, 1), np.float32))
    player._callback(np.zeros((64, 1), np.float32), 64, None, SimpleNamespace(output_underflow=True))
    assert player.xruns == 1


def test_first_audio_time_marks_the_first_block_with_audio() -> None:
    seen: list[float] = []
    player = Player(on_first_audio=seen.append)
    render_blocks(player, 2)
    assert player.first_audio_time is None and seen == []
    before = time.monotonic()
    player.play(np.ones(200, np.float32))
    render_blocks(player, 5)
    after = time.monotonic()
    assert player.first_audio_time is not None and before <= player.first_audio_time <= after
    assert seen == [player.first_audio_time]  # called once per burst, from the block that carried audio
    player.wait_idle(0)  # finishes the burst; the next play() starts a new measurement
    player.play(np.ones(10, np.float32))
    assert player.first_audio_time is None
    render_blocks(player, 1)
    assert len(seen) == 2


def test_every_block_handed_to_the_device_reaches_on_render_silence_included() -> None:
    seen: list[tuple[np.ndarray, int]] = []
    player = Player(on_render=lambda block, rate: seen.append((block.copy(), rate)))
    player.play(np.full(100, 0.25, np.float32))
    played = render_blocks(player, 3, channels=2)
    assert [rate for _, rate in seen] == [RATE] * 3  # the device's rate (16 kHz: no device opened here)
    np.testing.assert_array_equal(np.concatenate([block[:, 0] for block, _ in seen]), played)
    assert seen[-1][0].shape == (64, 2) and not seen[-1][0].any()


def test_heard_seconds_counts_what_was_handed_over_until_the_stop() -> None:
    player = Player()
    player.play(np.ones(1000, np.float32))
    render_blocks(player, 5)  # 320 of the 1000 samples
    assert player.heard_seconds == pytest.approx(320 / RATE)
    player.stop()
    render_blocks(player, 5)
    assert player.heard_seconds == pytest.approx(320 / RATE)  # frozen: nothing more was played
    player.play(np.ones(100, np.float32))  # a new burst counts from zero
    assert player.heard_seconds == 0.0
    render_blocks(player, 1)
    assert player.heard_seconds == pytest.approx(64 / RATE)


def test_silent_time_is_the_first_block_without_the_cut_audio_plus_the_latency() -> None:
    player = Player()
    player._output_latency = 0.05
    player.play(np.ones(1000, np.float32))
    render_blocks(player, 2)
    player.stop()
    assert player.silent_time(timeout=0.01) is None  # no block has been handed to the device since
    before = time.monotonic()
    np.testing.assert_array_equal(render_blocks(player, 1), 0.0)
    after = time.monotonic()
    silent = player.silent_time(timeout=0)
    assert silent is not None and before + 0.05 <= silent <= after + 0.05
    # Stopping while nothing plays: silent at once (or once the last block with audio is out).
    player.stop()
    assert player.silent_time(timeout=0) == pytest.approx(max(time.monotonic(), silent), abs=0.05)


def test_wait_idle_returns_once_everything_was_rendered() -> None:
    player = Player()
    player.play(np.ones(RATE // 10, np.float32))
    assert player.playing
    assert not player.wait_idle(timeout=0.05)  # no device is pulling audio

    def device() -> None:
        for _ in range(30):
            render_blocks(player, 1, block=160)
            time.sleep(0.002)

    thread = threading.Thread(target=device)
    thread.start()
    assert player.wait_idle(timeout=5)
    thread.join()
    assert not player.playing


class EventThatPlaysWhenAsked(threading.Event):
    """An Event whose is_set() first runs `before_answer` once: a producer landing mid-callback."""

    before_answer: Callable[[], None] | None = None

    def is_set(self) -> bool:
        hook, self.before_answer = self.before_answer, None
        if hook is not None:
            hook()
        return super().is_set()


def test_a_burst_queued_while_the_callback_goes_idle_still_counts_as_playing() -> None:
    player = Player()
    player._idle = EventThatPlaysWhenAsked()
    player.play(np.ones(64, np.float32))
    player.finish()
    render_blocks(player, 1)  # exactly the queued audio: idle is decided on the next, empty block
    assert player.playing
    player._idle.before_answer = lambda: player.play(np.full(100, 0.5, np.float32))
    np.testing.assert_array_equal(render_blocks(player, 1), 0.0)  # the new burst arrives after this block was filled
    player.finish()
    assert player.playing  # its audio is still queued
    np.testing.assert_array_equal(render_blocks(player, 2)[:100], 0.5)
    render_blocks(player, 1)
    assert not player.playing


def test_device_without_16k_gets_resampled_audio(fake_sounddevice) -> None:
    fake = fake_sounddevice()  # the fake speakers accept 44.1 and 48 kHz only
    chunk = np.sin(2 * np.pi * 440 * np.arange(RATE // 2) / RATE).astype(np.float32)
    with Player() as player:
        (stream,) = fake.streams
        assert player.device_rate == 48000 and stream.settings["samplerate"] == 48000
        assert stream.settings["blocksize"] == 48000 * player.block_ms // 1000
        player.play(chunk[:3000])
        player.play(chunk[3000:])
        assert player.wait_idle(timeout=0) is False  # nothing rendered yet
        out = []
        for _ in range(600 // player.block_ms):  # 0.6 s of blocks: the whole chunk
            buffer = np.zeros((stream.settings["blocksize"], 1), np.float32)
            stream.callback(buffer, buffer.shape[0], None, NO_STATUS)
            out.append(buffer[:, 0].copy())
    expected = resample_poly(chunk, 3, 1)
    np.testing.assert_allclose(np.concatenate(out)[: expected.size], expected, atol=1e-5)


def test_open_errors_are_one_line(fake_sounddevice) -> None:
    fake = fake_sounddevice()
    fake.start_error = "Device unavailable [PaErrorCode -9985]"
    with pytest.raises(AudioInputError, match="cannot open speaker 'Built-in Speakers': Device unavailable") as info:
        Player().start()
    assert "\n" not in str(info.value)
    with pytest.raises(AudioInputError, match="no output device named 'hdmi'"):
        Player(device="hdmi").start()
    fake_sounddevice(rates=(22050,))
    with pytest.raises(AudioInputError, match="accepts none of 16000 Hz/1 ch, 48000 Hz/1 ch"):
        Player().start()


# -- real playback through PulseAudio -------------------------------------------------------


def envelope(audio: np.ndarray, rate: int = RATE, window_ms: int = 10) -> np.ndarray:
    """RMS per window."""
    size = rate * window_ms // 1000
    n = audio.size // size
    return np.sqrt(np.mean(np.square(audio[: n * size].reshape(n, size)), axis=1))


def best_alignment(recording: np.ndarray, reference: np.ndarray) -> tuple[int, float]:
    """(lag in samples, normalised correlation) where `reference` best matches inside `recording`."""
    scores = np.correlate(recording, reference, mode="valid")
    lag = int(np.argmax(scores))
    segment = recording[lag : lag + reference.size]
    return lag, float(segment @ reference / (np.linalg.norm(segment) * np.linalg.norm(reference) + 1e-12))


@pytest.mark.sound
@pytest.mark.parametrize("device_rate", [None, 44100])
def test_played_speech_reaches_the_speaker(sound_server, question_16k, tmp_path: Path, device_rate: int | None) -> None:
    speech = question_16k[0]
    recording_path = tmp_path / "speaker.wav"
    recorder = sound_server.record_output(recording_path)
    with Player(device_rate=device_rate) as player:
        assert player.device_rate == (device_rate or RATE)
        for chunk in np.array_split(speech, 7):  # as a vocoder would deliver it
            player.play(chunk)
        assert player.wait_idle(timeout=speech.size / RATE + 3)
        assert player.first_audio_time is not None and player.underruns == 0
    time.sleep(0.1)
    sound_server.stop_recording(recorder)
    recording, rate = sf.read(recording_path, dtype="float32")
    assert rate == RATE
    lag, correlation = best_alignment(recording, speech)
    assert correlation > 0.95, correlation
    segment = recording[lag : lag + speech.size]
    assert np.sqrt(np.mean(segment**2)) == pytest.approx(np.sqrt(np.mean(speech**2)), rel=0.1)


@pytest.mark.sound
def test_stop_cuts_playback_within_a_block(sound_server, tmp_path: Path) -> None:
    tone = (0.5 * np.sin(2 * np.pi * 440 * np.arange(3 * RATE) / RATE)).astype(np.float32)
    recording_path = tmp_path / "speaker.wav"
    recorder = sound_server.record_output(recording_path)
    with Player() as player:
        player.play(tone)
        time.sleep(0.8)
        stopped_at = time.monotonic()
        player.stop()
        assert player.first_audio_time is not None
        played_for = stopped_at - player.first_audio_time
        time.sleep(0.5)
    sound_server.stop_recording(recorder)
    recording, _ = sf.read(recording_path, dtype="float32")
    loud = np.flatnonzero(envelope(recording) > 0.1)
    assert loud.size, "the tone never reached the speaker"
    heard_for = (loud[-1] - loud[0] + 1) * 0.010
    # The device heard the tone for as long as it was handed over, plus at most one block and a margin.
    assert -0.05 < heard_for - played_for < 0.2, (heard_for, played_for)
    assert heard_for < tone.size / RATE - 1.0  # and not the rest of the 3 s tone
