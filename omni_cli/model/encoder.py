"""The Whisper speech encoder (frozen in LLaMA-Omni), loaded from either released format.

The reference loads openai-whisper's `large-v3.pt`; the same weights are published as the
transformers checkpoint `openai/whisper-large-v3`. Both load here into transformers'
`WhisperEncoder`, reading only the encoder tensors and refusing anything unexpected.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from typing import Any
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from transformers import WhisperConfig
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from omni_cli.errors import CheckpointError
from omni_cli.weights.layout import SAFETENSORS_INDEX_NAME, SAFETENSORS_NAME, indexed_shards, load_weights_pickle

# Encoder key prefixes of the transformers checkpoints we accept, most specific first:
# WhisperForConditionalGeneration (openai/whisper-large-v3), WhisperModel, bare WhisperEncoder.
_HF_ENCODER_PREFIXES = ("model.encoder.", "encoder.", "")
# Everything of a whole Whisper that is not the encoder; read past, never loaded.
_HF_IGNORED_PREFIXES = ("model.decoder.", "decoder.", "proj_out.")

# openai-whisper names inside `encoder.blocks.{i}.` → transformers names inside `layers.{i}.`.
_OPENAI_BLOCK_RENAMES = (
    ("attn.query.", "self_attn.q_proj."),
    ("attn.key.", "self_attn.k_proj."),
    ("attn.value.", "self_attn.v_proj."),
    ("attn.out.", "self_attn.out_proj."),
    ("attn_ln.", "self_attn_layer_norm."),
    ("mlp.0.", "fc1."),
    ("mlp.2.", "fc2."),
    ("mlp_ln.", "final_layer_norm."),
)
# openai-whisper names inside `encoder.` outside the blocks → transformers names.
_OPENAI_TOP_RENAMES = (
    ("conv1.", "conv1."),
    ("conv2.", "conv2."),
    ("ln_post.", "layer_norm."),
    ("positional_embedding", "embed_positions.weight"),
)
_OPENAI_BLOCK = re.compile(r"blocks\.(\d+)\.(.*)")
_HF_LAYER = re.compile(r"layers\.(\d+)\.(.*)")
_OPENAI_DIMS = ("n_mels", "n_audio_ctx", "n_audio_state", "n_audio_head", "n_audio_layer")
_MAX_NAMED_KEYS = 5
# How torch.load(weights_only=True) names a class it refused to unpickle.

# Maps a transformers WhisperEncoder key to the name the checkpoint being read uses for it,
# so errors name keys the way the user's file does.
KeyNamer = Callable[[str], str]


class SpeechEncoder(nn.Module):
    """Whisper encoder: log-mel (B, n_mels, frames) → hidden states (B, (frames + 1) // 2, d_model).

    Full-length input (`expected_frames`, 30 s) runs transformers' own forward; shorter input
    runs the same modules with the positional table cut to length (a speed experiment the
    reference does not do; its outputs differ from padded ones and must be measured before use).
    """

    def __init__(self, config: WhisperConfig) -> None:
        super().__init__()
        config._attn_implementation = "sdpa"
        self.config = config
        self.encoder = WhisperEncoder(config)

    @property
    def n_mels(self) -> int:
        """Mel bins the encoder's first convolution expects."""
        return self.config.num_mel_bins

    @property
    def hidden_size(self) -> int:
        """Width of each output frame (d_model)."""
        return self.config.d_model

    @property
    def expected_frames(self) -> int:
        """Mel frames of one full window (3000 for 30 s), the length the encoder was trained on."""
        return self.config.max_source_positions * self.encoder.conv1.stride[0] * self.encoder.conv2.stride[0]

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        """Encode (B, n_mels, frames) log-mel into (B, (frames + 1) // 2, d_model) hidden states."""
        if mel.ndim != 3 or mel.shape[1] != self.n_mels:
            raise ValueError(f"expected mel of shape (batch, {self.n_mels}, frames), got {tuple(mel.shape)}")
        frames = mel.shape[-1]
        if frames > self.expected_frames:
            raise ValueError(
                f"mel has {frames} frames, more than the encoder's {self.expected_frames}; "
                "split the audio with features.split_into_windows first"
            )
        if frames == self.expected_frames:
            return self.encoder(mel).last_hidden_state
        return self._forward_unpadded(mel)

    def _forward_unpadded(self, mel: torch.Tensor) -> torch.Tensor:
        """WhisperEncoder.forward without its fixed-length check: positions cut to the input length."""
        encoder = self.encoder
        hidden = nn.functional.gelu(encoder.conv1(mel))
        hidden = nn.functional.gelu(encoder.conv2(hidden)).permute(0, 2, 1)
        hidden = hidden + encoder.embed_positions.weight[: hidden.shape[1]]
        for layer in encoder.layers:
            hidden = layer(hidden, None)
        return encoder.layer_norm(hidden)


def load_speech_encoder(
    path: str | Path,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    config: dict[str, Any] | None = None,
) -> SpeechEncoder:
    """Load a Whisper encoder from a transformers checkpoint directory or an openai-whisper `.pt` file.

    Only encoder tensors are read; decoder tensors are skipped. Missing, unexpected or
    wrongly shaped encoder tensors raise CheckpointError naming them. Returns the encoder
    in eval mode; freezing (`requires_grad_(False)`) is the caller's choice. `config`: the
    directory's config.json already read (see `ModelFiles`), so it is not read twice.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(
            f"speech encoder {path} does not exist; pass --speech-encoder a Whisper checkpoint directory or large-v3.pt"
        )
    if path.is_dir() and (path / "config.json").is_file():
        whisper, tensors, file_key = _read_hf_checkpoint(path, device, config)
    elif path.is_file():
        whisper, tensors, file_key = _read_openai_checkpoint(path)
    else:
        raise _not_a_checkpoint(path)
    return _build_encoder(path, whisper, tensors, file_key, dtype, device)


def openai_key_to_hf(key: str) -> str | None:
    """Transformers WhisperEncoder name of an openai-whisper `encoder.*` key, None if it has none."""
    if not key.startswith("encoder."):
        return None
    rest = key[len("encoder.") :]
    block = _OPENAI_BLOCK.fullmatch(rest)
    if block:
        index, inner = block.groups()
        renamed = _rename(inner, _OPENAI_BLOCK_RENAMES)
        return None if renamed is None else f"layers.{index}.{renamed}"
    return _rename(rest, _OPENAI_TOP_RENAMES)


def hf_key_to_openai(key: str) -> str | None:
    """openai-whisper name (`encoder.*`) of a transformers WhisperEncoder key, None if it has none."""
    layer = _HF_LAYER.fullmatch(key)
    if layer:
        index, inner = layer.groups()
        renamed = _rename(inner, [(hf, oa) for oa, hf in _OPENAI_BLOCK_RENAMES])
        return None if renamed is None else f"encoder.blocks.{index}.{renamed}"
    renamed = _rename(key, [(hf, oa) for oa, hf in _OPENAI_TOP_RENAMES])
    return None if renamed is None else f"encoder.{renamed}"


def _rename(key: str, renames: Iterable[tuple[str, str]]) -> str | None:
    """Apply the first (old, new) whose old is a prefix of key (or equals it, for whole names)."""
    for old, new in renames:
        if old.endswith(".") and key.startswith(old):
            return new + key[len(old) :]
        if key == old:
            return new
    return None


def _not_a_checkpoint(path: Path) -> CheckpointError:
    return CheckpointError(
        f"{path} is neither a Whisper checkpoint directory nor an openai-whisper .pt file; "
        "pass --speech-encoder a directory like openai/whisper-large-v3 or the file large-v3.pt"
    )


def _read_hf_checkpoint(
    directory: Path, device: str | torch.device, raw_config: dict[str, Any] | None = None
) -> tuple[WhisperConfig, dict[str, torch.Tensor], KeyNamer]:
    """Config, encoder tensors (transformers names) and how the files name them, from a Whisper directory."""
    if raw_config is None:
        try:
            raw_config = json.loads((directory / "config.json").read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise CheckpointError(
                f"cannot read {directory / 'config.json'} ({error}); re-download the speech encoder"
            ) from error
    if not isinstance(raw_config, dict) or raw_config.get("model_type") != "whisper":
        raise _not_a_checkpoint(directory)
    config = WhisperConfig.from_dict(raw_config)

    files = _safetensors_files(directory)
    all_keys = {key: file for file in files for key in _safetensors_keys(file)}
    prefix = next(p for p in _HF_ENCODER_PREFIXES if any(key.startswith(p) for key in all_keys))
    unexpected = []
    wanted: dict[Path, list[str]] = {}
    for key, file in all_keys.items():
        if key.startswith(_HF_IGNORED_PREFIXES):
            continue
        if not key.startswith(prefix):
            unexpected.append(key)
            continue
        wanted.setdefault(file, []).append(key)
    if unexpected:
        raise CheckpointError(
            f"{directory} holds tensors that are not part of a Whisper model: {_name_keys(unexpected)}; "
            "pass --speech-encoder an unmodified Whisper checkpoint"
        )

    tensors: dict[str, torch.Tensor] = {}
    for file, keys in wanted.items():
        with safe_open(str(file), framework="pt", device=str(device)) as handle:
            for key in keys:
                tensors[key[len(prefix) :]] = handle.get_tensor(key)
    return config, tensors, lambda name: prefix + name


def _safetensors_files(directory: Path) -> list[Path]:
    """The safetensors files of a checkpoint directory: the single file or the shards its index lists."""
    single = directory / SAFETENSORS_NAME
    if single.is_file():
        return [single]
    index = directory / SAFETENSORS_INDEX_NAME
    if index.is_file():
        return indexed_shards(index, "speech encoder")
    raise CheckpointError(
        f"{directory} has a Whisper config.json but no {SAFETENSORS_NAME} or {SAFETENSORS_INDEX_NAME}; "
        "download the safetensors weights of the speech encoder"
    )


def _safetensors_keys(file: Path) -> list[str]:
    try:
        with safe_open(str(file), framework="pt") as handle:
            return list(handle.keys())
    except Exception as error:  # safetensors raises its own error types for corrupt headers
        raise CheckpointError(f"cannot read {file} ({error}); re-download the speech encoder") from error


def _read_openai_checkpoint(file: Path) -> tuple[WhisperConfig, dict[str, torch.Tensor], KeyNamer]:
    """Config, encoder tensors (transformers names) and how the file names them, from openai-whisper's .pt."""
    # mmap: the decoder half of the file is never read into memory.
    checkpoint = load_weights_pickle(
        file, "the official openai-whisper large-v3.pt or a transformers Whisper directory", _not_a_checkpoint(file), mmap=True
    )
    if not isinstance(checkpoint, dict) or not {"dims", "model_state_dict"} <= checkpoint.keys():
        raise _not_a_checkpoint(file)
    dims, state = checkpoint["dims"], checkpoint["model_state_dict"]
    absent = [name for name in _OPENAI_DIMS if not isinstance(dims, dict) or name not in dims]
    if absent or not isinstance(state, dict):
        raise CheckpointError(
            f"{file} lacks Whisper dims {_name_keys(absent)}; use the official openai-whisper large-v3.pt"
        )

    config = WhisperConfig(
        num_mel_bins=dims["n_mels"],
        d_model=dims["n_audio_state"],
        encoder_layers=dims["n_audio_layer"],
        encoder_attention_heads=dims["n_audio_head"],
        encoder_ffn_dim=4 * dims["n_audio_state"],  # openai-whisper's MLP width is fixed at 4 × width
        max_source_positions=dims["n_audio_ctx"],
    )
    tensors: dict[str, torch.Tensor] = {}
    unexpected = []
    for key, tensor in state.items():
        if key.startswith("decoder."):
            continue
        name = openai_key_to_hf(key)
        if name is None:
            unexpected.append(key)
            continue
        tensors[name] = tensor
    if unexpected:
        raise CheckpointError(
            f"{file} holds tensors an openai-whisper encoder does not have: {_name_keys(unexpected)}; "
            "use an unmodified openai-whisper checkpoint"
        )
    return config, tensors, lambda name: hf_key_to_openai(name) or name


def _build_encoder(
    source: Path,
    config: WhisperConfig,
    tensors: dict[str, torch.Tensor],
    file_key: KeyNamer,
    dtype: torch.dtype,
    device: str | torch.device,
) -> SpeechEncoder:
    """Check names and shapes against a bodiless encoder, then give it the checkpoint's tensors."""
    # Built on the meta device: no memory and no random init for weights about to be replaced.
    with torch.device("meta"):
        encoder = SpeechEncoder(config)
    expected = encoder.encoder.state_dict()
    unexpected = [file_key(name) for name in tensors if name not in expected]
    if unexpected:
        raise CheckpointError(
            f"{source} holds encoder tensors a Whisper encoder with this config does not have: "
            f"{_name_keys(unexpected)}; check the checkpoint matches its config"
        )
    missing = [name for name in expected if name not in tensors]
    if missing:
        raise CheckpointError(
            f"{source} lacks encoder tensors {_name_keys([file_key(name) for name in missing])}; "
            "re-download the speech encoder"
        )
    for name, tensor in tensors.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise CheckpointError(
                f"{source}: tensor {file_key(name)} has shape {tuple(tensor.shape)} but the config needs "
                f"{tuple(expected[name].shape)}; the checkpoint does not match its config"
            )
    state = {name: tensor.to(device=device, dtype=dtype) for name, tensor in tensors.items()}
    encoder.encoder.load_state_dict(state, strict=True, assign=True)
    return encoder.eval()


def _name_keys(keys: list[str]) -> str:
    shown = ", ".join(keys[:_MAX_NAMED_KEYS])
    more = len(keys) - _MAX_NAMED_KEYS
    return shown + (f" and {more} more" if more > 0 else "")
