"""Fine-tuning in the paper's two stages, on one device or many (torchrun: DDP, or FSDP2 with --fsdp).

Stage 1 (speech → text): the adaptor and the LLM learn (fully or with LoRA); the Whisper
encoder and the speech decoder stay frozen. Stage 2 (text hidden states → units): only the
speech decoder learns, with CTC loss on the LLM's last-layer hidden states.

A run is a `Run` in named phases: `prepare` (check the options, read the model's files once,
validate every record, load the weights), `build` (what trains, the batch plan, DDP/FSDP,
optimizer and schedule, a resumed state), `train` (the optimizer steps and resume points)
and `finish` (the exported model). `--batch-size` is the global batch: every process and
accumulation step together. Ctrl-C is a request to stop at the next step boundary, agreed
by all processes, so a checkpoint always holds the weights of the step it is named after.
What is on disk: `checkpoints.py`; LoRA: `lora.py`.
"""

from __future__ import annotations

import gc
import math
import os
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

from omni_cli.config import TRAIN_PRECISIONS, FinetuneConfig
from omni_cli.errors import CheckpointError, ConfigError, one_line
from omni_cli.model.adaptor import SpeechAdaptor
from omni_cli.model.features import CHUNK_SAMPLES, HOP_LENGTH
from omni_cli.model.loading import OmniModel, load_omni, load_tokenizer, resolve_placement
from omni_cli.stop_request import StopRequest
from omni_cli.train.checkpoints import (
    FINAL_DIR,
    checkpoint_dir,
    clean_stale_saves,
    latest_checkpoint,
    load_trainer_state,
    prune_checkpoints,
    read_trained,
    rng_state,
    save_model,
    save_resume_point,
    seed_everything,
    set_rng_state,
    tensor_dtypes,
)
from omni_cli.train.data import (
    Batch,
    DataLimits,
    SpeechReplyDataset,
    assemble_inputs,
    collate,
    load_manifest,
    reply_hidden_states,
)
from omni_cli.train.lora import apply_lora, is_peft, merged_llm_state
from omni_cli.weights.layout import ADAPTOR_PREFIX, DECODER_PREFIX
from omni_cli.weights.model_files import read_model_files


@dataclass(frozen=True)
class TrainLog:
    """One progress report: after optimizer step `step` of `total_steps`."""

    step: int
    total_steps: int
    epoch: float
    loss: float
    lr: float
    samples_per_second: float
    elapsed: float


@dataclass(frozen=True)
class BatchPlan:
    """How the data becomes optimizer steps: the global batch, split over processes and accumulation."""

    records: int
    world_size: int
    micro_batch: int  # samples per process per forward/backward
    accumulation: int  # micro-batches per process per optimizer step
    steps_per_epoch: int
    total_steps: int
    start_step: int  # > 0 when resuming

    @property
    def global_batch(self) -> int:
        """Samples per optimizer step, all processes together."""
        return self.world_size * self.micro_batch * self.accumulation

    def describe(self) -> str:
        """One line for the start of a run."""
        processes = f"{self.world_size} process{'es' if self.world_size > 1 else ''}"
        steps = f"{self.accumulation} accumulation step{'s' if self.accumulation > 1 else ''}"
        resumed = f", resuming after step {self.start_step}" if self.start_step else ""
        return (f"{self.records} records, global batch {self.global_batch} = {processes} × {self.micro_batch} "
                f"samples × {steps}; {self.total_steps} steps ({self.steps_per_epoch} per epoch){resumed}")


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


@dataclass(frozen=True)
class Distributed:
    """This process's place in a torchrun job (world 1 when run alone)."""

    rank: int
    local_rank: int
    world_size: int

    @property
    def is_main(self) -> bool:
        """Rank 0 writes checkpoints and reports progress."""
        return self.rank == 0


def init_distributed(device_type: str) -> Distributed:
    """Join the torchrun job described by the environment (gloo on CPU, nccl on CUDA), if any."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Distributed(0, 0, 1)
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    return Distributed(rank, local_rank, world)


class OmniForTraining(nn.Module):
    """The parts of LLaMA-Omni a stage needs, with `forward(batch) -> loss` for DDP."""

    def __init__(self, omni: OmniModel, stage: int) -> None:
        super().__init__()
        if stage not in (1, 2):
            raise ConfigError(f"--stage must be 1 or 2, got {stage}.")
        if stage == 2 and omni.unit_decoder is None:
            raise ConfigError("stage 2 trains the speech decoder, but this checkpoint has none; use a speech-to-speech model.")
        self.stage = stage
        self.encoder = omni.encoder
        self.adaptor = omni.adaptor
        self.llm = omni.llm
        self.unit_decoder = omni.unit_decoder

    def train(self, mode: bool = True) -> OmniForTraining:
        """Train mode for the parts this stage trains; frozen parts stay in eval mode (no dropout)."""
        super().train(mode)
        frozen = [self.encoder, self.unit_decoder] if self.stage == 1 else [self.encoder, self.adaptor, self.llm]
        for module in frozen:
            if module is not None:
                module.eval()
        return self

    def speech_embeddings(self, mels: torch.Tensor) -> torch.Tensor:
        """Frozen encoder (no graph) → adaptor (trained in stage 1)."""
        with torch.no_grad():
            frames = self.encoder(mels.to(dtype=next(self.encoder.parameters()).dtype))
        return self.adaptor(frames.to(dtype=self.adaptor.linear1.weight.dtype))

    def forward(self, batch: Batch) -> torch.Tensor:
        """The stage's loss on one batch: LM cross-entropy (stage 1) or CTC (stage 2)."""
        embed_tokens = self.llm.get_input_embeddings()
        if self.stage == 1:
            speech = self.speech_embeddings(batch.mels)
            inputs, mask, labels = assemble_inputs(embed_tokens, batch, speech)
            return self.llm(inputs_embeds=inputs, attention_mask=mask, labels=labels).loss
        assert self.unit_decoder is not None and batch.units is not None
        with torch.no_grad():
            speech = self.speech_embeddings(batch.mels)
            inputs, mask, labels = assemble_inputs(embed_tokens, batch, speech)
            hidden = self.llm.model(inputs_embeds=inputs, attention_mask=mask).last_hidden_state
            reply_hidden, lengths = reply_hidden_states(hidden, labels)
        weight = self.unit_decoder.input_proj.weight
        return self.unit_decoder.ctc_loss(reply_hidden.to(weight.dtype), lengths, batch.units)


def freeze_for_stage(model: OmniForTraining) -> list[str]:
    """Set requires_grad for the stage; returns the names of the parameters that train, in a fixed order."""
    model.requires_grad_(False)
    if model.stage == 1:
        model.adaptor.requires_grad_(True)
        if not is_peft(model.llm):
            model.llm.requires_grad_(True)
        else:  # LoRA: peft has already marked only the adapter weights trainable
            for name, p in model.llm.named_parameters():
                p.requires_grad_("lora_" in name)
    else:
        assert model.unit_decoder is not None
        model.unit_decoder.requires_grad_(True)
    return [name for name, p in model.named_parameters() if p.requires_grad]


def trainable_state(model: OmniForTraining, names: list[str], sharded: bool) -> dict[str, torch.Tensor]:
    """The trained parameters (`names`, float32 masters) on the CPU: what a resume point holds.

    With `sharded` (FSDP) every process must call this: the full tensors are gathered onto
    rank 0's CPU, and the other ranks get an empty dict.
    """
    if sharded:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return {k: full[k].contiguous() for k in names if k in full}
    params = dict(model.named_parameters())
    return {k: params[k].detach().cpu().contiguous() for k in names}


def released_tensors(
    model: OmniForTraining, dtypes: dict[str, torch.dtype], sharded: bool = False, base_dir: Path | None = None
) -> dict[str, torch.Tensor]:
    """Every tensor of the released layout on the CPU, each in its base checkpoint's dtype (`dtypes`).

    `base_dir`: the base weights, for QLoRA. With `sharded` (FSDP) every process must call
    this: the full weights are gathered onto rank 0's CPU, and the other ranks get an empty dict.
    """
    if sharded:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not full:
            return {}
        tensors = {k[len("llm.") :]: v for k, v in full.items() if k.startswith("llm.")}
        adaptor = {k[len("adaptor.") :]: v for k, v in full.items() if k.startswith("adaptor.")}
        decoder = {k[len("unit_decoder.") :]: v for k, v in full.items() if k.startswith("unit_decoder.")}
    else:
        tensors = merged_llm_state(model.llm, base_dir)
        adaptor = model.adaptor.state_dict()
        decoder = model.unit_decoder.state_dict() if model.unit_decoder is not None else {}
        if any(k.startswith(DECODER_PREFIX) for k in tensors):
            decoder = {}  # QLoRA: the frozen decoder came from the base checkpoint, untouched
    if getattr(model.llm.config, "tie_word_embeddings", False):
        tensors.pop("lm_head.weight", None)  # safetensors refuses shared storage; the loader re-ties
    tensors.update({ADAPTOR_PREFIX + k: v for k, v in adaptor.items()})
    tensors.update({DECODER_PREFIX + k: v for k, v in decoder.items()})
    return {k: v.detach().to("cpu", dtypes.get(k, v.dtype)).contiguous() for k, v in tensors.items()}


def shard_for_fsdp(model: OmniForTraining, compute_dtype: torch.dtype | None) -> None:
    """FSDP2 (`fully_shard`): each LLM decoder layer is one shard unit, the rest one root unit.

    Parameters stay fp32 masters; `compute_dtype` (bf16/fp16) is FSDP's mixed-precision
    policy, with gradients reduced in fp32.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32 if compute_dtype else None)
    for layer in model.llm.model.layers:
        fully_shard(layer, mp_policy=policy)
    fully_shard(model, mp_policy=policy)


class ResumableSampler(torch.utils.data.DistributedSampler):
    """DistributedSampler (seeded shuffle per epoch, one shard per rank) that can start mid-epoch."""

    def __init__(self, dataset: torch.utils.data.Dataset, dist_info: Distributed, seed: int) -> None:
        super().__init__(dataset, num_replicas=dist_info.world_size, rank=dist_info.rank, shuffle=True, seed=seed)
        self.start = 0

    def __iter__(self) -> Iterator[int]:
        return iter(list(super().__iter__())[self.start :])

    def __len__(self) -> int:
        return super().__len__() - self.start


def _autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """Mixed-precision compute dtype (None = plain fp32): weights stay fp32, matmuls run in bf16/fp16."""
    if device.type != "cuda":
        if precision in ("bf16", "fp16"):
            raise ConfigError(f"--precision {precision} needs a CUDA GPU; on CPU training runs in fp32.")
        return None
    if precision == "fp32":
        return None
    if precision == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]


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


def _check_qlora_device(device: torch.device) -> None:
    try:
        resolve_placement("4bit", str(device))
    except ConfigError:
        if device.type == "cuda":
            raise  # what is wrong with the GPU the user asked for
        raise ConfigError(
            f"--qlora keeps the LLM in 4 bit (bitsandbytes), which needs a CUDA GPU, but this run is on {device}; "
            "use --lora on CPU."
        ) from None


def _check_resumable(cfg: FinetuneConfig, state: dict[str, Any], resume_dir: Path) -> None:
    if state["stage"] != cfg.stage:
        raise ConfigError(f"{resume_dir} was written by stage {state['stage']}; resume it with --stage {state['stage']}.")
    if bool(state.get("fsdp")) != cfg.fsdp:
        raise ConfigError(f"{resume_dir} was written {'with' if state.get('fsdp') else 'without'} --fsdp; resume it the same way.")
    if bool(state.get("lora")) != cfg.lora:
        raise ConfigError(f"{resume_dir} was {'' if state.get('lora') else 'not '}a LoRA run; resume it with the same --lora setting.")


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
        # The only tensors this run hands to collectives, reused every step and kept until the
        # process group is destroyed. A gloo worker thread that drops the last reference to a
        # tensor whose Python object has died must take the GIL to free that object; if the main
        # thread is then destroying the group (holding the GIL while it joins those threads), both
        # wait forever. A tensor Python still holds is let go without the GIL (see close()).
        self._reduced: dict[str, torch.Tensor] = {}

    # -- prepare: options, devices, resume state, files, data, weights -------------------------

    def prepare(self) -> None:
        """Check everything that can be checked before the weights load, then load them."""
        cfg = self.cfg
        check_options(cfg)
        want_cuda = cfg.device.startswith("cuda") if cfg.device else torch.cuda.is_available()
        self.dist = init_distributed("cuda" if want_cuda else "cpu")
        device = torch.device(cfg.device) if cfg.device else torch.device("cuda" if want_cuda else "cpu")
        if device.type == "cuda" and self.dist.world_size > 1:
            device = torch.device("cuda", self.dist.local_rank)
            torch.cuda.set_device(device)
        self.device = device
        if cfg.qlora:
            _check_qlora_device(device)

        self.resume_dir = latest_checkpoint(cfg.resume) if cfg.resume else None
        self.state = load_trainer_state(self.resume_dir) if self.resume_dir else None
        model, encoder = cfg.model, cfg.speech_encoder
        if self.state is not None:
            assert self.resume_dir is not None
            _check_resumable(cfg, self.state, self.resume_dir)
            # A resume point holds only the trained parts: the rest comes from the base model,
            # which --model/--speech-encoder may name anew (moved, or another machine).
            model = model or Path(self.state["base_model"])
            encoder = encoder or Path(self.state["speech_encoder"])
        if model is None:
            raise ConfigError("pass --model a LLaMA-Omni checkpoint directory (or --resume a checkpoint).")
        if self.dist.is_main:
            clean_stale_saves(self.output)

        # Every config is read once; every record is checked before the weights are loaded
        # (minutes for 8B) and before the first step; one error lists all bad records.
        self.files = files = read_model_files(Path(model).expanduser().resolve(), encoder)
        config = files.config
        if cfg.stage == 2 and config.speech_decoder is None:
            raise ConfigError("stage 2 trains the speech decoder, but this checkpoint has none; use a speech-to-speech model.")
        limits = DataLimits(
            unit_vocab_size=config.speech_decoder.unit_vocab_size if config.speech_decoder is not None else 0,
            # Training pads each question to one 30 s window, as SpeechToSpeech.encode_speech does.
            speech_positions=SpeechAdaptor.output_length(CHUNK_SAMPLES // HOP_LENGTH, config.speech_encoder_ds_rate),
            max_length=cfg.max_length,
            unit_frames_per_token=config.speech_decoder.upsample_factor if config.speech_decoder is not None else None,
        )
        self.records = load_manifest(cfg.data, cfg.stage, load_tokenizer(files.model_dir), limits)

        seed_everything(cfg.seed)
        # Master weights in fp32; bf16/fp16 only inside autocast (or 4-bit for QLoRA, whose frozen
        # base computes in the training precision: bf16 on GPUs that have it).
        if cfg.qlora:
            compute = _autocast_dtype(cfg.precision, device) or torch.float32
            self.omni = load_omni(files, precision="4bit", device=str(device), compute_dtype=compute)
            # The 4-bit load puts the speech modules in the compute dtype; the trained adaptor needs
            # fp32 master weights (half-precision updates round away, and the fp16 grad scaler
            # refuses fp16 gradients).
            self.omni.adaptor.float()
        else:
            self.omni = load_omni(files, precision="fp32", device=str(device))
        if cfg.lora:
            apply_lora(self.omni, cfg.lora_rank, cfg.lora_alpha, quantized=cfg.qlora)

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

        dataset = SpeechReplyDataset(self.records, self.omni.tokenizer, self.omni.encoder.n_mels)
        self.sampler = ResumableSampler(dataset, self.dist, cfg.seed)
        micro, accumulation = cfg.batch_split(self.dist.world_size)
        self.micro_per_epoch = math.ceil(len(self.sampler) / micro)
        steps_per_epoch = math.ceil(self.micro_per_epoch / accumulation)
        total = cfg.max_steps if cfg.max_steps is not None else max(1, math.ceil(cfg.epochs * steps_per_epoch))
        start = int(self.state["step"]) if self.state is not None else 0
        self.plan = BatchPlan(len(self.records), self.dist.world_size, micro, accumulation, steps_per_epoch, total, start)
        self.loader = torch.utils.data.DataLoader(
            dataset, batch_size=micro, sampler=self.sampler, collate_fn=collate, num_workers=cfg.num_workers
        )

        self.amp_dtype = _autocast_dtype(cfg.precision, device)
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
        self.scheduler = get_cosine_schedule_with_warmup(self.optimizer, int(cfg.warmup_ratio * total), total)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        if self.state is not None:
            self._restore(self.state)
        self.result = FinetuneResult(output_dir=None, last_checkpoint=self.resume_dir, steps=self.step, model=model)

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
        """Run the steps up to the total, with periodic resume points; True when a stop request ended it early.

        A stop request is acted on only between steps, once every process has agreed on it, so
        the resume point saved then holds exactly the weights of the step it is named after.
        """
        cfg, plan = self.cfg, self.plan
        self.started = time.monotonic()
        self.samples_seen = 0
        while self.step < plan.total_steps:
            self.sampler.set_epoch(self.step // plan.steps_per_epoch)
            self.sampler.start = (self.step % plan.steps_per_epoch) * plan.accumulation * plan.micro_batch
            batches = iter(self.loader)
            for step_in_epoch in range(self.step % plan.steps_per_epoch, plan.steps_per_epoch):
                if self.step >= plan.total_steps:
                    break
                n_micro = min(plan.accumulation, self.micro_per_epoch - step_in_epoch * plan.accumulation)
                loss = self._optimizer_step(batches, n_micro)
                self.step += 1
                self._report(loss)
                if cfg.save_every > 0 and self.step % cfg.save_every == 0 and self.step < plan.total_steps:
                    self.save_resume_point()
                if self._agreed_to_stop(stop):
                    self.save_resume_point()
                    self.result.interrupted = True
                    return True
        return False

    def _optimizer_step(self, batches: Iterator[Batch], n_micro: int) -> torch.Tensor:
        """Accumulate `n_micro` micro-batches and update the weights once; returns the step's loss (summed on this rank)."""
        loss_sum = torch.zeros((), device=self.device)
        for i in range(n_micro):
            batch = next(batches).to(self.device)
            # FSDP reduces gradients every micro-step (correct, a little slower than no_sync).
            sync = i == n_micro - 1 or self.dist.world_size == 1 or self.cfg.fsdp
            ctx = nullcontext() if sync else self.ddp_model.no_sync()  # type: ignore[operator]
            amp = nullcontext() if self.amp_dtype is None else torch.autocast(self.device.type, dtype=self.amp_dtype)
            with ctx, amp:
                loss = self.ddp_model(batch) / n_micro
            self.scaler.scale(loss).backward()
            loss_sum += loss.detach()
            self.samples_seen += len(batch.record_ids) * self.dist.world_size
        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss_sum

    def _report(self, loss_sum: torch.Tensor) -> None:
        if self.dist.world_size > 1:
            loss_sum = self._all_reduce("loss", loss_sum) / self.dist.world_size
        self.result.losses.append(float(loss_sum))
        self.result.steps = self.step
        if self.on_log is not None and self.dist.is_main and (self.step % self.cfg.log_every == 0 or self.step == self.plan.total_steps):
            elapsed = time.monotonic() - self.started
            self.on_log(TrainLog(self.step, self.plan.total_steps, self.step / self.plan.steps_per_epoch, float(loss_sum),
                                 self.scheduler.get_last_lr()[0], self.samples_seen / max(elapsed, 1e-9), elapsed))

    def _agreed_to_stop(self, stop: StopRequest) -> bool:
        """Whether any process was asked to stop (torchrun forwards Ctrl-C to each at its own moment)."""
        if self.dist.world_size == 1:
            return stop.requested
        flag = self._all_reduce("stop", torch.tensor([1.0 if stop.requested else 0.0], device=self.device))
        return bool(flag.item() > 0)

    def _all_reduce(self, name: str, value: torch.Tensor) -> torch.Tensor:
        """The sum of `value` over the processes, in this run's buffer `name` (see `_reduced`)."""
        buffer = self._reduced.get(name)
        if buffer is None:
            buffer = self._reduced[name] = torch.empty_like(value)
        buffer.copy_(value)
        dist.all_reduce(buffer)
        return buffer.clone()

    # -- save -------------------------------------------------------------------------------------

    def trainer_state(self) -> dict[str, Any]:
        """What --resume needs besides the trained weights: optimizer, schedule, step, RNG, and how the run was set up."""
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
        """Write `checkpoint-<step>` (every process calls this; rank 0 writes) and prune the oldest."""
        if self.saved_step == self.step:  # Ctrl-C right after a periodic save: it is on disk already
            return
        path = checkpoint_dir(self.output, self.step)
        # Under FSDP gathering weights and optimizer state is collective: every rank takes part.
        # Under DDP only rank 0 writes, so only it builds the CPU copy.
        if self.cfg.fsdp or self.dist.is_main:
            trained, state = trainable_state(self.model, self.trained_names, self.cfg.fsdp), self.trainer_state()
            if self.dist.is_main:
                save_resume_point(trained, state, path)
                prune_checkpoints(self.output, path, self.cfg.keep_checkpoints)
        if self.dist.world_size > 1:
            dist.barrier()
        self.saved_step = self.step
        self.result.last_checkpoint = path

    # -- finish ------------------------------------------------------------------------------------

    def finish(self) -> None:
        """Export `final/`: the fine-tuned model in the released layout, each tensor in the base model's dtype."""
        self.exporting = True
        files = self.files
        final = self.output / FINAL_DIR
        dtypes = tensor_dtypes({path for _, path in files.shapes.values()})
        tensors = released_tensors(self.model, dtypes, self.cfg.fsdp, files.model_dir)
        if self.dist.is_main:
            save_model(tensors, files.model_dir, final, files.speech_encoder)
        if self.dist.world_size > 1:
            dist.barrier()
        self.result.output_dir = final

    def close(self) -> None:
        """Leave the torchrun job (every process, however the run ended), at this point and no later.

        DDP's reducer holds the process group too: while it lives, destroy_process_group() only
        forgets the group, which is then torn down whenever the wrapper happens to be collected
        (a hang seen once in ~20 runs: see `_reduced`). So the wrapper goes first;
        the buffers handed to collectives are let go only once the group is gone.
        """
        if self.dist.world_size > 1 and dist.is_initialized():
            if hasattr(self, "model"):
                self.ddp_model = self.model
            gc.collect()  # the DDP wrapper sits in reference cycles (module hooks)
            dist.destroy_process_group()
        self._reduced.clear()


def finetune(
    cfg: FinetuneConfig,
    on_log: Callable[[TrainLog], None] | None = None,
    on_start: Callable[[BatchPlan], None] | None = None,
) -> FinetuneResult:
    """Run one stage of fine-tuning; returns where the exported model and the last resume point went.

    Ctrl-C stops at the next step boundary with a resume point (`interrupted`); a second
    Ctrl-C quits at once without saving (`unsaved` says what was lost), never leaving a
    half-written folder. Under torchrun every process runs this; rank 0 writes the files.
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
                if not run.train(stop):
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
