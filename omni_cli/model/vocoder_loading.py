"""Reading the unit vocoder's released files: the fairseq pickle (weights only, weight norm
folded) or our one-time safetensors conversion, checked key by key against config.json.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from omni_cli.config import VocoderConfig
from omni_cli.errors import CheckpointError
from omni_cli.model.vocoder import UnitVocoder
from omni_cli.weights.layout import CONFIG_NAME, VOCODER_SAFETENSORS_NAME, load_weights_pickle, locate_vocoder_files

# Weight-norm pairs as saved by torch.nn.utils.weight_norm (fairseq) and by the newer parametrizations.
_WEIGHT_NORM_SUFFIXES = (
    (".weight_g", ".weight_v"),
    (".parametrizations.weight.original0", ".parametrizations.weight.original1"),
)


def fold_weight_norm(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Replace every weight-norm pair (g, v) by the plain weight g * v / ||v||.

    The norm is over all dims but 0 for Conv1d and ConvTranspose1d alike (torch's weight_norm
    default dim=0, which fairseq/HiFi-GAN use); computed in float32 with the same op as
    torch's remove_weight_norm, so folded weights equal the reference's bit for bit.
    """
    out: dict[str, torch.Tensor] = {}
    consumed: set[str] = set()
    for key in state:
        for g_suffix, v_suffix in _WEIGHT_NORM_SUFFIXES:
            if key.endswith(g_suffix):
                base = key[: -len(g_suffix)]
                v_key = base + v_suffix
                if v_key not in state:
                    raise CheckpointError(f"vocoder checkpoint has '{key}' without '{v_key}'; the file is damaged.")
                g, v = state[key].float(), state[v_key].float()
                out[base + ".weight"] = torch._weight_norm(v, g, 0)
                consumed.update((key, v_key))
    for key, value in state.items():
        if key in consumed:
            continue
        if any(key.endswith(v_suffix) for _, v_suffix in _WEIGHT_NORM_SUFFIXES):
            raise CheckpointError(f"vocoder checkpoint has '{key}' without its weight-norm gain; the file is damaged.")
        out[key] = value
    return out


def _read_generator_pickle(path: Path) -> dict[str, torch.Tensor]:
    """Read the fairseq checkpoint's "generator" state dict with the safe (weights-only) unpickler."""
    ckpt = load_weights_pickle(
        path,
        "the released g_00500000 or a converted vocoder.safetensors",
        CheckpointError(f"{path} is not a torch checkpoint; expected the unit vocoder (g_00500000)."),
    )
    generator = ckpt.get("generator") if isinstance(ckpt, dict) else None
    if not isinstance(generator, Mapping):
        raise CheckpointError(f"{path} has no 'generator' weights: it is not a CodeHiFiGAN vocoder checkpoint.")
    bad = [k for k, v in generator.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{path}: generator entry {bad[0]!r} is not a tensor; the file is not a vocoder checkpoint.")
    return fold_weight_norm(generator)


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is not a readable safetensors file ({exc}); convert the vocoder again.") from exc


def _load_state_strict(model: UnitVocoder, state: Mapping[str, torch.Tensor], source: Path) -> None:
    """load_state_dict with one-line errors naming the first missing/unexpected/mis-shaped key."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(
            f"{source} lacks the vocoder weight '{missing[0]}'{more}; the checkpoint does not match config.json."
        )
    unexpected = [k for k in state if k not in expected]
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise CheckpointError(
            f"{source} has an unexpected vocoder weight '{unexpected[0]}'{more}; "
            "the checkpoint does not match config.json."
        )
    for key, param in expected.items():
        if tuple(state[key].shape) != tuple(param.shape):
            raise CheckpointError(
                f"{source}: weight '{key}' has shape {tuple(state[key].shape)} but config.json implies "
                f"{tuple(param.shape)}; the config does not match the weights."
            )
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)


def _read_vocoder_state(weights: Path) -> dict[str, torch.Tensor]:
    if weights.suffix == ".safetensors":
        return _read_safetensors(weights)
    return _read_generator_pickle(weights)


def load_vocoder(
    path: str | Path,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    config: VocoderConfig | None = None,
) -> UnitVocoder:
    """Load the unit vocoder from a directory (config.json + vocoder.safetensors or g_00500000) or a weights file.

    The pickle is read only with torch's weights-only unpickler; weight norm is folded; the
    key set and every shape must match config.json exactly. `config`: the config.json already
    read (see `ModelFiles`), so it is not read twice.
    """
    config_path, weights = locate_vocoder_files(path)
    cfg = config if config is not None else VocoderConfig.load(config_path)
    state = _read_vocoder_state(weights)
    model = UnitVocoder(cfg)
    _load_state_strict(model, state, weights)
    return model.to(device=device, dtype=dtype)


def _atomic_write(dst: Path, write: Callable[[Path], object]) -> None:
    """Write via a temporary file in the same directory, then os.replace, so no half file is ever seen."""
    fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, dst)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def convert_vocoder_checkpoint(src: Path, dst_dir: Path) -> Path:
    """Convert the released pickle once into `dst_dir/vocoder.safetensors` (weight norm folded) + config.json.

    `src` is the checkpoint file or its directory. The weights are validated against the
    config before anything is written. Returns the safetensors path.
    """
    src = Path(src)
    config_path, weights = locate_vocoder_files(src)
    state = _read_vocoder_state(weights)
    cfg = VocoderConfig.load(config_path)
    _load_state_strict(UnitVocoder(cfg), state, weights)  # refuse to write weights that would not load
    dst_dir = Path(dst_dir)
    dst_dir.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.float().contiguous() for k, v in state.items()}
    out = dst_dir / VOCODER_SAFETENSORS_NAME
    _atomic_write(out, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt", "source": weights.name}))
    dst_config = dst_dir / CONFIG_NAME
    if not (dst_config.exists() and dst_config.resolve() == config_path.resolve()):
        _atomic_write(dst_config, lambda tmp: shutil.copyfile(config_path, tmp))
    return out
