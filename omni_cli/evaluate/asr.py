"""Transcribing the speech reply with Whisper (`WhisperForConditionalGeneration`), as the paper scored S2SIF and ASR-WER.

By default the Whisper checkpoint the model already uses as its speech encoder, when that directory
holds the decoder and a tokenizer too (openai/whisper-large-v3 does, as does `omni make-tiny`'s);
`--asr DIR` names another transformers Whisper. Features are omni's own Whisper log-mel (the same
front end the encoder reads); speech longer than 30 s is transcribed window by window.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open

from omni_cli.errors import CheckpointError, one_line
from omni_cli.model.features import log_mel_spectrogram, split_into_windows

DECODER_PREFIX = "model.decoder."
TOKENIZER_FILES = ("tokenizer.json", "vocab.json")


def _weight_names(directory: Path) -> set[str]:
    """The tensor names of a transformers checkpoint directory (one safetensors file or an index)."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        return set(json.loads(index.read_text(encoding="utf-8")).get("weight_map", {}))
    single = directory / "model.safetensors"
    if not single.is_file():
        return set()
    with safe_open(str(single), framework="pt") as handle:
        return set(handle.keys())


def asr_problem(directory: Path) -> str | None:
    """Why `directory` cannot transcribe (not a transformers Whisper, no decoder, no tokenizer), or None."""
    if not directory.is_dir() or not (directory / "config.json").is_file():
        return f"{directory} is not a transformers Whisper directory (config.json + model.safetensors)"
    if json.loads((directory / "config.json").read_text(encoding="utf-8")).get("model_type") != "whisper":
        return f"{directory} does not hold a Whisper model"
    if not any(name.startswith(DECODER_PREFIX) for name in _weight_names(directory)):
        return f"{directory} holds the Whisper encoder only, without the decoder that writes text"
    if not any((directory / name).is_file() for name in TOKENIZER_FILES):
        return f"{directory} has no tokenizer ({' or '.join(TOKENIZER_FILES)})"
    return None


def choose_asr(speech_encoder: Path, asr: Path | None) -> Path:
    """The Whisper directory to transcribe with: `--asr` when given, else the model's own speech encoder."""
    if asr is not None:
        problem = asr_problem(asr)
        if problem:
            raise CheckpointError(f"--asr: {problem}; give a transformers Whisper directory such as openai/whisper-large-v3.")
        return asr
    problem = asr_problem(speech_encoder)
    if problem:
        raise CheckpointError(
            f"the speech encoder cannot transcribe the replies: {problem}. For the preset's Whisper, "
            "`omni download llama-omni-8b` fetches what is missing; else pass --asr a transformers Whisper directory "
            "(e.g. `hf download openai/whisper-large-v3 --local-dir whisper-large-v3`)."
        )
    return speech_encoder


class WhisperAsr:
    """A Whisper checkpoint that turns 16 kHz speech into text (greedy, English when the checkpoint knows languages)."""

    def __init__(self, directory: Path, device: str | None = None, dtype: torch.dtype | None = None) -> None:
        from transformers import AutoTokenizer, WhisperForConditionalGeneration

        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = dtype or (torch.float16 if self.device.type == "cuda" else torch.float32)
        try:
            self.model: Any = WhisperForConditionalGeneration.from_pretrained(str(directory), dtype=dtype).to(self.device).eval()
            self.tokenizer: Any = AutoTokenizer.from_pretrained(str(directory))
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"the Whisper checkpoint {directory} does not load for transcription ({one_line(exc)}).") from exc
        config = self.model.config
        self.n_mels = int(config.num_mel_bins)
        self.max_new_tokens = max(1, int(config.max_target_positions) - 8)  # room for the prompt ids (start, language, task)
        generation = self.model.generation_config
        self.language = {"language": "en", "task": "transcribe"} if getattr(generation, "lang_to_id", None) else {}

    @torch.inference_mode()
    def transcribe(self, audio: np.ndarray) -> str:
        """The text spoken in `audio` (16 kHz mono float32)."""
        if len(audio) == 0:
            return ""
        from transformers.utils import logging as transformers_logging

        texts = []
        verbosity = transformers_logging.get_verbosity()
        transformers_logging.set_verbosity_error()  # generate() warns about its own config on every call
        try:
            for window in split_into_windows(np.asarray(audio, dtype=np.float32)):
                features = log_mel_spectrogram(window, n_mels=self.n_mels).to(self.device, self.model.dtype)[None]
                ids = self.model.generate(features, max_new_tokens=self.max_new_tokens, **self.language)
                texts.append(self.tokenizer.decode(ids[0], skip_special_tokens=True).strip())
        finally:
            transformers_logging.set_verbosity(verbosity)
        return " ".join(t for t in texts if t)
