"""Text to speech for `omni data build`: espeak-ng (always there, offline) and Piper's VITS voices (neural).

Every engine speaks a text in a named voice at a speed factor and returns 16 kHz mono float32, the
rate everything in omni reads. Instructions are spoken in several voices and speeds (the paper used
random CosyVoice speakers), replies in one voice (the paper: VITS trained on LJSpeech); `VoicePlan`
picks an item's voice and speed from its id, so a rerun speaks each item exactly as before.
"""

from __future__ import annotations

import hashlib
import io
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import soundfile as sf

from omni_cli.audio.io import SAMPLE_RATE, resample
from omni_cli.errors import OmniError, one_line

ESPEAK_WPM = 175  # espeak-ng's own default speed, the 1.0 of a speed factor
# Several English voices of espeak-ng (variants: +fN female, +mN male), for the instructions.
ESPEAK_INSTRUCTION_VOICES = ("en-us", "en-us+f3", "en-gb", "en-gb+f2", "en-us+m3", "en-gb-x-rp+f4")
ESPEAK_RESPONSE_VOICE = "en-us"
INSTRUCTION_SPEEDS = (0.85, 1.0, 1.15)
ESPEAK_TIMEOUT_S = 60


class TtsError(OmniError):
    """A text could not be spoken (the engine is missing, the voice unknown, the engine failed)."""


class Synthesizer(Protocol):
    """A TTS engine: `speak(text, voice, speed)` → 16 kHz mono float32."""

    name: str

    def speak(self, text: str, voice: str, speed: float) -> np.ndarray: ...


class EspeakTts:
    """espeak-ng through its command line (no Python binding needed; the Debian package is enough)."""

    name = "espeak"

    def __init__(self) -> None:
        self.program = shutil.which("espeak-ng")
        if self.program is None:
            raise TtsError("espeak-ng is not installed; install it (Debian/Ubuntu: apt-get install espeak-ng).")

    def speak(self, text: str, voice: str, speed: float) -> np.ndarray:
        """`text` in espeak-ng voice `voice` (e.g. en-us, en-gb+f2) at `speed` × 175 words a minute."""
        wpm = max(80, min(450, round(ESPEAK_WPM * speed)))
        assert self.program is not None
        try:
            done = subprocess.run(
                [self.program, "-v", voice, "-s", str(wpm), "--stdin", "--stdout"],
                input=text.encode("utf-8"), capture_output=True, timeout=ESPEAK_TIMEOUT_S, check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise TtsError(f"espeak-ng took more than {ESPEAK_TIMEOUT_S} s for one text") from exc
        if done.returncode != 0 or not done.stdout:
            why = one_line(Exception(done.stderr.decode("utf-8", "replace"))) if done.stderr.strip() else f"exit status {done.returncode}"
            raise TtsError(f"espeak-ng failed in voice {voice!r}: {why} (voices: `espeak-ng --voices=en`)")
        # espeak-ng streams its WAV, so the header's sizes are placeholders; soundfile reads what is there.
        audio, rate = sf.read(io.BytesIO(done.stdout), dtype="float32", always_2d=True)
        return resample(audio.mean(axis=1), rate, SAMPLE_RATE).astype(np.float32)


class PiperTts:
    """A Piper VITS voice (`NAME.onnx` + `NAME.onnx.json`) through the piper-tts package, on the CPU.

    Voices: the speaker names of a multi-speaker voice, or "default". Speed divides the voice's length scale.
    """

    name = "piper"

    def __init__(self, model_path: Path) -> None:
        try:
            from piper import PiperVoice
        except ImportError as exc:
            raise TtsError("the Piper engine needs the piper-tts package: pip install 'omni-cli[research]'.") from exc
        model_path = Path(model_path)
        config_path = model_path.with_name(model_path.name + ".json")
        for path in (model_path, config_path):
            if not path.is_file():
                raise TtsError(f"Piper voice file {path} not found; fetch the voice with `omni data build --tts piper` online, or give --piper-voice FILE.onnx with its .onnx.json beside it.")
        try:
            self.voice: Any = PiperVoice.load(model_path, config_path=config_path)
        except Exception as exc:  # onnxruntime and json raise their own types for a damaged file
            raise TtsError(f"the Piper voice {model_path} does not load ({one_line(exc)}); delete it and fetch it again.") from exc
        self.rate = int(self.voice.config.sample_rate)
        self.speakers: dict[str, int] = dict(self.voice.config.speaker_id_map or {})

    def voices(self) -> list[str]:
        """The names this voice answers to."""
        return sorted(self.speakers) or ["default"]

    def speak(self, text: str, voice: str, speed: float) -> np.ndarray:
        """`text` spoken by speaker `voice` ("default" for a one-speaker voice) at `speed`."""
        from piper import SynthesisConfig

        if voice != "default" and voice not in self.speakers:
            raise TtsError(f"this Piper voice has no speaker {voice!r}; it has: {', '.join(self.voices()[:10])}")
        config = SynthesisConfig(
            speaker_id=self.speakers.get(voice), length_scale=self.voice.config.length_scale / max(speed, 0.1)
        )
        try:
            chunks = [chunk.audio_float_array for chunk in self.voice.synthesize(text, syn_config=config)]
        except Exception as exc:  # onnxruntime's errors have their own types
            raise TtsError(f"Piper failed on this text ({one_line(exc)})") from exc
        if not chunks:
            raise TtsError("Piper produced no audio for this text (nothing it could pronounce)")
        return resample(np.concatenate(chunks).astype(np.float32), self.rate, SAMPLE_RATE).astype(np.float32)


@dataclass(frozen=True)
class VoicePlan:
    """The voices and speeds one side (instructions or replies) is spoken in; each item's pick follows from its id."""

    voices: tuple[str, ...]
    speeds: tuple[float, ...] = (1.0,)
    seed: int = 0

    def pick(self, item_id: str) -> tuple[str, float]:
        """The voice and speed for `item_id`: spread evenly over the choices, the same on every run."""
        digest = hashlib.sha256(f"{self.seed}:{item_id}".encode()).digest()
        voice = self.voices[int.from_bytes(digest[:4], "big") % len(self.voices)]
        speed = self.speeds[int.from_bytes(digest[4:8], "big") % len(self.speeds)]
        return voice, speed


def seconds(audio: np.ndarray) -> float:
    """Length of 16 kHz audio in seconds."""
    return len(audio) / SAMPLE_RATE
