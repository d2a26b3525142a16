"""A tiny random mHuBERT and k-means in the layout `omni units` reads: what `omni convert-hubert` and
`omni convert-kmeans` (or `omni download --units`) make of the released files, only small.

The HuBERT keeps the real front end (16 kHz in, one frame per 20 ms: conv strides 5·2·2·2·2·2·2)
and the reference's 11 layers, with tiny widths; the k-means has as many centres as the tiny
LLaMA-Omni has units (1000), so its units are stage-2 targets for that model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import HubertConfig, HubertModel

from omni_cli.train.units import CENTRES_KEY, DEFAULT_LAYER
from omni_cli.weights.presets import HUBERT_DIRNAME, KMEANS_CENTRES_NAME

TINY_UNITS = 1000  # the tiny model's unit_vocab_size (tiny/omni.py)


@dataclass(frozen=True)
class TinyUnitsPaths:
    """Where the tiny unit extractor was written: pass them as --hubert, --kmeans and --layer."""

    hubert_dir: Path
    kmeans: Path
    layer: int = DEFAULT_LAYER


def make_tiny_units(root: Path, seed: int = 0, hidden: int = 16) -> TinyUnitsPaths:
    """Write a tiny HuBERT directory (config.json + model.safetensors) and k-means centres under `root`."""
    root = Path(root)
    config = HubertConfig(
        hidden_size=hidden, num_hidden_layers=DEFAULT_LAYER, num_attention_heads=2, intermediate_size=2 * hidden,
        conv_dim=(8,) * 7, num_conv_pos_embeddings=8, num_conv_pos_embedding_groups=2,
    )
    torch.manual_seed(seed)
    hubert_dir = root / HUBERT_DIRNAME
    HubertModel(config).eval().save_pretrained(hubert_dir)
    generator = torch.Generator().manual_seed(seed)
    kmeans = root / KMEANS_CENTRES_NAME
    save_file({CENTRES_KEY: torch.randn(TINY_UNITS, hidden, generator=generator)}, str(kmeans))
    return TinyUnitsPaths(hubert_dir, kmeans)
