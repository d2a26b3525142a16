"""Speech adaptor: concatenate k consecutive encoder frames, then a two-layer MLP into the LLM's space."""

from __future__ import annotations

import torch
from torch import nn


class SpeechAdaptor(nn.Module):
    """The reference "linear" speech projector (`model.speech_projector`).

    (B, T, d_enc) → drop T mod k trailing frames → (B, T/k, d_enc·k) → linear1 → ReLU → linear2.
    The MLP's inner width is not in config.json; the loader reads it from the weight shapes.
    """

    def __init__(self, encoder_hidden: int, llm_hidden: int, downsample: int, inner: int) -> None:
        super().__init__()
        self.downsample = downsample
        self.linear1 = nn.Linear(encoder_hidden * downsample, inner)
        self.relu = nn.ReLU()
        self.linear2 = nn.Linear(inner, llm_hidden)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        """Map encoder frames (B, T, d_enc) to speech embeddings (B, T // k, d_llm)."""
        b, t, d = frames.shape
        t_kept = t - t % self.downsample
        stacked = frames[:, :t_kept].contiguous().view(b, t_kept // self.downsample, d * self.downsample)
        return self.linear2(self.relu(self.linear1(stacked)))

    @staticmethod
    def output_length(mel_frames: int, downsample: int) -> int:
        """Speech embeddings produced for `mel_frames` log-mel frames (the encoder halves, then ÷k)."""
        return (mel_frames + 1) // 2 // downsample
