"""Measures of the vocoder's streaming seams, for the tests: how far chunk boundaries can be
heard, and how much streamed audio differs from whole-utterance synthesis near them."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from omni_cli.config import VocoderConfig


def receptive_radius_frames(cfg: VocoderConfig) -> float:
    """How many duration frames on either side can influence a frame's samples (an estimate).

    Sums the half-widths of conv_pre, each transposed conv, the widest residual block and
    conv_post, each converted to frames at its stage's sample rate. For the released sizes
    this is ~20 frames: audio within that distance of a chunk's end depends on units not yet known.
    """
    radius = 3.0  # conv_pre, kernel 7, at one sample per frame
    rate = 1
    for u, k in zip(cfg.upsample_rates, cfg.upsample_kernel_sizes):
        radius += (k / u) / 2 / rate
        rate *= u
        # Residual block: per dilation d, a dilated conv then an undilated one, both of kernel k_res.
        kernels = zip(cfg.resblock_kernel_sizes, cfg.resblock_dilation_sizes)
        widest = max(sum((k_res - 1) // 2 * (d + 1) for d in dil) for k_res, dil in kernels)
        radius += widest / rate
    return radius + 3.0 / rate  # conv_post




def seam_error(
    streamed: torch.Tensor | np.ndarray, whole: torch.Tensor | np.ndarray, boundaries: Sequence[int], width: int
) -> float:
    """RMS of (streamed - whole) within ±width samples of each boundary, relative to the RMS of `whole`.

    Used to measure how audible chunk seams are: 0 means streaming equals whole-utterance synthesis.
    """
    a = torch.as_tensor(np.asarray(streamed), dtype=torch.float64)
    b = torch.as_tensor(np.asarray(whole), dtype=torch.float64)
    if a.shape != b.shape:
        raise ValueError(f"streamed and whole audio differ in length: {a.numel()} vs {b.numel()}")
    mask = torch.zeros_like(a, dtype=torch.bool)
    for s in boundaries:
        mask[max(0, s - width) : min(a.numel(), s + width)] = True
    if not bool(mask.any()):
        return 0.0
    err = torch.sqrt(torch.mean((a[mask] - b[mask]) ** 2))
    ref = torch.sqrt(torch.mean(b**2)).clamp_min(1e-12)
    return float(err / ref)
