"""A run's options, checked before anything loads (no torch): combinations that cannot train, and an
`--output` that would overwrite what the run reads from, cannot be written, or cannot hold a checkpoint."""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

from omni_cli.config import TRAIN_PRECISIONS, FinetuneConfig
from omni_cli.destinations import check_writable_folder
from omni_cli.errors import ConfigError, OmniError
from omni_cli.train.run_settings import SavedRun
from omni_cli.train.trainer_state import CHECKPOINT_PREFIX
from omni_cli.weights.model_files import read_model_files

GB = 1e9


class TrainingFailed(OmniError):
    """A run that cannot go on (no room on disk, a failed save, a diverged loss): exit status 1, not a usage error."""


def check_options(cfg: FinetuneConfig) -> None:
    """Refuse option combinations that cannot train, before anything is read or loaded."""
    if cfg.stage not in (1, 2):
        raise ConfigError(f"--stage must be 1 or 2, got {cfg.stage}.")
    if cfg.precision not in TRAIN_PRECISIONS:
        raise ConfigError(f"--precision {cfg.precision!r} cannot train; choose one of {', '.join(TRAIN_PRECISIONS)} (QLoRA: --qlora).")
    if cfg.lora and cfg.stage != 1:
        raise ConfigError("--lora/--qlora applies to stage 1 (the LLM); stage 2 trains only the small speech decoder.")
    if cfg.fsdp and (cfg.stage != 1 or cfg.lora):
        raise ConfigError("--fsdp is for full stage-1 fine-tuning; stage 2 and --lora fit one GPU each (plain DDP).")
    if cfg.fsdp and int(os.environ.get("WORLD_SIZE", "1")) < 2:
        raise ConfigError("--fsdp shards the model over several processes: launch with torchrun --nproc_per_node N (N >= 2).")
    if cfg.export_only and cfg.resume is None:
        raise ConfigError("--export-only writes OUTPUT/final from a checkpoint: pass --resume CHECKPOINT-N.")


def check_output_apart(
    output: Path, *, model: Path | None = None, speech_encoder: Path | None = None, data: Path | None = None,
    checkpoint: Path | None = None,
) -> None:
    """Refuse an `--output` that is, or holds, what the run reads: it writes and prunes checkpoint-N/ and final/ there.

    A resume point directly in `--output` is the exception: that is how a run continues in its own folder.
    """
    out = Path(output).expanduser().resolve()
    reads = [("the model", model), ("the speech encoder", speech_encoder), ("the data", Path(data).parent if data else None)]
    if checkpoint is not None:
        ck = Path(checkpoint).expanduser().resolve()
        if not (ck.parent == out and ck.name.startswith(CHECKPOINT_PREFIX)):
            reads.append(("the checkpoint resumed", ck))
    for what, path in reads:
        if path is None:
            continue
        inside = Path(path).expanduser().resolve()
        if inside == out or out in inside.parents:
            relation = "is" if inside == out else "holds"
            raise ConfigError(
                f"--output {output} {relation} {what} ({path}), which the run would overwrite while reading it; "
                "give the run an output folder of its own (e.g. runs/s1)."
            )


def _nearest_existing(path: Path) -> Path:
    path = Path(path).expanduser().absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_writable(output: Path) -> None:
    """`--output` can be created and written: a folder (or a path under one) where a file can be made."""
    check_writable_folder(output, "--output", "the checkpoints and the fine-tuned model")


def check_free_space(output: Path, checkpoint_bytes: int, model_bytes: int) -> None:
    """Refuse to start when `--output`'s disk cannot hold one more checkpoint and the exported model."""
    needed = checkpoint_bytes + model_bytes
    free = shutil.disk_usage(_nearest_existing(output)).free
    if free < needed:
        raise TrainingFailed(
            f"--output {output} has {free / GB:.2f} GB free, but this run needs {needed / GB:.2f} GB there "
            f"(a checkpoint: {checkpoint_bytes / GB:.2f} GB, the fine-tuned model: {model_bytes / GB:.2f} GB); "
            "free some space or choose another --output."
        )


def check_run(cfg: FinetuneConfig, saved: SavedRun | None = None) -> None:
    """Every check that needs neither torch nor the model's weights: options, the model's files (configs and
    safetensors headers), an output apart from the inputs, writable, and the reporting library there (the
    trainer checks again, with the model's own paths)."""
    check_options(cfg)
    model = cfg.model or (saved.base_model if saved else None)
    check_output_apart(cfg.output, model=model, speech_encoder=cfg.speech_encoder, data=cfg.data,
                       checkpoint=saved.checkpoint if saved else None)
    check_writable(cfg.output)
    if model is not None:  # a missing or broken model folder: one line now, not after torch and the data load
        read_model_files(model, cfg.speech_encoder or (saved.speech_encoder if saved else None))
    if cfg.report_to == "tensorboard" and importlib.util.find_spec("tensorboard") is None:
        raise ConfigError("--report-to tensorboard needs the tensorboard package: pip install tensorboard (or leave the option out).")
