"""Audio as it travels over the network, to and from the 16 kHz float32 the model hears and speaks.

OpenAI's wire formats: `pcm16` is raw 16-bit little-endian mono at 24 kHz, base64-encoded
(the Realtime API's `audio/pcm`, chat completions' `pcm16`); chat completions also take whole
files (`wav`, and whatever else soundfile reads: flac, ogg, mp3). Replies go out as pcm16 at
24 kHz, or as a WAV at the vocoder's own rate.
"""

from __future__ import annotations

import base64
import binascii
import io

import numpy as np
import soundfile as sf

from omni_cli.audio.stream_resampler import StreamResampler
from omni_cli.audio.io import SAMPLE_RATE, resample
from omni_cli.audio.vad import to_float32, to_pcm16
from omni_cli.errors import AudioInputError

PCM16_RATE = 24000  # OpenAI's pcm16 / audio/pcm rate, both directions


class BadAudio(AudioInputError):
    """Audio from a client that cannot be decoded (one line, says what to send instead)."""


def decode_base64(data: object, what: str = "audio") -> bytes:
    """Strict base64 → bytes; BadAudio for anything else."""
    if not isinstance(data, str):
        raise BadAudio(f"{what} must be a base64 string.")
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise BadAudio(f"{what} is not valid base64 ({exc}).") from exc


def pcm16_samples(raw: bytes) -> np.ndarray:
    """Raw 16-bit little-endian mono PCM → float32 in [-1, 1]; an odd byte count is BadAudio."""
    if len(raw) % 2:
        raise BadAudio(f"PCM16 audio must have an even number of bytes (2 per sample); got {len(raw)}.")
    return to_float32(raw)


def decode_question(data: object, fmt: object) -> np.ndarray:
    """A chat completion's `input_audio` (base64 `data`, `format`) → 16 kHz mono float32."""
    raw = decode_base64(data, "input_audio.data")
    if fmt == "pcm16":
        return resample(pcm16_samples(raw), PCM16_RATE, SAMPLE_RATE)
    if not isinstance(fmt, str):
        raise BadAudio("input_audio.format must be \"wav\" or \"pcm16\".")
    try:
        samples, rate = sf.read(io.BytesIO(raw), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, TypeError) as exc:
        raise BadAudio(f"input_audio is not a readable {fmt} file ({exc}); send wav, or pcm16 at 24 kHz.") from exc
    if samples.shape[0] == 0:
        raise BadAudio("input_audio holds no samples.")
    mono = samples.mean(axis=1)
    if not np.all(np.isfinite(mono)):
        raise BadAudio("input_audio holds NaN or infinite samples.")
    return resample(mono, int(rate), SAMPLE_RATE)


def encode_pcm16(audio: np.ndarray) -> str:
    """float32 [-1, 1] mono → base64 PCM16 (clipped)."""
    return base64.b64encode(to_pcm16(np.clip(audio, -1.0, 1.0))).decode("ascii")


def wav_base64(audio: np.ndarray, rate: int) -> str:
    """float32 mono → a base64 16-bit WAV file at `rate`."""
    buffer = io.BytesIO()
    sf.write(buffer, np.clip(np.asarray(audio, dtype=np.float32), -1.0, 1.0), rate, subtype="PCM_16", format="WAV")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


class ReplyAudioStream:
    """One reply's audio chunks (at the vocoder's rate) → PCM16 at 24 kHz, resampled without seams.

    `push` returns the samples now final; `finish` the tail. `sent_ms` is how much audio has
    gone out, so a client's `audio_end_ms` can be checked against it.
    """

    def __init__(self, rate_in: int, rate_out: int = PCM16_RATE) -> None:
        self.rate_out = rate_out
        self._resampler = StreamResampler(rate_in, rate_out)
        self.samples_out = 0

    @property
    def sent_ms(self) -> int:
        """Milliseconds of audio produced so far."""
        return self.samples_out * 1000 // self.rate_out

    def push(self, chunk: np.ndarray) -> np.ndarray:
        """A chunk of the reply → the 24 kHz samples that are final now."""
        out = self._resampler.process(chunk)
        self.samples_out += out.size
        return out

    def finish(self) -> np.ndarray:
        """The held-back tail at the end of the reply."""
        out = self._resampler.flush()
        self.samples_out += out.size
        return out
