"""UTMOS (predicted naturalness, 1–5) of the speech replies, where a MOS package installs.

The paper reported UTMOS through SpeechMOS, which loads its code from GitHub at run time; omni uses
`utmos-pytorch` (a fairseq-free port of the same UTMOS22 strong learner, on PyPI) whose weights come
through huggingface_hub (cached; offline once fetched). Without the package or its weights the column
is left out and one line says why — the other scores do not depend on it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from omni_cli.errors import OmniError, one_line


class MosUnavailable(OmniError):
    """UTMOS cannot run here (package not installed, weights not cached offline, a damaged checkpoint)."""


class UtmosScorer:
    """UTMOS22 strong through `utmos_pytorch`, every weight of the checkpoint checked before use."""

    def __init__(self, device: str | None = None) -> None:
        try:
            from utmos_pytorch import UTMOSScoreTorch
            from utmos_pytorch.utils import download_utmos_ckpt
            from utmos_pytorch.utmos_torch import UTMOSModel
        except ImportError as exc:
            raise MosUnavailable("UTMOS left out: the utmos-pytorch package is not installed (pip install 'omni-cli[mos]')") from exc
        try:
            path = download_utmos_ckpt()
        except Exception as exc:  # huggingface_hub's many error types: offline, not cached, gated
            raise MosUnavailable(f"UTMOS left out: its weights are not available ({one_line(exc)}); run once with network access") from exc
        state = torch.load(str(path), map_location="cpu", weights_only=True)
        # The package loads with strict=False: a partial checkpoint would score with random layers.
        missing = sorted(set(UTMOSModel().state_dict()) - set(state))
        if missing:
            raise MosUnavailable(f"UTMOS left out: {path} lacks {len(missing)} weights (e.g. {missing[0]}); delete it to fetch it again")
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model: Any = UTMOSScoreTorch(str(path), device=self.device)

    def score(self, audio: np.ndarray) -> float:
        """Predicted MOS of 16 kHz mono speech."""
        wave = torch.as_tensor(np.asarray(audio, dtype=np.float32), device=self.device)
        return round(float(self.model.score(wave)[0]), 3)
