"""Unit targets for stage 2: response speech → mHuBERT layer-11 features → nearest k-means centre.

The reference's units come from mHuBERT base (vp_en_es_fr_it3, 400k) layer 11 at 50 Hz and a
1000-centre k-means; consecutive duplicates are merged for the CTC targets. HuBERT loads as
transformers' `HubertModel` from a converted checkpoint (config.json + safetensors; see
`hubert.py`), strictly: a directory whose weights do not all match (e.g. a Whisper model) is
refused rather than run half random.

The released k-means file is a scikit-learn/joblib pickle; `convert_kmeans` reads only its
centres with a restricted unpickler (`kmeans_pickle.py`) and writes them as safetensors.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from transformers import HubertModel

from omni_cli.audio.io import SAMPLE_RATE, load_audio
from omni_cli.config import read_json
from omni_cli.errors import CheckpointError, ConfigError, one_line
from omni_cli.train.data import DatasetError, merge_repeats, read_manifest_and_format
from omni_cli.train.kmeans_pickle import centres_problem, read_kmeans_centres

CENTRES_KEY = "cluster_centers"
# The reference's layer: the output of HuBERT's 11th transformer layer (hidden_states[11]).
DEFAULT_LAYER = 11
# Where a manifest record keeps the path of its spoken response, by release.
RESPONSE_SPEECH_FIELDS = ("tgt_speech", "response_speech", "answer_speech", "tgt_audio")
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3")


def convert_kmeans(src: str | Path, dst: str | Path) -> Path:
    """Turn the released k-means file into `dst`: safetensors holding only the centres, (K, D) float32.

    The file is read with a restricted unpickler (numpy arrays and a stand-in for scikit-learn's
    MiniBatchKMeans only); a file naming anything else is refused without running it.
    """
    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise CheckpointError(f"k-means file {src} not found; download it (`omni download llama-omni-8b --units`).")
    centres = read_kmeans_centres(src)
    part = dst.with_name(f".{dst.name}.part")
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        save_file({CENTRES_KEY: torch.from_numpy(centres)}, str(part))
        os.replace(part, dst)
    except (OSError, SafetensorError) as exc:  # a folder, read-only or full destination: nothing half-written stays
        raise CheckpointError(f"cannot write {dst} ({getattr(exc, 'strerror', None) or one_line(exc)}); choose a writable file name.") from exc
    finally:
        part.unlink(missing_ok=True)
    return dst


def load_kmeans_centres(path: str | Path) -> torch.Tensor:
    """The (K, D) centres from a converted safetensors file or a plain `.npy` (never a pickle)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"k-means centres {path} not found; convert the released file once with `omni convert-kmeans`.")
    if path.suffix == ".npy":
        try:
            centres = torch.from_numpy(np.load(path, allow_pickle=False))
        except (ValueError, EOFError, OSError) as exc:  # a pickled, empty or damaged .npy
            raise CheckpointError(f"{path} is not a plain array ({one_line(exc)}); convert it with `omni convert-kmeans`.") from exc
    else:
        try:
            with safe_open(str(path), framework="pt") as handle:
                centres = handle.get_tensor(CENTRES_KEY)
        except Exception as exc:  # safetensors raises its own error types for non-safetensors files
            raise CheckpointError(
                f"{path} is not a converted k-means file ({str(exc).splitlines()[0]}); convert the released pickle with `omni convert-kmeans`."
            ) from exc
    problem = centres_problem(centres.numpy())
    if problem is not None:
        raise CheckpointError(f"{path} {problem}; convert the release's k-means file with `omni convert-kmeans`.")
    return centres.float()


def nearest_centre(features: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """Index of the nearest centre (Euclidean) for each feature row: (T, D), (K, D) → (T,)."""
    return torch.cdist(features.float()[None], centres.float()[None])[0].argmin(dim=-1)


def pick_device(device: str | None) -> str:
    """--device as given, else cuda when available, else cpu; a CUDA device this machine lacks is a ConfigError."""
    if device is not None and device.startswith("cuda"):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = int(device.partition(":")[2] or 0)
        if index >= count:
            there = f"this machine has {count} CUDA GPU(s)" if count else "no CUDA GPU is visible"
            raise ConfigError(f"--device {device} was asked for but {there}; use --device cpu (or install a CUDA build of torch).")
    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def load_hubert(hubert_dir: str | Path) -> HubertModel:
    """transformers' HubertModel from a converted directory, every weight present and used.

    A missing, unexpected or wrongly shaped weight is an error naming it: a model that loads
    half random (a Whisper directory, a partial conversion) would label every frame alike.
    """
    hubert_dir = Path(hubert_dir)
    convert = "convert mHuBERT with `omni convert-hubert` (or `omni download llama-omni-8b --units`)"
    if not (hubert_dir / "config.json").is_file():
        raise CheckpointError(f"{hubert_dir} is not a transformers HuBERT directory (config.json + safetensors); {convert}.")
    model_type = read_json(hubert_dir / "config.json", "HuBERT config").get("model_type")
    if model_type != "hubert":
        raise CheckpointError(f"{hubert_dir} holds a {model_type!r} model, not HuBERT; {convert}.")
    try:
        model, info = HubertModel.from_pretrained(str(hubert_dir), use_safetensors=True, output_loading_info=True)
    except (OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{hubert_dir} does not load as HuBERT ({one_line(exc)}); {convert}.") from exc
    problems = [
        (kind, key if isinstance(key, str) else key[0])
        for kind, keys in (("missing", info["missing_keys"]), ("unexpected", info["unexpected_keys"]),
                           ("of the wrong shape", info.get("mismatched_keys", [])))
        for key in sorted(keys)
    ]
    if problems:
        kind, key = problems[0]
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise CheckpointError(f"{hubert_dir}: weight {key!r} is {kind}{more}; it is not a complete HuBERT checkpoint: {convert}.")
    return model


class UnitExtractor:
    """HuBERT (transformers) + k-means centres: 16 kHz speech → discrete units at the model's frame rate."""

    def __init__(
        self, hubert_dir: str | Path, centres: torch.Tensor, layer: int = DEFAULT_LAYER, device: str | None = None
    ) -> None:
        device = pick_device(device)
        self.model = load_hubert(hubert_dir).to(device).eval()
        layers = self.model.config.num_hidden_layers
        if not 1 <= layer <= layers:
            raise ConfigError(f"--layer {layer} does not exist; this HuBERT has layers 1..{layers}.")
        if centres.shape[1] != self.model.config.hidden_size:
            raise ConfigError(
                f"k-means centres have dimension {centres.shape[1]} but HuBERT layer features have {self.model.config.hidden_size}; use the matching pair."
            )
        self.centres = centres.to(device)
        self.layer = layer
        self.device = device

    @property
    def min_samples(self) -> int:
        """The shortest 16 kHz audio HuBERT turns into a frame: its feature convolutions' receptive field (400 for mHuBERT)."""
        field = 1
        for kernel, stride in reversed(list(zip(self.model.config.conv_kernel, self.model.config.conv_stride))):
            field = (field - 1) * stride + kernel
        return field

    @torch.inference_mode()
    def features(self, audio: np.ndarray) -> torch.Tensor:
        """Layer features (T, D) of 16 kHz mono audio (no normalisation, as fairseq's mHuBERT base)."""
        wave = torch.as_tensor(np.asarray(audio, dtype=np.float32), device=self.device)[None]
        out = self.model(wave, output_hidden_states=True)
        # hidden_states[0] is the input to the first layer, so [layer] is that layer's output.
        return out.hidden_states[self.layer][0]

    def units(self, audio: np.ndarray, merge: bool = True) -> list[int]:
        """Units of one utterance; consecutive duplicates merged unless `merge` is False."""
        labels = nearest_centre(self.features(audio), self.centres).tolist()
        return merge_repeats(labels) if merge else labels


def _audio_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.suffix.lower() in AUDIO_SUFFIXES and p.is_file())


def unreadable_audio(paths: Sequence[Path], min_samples: int = 1) -> list[str]:
    """`path (reason)` for each path that is missing, whose audio header soundfile cannot read, or
    that holds fewer than `min_samples` samples at 16 kHz."""
    bad = []
    for path in paths:
        if not path.is_file():
            bad.append(f"{path} (no such file)")
            continue
        try:
            info = sf.info(str(path))
        except (sf.LibsndfileError, RuntimeError, TypeError) as exc:
            bad.append(f"{path} ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})")
            continue
        if info.frames * SAMPLE_RATE < min_samples * info.samplerate:
            bad.append(f"{path} ({info.frames / info.samplerate * 1000:.1f} ms: shorter than the {min_samples / SAMPLE_RATE * 1000:g} ms of one HuBERT frame)")
    return bad


def label_units(
    source: str | Path,
    out: str | Path,
    extractor: UnitExtractor,
    on_item: Callable[[int, int, str], None] | None = None,
) -> int:
    """Write unit targets for a directory of response WAVs or a manifest; returns the items labelled.

    A directory gives JSONL lines `{"id", "audio", "units"}`. A manifest keeps every record and
    adds `tgt_units` from each record's response speech (one of RESPONSE_SPEECH_FIELDS). The
    output is written atomically: rows go to a `.part` file as they are labelled (it keeps
    the work done if a file fails midway) and it is renamed to `out` at the end. Every audio
    file is checked (exists, readable header) before the first one is labelled.
    """
    source, out = Path(source), Path(out)
    rows: list[dict[str, Any]]
    as_json_list = False
    if source.is_dir():
        files = _audio_files(source)
        if not files:
            raise DatasetError(f"{source} holds no audio files ({', '.join(AUDIO_SUFFIXES)}).")
        rows = [{"id": str(f.relative_to(source).with_suffix("")), "audio": str(f)} for f in files]
        paths = list(files)
        target = "units"
    else:
        rows, as_json_list = read_manifest_and_format(source)
        paths, missing, not_paths = [], [], []
        for i, row in enumerate(rows):
            value = next((row.get(f) for f in RESPONSE_SPEECH_FIELDS if isinstance(row, dict) and row.get(f)), None)
            name = str(row.get("id", f"#{i}"))[:40] if isinstance(row, dict) else f"#{i}"
            if value is None:
                missing.append(name)
                continue
            if not isinstance(value, str):  # a number or a list where a file name belongs
                not_paths.append(f"{name} ({json.dumps(value)[:30]})")
                continue
            path = Path(value)
            paths.append(path if path.is_absolute() else source.parent / path)
        if missing:
            raise DatasetError(
                f"{source}: records {', '.join(missing[:10])}{' ...' if len(missing) > 10 else ''} name no response speech "
                f"({' or '.join(RESPONSE_SPEECH_FIELDS)}); add it or label a directory of WAVs instead."
            )
        if not_paths:
            raise DatasetError(
                f"{source}: the response speech of records {', '.join(not_paths[:10])}{' ...' if len(not_paths) > 10 else ''} "
                "is not a file name; give each one path as a string."
            )
        target = "tgt_units"
    bad = unreadable_audio(paths, extractor.min_samples)
    if bad:
        raise DatasetError(
            f"{len(bad)} audio file(s) cannot be labelled: {'; '.join(bad[:10])}{' ...' if len(bad) > 10 else ''}; fix or remove them and rerun."
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    part = out.with_name(f".{out.name}.part")
    with part.open("w", encoding="utf-8") as f:
        if as_json_list:
            f.write("[\n")
        for i, (row, path) in enumerate(zip(rows, paths)):
            row[target] = extractor.units(load_audio(path, SAMPLE_RATE))
            line = json.dumps(row, ensure_ascii=False)
            f.write((f"{',' if i else ''}{line}\n") if as_json_list else line + "\n")
            f.flush()
            if on_item is not None:
                on_item(i + 1, len(rows), str(path))
        if as_json_list:
            f.write("]\n")
    os.replace(part, out)
    return len(rows)
