"""PlaybackBuffer: a simulated reply (units at a steady rate, chunks of Ω units) played with and without it."""

from __future__ import annotations

import numpy as np
import pytest

from omni_cli.audio.playback_buffer import PlaybackBuffer

RATE = 16000
UNIT_AUDIO_S = 0.02  # each unit is 20 ms of speech


def simulate(buffer: PlaybackBuffer | None, unit_s: float, units: int = 120, first: int = 10, omega: int = 40) -> tuple[float, float]:
    """Generate `units` units, one every `unit_s`, chunked like the pipeline (first chunk `first`, then Ω);
    play what the buffer releases (everything at once without one). Returns (start of playback after
    the first chunk was ready, longest silence after the first sound) in seconds."""
    if buffer is not None:
        buffer.start_reply()
    arrivals: list[tuple[float, float]] = []  # (time the audio is handed to the player, seconds of audio)
    pending, chunks, t = 0, 0, 0.0
    first_chunk_t = None
    for _ in range(units):
        t += unit_s
        pending += 1
        if buffer is not None:
            buffer.on_units(t, 1)
        if pending >= (omega if chunks else first):
            audio = np.zeros(int(pending * UNIT_AUDIO_S * RATE), np.float32)
            first_chunk_t = t if first_chunk_t is None else first_chunk_t
            chunks, pending = chunks + 1, 0
            if buffer is None:
                arrivals.append((t, audio.size / RATE))
            else:
                buffer.push(audio, RATE)
        if buffer is not None:
            arrivals += [(t, a.size / RATE) for a in buffer.take()]
    if buffer is not None:
        arrivals += [(t, a.size / RATE) for a in buffer.release()]
        buffer.end_reply()
    # The player plays each piece as soon as it is there and the previous one has ended.
    clock, longest = arrivals[0][0], 0.0
    for arrived, seconds in arrivals:
        longest = max(longest, arrived - clock)
        clock = max(clock, arrived) + seconds
    assert first_chunk_t is not None
    return arrivals[0][0] - first_chunk_t, longest


def test_without_it_a_slowish_reply_stutters_after_its_first_chunk() -> None:
    # 10 units = 0.2 s of audio, then 40 more units take 0.4 s to come: a 0.2 s gap.
    _, gap = simulate(None, unit_s=0.01)
    assert gap == pytest.approx(0.2, abs=0.02)


def test_playback_waits_until_the_held_audio_covers_the_next_chunk() -> None:
    buffer = PlaybackBuffer(chunk_units=40)
    wait, gap = simulate(buffer, unit_s=0.01)
    assert gap == 0.0
    # It held the first chunk only until the units still missing for the next would come in time.
    assert 0.0 < wait < 0.4
    assert buffer.unit_s == pytest.approx(0.01)  # remembered for the next reply


def test_a_fast_reply_plays_at_once() -> None:
    wait, gap = simulate(PlaybackBuffer(chunk_units=40), unit_s=0.002)
    assert wait == 0.0 and gap == 0.0


def test_the_next_reply_starts_from_the_rate_measured_before() -> None:
    buffer = PlaybackBuffer(chunk_units=40)
    simulate(buffer, unit_s=0.01)
    buffer.start_reply()
    buffer.on_units(0.0, 1)  # its own rate is not known yet
    assert buffer.wait_s() == pytest.approx(39 * 0.01 * buffer.MARGIN + buffer.SLACK_S)
    buffer.push(np.zeros(RATE // 10, np.float32), RATE)  # 0.1 s held, the next chunk needs 40 units: ~0.63 s
    assert buffer.take() == []


def test_generating_slower_than_real_time_holds_at_most_max_wait() -> None:
    buffer = PlaybackBuffer(chunk_units=40)
    wait, gap = simulate(buffer, unit_s=0.05)
    assert wait <= buffer.MAX_WAIT_S + 40 * 0.05  # it starts by the first chunk after MAX_WAIT_S of audio is held
    assert gap > 0  # gaps cannot be avoided there, only bounded


def test_without_a_rate_or_chunk_size_nothing_is_held() -> None:
    for buffer in (PlaybackBuffer(chunk_units=None), PlaybackBuffer(chunk_units=40)):
        buffer.push(np.zeros(160, np.float32), RATE)
        assert len(buffer.take()) == 1
