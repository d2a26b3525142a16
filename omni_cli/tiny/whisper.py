"""A tiny random Whisper in both released layouts (transformers directory, openai-whisper .pt).

It keeps the real 30 s input (1500 positions → 3000 mel frames) and 128 mel bins by default,
so the whole speech front end runs unchanged; only the widths and depths are small.
For one seed both layouts hold the same encoder weights, so their loaders can be compared.

Its convolutions are He-initialised (see `_hear_the_input`): with transformers' default init
(std 0.02) the input reaches the layers ~100 times weaker than the sinusoidal positions, so
every question encodes alike and nothing trained on top can tell questions apart.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import WhisperConfig, WhisperForConditionalGeneration

from omni_cli.model.encoder import hf_key_to_openai
from omni_cli.tiny.whisper_tokenizer import write_tiny_whisper_tokenizer

# The real 30 s window: 1500 encoder positions after the stride-2 convolution = 3000 mel frames.
TINY_SOURCE_POSITIONS = 1500
# A decoder only so the files look like the releases; the encoder loaders skip it.
_TINY_VOCAB = 64
_TINY_TEXT_CTX = 16
_TINY_DECODER_LAYERS = 1
_ENCODER_PREFIX = "model.encoder."
# openai-whisper names of the few decoder tensors written to the .pt (transformers name → openai name).
_OPENAI_DECODER_KEYS = {
    "model.decoder.embed_tokens.weight": "decoder.token_embedding.weight",
    "model.decoder.embed_positions.weight": "decoder.positional_embedding",
    "model.decoder.layer_norm.weight": "decoder.ln.weight",
    "model.decoder.layer_norm.bias": "decoder.ln.bias",
}


def tiny_whisper_config(n_mels: int, d_model: int, layers: int, heads: int) -> WhisperConfig:
    """A Whisper config with the real input length and tiny widths, depths and vocabulary."""
    return WhisperConfig(
        num_mel_bins=n_mels,
        d_model=d_model,
        encoder_layers=layers,
        encoder_attention_heads=heads,
        encoder_ffn_dim=4 * d_model,  # openai-whisper's fixed MLP ratio, so the .pt's dims describe it
        decoder_layers=_TINY_DECODER_LAYERS,
        decoder_attention_heads=heads,
        decoder_ffn_dim=4 * d_model,
        vocab_size=_TINY_VOCAB,
        max_source_positions=TINY_SOURCE_POSITIONS,
        max_target_positions=_TINY_TEXT_CTX,
        # Special ids must fit the tiny vocabulary.
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=1,
        decoder_start_token_id=2,
        suppress_tokens=[],
        begin_suppress_tokens=[],
    )


def _hear_the_input(model: WhisperForConditionalGeneration, seed: int) -> None:
    """Give the encoder's two convolutions He (variance-preserving) weights, as a trained Whisper's front end
    dominates its positions: encodings of different questions then differ by ~15-20 % instead of ~0.5 %."""
    generator = torch.Generator().manual_seed(seed)
    encoder = model.model.encoder
    with torch.no_grad():
        for conv in (encoder.conv1, encoder.conv2):
            fan_in = conv.in_channels * conv.kernel_size[0]
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator) * (2.0 / fan_in) ** 0.5)


def make_tiny_whisper(
    out: Path,
    *,
    fmt: str = "hf",
    n_mels: int = 128,
    d_model: int = 32,
    layers: int = 2,
    heads: int = 2,
    seed: int = 0,
) -> Path:
    """Write a random Whisper to `out` and return the path to pass as --speech-encoder.

    fmt "hf": a directory laid out like openai/whisper-large-v3 (config.json, model.safetensors,
    `model.encoder.*` / `model.decoder.*` keys). fmt "openai": the single file `out` laid out like
    openai-whisper's large-v3.pt (`dims` + `model_state_dict` with `encoder.*` and some `decoder.*`).
    The same seed gives the same encoder weights in both formats.
    """
    if fmt not in ("hf", "openai"):
        raise ValueError(f"fmt must be 'hf' or 'openai', got {fmt!r}")
    out = Path(out)
    config = tiny_whisper_config(n_mels, d_model, layers, heads)
    torch.manual_seed(seed)
    model = WhisperForConditionalGeneration(config).eval()
    _hear_the_input(model, seed)
    if fmt == "hf":
        model.save_pretrained(out)
        write_tiny_whisper_tokenizer(out, config.vocab_size, config.max_target_positions)  # the decoder can then write text, as `omni eval`'s ASR needs
        return out

    state: dict[str, torch.Tensor] = {}
    for key, tensor in model.state_dict().items():
        if key.startswith(_ENCODER_PREFIX):
            openai_key = hf_key_to_openai(key[len(_ENCODER_PREFIX) :])
            if openai_key is None:
                raise RuntimeError(f"no openai-whisper name for encoder tensor {key}")
            state[openai_key] = tensor.detach().clone()
        elif key in _OPENAI_DECODER_KEYS:
            state[_OPENAI_DECODER_KEYS[key]] = tensor.detach().clone()
    dims = {
        "n_mels": n_mels,
        "n_vocab": config.vocab_size,
        "n_audio_ctx": config.max_source_positions,
        "n_audio_state": d_model,
        "n_audio_head": heads,
        "n_audio_layer": layers,
        "n_text_ctx": config.max_target_positions,
        "n_text_state": d_model,
        "n_text_head": heads,
        "n_text_layer": config.decoder_layers,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"dims": dims, "model_state_dict": state}, out)
    return out
