"""Test signals: steady noises and music-like tones at a level, speech at a level, pauses, room echo; their level in dB.

Shared by tests/audio and benchmarks/turn_taking.py, benchmarks/echo_cancellation.py (which put this folder on sys.path).
"""

from __future__ import annotations

import numpy as np

RATE = 16000


def at_dbfs(audio: np.ndarray, dbfs: float) -> np.ndarray:
    """Scale so the RMS over the loud part (frames within 30 dB of the loudest) is `dbfs`: speech's active level."""
    frame = RATE * 30 // 1000
    n = audio.size // frame
    rms = np.sqrt(np.mean(np.square(audio[: n * frame].reshape(n, frame), dtype=np.float64), axis=1))
    active = rms[rms >= rms.max() * 10 ** (-30 / 20)]
    level = float(np.sqrt(np.mean(np.square(active))))
    return (audio * (10 ** (dbfs / 20) / level)).astype(np.float32)


def level_db(audio: np.ndarray) -> float:
    """Mean power in dB relative to full scale (a sine at full scale is -3 dB); silence is -200 dB."""
    return float(10 * np.log10(np.mean(np.square(audio, dtype=np.float64)) + 1e-20))


def white_noise(seconds: float, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(int(seconds * RATE)).astype(np.float32)


def pink_noise(seconds: float, seed: int = 0) -> np.ndarray:
    """1/f power: white noise shaped in the frequency domain."""
    n = int(seconds * RATE)
    spectrum = np.fft.rfft(np.random.default_rng(seed).standard_normal(n))
    f = np.fft.rfftfreq(n, 1 / RATE)
    spectrum[1:] /= np.sqrt(f[1:])
    spectrum[0] = 0
    return np.fft.irfft(spectrum, n).astype(np.float32)


def tone(seconds: float, hz: float = 440.0) -> np.ndarray:
    return np.sin(2 * np.pi * hz * np.arange(int(seconds * RATE)) / RATE).astype(np.float32)


def music(seconds: float, seed: int = 0) -> np.ndarray:
    """A melody: 250 ms notes with 4 harmonics, attack/decay envelopes, and a chord pad under them."""
    rng = np.random.default_rng(seed)
    note = RATE // 4
    t = np.arange(note) / RATE
    envelope = np.minimum(1.0, t / 0.01) * np.exp(-t / 0.2)
    scale = 220.0 * 2 ** (np.array([0, 2, 4, 5, 7, 9, 11, 12]) / 12)
    notes = []
    for _ in range(int(seconds * 4)):
        f0 = rng.choice(scale)
        notes.append(envelope * sum(np.sin(2 * np.pi * f0 * k * t) / k for k in range(1, 5)))
    melody = np.concatenate(notes)
    s = np.arange(melody.size) / RATE
    pad = 0.3 * sum(np.sin(2 * np.pi * f * s) for f in (110.0, 138.6, 164.8))
    return (melody + pad).astype(np.float32)


def room_echo(far: np.ndarray, delay_ms: int, gain_db: float) -> np.ndarray:
    """What a microphone hears of `far` played in a room: `delay_ms` later, with two reflections, at `gain_db`."""
    response = np.zeros(400)
    response[[0, 40, 120]] = 1.0, 0.3, -0.15  # direct path, then reflections 2.5 and 7.5 ms later
    echo = np.convolve(far, response)[: far.size]
    delay = delay_ms * RATE // 1000
    return (np.concatenate([np.zeros(delay), echo[: far.size - delay]]) * 10 ** (gain_db / 20)).astype(np.float32)


NOISES = {"white": white_noise, "pink": pink_noise, "tone": tone, "music": music}


def true_bounds(audio: np.ndarray, threshold: float = 0.02) -> tuple[float, float]:
    """Onset/offset (s) of speech in a clean clip: first and last sample above `threshold` × its peak."""
    loud = np.flatnonzero(np.abs(audio) > threshold * np.abs(audio).max())
    return loud[0] / RATE, (loud[-1] + 1) / RATE


def with_pause(first: np.ndarray, second: np.ndarray, pause_s: float = 0.4) -> tuple[np.ndarray, float, float]:
    """`first`'s speech, `pause_s` of silence, then `second`'s: (audio, end of first part, start of second)."""
    _, end = true_bounds(first)
    start, _ = true_bounds(second)
    a = first[: int(end * RATE)]
    b = second[int(start * RATE) :]
    return np.concatenate([a, np.zeros(int(pause_s * RATE), np.float32), b]).astype(np.float32), end, end + pause_s


def split_at_inner_gap(speech: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cut a spoken sentence in the middle of its quiet stretch between words nearest its middle.

    `with_pause` then trims both halves to their speech, so the natural gap is replaced by
    exactly the pause asked for (not added to it).
    """
    start, end = true_bounds(speech)
    frame = RATE * 30 // 1000
    n = speech.size // frame
    rms = np.sqrt(np.mean(np.square(speech[: n * frame].reshape(n, frame)), axis=1))
    first, last = int(start * RATE / frame) + 8, int(end * RATE / frame) - 8
    quiet = [i for i in range(first, last) if rms[i] < 0.1 * rms.max()] or [int(np.argmin(rms[first:last])) + first]
    runs: list[list[int]] = []
    for i in quiet:
        if runs and i == runs[-1][-1] + 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    middle = (first + last) / 2
    run = min(runs, key=lambda r: abs((r[0] + r[-1]) / 2 - middle))
    cut = (run[0] + run[-1] + 1) // 2 * frame
    return speech[:cut], speech[cut:]
