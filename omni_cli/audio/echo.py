"""Echo cancellation: remove what the speaker plays from the microphone, so omni can listen while it talks.

WebRTC's audio processing module (AEC3 echo canceller, high-pass filter, optional noise
suppression), as shipped in the `livekit` wheel, works on 10 ms int16 frames. Two streams go
in, each from its own audio callback, as WebRTC expects:

- the far end (`play_reference`): every block handed to the speaker, silence included, at the
  speaker's rate; it is resampled to 16 kHz here;
- the near end (`process`): the microphone's 16 kHz frames (any whole number of 10 ms), which
  come back cleaned.

AEC3 finds the echo delay itself (a few hundred ms of range); `delay_ms` (output + input
latency) is only its starting hint. It adapts within a second of broadband sound (a second or
more of speech) and stays converged while the room does not change, so keep one canceller for a
whole session, and until `converged` (measured: the echo left far below what is played), treat
what the mic hears during a reply as echo (half-duplex). `warm_up_sound()` is a short soft hiss
a front door can play at the start so that the canceller has converged before the first reply.
Where the module cannot load, `EchoCanceller()` raises `EchoUnavailable` with one line, and
the caller falls back to half-duplex (not listening while it speaks).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import numpy as np

from omni_cli.audio.stream_resampler import StreamResampler
from omni_cli.audio.vad import FrameSplitter, to_float32, to_pcm16
from omni_cli.errors import AudioInputError, one_line

APM_RATE = 16000
APM_FRAME = APM_RATE // 100  # WebRTC processes exactly 10 ms at a time
# A 10 ms reference frame louder than -60 dBFS is audible far end (its echo may follow).
FAR_AUDIBLE_ENERGY = APM_FRAME * 10 ** (-60 / 10)
ECHO_HOLD_FRAMES = 30  # its echo can arrive up to 300 ms later (output + input latency + room)
ERLE_DECAY = 0.99  # per 10 ms frame: a ~1 s window
# Converged (listening while omni speaks is safe) once the cleaned microphone is CONVERGED_DB below
# what the speaker plays, over the last ~1 s of at least MIN_FAR_S of audible far end: the echo
# left is then far below a voice's level (speech echo: 19-36 dB below in AEC3's first 2 s, 44-50
# dB once converged; benchmarks/echo_cancellation.py). Measured, not assumed after a fixed time:
# no echo at all (a headset) converges at once; a user speaking meanwhile keeps the cleaned level
# up, so double talk can only delay it.
CONVERGED_DB = 30.0
MIN_FAR_S = 0.5
# No echo path: the raw microphone stayed this far below what was played while the canceller
# converged (a headset; loudspeakers into a microphone return 0-20 dB below). AEC3 then only
# harms: while a reply plays it still ducks the user's first half-second as if it were echo
# (10-40 dB), which delays barge-in by as much. So the microphone is passed through unchanged.
NO_ECHO_DB = 40.0


class EchoUnavailable(AudioInputError):
    """The echo canceller cannot run here; the message is one line saying why."""


@dataclass(frozen=True)
class EchoSettings:
    """What the audio processing module does to the microphone.

    delay_ms: the speaker's output latency plus the microphone's input latency (a hint; AEC3
        estimates the true delay itself).
    high_pass: remove rumble below ~80 Hz (WebRTC's recommended companion to AEC3).
    noise_suppression: WebRTC's stationary-noise suppressor; off by default because the VAD
        confirmation already ignores steady noise and suppression colours quiet speech.
    """

    delay_ms: int = 50
    high_pass: bool = True
    noise_suppression: bool = False


class EchoCanceller:
    """WebRTC AEC3 on 16 kHz mono: `play_reference()` what is played, `process()` what is heard.

    Thread-safe: the speaker's and the microphone's callbacks may call in at the same time
    (one lock; each call into the module takes ~0.1 ms). Counters for the transcript:
    `reference_frames` and `processed_frames` (10 ms each). Live measures: `far_active_s`
    (seconds of audible far end seen so far; AEC3 needs 2-5 s of reply speech to converge) and
    `erle_db` (echo return loss enhancement over the last ~1 s while the far end was audible).
    """

    def __init__(self, settings: EchoSettings | None = None) -> None:
        self.settings = settings or EchoSettings()
        self._apm, self._frame_type = _load_module(self.settings)
        self._lock = threading.Lock()
        self._delay_ms = int(self.settings.delay_ms)
        self._reference_rate = APM_RATE
        self._resampler = StreamResampler(APM_RATE, APM_RATE)
        self._splitter = FrameSplitter(APM_FRAME)
        self.reference_frames = 0
        self.processed_frames = 0
        self.far_active_s = 0.0
        self._far_hold = 0  # 10 ms frames the echo of the last audible reference may still arrive
        self._energy_in = self._energy_out = 0.0  # ~1 s exponential windows while the far end is audible
        self._energy_far = 0.0  # the same window over what the speaker played
        self._converged = False
        self.echo_return_db: float | None = None  # raw microphone under what was played when it converged
        self.bypassed = False  # no echo path was found: the microphone passes unchanged

    def set_delay_ms(self, delay_ms: float) -> None:
        """Update the output + input latency hint (ms), e.g. once both streams are open."""
        self._delay_ms = max(0, int(round(delay_ms)))

    @property
    def delay_ms(self) -> int:
        """The current latency hint in ms."""
        return self._delay_ms

    def play_reference(self, block: np.ndarray, rate: int = APM_RATE) -> None:
        """Tell the canceller what the speaker is playing now: call once per output block, silence included.

        `block` is mono (or frames × channels, averaged) at `rate`. Why every block: the module
        pairs the far-end timeline with the microphone's, so gaps would shift it.
        """
        samples = np.asarray(block, dtype=np.float32)
        if samples.ndim == 2:
            samples = samples[:, 0] if samples.shape[1] == 1 else samples.mean(axis=1)
        with self._lock:
            if rate != self._reference_rate:
                self._reference_rate = int(rate)
                self._resampler = StreamResampler(int(rate), APM_RATE)
                self._splitter.reset()
            for frame in self._splitter.push(self._resampler.process(samples)):
                self._apm.process_reverse_stream(self._frame_type(bytearray(to_pcm16(frame)), APM_RATE, 1, APM_FRAME))
                self.reference_frames += 1
                energy = float(np.dot(frame, frame))
                if energy > FAR_AUDIBLE_ENERGY:
                    self.far_active_s += APM_FRAME / APM_RATE
                    self._far_hold = ECHO_HOLD_FRAMES
                    self._energy_far = ERLE_DECAY * self._energy_far + energy

    def process(self, frame: np.ndarray) -> np.ndarray:
        """Clean microphone audio: 16 kHz mono, a whole number of 10 ms frames (float32 or int16) → float32."""
        samples = to_float32(frame)
        if samples.size % APM_FRAME:
            raise ValueError(f"echo cancellation needs whole 10 ms frames ({APM_FRAME} samples at 16 kHz); got {samples.size}")
        out = np.empty(samples.size, dtype=np.float32)
        with self._lock:
            for start in range(0, samples.size, APM_FRAME):
                pcm = bytearray(to_pcm16(samples[start : start + APM_FRAME]))  # writable: processed in place
                self._apm.set_stream_delay_ms(self._delay_ms)
                self._apm.process_stream(self._frame_type(pcm, APM_RATE, 1, APM_FRAME))
                cleaned = to_float32(pcm)
                out[start : start + APM_FRAME] = samples[start : start + APM_FRAME] if self.bypassed else cleaned
                self.processed_frames += 1
                if self._far_hold > 0:
                    self._far_hold -= 1
                    heard = samples[start : start + APM_FRAME]
                    self._energy_in = ERLE_DECAY * self._energy_in + float(np.dot(heard, heard))
                    self._energy_out = ERLE_DECAY * self._energy_out + float(np.dot(cleaned, cleaned))
                    if not self._converged and self.far_active_s >= MIN_FAR_S and self._attenuation_db() >= CONVERGED_DB:
                        self._converged = True
                        self.echo_return_db = _db(self._energy_far, self._energy_in)
                        self.bypassed = self.echo_return_db >= NO_ECHO_DB
        return out

    def _attenuation_db(self) -> float:
        """How far below what the speaker played the cleaned microphone is (dB, ~1 s window)."""
        return _db(self._energy_far, self._energy_out)

    @property
    def converged(self) -> bool:
        """True once the echo left in the cleaned microphone was measured far below what was
        played (see CONVERGED_DB); it stays True for the session.

        Before that, treat speech heard while the reply plays as echo (half-duplex)."""
        return self._converged

    @property
    def erle_db(self) -> float | None:
        """How much quieter the cleaned microphone is than the raw one (dB) over the last ~1 s of
        audible far end; None before any. Near-end speech and room noise pull it down."""
        with self._lock:
            if self._energy_in <= 0.0:
                return None
            return float(10.0 * np.log10(self._energy_in / max(self._energy_out, 1e-12)))


def _db(reference: float, energy: float) -> float:
    """How far (dB) `energy` lies below `reference`; infinite for silence."""
    if energy <= 0.0:
        return float("inf")
    return float(10.0 * np.log10(max(reference, 1e-12) / energy))


def _load_module(settings: EchoSettings) -> tuple[Any, Any]:
    """(AudioProcessingModule instance, AudioFrame class), or EchoUnavailable saying why not."""
    try:
        from livekit.rtc import AudioFrame, AudioProcessingModule
    except ImportError as exc:
        if getattr(exc, "name", None) in ("livekit", "livekit.rtc"):
            reason = "the livekit package is not installed (pip install livekit)"
        else:  # livekit's native library failed to load (e.g. an unsupported platform)
            reason = one_line(exc)
        raise EchoUnavailable(f"echo cancellation unavailable: {reason}.") from exc
    except Exception as exc:  # noqa: BLE001 - a broken native module must not stop a conversation
        raise EchoUnavailable(f"echo cancellation unavailable: {one_line(exc)}.") from exc
    try:
        apm = AudioProcessingModule(
            echo_cancellation=True,
            high_pass_filter=settings.high_pass,
            noise_suppression=settings.noise_suppression,
            auto_gain_control=False,  # AGC would pump the level the VAD thresholds rely on
        )
    except Exception as exc:  # noqa: BLE001 - the native runtime's errors are not typed
        raise EchoUnavailable(f"echo cancellation unavailable: cannot start WebRTC's audio processing ({one_line(exc)}).") from exc
    return apm, AudioFrame


def warm_up_sound(rate: int, seconds: float = 0.8, dbfs: float = -24.0, seed: int = 0) -> np.ndarray:
    """A soft hiss (pink noise at `dbfs` RMS, 100 ms fades) to play when a session starts: broadband
    sound the canceller learns the room from in well under a second (speech takes seconds), so the
    first reply can already be interrupted."""
    n = int(rate * seconds)
    spectrum = np.fft.rfft(np.random.default_rng(seed).standard_normal(n))
    f = np.fft.rfftfreq(n, 1 / rate)
    spectrum[1:] /= np.sqrt(f[1:])
    spectrum[0] = 0
    noise = np.fft.irfft(spectrum, n)
    noise *= 10 ** (dbfs / 20) / np.sqrt(np.mean(np.square(noise)))
    fade = min(n // 2, int(rate * 0.1))
    ramp = 0.5 - 0.5 * np.cos(np.pi * np.arange(fade) / fade)
    noise[:fade] *= ramp
    noise[n - fade :] *= ramp[::-1]
    return noise.astype(np.float32)
