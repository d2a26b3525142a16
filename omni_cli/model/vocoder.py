"""Unit HiFi-GAN vocoder with duration predictor (fairseq CodeHiFiGAN), plus streaming synthesis.

Discrete units (mHuBERT k-means ids, 50 per second) → embedding → predicted durations →
repeated embeddings → HiFi-GAN generator → 16 kHz waveform. Module names match the fairseq
generator state dict once its weight norm is folded (reading the released files:
`vocoder_loading.py`). `VocoderStream` renders a reply chunk by chunk with left context and a
short re-rendered tail, so chunk seams stay quiet.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from omni_cli.config import DurationPredictorConfig, VocoderConfig
from omni_cli.errors import ConfigError, OmniError

# Leaky-ReLU slope inside the generator (HiFi-GAN's LRELU_SLOPE). The activation before
# conv_post uses torch's default slope 0.01, exactly as the released generator was trained.
LRELU_SLOPE = 0.1
# Streaming defaults, measured on the tiny vocoder (same architecture, same ~21-frame receptive
# radius): 8 units of left context make the start of a chunk equal whole-utterance synthesis;
# re-rendering the last 8 frames (160 ms) of each chunk once the next units are known takes the
# seam error (relative RMS within ±21 frames of a seam, Ω=10) from 0.24 (independent chunks,
# as the reference) and 0.15 (context only) to 0.005.
DEFAULT_CONTEXT_UNITS = 8
DEFAULT_HOLDBACK_FRAMES = 8



class VocoderInputError(OmniError):
    """Units or durations handed to the vocoder cannot be rendered."""


class UnitRangeError(VocoderInputError):
    """A unit id lies outside the vocoder's embedding table."""


def get_padding(kernel_size: int, dilation: int = 1) -> int:
    """'Same' padding of a dilated odd-sized convolution (HiFi-GAN's get_padding)."""
    return (kernel_size * dilation - dilation) // 2


class DurationPredictor(nn.Module):
    """fairseq's VariancePredictor: two conv+ReLU+LayerNorm blocks and a projection to log(duration + 1)."""

    def __init__(self, cfg: DurationPredictorConfig) -> None:
        super().__init__()
        k = cfg.var_pred_kernel_size
        if k % 2 == 0:
            raise ConfigError(f"vocoder config: var_pred_kernel_size {k} must be odd so durations align with units.")
        hidden = cfg.var_pred_hidden_dim
        # fairseq pads conv2 by a literal 1; (k-1)//2 is the same for k=3, the only size fairseq can run.
        self.conv1 = nn.Sequential(nn.Conv1d(cfg.encoder_embed_dim, hidden, k, padding=(k - 1) // 2), nn.ReLU())
        self.ln1 = nn.LayerNorm(hidden)
        self.dropout_module = nn.Dropout(cfg.var_pred_dropout)
        self.conv2 = nn.Sequential(nn.Conv1d(hidden, hidden, k, padding=(k - 1) // 2), nn.ReLU())
        self.ln2 = nn.LayerNorm(hidden)
        self.proj = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, C) unit embeddings → (B, T) predicted log(duration + 1)."""
        x = self.conv1(x.transpose(1, 2)).transpose(1, 2)
        x = self.dropout_module(self.ln1(x))
        x = self.conv2(x.transpose(1, 2)).transpose(1, 2)
        x = self.dropout_module(self.ln2(x))
        return self.proj(x).squeeze(dim=2)


class ResBlock1(nn.Module):
    """HiFi-GAN residual block type "1": per dilation, x += conv2(lrelu(conv1_dilated(lrelu(x))))."""

    def __init__(self, channels: int, kernel_size: int, dilations: Sequence[int]) -> None:
        super().__init__()
        self.convs1 = nn.ModuleList(
            nn.Conv1d(channels, channels, kernel_size, dilation=d, padding=get_padding(kernel_size, d)) for d in dilations
        )
        self.convs2 = nn.ModuleList(
            nn.Conv1d(channels, channels, kernel_size, dilation=1, padding=get_padding(kernel_size, 1)) for _ in dilations
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for c1, c2 in zip(self.convs1, self.convs2):
            x = x + c2(F.leaky_relu(c1(F.leaky_relu(x, LRELU_SLOPE)), LRELU_SLOPE))
        return x


class UnitVocoder(nn.Module):
    """fairseq CodeHiFiGAN generator (inference only): units → 16 kHz waveform.

    Built from `VocoderConfig`; parameter names equal the released generator's keys after
    weight-norm folding. The module is always in eval mode (dropout off), since we never train it.
    """

    def __init__(self, cfg: VocoderConfig) -> None:
        super().__init__()
        _check_supported(cfg)
        self.config = cfg
        self.num_kernels = len(cfg.resblock_kernel_sizes)
        self.dict = nn.Embedding(cfg.num_embeddings, cfg.embedding_dim)
        self.dur_predictor = DurationPredictor(cfg.duration_predictor) if cfg.duration_predictor else None
        ch = cfg.upsample_initial_channel
        self.conv_pre = nn.Conv1d(cfg.model_in_dim, ch, 7, 1, padding=3)
        self.ups = nn.ModuleList(
            nn.ConvTranspose1d(ch // 2**i, ch // 2 ** (i + 1), k, u, padding=(k - u) // 2)
            for i, (u, k) in enumerate(zip(cfg.upsample_rates, cfg.upsample_kernel_sizes))
        )
        self.resblocks = nn.ModuleList(
            ResBlock1(ch // 2 ** (i + 1), k, d)
            for i in range(len(self.ups))
            for k, d in zip(cfg.resblock_kernel_sizes, cfg.resblock_dilation_sizes)
        )
        self.conv_post = nn.Conv1d(ch // 2 ** len(self.ups), 1, 7, 1, padding=3)
        self.eval()

    @property
    def hop_length(self) -> int:
        """Samples per duration frame."""
        return self.config.hop_length

    def train(self, mode: bool = True) -> UnitVocoder:
        """Stay in eval mode: the vocoder is inference-only and dropout would randomise durations."""
        return super().train(False)

    def check_units(self, units: Sequence[int] | torch.Tensor) -> torch.LongTensor:
        """Validate unit ids into a 1-D LongTensor on the model's device; empty or out-of-range → error."""
        try:
            t = torch.as_tensor(units)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise VocoderInputError(f"vocoder units must be a sequence of integers ({exc}).") from exc
        if t.dim() == 2 and t.shape[0] == 1:  # the reference passes (1, T)
            t = t[0]
        if t.dim() != 1:
            raise VocoderInputError(f"vocoder units must be one sequence, got shape {tuple(t.shape)}.")
        if t.numel() == 0:
            raise VocoderInputError("no units to vocode: the unit sequence is empty.")
        if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise VocoderInputError(f"vocoder units must be integers, got dtype {t.dtype}.")
        n = self.config.num_embeddings
        bad = (t < 0) | (t >= n)
        if bool(bad.any()):
            pos = int(bad.nonzero()[0, 0])
            raise UnitRangeError(
                f"unit id {int(t[pos])} at position {pos} is outside the vocoder's range 0..{n - 1}."
            )
        return t.to(device=self.dict.weight.device, dtype=torch.long)

    def check_durations(self, durations: Sequence[int] | torch.Tensor, length: int) -> torch.LongTensor:
        """Validate one positive integer duration per unit into a LongTensor on the device.

        At least one frame per unit, as the reference's clamp guarantees: a unit of length 0
        would let a chunk's left context be shorter than the tail the stream re-renders.
        """
        d = torch.as_tensor(durations)
        if d.dim() == 2 and d.shape[0] == 1:
            d = d[0]
        if d.dim() != 1 or d.numel() != length:
            raise VocoderInputError(
                f"durations must give one value per unit: {length} units, durations of shape {tuple(d.shape)}."
            )
        if d.is_floating_point() or bool((d < 1).any()):
            raise VocoderInputError("durations must be positive integers (at least one frame per unit).")
        return d.to(device=self.dict.weight.device, dtype=torch.long)

    @torch.inference_mode()
    def units_to_durations(self, units: Sequence[int] | torch.Tensor) -> torch.LongTensor:
        """Frames per unit as the reference predicts them: clamp(round(exp(log_dur) - 1), min=1).

        Without a duration predictor in the config every unit lasts one frame (the reference
        without dur_prediction).
        """
        u = self.check_units(units)
        if self.dur_predictor is None:
            return torch.ones_like(u)
        x = self.dict(u[None])  # (1, T, C)
        log_dur = self.dur_predictor(x)
        return torch.clamp(torch.round(torch.exp(log_dur) - 1).long(), min=1)[0]

    def generate(self, frames: torch.Tensor) -> torch.Tensor:
        """HiFi-GAN generator: (B, model_in_dim, F) frame features → (B, 1, F * hop_length) in [-1, 1]."""
        x = self.conv_pre(frames)
        for i, up in enumerate(self.ups):
            x = up(F.leaky_relu(x, LRELU_SLOPE))
            blocks = self.resblocks[i * self.num_kernels : (i + 1) * self.num_kernels]
            xs = blocks[0](x)
            for block in blocks[1:]:
                xs = xs + block(x)
            x = xs / self.num_kernels
        return torch.tanh(self.conv_post(F.leaky_relu(x)))

    @torch.inference_mode()
    def render(self, units: torch.LongTensor, durations: torch.LongTensor) -> torch.Tensor:
        """Checked units and durations (1-D, same device) → float32 waveform of sum(durations) * hop samples."""
        x = self.dict(units[None]).transpose(1, 2)  # (1, C, T)
        x = torch.repeat_interleave(x, durations, dim=2)
        return self.generate(x)[0, 0].float()

    @torch.inference_mode()
    def synthesize(
        self, units: Sequence[int] | torch.Tensor, durations: Sequence[int] | torch.Tensor | None = None
    ) -> torch.Tensor:
        """Units → (samples,) float32 waveform in [-1, 1], samples = sum(durations) * hop_length.

        `durations` default to the predicted ones (the reference's dur_prediction=True).
        """
        u = self.check_units(units)
        d = self.units_to_durations(u) if durations is None else self.check_durations(durations, u.numel())
        return self.render(u, d)

    def forward(self, units: torch.Tensor, durations: torch.Tensor | None = None) -> torch.Tensor:
        """Same as `synthesize` (so the module can be called like the reference's vocoder)."""
        return self.synthesize(units, durations)


def _check_supported(cfg: VocoderConfig) -> None:
    """Refuse configs of CodeHiFiGAN variants this generator does not implement, with one clear line."""
    if cfg.resblock != "1":
        raise ConfigError(f"vocoder config: resblock type {cfg.resblock!r} is not supported (only '1', as released).")
    for key in ("multispkr", "f0", "embedder_params"):
        if cfg.raw.get(key):
            raise ConfigError(f"vocoder config sets '{key}': speaker/f0-conditioned vocoders are not supported.")
    if cfg.model_in_dim != cfg.embedding_dim:
        raise ConfigError(
            f"vocoder config: model_in_dim {cfg.model_in_dim} differs from embedding_dim {cfg.embedding_dim}; "
            "only unit-only vocoders (no speaker/f0 features) are supported."
        )
    dp = cfg.duration_predictor
    if dp is not None and dp.encoder_embed_dim != cfg.embedding_dim:
        raise ConfigError(
            f"vocoder config: dur_predictor_params.encoder_embed_dim {dp.encoder_embed_dim} "
            f"differs from embedding_dim {cfg.embedding_dim}."
        )
    for u, k in zip(cfg.upsample_rates, cfg.upsample_kernel_sizes):
        if (k - u) % 2:
            raise ConfigError(f"vocoder config: upsample kernel {k} and rate {u} must differ by an even number.")


# ---------------------------------------------------------------------------------------------
# Streaming


class VocoderStream:
    """Chunk-by-chunk synthesis for one reply, with quiet seams.

    Each push renders `context_units` previously pushed units in front of the new ones, so
    the new units' durations are predicted with their left neighbours and the generator's
    convolutions see real history; the context's samples (sum of its durations × hop) are
    cut off. Future units are unknown, so the end of every chunk is rendered against
    silence (the generator sees ~20 frames either side): the last `holdback_samples` of
    each chunk (at most half of it) are kept back and, on the next push, replaced by the
    same stretch re-rendered with the new units to its right, entered through a 5 ms
    cross-fade. This delays only the chunk's tail, never its start. A pushed unit's duration
    is fixed once pushed (its samples may be out already). `flush()` returns the held tail
    at the end of the reply. Returned audio is float32 numpy, ready for the player.
    """

    def __init__(
        self, vocoder: UnitVocoder, context_units: int = DEFAULT_CONTEXT_UNITS, holdback_samples: int | None = None
    ) -> None:
        if context_units < 0:
            raise ValueError("context_units must be >= 0")
        hop = vocoder.hop_length
        if holdback_samples is None:
            holdback_samples = min(DEFAULT_HOLDBACK_FRAMES, context_units) * hop
        # The held tail is re-rendered inside the next push's context, which spans >= context_units frames.
        if holdback_samples < 0 or holdback_samples > context_units * hop:
            raise ValueError(f"holdback_samples must be between 0 and context_units * hop ({context_units * hop}).")
        self.vocoder = vocoder
        self.context_units = context_units
        self.holdback_samples = holdback_samples
        self.splice_samples = max(1, hop // 4) if holdback_samples else 0  # 5 ms at the released sizes
        self.units: list[int] = []
        self.durations: list[int] = []
        self._tail = np.zeros(0, dtype=np.float32)

    @torch.inference_mode()
    def push(
        self, units: Sequence[int] | torch.Tensor, durations: Sequence[int] | torch.Tensor | None = None
    ) -> np.ndarray:
        """Render new units; returns the float32 samples ready to play (may end short of them by the held tail).

        `durations` (one per new unit) override the predicted ones. An empty push returns no samples.
        """
        if len(units) == 0:
            return np.zeros(0, dtype=np.float32)
        voc = self.vocoder
        new = voc.check_units(units)
        n_ctx = min(self.context_units, len(self.units))
        ctx_units = self.units[len(self.units) - n_ctx :]
        ctx_dur = self.durations[len(self.durations) - n_ctx :]
        seq = torch.cat([torch.tensor(ctx_units, dtype=torch.long, device=new.device), new])
        if durations is None:
            new_dur = voc.units_to_durations(seq)[n_ctx:]
        else:
            new_dur = voc.check_durations(durations, new.numel())
        seq_dur = torch.cat([torch.tensor(ctx_dur, dtype=torch.long, device=new.device), new_dur])
        wav = voc.render(seq, seq_dur).cpu().numpy()
        start = sum(ctx_dur) * voc.hop_length
        fresh = wav[start:]
        h = self._tail.size
        if h:
            # Replace the held tail (rendered against silence) by its re-render that sees the new
            # units, entering it with a short cross-fade so the splice itself cannot click.
            redo = wav[start - h : start].copy()
            f = min(h, self.splice_samples)
            if f:
                fade = 0.5 - 0.5 * np.cos(np.pi * (np.arange(f, dtype=np.float32) + 0.5) / f)
                redo[:f] = self._tail[:f] * (1 - fade) + redo[:f] * fade
            fresh = np.concatenate([redo, fresh])
        self.units.extend(int(u) for u in new.tolist())
        self.durations.extend(int(d) for d in new_dur.tolist())
        # Hold back at most half of the new audio, so even a short chunk plays something at once.
        keep = min(self.holdback_samples, (len(wav) - start) // 2)
        self._tail = fresh[len(fresh) - keep :].astype(np.float32, copy=True)
        return fresh[: len(fresh) - keep].astype(np.float32, copy=False)

    def flush(self) -> np.ndarray:
        """The held-back tail of the last chunk: call once when the reply's units are complete."""
        tail, self._tail = self._tail, np.zeros(0, dtype=np.float32)
        return tail


__all__ = [
    "UnitVocoder",
    "VocoderStream",
    "VocoderInputError",
    "UnitRangeError",
    "get_padding",
]
