"""Fine-tuning in the paper's two stages, on one device or many (torchrun: DDP, or FSDP2 with --fsdp).

A run is a `Run` in named phases: `prepare` (check the options, take a resumed run's settings
from its checkpoint, read the model's files once, validate every record, load the weights),
`build` (what trains, the batch plan, DDP/FSDP, optimizer and schedule, a resumed state, room
on disk), `train` (the optimizer steps, the loss log and resume points) and `finish` (the
exported model). Ctrl-C is a request to stop at the next step boundary, agreed by all
processes, so a checkpoint always holds the weights of the step it is named after. A
non-finite loss or gradient stops the run before the step is applied, and nothing non-finite
is ever saved. Under torchrun rank 0 writes; a failure there stops every process together.

What each stage trains: `stages.py`; the batch plan: `batch_plan.py`; on disk: `checkpoints.py`,
`run_settings.py` (what a resume continues), `train_log.py`; LoRA: `lora.py`.
"""

from __future__ import annotations

import gc
import math
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from transformers import get_cosine_schedule_with_warmup

from omni_cli.config import FinetuneConfig
from omni_cli.errors import CheckpointError, ConfigError, OmniError, one_line
from omni_cli.model.adaptor import SpeechAdaptor
from omni_cli.model.features import CHUNK_SAMPLES, HOP_LENGTH
from omni_cli.model.loading import load_tokenizer
from omni_cli.stop_request import StopRequest
from omni_cli.train.batch_plan import BatchPlan, ResumableSampler, plan_batches
from omni_cli.train.checkpoints import (
    FINAL_DIR,
    checkpoint_dir,
    clean_stale_saves,
    first_non_finite,
    prune_checkpoints,
    read_trained,
    rng_state,
    save_model,
    save_resume_point,
    seed_everything,
    set_rng_state,
    tensor_dtypes,
)
from omni_cli.train.data import Batch, DataLimits, SpeechReplyDataset, collate, load_manifest
from omni_cli.train.distributed import Collectives, Distributed, init_distributed
from omni_cli.train.options import TrainingFailed, check_free_space, check_options, check_output_apart, check_writable
from omni_cli.train.run_settings import find_checkpoint, read_saved_run, records_digest, resumed_config, run_file_data
from omni_cli.train.stages import (
    OmniForTraining,
    autocast_dtype,
    check_qlora_device,
    freeze_for_stage,
    load_for_training,
    released_tensors,
    shard_for_fsdp,
    target_count,
    trainable_state,
)
from omni_cli.train.train_log import LossLog, StepTotals, TrainLog
from omni_cli.train.trainer_state import load_trainer_state
from omni_cli.weights.layout import weight_files
from omni_cli.weights.model_files import read_model_files

__all__ = ["BatchPlan", "FinetuneConfig", "FinetuneResult", "Run", "TrainLog", "TrainingFailed", "finetune"]


@dataclass
class FinetuneResult:
    """What a run produced: the exported model (None when interrupted), the last resume point and the losses.

    `interrupted`: stopped by Ctrl-C; `unsaved` says what a second Ctrl-C left unwritten (None: nothing).
    """

    output_dir: Path | None
    last_checkpoint: Path | None
    steps: int
    losses: list[float] = field(default_factory=list)
    interrupted: bool = False
    unsaved: str | None = None
    model: OmniForTraining | None = None  # the trained model, in memory


class Run:
    """One fine-tuning run, phase by phase: `prepare` → `build` → `train` → `finish` (see `finetune`)."""

    def __init__(self, cfg: FinetuneConfig, on_log: Callable[[TrainLog], None] | None = None) -> None:
        self.cfg = cfg
        self.on_log = on_log
        self.output = Path(cfg.output)
        self.step = 0
        self.dist = Distributed(0, 0, 1)
        self.saved_step: int | None = None  # the step whose resume point is on disk, from this run
        self.exporting = False
        self.loss_log: LossLog | None = None
        self.collectives = Collectives()

    # -- prepare: options, devices, resume state, files, data, weights -------------------------

    def prepare(self) -> None:
        """Check everything that can be checked before the weights load, then load them."""
        self.resume_dir = find_checkpoint(self.cfg.resume) if self.cfg.resume else None
        self.saved = read_saved_run(self.resume_dir) if self.resume_dir else None
        if self.saved is not None:
            self.cfg = resumed_config(self.cfg, self.saved)  # every setting as the run had it, or refused
        cfg = self.cfg
        check_options(cfg)
        want_cuda = cfg.device.startswith("cuda") if cfg.device else torch.cuda.is_available()
        self.dist = init_distributed("cuda" if want_cuda else "cpu")
        device = torch.device(cfg.device) if cfg.device else torch.device("cuda" if want_cuda else "cpu")
        if device.type == "cuda" and self.dist.world_size > 1:
            device = torch.device("cuda", self.dist.local_rank)
            torch.cuda.set_device(device)
        self.device = device
        self.collectives = Collectives(self.dist.world_size, device)
        if cfg.qlora:
            check_qlora_device(device)

        self.state = load_trainer_state(self.resume_dir) if self.resume_dir else None
        # A resume point holds only the trained parts: the rest comes from the base model,
        # which --model/--speech-encoder may name anew (moved, or another machine).
        model = cfg.model or (self.saved.base_model if self.saved else None)
        encoder = cfg.speech_encoder or (self.saved.speech_encoder if self.saved else None)
        if model is None:
            raise ConfigError("pass --model a LLaMA-Omni checkpoint directory (or --resume a checkpoint).")

        # Every config is read once; every record is checked before the weights are loaded
        # (minutes for 8B) and before the first step; one error lists all bad records.
        self.files = files = read_model_files(Path(model).expanduser().resolve(), encoder)
        check_output_apart(self.output, model=files.model_dir, speech_encoder=files.speech_encoder, data=cfg.data,
                           checkpoint=self.resume_dir)
        check_writable(self.output)
        config = files.config
        if cfg.stage == 2 and config.speech_decoder is None:
            raise ConfigError("stage 2 trains the speech decoder, but this checkpoint has none; use a speech-to-speech model.")
        self.speech_positions = SpeechAdaptor.output_length(CHUNK_SAMPLES // HOP_LENGTH, config.speech_encoder_ds_rate)
        limits = DataLimits(
            unit_vocab_size=config.speech_decoder.unit_vocab_size if config.speech_decoder is not None else 0,
            # Training pads each question to one 30 s window, as SpeechToSpeech.encode_speech does.
            speech_positions=self.speech_positions,
            max_length=cfg.max_length,
            unit_frames_per_token=config.speech_decoder.upsample_factor if config.speech_decoder is not None else None,
        )
        self.records = load_manifest(cfg.data, cfg.stage, load_tokenizer(files.model_dir), limits)
        self.record_ids = [r.record_id for r in self.records]
        saved = self.saved
        if saved is not None and saved.records_digest not in (None, records_digest(self.record_ids)):
            raise ConfigError(
                f"--data {cfg.data} holds other records than the run being resumed trained on "
                f"({saved.records} records from {saved.data}); resume with that data, or start a new run."
            )
        if self.dist.is_main:
            clean_stale_saves(self.output)

        seed_everything(cfg.seed)
        self.omni = load_for_training(cfg, files, device)

    # -- build: what trains, the batch plan, parallelism, optimizer, schedule, resumed state -------

    def build(self) -> None:
        """Freeze for the stage, plan the batches, wrap for DDP/FSDP, create optimizer and schedule, restore a resume point."""
        cfg, device = self.cfg, self.device
        self.model = model = OmniForTraining(self.omni, cfg.stage)
        self.trained_names = freeze_for_stage(model)
        if self.state is not None:
            assert self.resume_dir is not None
            self._load_trained(self.resume_dir)
        model.train()
        self._check_room(sum(p.numel() for p in model.parameters() if p.requires_grad))

        dataset = SpeechReplyDataset(self.records, self.omni.tokenizer, self.omni.encoder.n_mels)
        self.sampler = ResumableSampler(dataset, self.dist, cfg.seed)
        start = int(self.state["step"]) if self.state is not None else 0
        self.plan = plan_batches(cfg, len(self.records), len(self.sampler), self.dist.world_size, start)
        self.loader = torch.utils.data.DataLoader(
            dataset, batch_size=self.plan.micro_batch, sampler=self.sampler, collate_fn=collate, num_workers=cfg.num_workers
        )

        self.amp_dtype = autocast_dtype(cfg.precision, device)
        self.ddp_model: nn.Module = model
        if cfg.fsdp:
            if self.amp_dtype == torch.float16:
                raise ConfigError("--fsdp trains in bf16 or fp32; pass --precision bf16 (or fp32).")
            shard_for_fsdp(model, self.amp_dtype)
            self.amp_dtype = None  # FSDP's policy casts; no autocast on top
        elif self.dist.world_size > 1:
            self.ddp_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        self.params = [p for p in model.parameters() if p.requires_grad]  # sharded DTensors under FSDP
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.learning_rate(), weight_decay=cfg.weight_decay)
        # Rounded down: with a warm-up step the very first update has lr 0, a wasted step on short runs.
        total = self.plan.total_steps
        self.scheduler = get_cosine_schedule_with_warmup(self.optimizer, int(cfg.warmup_ratio * total), total)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        if self.state is not None:
            self._restore(self.state)
        self.result = FinetuneResult(output_dir=None, last_checkpoint=self.resume_dir, steps=self.step, model=model)

    def _check_room(self, trained_parameters: int) -> None:
        """Room on disk, checked by the process that writes: a resume point (fp32 weights + Adam's two moments) and `final/`."""
        problem = None
        if self.dist.is_main:
            model_bytes = sum(path.stat().st_size for path in weight_files(self.files.model_dir))
            checkpoint_bytes = 0 if self.cfg.export_only else 12 * trained_parameters
            try:
                check_free_space(self.output, checkpoint_bytes, model_bytes)
            except OmniError as exc:
                problem = exc
        self._agree(problem)

    def _load_trained(self, resume_dir: Path) -> None:
        """Put a resume point's trained parameters onto the freshly loaded base (before any wrapping)."""
        trained = read_trained(resume_dir)
        expected = set(self.trained_names)
        strays = sorted(expected ^ trained.keys())
        if strays:
            raise CheckpointError(
                f"{resume_dir} does not hold the weights this run trains ({strays[0]!r}); resume with the --stage, "
                "--lora/--qlora and --lora-rank it was written with."
            )
        try:
            self.model.load_state_dict(trained, strict=False)
        except RuntimeError as exc:  # shapes that do not fit: another base model or LoRA rank
            raise CheckpointError(
                f"{resume_dir} does not fit this model ({one_line(exc)}); resume with the --model and --lora-rank it was trained with."
            ) from None

    def _restore(self, state: dict[str, Any]) -> None:
        if self.cfg.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            set_optimizer_state_dict(self.model, self.optimizer, state["optimizer"], options=StateDictOptions(full_state_dict=True))
        else:
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
        self.step = int(state["step"])

    # -- train: the optimizer steps -------------------------------------------------------------

    def train(self, stop: StopRequest) -> bool:
        """Run the steps up to the total, with the loss log and periodic resume points; True when a stop request ended it early.

        A stop request is acted on only between steps, once every process has agreed on it, so
        the resume point saved then holds exactly the weights of the step it is named after.
        """
        cfg, plan = self.cfg, self.plan
        self.started = time.monotonic()
        if self.dist.is_main:
            try:
                self.loss_log = LossLog(self.output, self.step, tensorboard=cfg.report_to == "tensorboard")
            except OSError as exc:
                raise TrainingFailed(f"cannot write the loss log in {self.output} ({exc.strerror or one_line(exc)}); choose another --output.") from None
        while self.step < plan.total_steps:
            self.sampler.set_epoch(self.step // plan.steps_per_epoch)
            self.sampler.start = (self.step % plan.steps_per_epoch) * plan.accumulation * plan.micro_batch
            batches = iter(self.loader)
            for step_in_epoch in range(self.step % plan.steps_per_epoch, plan.steps_per_epoch):
                if self.step >= plan.total_steps:
                    break
                totals = self._optimizer_step(batches, plan.micro_batches_in(step_in_epoch))
                self.step += 1
                self._report(totals)
                if cfg.save_every > 0 and self.step % cfg.save_every == 0 and self.step < plan.total_steps:
                    self.save_resume_point()
                if self._agreed_to_stop(stop):
                    self.save_resume_point()
                    self.result.interrupted = True
                    return True
        return False

    def _optimizer_step(self, batches: Iterator[Batch], n_micro: int) -> StepTotals:
        """Accumulate `n_micro` micro-batches and update the weights once.

        Every micro-batch's loss is its sum over its targets divided by the whole global batch's
        number of targets (all micro-batches, all processes), so any split of the batch gives the
        same update; DDP and FSDP average the gradients over the processes, hence the targets per process.
        """
        began = time.monotonic()
        micro = [next(batches) for _ in range(n_micro)]
        counts = [sum(target_count(b, self.cfg.stage) for b in micro),
                  sum(len(p) - 1 + self.speech_positions + len(r) for b in micro for p, r in zip(b.prompt_ids, b.reply_ids)),
                  sum(len(b.record_ids) for b in micro)]
        totals = self.collectives.sum("totals", torch.tensor(counts, dtype=torch.float64, device=self.device))
        normaliser = (totals[0] / self.dist.world_size).to(torch.float32)
        loss_sum = torch.zeros((), device=self.device)
        for i, batch in enumerate(micro):
            batch = batch.to(self.device)
            # FSDP reduces gradients every micro-step (correct, a little slower than no_sync).
            sync = i == n_micro - 1 or self.dist.world_size == 1 or self.cfg.fsdp
            ctx = nullcontext() if sync else self.ddp_model.no_sync()  # type: ignore[operator]
            amp = nullcontext() if self.amp_dtype is None else torch.autocast(self.device.type, dtype=self.amp_dtype)
            with ctx, amp:
                loss = self.ddp_model(batch, normaliser)
            self.scaler.scale(loss).backward()
            loss_sum += loss.detach()
        self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm)
        if hasattr(grad_norm, "full_tensor"):  # FSDP: a DTensor
            grad_norm = grad_norm.full_tensor()
        loss_sum = self.collectives.sum("loss", loss_sum) / self.dist.world_size
        loss_value, norm_value = float(loss_sum), float(grad_norm)
        # The gradients are the same on every process (reduced), so all stop here together.
        # (Under the fp16 scaler inf gradients are expected now and then: it skips that step.)
        what, value = ("loss", loss_value) if not math.isfinite(loss_value) else ("gradient norm", norm_value)
        if not math.isfinite(value) and (what == "loss" or not self.scaler.is_enabled()):
            self.optimizer.zero_grad(set_to_none=True)
            self._diverged(what, value)
        lr = self.scheduler.get_last_lr()[0]
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepTotals(loss_value, norm_value, lr, int(totals[2]), int(totals[1]), time.monotonic() - began)

    def _last_good(self) -> str:
        ck = self.result.last_checkpoint
        if ck is None:
            return "no checkpoint had been saved, so there is nothing to resume"
        return f"the last good checkpoint is {ck}: resume with --resume {ck}"

    def _diverged(self, what: str, value: float) -> None:
        step = self.step + 1
        raise TrainingFailed(
            f"stopped at step {step}: the {what} is {value} (the run diverged; a lower --lr usually helps). "
            f"Step {step} was not applied and no fine-tuned model was written; {self._last_good()}."
        )

    def _report(self, totals: StepTotals) -> None:
        self.result.losses.append(totals.loss)
        self.result.steps = self.step
        if not self.dist.is_main:
            return
        seconds = max(totals.seconds, 1e-9)
        log = TrainLog(self.step, self.plan.total_steps, self.step / self.plan.steps_per_epoch, totals.loss, totals.lr,
                       totals.grad_norm, totals.samples / seconds, totals.positions / seconds, time.monotonic() - self.started)
        if self.loss_log is not None:
            try:
                self.loss_log.write(log)
            except OSError as exc:
                raise TrainingFailed(f"cannot append step {self.step} to {self.loss_log.path} ({exc.strerror or one_line(exc)}); {self._last_good()}.") from None
        if self.on_log is not None:
            self.on_log(log)

    def _agreed_to_stop(self, stop: StopRequest) -> bool:
        """Whether any process was asked to stop (torchrun forwards Ctrl-C to each at its own moment)."""
        return self.collectives.any("stop", stop.requested)

    def _agree(self, problem: OmniError | None) -> None:
        """Raise `problem` (found by the writing process, rank 0) on every process, so none waits for the others."""
        if self.collectives.any("failed", problem is not None) and problem is None:
            problem = TrainingFailed("process 0 stopped the run (see its message).")
        if problem is not None:
            raise problem

    # -- save -------------------------------------------------------------------------------------

    def trainer_state(self) -> dict[str, Any]:
        """What --resume needs besides the trained weights and run.json: optimizer, schedule, step, RNG."""
        cfg = self.cfg
        return {
            "step": self.step,
            "stage": cfg.stage,
            "optimizer": self._optimizer_state(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "rng": rng_state(),
            "lora": cfg.lora,
            "fsdp": cfg.fsdp,
            # Absolute: a resume from another working directory finds the same files.
            "base_model": str(self.files.model_dir.resolve()),
            "speech_encoder": str(self.files.speech_encoder.resolve()),
            "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()},
        }

    def _optimizer_state(self) -> dict[str, Any]:
        if not self.cfg.fsdp:
            return self.optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(self.model, self.optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def save_resume_point(self) -> None:
        """Write `checkpoint-<step>` (every process calls this; rank 0 writes) and prune the oldest.

        Weights that are not finite are never saved, and a save that fails (disk full, read-only)
        stops the run with the last good checkpoint left as it was.
        """
        if self.saved_step == self.step:  # Ctrl-C right after a periodic save: it is on disk already
            return
        path = checkpoint_dir(self.output, self.step)
        problem: OmniError | None = None
        # Under FSDP gathering weights and optimizer state is collective: every rank takes part.
        # Under DDP only rank 0 writes, so only it builds the CPU copy.
        if self.cfg.fsdp or self.dist.is_main:
            trained, state = trainable_state(self.model, self.trained_names, self.cfg.fsdp), self.trainer_state()
            if self.dist.is_main:
                problem = self._write(path, "checkpoint", trained, lambda: self._save_checkpoint(trained, state, path))
        self._agree(problem)
        self.saved_step = self.step
        self.result.last_checkpoint = path

    def _save_checkpoint(self, trained: dict[str, torch.Tensor], state: dict[str, Any], path: Path) -> None:
        run = run_file_data(self.cfg, self.step, self.files.model_dir, self.files.speech_encoder, self.record_ids)
        save_resume_point(trained, state, path, run)
        prune_checkpoints(self.output, path, self.cfg.keep_checkpoints)

    def _write(self, path: Path, what: str, tensors: dict[str, torch.Tensor], write: Callable[[], None]) -> OmniError | None:
        """Write `path` unless `tensors` hold a non-finite value; what went wrong, as one line, or None."""
        bad = first_non_finite(tensors)
        if bad is not None:
            return TrainingFailed(
                f"stopped at step {self.step}: the weights became non-finite ({bad}; the run diverged, a lower --lr usually helps); "
                f"the {what} was not written; {self._last_good()}."
            )
        try:
            write()
        except OSError as exc:
            return TrainingFailed(f"could not write {path} ({exc.strerror or one_line(exc)}); stopped at step {self.step}; {self._last_good()}.")
        return None

    # -- finish ------------------------------------------------------------------------------------

    def finish(self) -> None:
        """Export `final/`: the fine-tuned model in the released layout, each tensor in the base model's dtype."""
        self.exporting = True
        files = self.files
        final = self.output / FINAL_DIR
        dtypes = tensor_dtypes({path for _, path in files.shapes.values()})
        tensors = released_tensors(self.model, dtypes, self.cfg.fsdp, files.model_dir)
        problem = None
        if self.dist.is_main:
            problem = self._write(final, "fine-tuned model", tensors, lambda: save_model(tensors, files.model_dir, final, files.speech_encoder))
        self._agree(problem)
        self.result.output_dir = final

    def close(self) -> None:
        """Close the loss log and leave the torchrun job (every process, however the run ended), at this point and no later.

        DDP's reducer holds the process group too: while it lives, destroy_process_group() only
        forgets the group, which is then torn down whenever the wrapper happens to be collected
        (a hang seen once in ~20 runs: see `Collectives`). So the wrapper goes first.
        """
        if self.loss_log is not None:
            self.loss_log.close()
        if self.dist.world_size > 1 and dist.is_initialized():
            if hasattr(self, "model"):
                self.ddp_model = self.model
            gc.collect()  # the DDP wrapper sits in reference cycles (module hooks)
        self.collectives.leave()


def finetune(
    cfg: FinetuneConfig,
    on_log: Callable[[TrainLog], None] | None = None,
    on_start: Callable[[BatchPlan], None] | None = None,
) -> FinetuneResult:
    """Run one stage of fine-tuning; returns where the exported model and the last resume point went.

    Ctrl-C stops at the next step boundary with a resume point (`interrupted`); a second
    Ctrl-C quits at once without saving (`unsaved` says what was lost), never leaving a
    half-written folder. A diverged loss, or a save that fails, raises `TrainingFailed` with
    the last good checkpoint kept. Under torchrun every process runs this; rank 0 writes the files.
    """
    run = Run(cfg, on_log)
    try:
        run.prepare()
        run.build()
        if on_start is not None and run.dist.is_main:
            on_start(run.plan)
        announce = "\nomni: stopping after this step to save a checkpoint; Ctrl-C again quits without saving.\n"
        with StopRequest((signal.SIGINT, signal.SIGTERM), announce if run.dist.is_main else None) as stop:
            try:
                if run.cfg.export_only or not run.train(stop):
                    run.finish()
            except KeyboardInterrupt:
                run.result.interrupted = True
                if run.exporting:
                    run.result.unsaved = f"{FINAL_DIR}/, the fine-tuned model of step {run.step},"
                elif run.saved_step != run.step:
                    run.result.unsaved = f"step {run.step}"
    finally:
        run.close()
    return run.result
