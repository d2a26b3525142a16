"""A tiny random unit vocoder written exactly like the fairseq release: config.json + g_00500000.

The pickle holds `{"generator": state_dict}` with weight norm unfolded (`weight_g`/`weight_v`
on every generator conv, plain weights for the embedding and duration predictor), so tests
exercise the same loading and conversion path as the real 500k-step checkpoint.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from omni_cli.config import VocoderConfig
from omni_cli.model.vocoder import UnitVocoder

TINY_CHECKPOINT_NAME = "g_00500000"
# Mean predicted duration in frames: the released vocoder's units last a few 20 ms frames each.
TINY_MEAN_DURATION = 3.0


def tiny_vocoder_config(num_embeddings: int = 1000) -> dict[str, Any]:
    """The released config.json's keys with small channel sizes; hop 320 at 16 kHz as in the release."""
    return {
        "resblock": "1",
        "batch_size": 16,
        "learning_rate": 0.0002,
        "adam_b1": 0.8,
        "adam_b2": 0.99,
        "lr_decay": 0.999,
        "seed": 1234,
        "upsample_rates": [5, 4, 4, 2, 2],
        "upsample_kernel_sizes": [11, 8, 8, 4, 4],
        "upsample_initial_channel": 32,
        "resblock_kernel_sizes": [3, 7, 11],
        "resblock_dilation_sizes": [[1, 3, 5], [1, 3, 5], [1, 3, 5]],
        "num_embeddings": num_embeddings,
        "embedding_dim": 16,
        "model_in_dim": 16,
        "segment_size": 8960,
        "code_hop_size": 320,
        "f0": False,
        "num_mels": 80,
        "num_freq": 1025,
        "n_fft": 1024,
        "hop_size": 256,
        "win_size": 1024,
        "dur_prediction_weight": 1.0,
        "dur_predictor_params": {
            "encoder_embed_dim": 16,
            "var_pred_hidden_dim": 16,
            "var_pred_kernel_size": 3,
            "var_pred_dropout": 0.5,
        },
        "sampling_rate": 16000,
        "fmin": 0,
        "fmax": 8000,
        "fmax_for_loss": None,
        "num_workers": 4,
        "dist_config": {"dist_backend": "nccl", "dist_url": "env://"},
    }


def _has_weight_norm(key: str) -> bool:
    """Which weights fairseq wraps in weight norm: every generator conv, not the duration predictor."""
    return key.endswith(".weight") and key.split(".")[0] in ("conv_pre", "ups", "resblocks", "conv_post")


def tiny_generator_state(cfg: VocoderConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random generator weights in the release's layout (weight_g / weight_v pairs), scaled to give audible output."""
    gen = torch.Generator().manual_seed(seed)

    def normal(*shape: int, std: float = 1.0) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * std

    state: dict[str, torch.Tensor] = {}
    for key, ref in UnitVocoder(cfg).state_dict().items():
        shape = tuple(ref.shape)
        if _has_weight_norm(key):
            base = key[: -len(".weight")]
            # The gain g sets each output row's norm; ~1 keeps the signal's scale through the stack.
            # g differs from ||v|| so that folding is actually exercised.
            state[base + ".weight_g"] = (0.6 + 0.8 * torch.rand(shape[0], 1, 1, generator=gen)).contiguous()
            state[base + ".weight_v"] = normal(*shape, std=0.1)
        elif key == "dict.weight":
            state[key] = normal(*shape)
        elif key.endswith("proj.bias"):
            # exp(log_dur) - 1 ≈ TINY_MEAN_DURATION: durations of a few frames, like real speech units.
            state[key] = torch.full(shape, math.log(TINY_MEAN_DURATION + 1.0))
        elif key.endswith("proj.weight"):
            state[key] = normal(*shape, std=0.4 / math.sqrt(shape[-1]))
        elif key.startswith("dur_predictor.ln") and key.endswith(".weight"):
            state[key] = 1.0 + normal(*shape, std=0.1)
        elif key.startswith("dur_predictor.conv") and key.endswith(".weight"):
            state[key] = normal(*shape, std=1.0 / math.sqrt(shape[1] * shape[2]))
        elif key.endswith(".bias"):
            state[key] = normal(*shape, std=0.02)
        else:
            state[key] = normal(*shape, std=0.1)
    return {k: v.contiguous().clone() for k, v in state.items()}


def make_tiny_vocoder(out_dir: Path, *, seed: int = 0, num_embeddings: int = 1000) -> Path:
    """Write `out_dir/config.json` and `out_dir/g_00500000` (a plain-tensor torch pickle) and return `out_dir`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    raw = tiny_vocoder_config(num_embeddings)
    cfg = VocoderConfig.from_dict(raw)
    (out_dir / "config.json").write_text(json.dumps(raw, indent=2) + "\n", encoding="utf-8")
    torch.save({"generator": tiny_generator_state(cfg, seed)}, out_dir / TINY_CHECKPOINT_NAME)
    return out_dir
