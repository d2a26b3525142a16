"""A model's parts on disk with their configs, read once per run.

`read_model_files` reads every config.json and the checkpoint's safetensors headers once into
`ModelFiles`; the GPU-fit check and the loaders then work from that one reading (getting there
from `--model`, downloads included: `setup.prepare`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omni_cli.config import OmniConfig, VocoderConfig, read_json
from omni_cli.errors import CheckpointError, ConfigError
from omni_cli.weights.layout import ADAPTOR_PREFIX, CONFIG_NAME, Shapes, locate_vocoder_files, read_shapes, weight_files
from omni_cli.weights.presets import Preset


@dataclass(frozen=True)
class ModelFiles:
    """Where a model's parts are and what their config files say."""

    model_dir: Path
    config: OmniConfig
    shapes: Shapes  # every checkpoint tensor's shape and file, from the safetensors headers
    speech_encoder: Path
    whisper_config: dict[str, Any] | None  # the encoder directory's config.json; None for openai's .pt
    vocoder_dir: Path | None  # None: replies are text only
    vocoder_config: VocoderConfig | None
    preset: Preset | None = None

    @property
    def name(self) -> str:
        """How people know this model: the preset's name or the checkpoint directory."""
        return self.preset.name if self.preset is not None else str(self.model_dir)

    @property
    def adaptor_hidden(self) -> int | None:
        """The adaptor's inner width, which config.json does not store: read from its first weight."""
        found = self.shapes.get(ADAPTOR_PREFIX + "linear1.weight")
        return int(found[0][0]) if found else None


def resolve_speech_encoder(config: OmniConfig, model_dir: Path, override: str | Path | None) -> Path:
    """--speech-encoder if given, else config.json's `speech_encoder` (relative to the model dir or cwd)."""
    if override:
        path = Path(override).expanduser()
        if not path.exists():
            raise CheckpointError(f"speech encoder {path} not found; pass --speech-encoder a Whisper-large-v3 directory or large-v3.pt.")
        return path
    if not config.speech_encoder:
        raise ConfigError("config.json names no speech_encoder; pass --speech-encoder a Whisper-large-v3 directory or large-v3.pt.")
    for candidate in (Path(config.speech_encoder).expanduser(), model_dir / config.speech_encoder):
        if candidate.exists():
            return candidate
    raise CheckpointError(
        f"the speech encoder {config.speech_encoder!r} named in config.json was not found; "
        "pass --speech-encoder a Whisper-large-v3 directory or large-v3.pt."
    )


def read_model_files(
    model_dir: str | Path,
    speech_encoder: str | Path | None = None,
    vocoder: str | Path | None = None,
    preset: Preset | None = None,
) -> ModelFiles:
    """Read a model's config files and checkpoint headers once; one-line errors for what is missing or broken."""
    model_dir = Path(model_dir).expanduser()
    config = OmniConfig.load(model_dir)
    shapes = read_shapes(weight_files(model_dir))
    encoder = resolve_speech_encoder(config, model_dir, speech_encoder)
    whisper = read_json(encoder / CONFIG_NAME, "Whisper checkpoint") if (encoder / CONFIG_NAME).is_file() else None
    vocoder_dir = Path(vocoder).expanduser() if vocoder is not None else None
    vocoder_config = VocoderConfig.load(locate_vocoder_files(vocoder_dir)[0]) if vocoder_dir is not None else None
    return ModelFiles(model_dir, config, shapes, encoder, whisper, vocoder_dir, vocoder_config, preset)
