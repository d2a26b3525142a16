"""Fine-tuning on disk: resume points (`checkpoint-N/`), the exported model (`final/`), and their upkeep.

- `checkpoint-N/` holds only what resuming needs: the trained parameters in float32 (the
  speech decoder in stage 2; adaptor + LLM, or adaptor + LoRA adapters, in stage 1) as
  safetensors, `trainer_state.pt` (optimizer, schedule, step, RNG), which loads with
  `torch.load(weights_only=True)`, and `run.json` (the run's settings and the absolute paths of
  its base model, speech encoder and data: `run_settings.py`).
- `final/` is the fine-tuned model in the released layout and dtypes (config.json, tokenizer,
  every tensor), which `omni chat --model` loads; it holds no optimizer state.

Every directory is written under a temporary name (`.NAME.tmp-PID`) and renamed into place,
so an interrupted save never leaves half a checkpoint; an interrupted save removes its
temporary folder, and one left by a killed process is removed when the next run starts.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open

from omni_cli.errors import CheckpointError
from omni_cli.train.run_settings import RUN_FILE
from omni_cli.train.trainer_state import (
    CHECKPOINT_PREFIX,
    STATE_FORMAT,
    TRAINER_STATE_FILE,
)
from omni_cli.weights.layout import (
    CONFIG_NAME,
    SAFETENSORS_INDEX_NAME,
    fsync_file,
    weight_files,
    write_shards,
)

# Files of the base model copied verbatim next to the exported weights.
COPIED_FILES = (
    CONFIG_NAME,
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
)
FINAL_DIR = "final"
_CHECKPOINT_NAME = re.compile(rf"{CHECKPOINT_PREFIX}(\d+)")
_TEMP_NAME = re.compile(r"\.(.+)\.(tmp|old)-(\d+)")
# safetensors' dtype names → torch's.
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


def _replace_directory(tmp: Path, final: Path) -> None:
    """Move a fully written `tmp` onto `final`; an old `final` is removed only after the new one is in place."""
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    if old.exists():
        shutil.rmtree(old)


def write_directory(out_dir: Path, fill: Callable[[Path], None]) -> Path:
    """Create `out_dir` atomically: `fill` writes into a temporary folder, fsynced, then renamed into place.

    Anything that stops the write (an error, a second Ctrl-C) removes the temporary folder;
    an existing `out_dir` stays as it was until the new one is complete.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        tmp.mkdir()
        fill(tmp)
        # Everything in the folder is on disk before the folder gets its name (the shards
        # and the state are fsynced as they are written).
        for written in tmp.iterdir():
            if written.suffix != ".safetensors" and written.name not in (SAFETENSORS_INDEX_NAME, TRAINER_STATE_FILE):
                fsync_file(written)
        _replace_directory(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def save_model(tensors: dict[str, torch.Tensor], base_dir: Path, out_dir: Path, speech_encoder: Path) -> Path:
    """Write the fine-tuned model in the released layout: the base's config and tokenizer files, `tensors` as shards.

    config.json is copied unchanged except `speech_encoder`, set to the absolute path of the
    encoder the run used, so `--model DIR` alone finds it.
    """

    def fill(tmp: Path) -> None:
        for name in COPIED_FILES:
            if (base_dir / name).is_file():
                shutil.copy2(base_dir / name, tmp / name)
        if (tmp / CONFIG_NAME).is_file():
            raw = json.loads((tmp / CONFIG_NAME).read_text(encoding="utf-8"))
            raw["speech_encoder"] = str(Path(speech_encoder).resolve())
            (tmp / CONFIG_NAME).write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        write_shards(tensors, tmp, durable=True)

    return write_directory(out_dir, fill)


def save_resume_point(
    trained: dict[str, torch.Tensor], trainer_state: dict[str, Any], out_dir: Path, run: dict[str, Any] | None = None
) -> Path:
    """Write a `checkpoint-N`: the trained parameters (float32, their training names), the trainer state and `run` as run.json."""

    def fill(tmp: Path) -> None:
        write_shards(trained, tmp, durable=True)
        if run is not None:
            (tmp / RUN_FILE).write_text(json.dumps(run, indent=2) + "\n", encoding="utf-8")
        with (tmp / TRAINER_STATE_FILE).open("wb") as f:
            torch.save({"format": STATE_FORMAT, **trainer_state}, f)
            f.flush()
            os.fsync(f.fileno())

    return write_directory(out_dir, fill)


def read_trained(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The trained parameters a `checkpoint-N` holds, by their training names, on the CPU.

    On the CPU because `load_state_dict` copies them into the model where it lives: read onto
    the GPU, a full stage-1 resume would hold the fp32 LLM there twice.
    """
    tensors: dict[str, torch.Tensor] = {}
    for path in weight_files(checkpoint):
        try:
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    tensors[key] = f.get_tensor(key)
        except Exception as exc:  # safetensors raises its own error types for damaged files
            raise CheckpointError(f"{path} is not readable ({exc}); resume from another checkpoint-N.") from None
    return tensors


def first_non_finite(tensors: dict[str, torch.Tensor]) -> str | None:
    """The name of the first floating-point tensor holding an inf or NaN (never saved), or None."""
    return next((name for name, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())), None)


def tensor_dtypes(files: Iterable[Path]) -> dict[str, torch.dtype]:
    """Each tensor's dtype in safetensors files, from the headers only (what the exported model is written in)."""
    dtypes: dict[str, torch.dtype] = {}
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                name = f.get_slice(key).get_dtype()
                if name in _DTYPES:
                    dtypes[key] = _DTYPES[name]
    return dtypes


def rng_state() -> dict[str, Any]:
    """Python, numpy and torch RNG states in types `torch.load(weights_only=True)` accepts."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(np.asarray(keys).astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` saved."""
    python = state["python"]
    random.setstate((python[0], tuple(python[1]), python[2]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch (data order, dropout) for a reproducible run."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def checkpoint_dir(output: Path, step: int) -> Path:
    """Where the resume point of `step` goes."""
    return Path(output) / f"{CHECKPOINT_PREFIX}{step}"


def _named_step(path: Path) -> int | None:
    match = _CHECKPOINT_NAME.fullmatch(path.name)
    return int(match.group(1)) if match else None


def prune_checkpoints(output: Path, newest: Path, keep: int) -> list[Path]:
    """Delete all but the `keep` newest `checkpoint-N` folders up to `newest`, earlier runs' included (0: keep all).

    Folders of a higher step than `newest` (the future of a run resumed from an earlier
    checkpoint) are left alone: they are replaced when the run reaches their step.
    """
    newest_step = _named_step(newest)
    if keep <= 0 or newest_step is None:
        return []
    ours = [p for p in Path(output).glob(f"{CHECKPOINT_PREFIX}*") if (p / TRAINER_STATE_FILE).is_file()]
    steps = {p: _named_step(p) for p in ours}
    candidates = sorted((p for p, n in steps.items() if n is not None and n <= newest_step), key=lambda p: steps[p] or 0)
    doomed = [p for p in candidates[:-keep] if p != newest]
    for old in doomed:
        shutil.rmtree(old, ignore_errors=True)
    return doomed


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def clean_stale_saves(output: Path) -> list[Path]:
    """Tidy what killed saves left in `output`: remove `.NAME.tmp-PID` folders; put back a `.NAME.old-PID`
    whose replacement never got its name (else remove it). Folders of processes still running are left."""
    cleaned: list[Path] = []
    if not Path(output).is_dir():
        return cleaned
    for path in Path(output).iterdir():
        match = _TEMP_NAME.fullmatch(path.name)
        if match is None or not path.is_dir():
            continue
        name, kind, pid = match.group(1), match.group(2), int(match.group(3))
        if pid != os.getpid() and _process_alive(pid):
            continue
        target = path.with_name(name)
        if kind == "old" and not target.exists():
            os.replace(path, target)
        else:
            shutil.rmtree(path, ignore_errors=True)
        cleaned.append(path)
    return cleaned
