"""What a run is, on disk and on the command line, read without torch.

Each `checkpoint-N` holds `run.json`: the step it was saved at and the settings that define the
run (batch, steps or epochs, learning rate and schedule, stage, LoRA, precision, seed ...), with
the absolute paths of its base model, speech encoder and data. A resume takes all of them
from there: a flag that says otherwise is refused, naming it, instead of quietly training another
run (`resumed_config`). A few settings may change on a resume: `--micro-batch-size` (it only trades
memory for time), how often to save and how many checkpoints to keep, workers, `--report-to`.

Read without torch, so `omni finetune --resume` refuses a folder that is not a checkpoint, or a
flag that contradicts one, within a second. Checkpoints written before run.json existed are read
from their trainer state (with torch).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from omni_cli.config import FinetuneConfig
from omni_cli.errors import CheckpointError, ConfigError
from omni_cli.train.trainer_state import CHECKPOINT_PREFIX, TRAINER_STATE_FILE
from omni_cli.weights.layout import CONFIG_NAME

RUN_FILE = "run.json"
RUN_FORMAT = 1
_CHECKPOINT_NAME = re.compile(rf"{CHECKPOINT_PREFIX}(\d+)")

# The settings a resume takes from its checkpoint, each with the flag that sets it (None: no flag).
RUN_SETTINGS: dict[str, str | None] = {
    "stage": "--stage",
    "batch_size": "--batch-size",
    "epochs": "--epochs",
    "max_steps": "--max-steps",
    "lr": "--lr",
    "warmup_ratio": "--warmup-ratio",
    "weight_decay": None,
    "max_grad_norm": None,
    "seed": "--seed",
    "precision": "--precision",
    "lora": "--lora",
    "qlora": "--qlora",
    "lora_rank": "--lora-rank",
    "lora_alpha": None,
    "fsdp": "--fsdp",
    "max_length": None,
}
# Taken from the checkpoint too unless given, and free to change: how the same global batch is cut
# (memory only), how often to save, what to keep, data-loader workers, where the log also goes.
ADJUSTABLE_SETTINGS = ("micro_batch_size", "save_every", "keep_checkpoints", "num_workers", "report_to")


@dataclass(frozen=True)
class SavedRun:
    """What `run.json` says about the run a checkpoint belongs to."""

    checkpoint: Path
    source: Path  # the file this was read from: run.json (the trainer state, for older checkpoints)
    step: int
    settings: dict[str, Any]
    base_model: Path
    speech_encoder: Path
    data: Path | None = None
    records: int | None = None
    records_digest: str | None = None


def setting(cfg: FinetuneConfig, name: str) -> Any:
    """A run setting as the run uses it (the learning rate resolved to the stage's default)."""
    return cfg.learning_rate() if name == "lr" else getattr(cfg, name)


def records_digest(record_ids: Sequence[str]) -> str:
    """A fingerprint of the records a run trains on, in order (to tell another manifest from a moved one)."""
    return hashlib.sha256("\n".join(record_ids).encode("utf-8")).hexdigest()


def run_file_data(
    cfg: FinetuneConfig, step: int, base_model: Path, speech_encoder: Path, record_ids: Sequence[str]
) -> dict[str, Any]:
    """The contents of a checkpoint's run.json."""
    return {
        "format": RUN_FORMAT,
        "step": step,
        "settings": {name: setting(cfg, name) for name in (*RUN_SETTINGS, *ADJUSTABLE_SETTINGS)},
        "base_model": str(Path(base_model).resolve()),
        "speech_encoder": str(Path(speech_encoder).resolve()),
        "data": str(Path(cfg.data).resolve()),
        "records": len(record_ids),
        "records_digest": records_digest(record_ids),
    }


def _damaged(checkpoint: Path, why: str) -> CheckpointError:
    return CheckpointError(
        f"{checkpoint / RUN_FILE} {why}; resume from another {CHECKPOINT_PREFIX}N folder, or start again with --model."
    )


def read_saved_run(checkpoint: Path) -> SavedRun:
    """The run a checkpoint belongs to, from its run.json (from the trainer state for checkpoints without one)."""
    path = Path(checkpoint) / RUN_FILE
    if not path.is_file():
        return _legacy_saved_run(Path(checkpoint))
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise _damaged(checkpoint, f"is not readable ({type(exc).__name__})") from None
    if not isinstance(raw, dict) or raw.get("format") != RUN_FORMAT:
        raise _damaged(checkpoint, "is not a run.json this omni can read")
    settings = raw.get("settings")
    step = raw.get("step")
    wanted = list(RUN_SETTINGS)
    if (not isinstance(settings, dict) or any(k not in settings for k in wanted) or not isinstance(step, int)
            or isinstance(step, bool) or step < 0 or not all(isinstance(raw.get(k), str) for k in ("base_model", "speech_encoder"))):
        raise _damaged(checkpoint, "is incomplete")
    data = Path(raw["data"]) if isinstance(raw.get("data"), str) else None
    records = raw.get("records") if isinstance(raw.get("records"), int) else None
    digest = raw.get("records_digest") if isinstance(raw.get("records_digest"), str) else None
    return SavedRun(Path(checkpoint), path, step, settings, Path(raw["base_model"]), Path(raw["speech_encoder"]),
                    data, records, digest)


def _legacy_saved_run(checkpoint: Path) -> SavedRun:
    """A checkpoint from before run.json: the same facts, from the trainer state's copy of the run's config."""
    from omni_cli.train.trainer_state import load_trainer_state  # imports torch

    state = load_trainer_state(checkpoint, mmap=True)
    config = state.get("config")
    if not isinstance(config, dict) or any(k not in config for k in RUN_SETTINGS if k != "lr"):
        raise CheckpointError(f"{checkpoint} does not say how its run was set up; start a new run from it with --model.")
    stage = int(config["stage"])
    settings = {k: config[k] for k in (*RUN_SETTINGS, *ADJUSTABLE_SETTINGS) if k in config}
    settings["lr"] = FinetuneConfig(stage=stage, data=Path(), output=Path(), lr=config.get("lr")).learning_rate()
    data = config.get("data")
    return SavedRun(checkpoint, checkpoint / TRAINER_STATE_FILE, int(state["step"]), settings, Path(state["base_model"]),
                    Path(state["speech_encoder"]), Path(data).resolve() if isinstance(data, str) else None)


def _step_of(checkpoint: Path) -> int:
    try:
        return read_saved_run(checkpoint).step
    except CheckpointError:
        match = _CHECKPOINT_NAME.fullmatch(checkpoint.name)
        return int(match.group(1)) if match else -1


def find_checkpoint(path: Path) -> Path:
    """`path` itself if it is a checkpoint, else the `checkpoint-N` under it with the most steps (from its run.json)."""
    path = Path(path)
    if (path / TRAINER_STATE_FILE).is_file():
        return path
    if not path.exists():
        raise CheckpointError(f"--resume {path} does not exist; pass a {CHECKPOINT_PREFIX}N folder or the --output of an earlier run.")
    if not path.is_dir():
        raise CheckpointError(f"--resume {path} is a file; pass a {CHECKPOINT_PREFIX}N folder or the --output of an earlier run.")
    if (path / CONFIG_NAME).is_file():
        raise CheckpointError(
            f"{path} is a fine-tuned model, not a resume point; resume from a {CHECKPOINT_PREFIX}N folder, "
            f"or start a new run from it with --model {path}."
        )
    found = [p for p in path.glob(f"{CHECKPOINT_PREFIX}*") if (p / TRAINER_STATE_FILE).is_file()]
    if not found:
        raise CheckpointError(f"no checkpoint to resume under {path}; pass --resume a {CHECKPOINT_PREFIX}N directory.")
    return max(found, key=_step_of)


def _shown(name: str, value: Any) -> str:
    flag = RUN_SETTINGS.get(name)
    if isinstance(value, bool):
        return flag if value else f"no {flag}"
    if name == "max_steps" and value is None:
        return "no --max-steps"
    return f"{flag} {value:g}" if isinstance(value, float) else f"{flag} {value}"


def _differs(a: Any, b: Any) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return not (a is not None and b is not None and math.isclose(float(a), float(b), rel_tol=1e-12, abs_tol=0.0))
    return a != b


def resumed_config(cfg: FinetuneConfig, saved: SavedRun, given: Collection[str] | None = None) -> FinetuneConfig:
    """`cfg` with the settings of the run being resumed; a setting given that differs from it is refused, naming its flag.

    `given`: the fields the user set (the CLI's flags on the command line); None: every field of
    `cfg` counts as given (a `FinetuneConfig` built in Python).
    """
    updates: dict[str, Any] = {}
    for name, flag in RUN_SETTINGS.items():
        if name not in saved.settings:
            continue
        ours, theirs = setting(cfg, name), saved.settings[name]
        if (given is None or name in given) and _differs(ours, theirs):
            if flag is None:
                raise ConfigError(f"{saved.source} says {name} = {theirs}, this run asks for {ours}; resume with the same setting.")
            raise ConfigError(
                f"{_shown(name, ours)} contradicts the run being resumed ({_shown(name, theirs)} in {saved.source}); "
                "leave it out to continue that run, or start a new run from its final/ with --model."
            )
        updates[name] = theirs
    for name in ADJUSTABLE_SETTINGS:
        if given is not None and name not in given and name in saved.settings:
            updates[name] = saved.settings[name]
    known = {f.name for f in fields(FinetuneConfig)}
    return replace(cfg, **{k: v for k, v in updates.items() if k in known})


def run_config(values: dict[str, Any], given: Collection[str]) -> tuple[FinetuneConfig, SavedRun | None]:
    """The run the command line asks for: `values` by FinetuneConfig field, `given` the fields set on it.

    A new run needs --stage, --data and --output. A resume (`values["resume"]`) takes every
    run setting and the data from its checkpoint, refusing a given flag that says otherwise
    (`resumed_config`), and goes on in the folder that holds the checkpoint.
    """
    values = dict(values)
    resume = values.get("resume")
    if resume is None:
        missing = [f"--{name}" for name in ("stage", "data", "output") if values.get(name) is None]
        if missing:
            raise ConfigError(f"pass {', '.join(missing)} to start a run (or --resume a checkpoint to continue one).")
        return FinetuneConfig(**values), None
    saved = read_saved_run(find_checkpoint(Path(resume)))
    for name in (*RUN_SETTINGS, *ADJUSTABLE_SETTINGS):
        if values.get(name) is None and name in saved.settings:
            values[name] = saved.settings[name]
    values["data"] = values.get("data") or saved.data
    # Where the checkpoint is now (the folder may have moved since): the run goes on there.
    values["output"] = values.get("output") or saved.checkpoint.parent
    if values["data"] is None:
        raise ConfigError(f"{saved.checkpoint} does not say which data it trained on; pass --data.")
    return resumed_config(FinetuneConfig(**values), saved, given), saved
