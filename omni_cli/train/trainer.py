"""Fine-tuning in the paper's two stages, on one device or many (torchrun: DDP, or FSDP2 with --fsdp).

Stage 1 (speech → text): the adaptor and the LLM learn (fully or with LoRA); the Whisper
encoder and the speech decoder stay frozen. Stage 2 (text hidden states → units): only the
speech decoder learns, with CTC loss on the LLM's last-layer hidden states.

A run is a `Run` in named phases: `prepare` (check the options, read the model's files once,
validate every record, load the weights), `build` (what trains, DDP/FSDP, optimizer and
schedule, resumed state), `train` (the optimizer steps, periodic checkpoints, Ctrl-C) and
`finish` (the final checkpoint). What a checkpoint is on disk: `checkpoints.py`; LoRA: `lora.py`.
"""

from __future__ import annotations

import math
import os
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
from omni_cli.errors import ConfigError
from omni_cli.model.adaptor import SpeechAdaptor
from omni_cli.model.features import CHUNK_SAMPLES, HOP_LENGTH
from omni_cli.model.loading import OmniModel, load_omni, load_tokenizer
from omni_cli.train.checkpoints import (
    FINAL_DIR,
    CheckpointList,
    latest_checkpoint,
    load_trainer_state,
    rng_state,
    save_checkpoint,
    seed_everything,
    set_rng_state,
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
from omni_cli.train.lora import adapter_state, apply_lora, is_peft, llm_state_dict, restore_lora
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


@dataclass
class FinetuneResult:
    """What a run produced: the final checkpoint directory (None when interrupted) and the losses."""

    output_dir: Path | None
    last_checkpoint: Path | None
    steps: int
    losses: list[float] = field(default_factory=list)
    interrupted: bool = False
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


def freeze_for_stage(model: OmniForTraining) -> list[nn.Parameter]:
    """Set requires_grad for the stage and return the parameters the optimizer updates, in a fixed order."""
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
    return [p for p in model.parameters() if p.requires_grad]


def checkpoint_tensors(model: OmniForTraining, sharded: bool = False, base_dir: Path | None = None) -> dict[str, torch.Tensor]:
    """Every tensor of the released layout, on CPU and contiguous (`base_dir`: the base weights, for QLoRA).

    With `sharded` (FSDP) every process must call this: the full weights are gathered onto
    rank 0's CPU, and the other ranks get an empty dict.
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
        tensors = llm_state_dict(model.llm, base_dir)
        adaptor = model.adaptor.state_dict()
        decoder = model.unit_decoder.state_dict() if model.unit_decoder is not None else {}
        if any(k.startswith(DECODER_PREFIX) for k in tensors):
            decoder = {}  # QLoRA: the frozen decoder came from the base checkpoint, untouched
    if getattr(model.llm.config, "tie_word_embeddings", False):
        tensors.pop("lm_head.weight", None)  # safetensors refuses shared storage; the loader re-ties
    tensors.update({ADAPTOR_PREFIX + k: v for k, v in adaptor.items()})
    tensors.update({DECODER_PREFIX + k: v for k, v in decoder.items()})
    return {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}


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
        self.step = 0
        self.checkpoints = CheckpointList(Path(cfg.output), cfg.keep_checkpoints)

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

        self.resume_dir = latest_checkpoint(cfg.resume) if cfg.resume else None
        self.state = load_trainer_state(self.resume_dir) if self.resume_dir else None
        if self.state is not None:
            assert self.resume_dir is not None
            _check_resumable(cfg, self.state, self.resume_dir)
        if self.resume_dir is not None:
            self.source = self.resume_dir
        elif cfg.model is None:
            raise ConfigError("pass --model a LLaMA-Omni checkpoint directory (or --resume a checkpoint).")
        else:
            self.source = Path(cfg.model)
        # A LoRA checkpoint holds merged weights; resuming restarts from the base LLM plus the saved adapters.
        lora_resume = self.state is not None and self.state.get("lora")
        self.weights_source = Path(self.state["base_model"]) if lora_resume else self.source

        # Every config is read once; every record is checked before the weights are loaded
        # (minutes for 8B) and before the first step; one error lists all bad records.
        files = read_model_files(self.weights_source, cfg.speech_encoder)
        config = files.config
        if cfg.stage == 2 and config.speech_decoder is None:
            raise ConfigError("stage 2 trains the speech decoder, but this checkpoint has none; use a speech-to-speech model.")
        limits = DataLimits(
            unit_vocab_size=config.speech_decoder.unit_vocab_size if config.speech_decoder is not None else 0,
            # Training pads each question to one 30 s window, as SpeechToSpeech.encode_speech does.
            speech_positions=SpeechAdaptor.output_length(CHUNK_SAMPLES // HOP_LENGTH, config.speech_encoder_ds_rate),
            max_length=cfg.max_length,
        )
        self.records = load_manifest(cfg.data, cfg.stage, load_tokenizer(self.source), limits)

        seed_everything(cfg.seed)
        # Master weights in fp32; bf16/fp16 only inside autocast (or 4-bit for QLoRA).
        self.omni = load_omni(files, precision="4bit" if cfg.qlora else "fp32", device=str(device))
        if cfg.qlora:
            # A 4-bit load puts the speech modules in fp16; the trained adaptor needs fp32 master
            # weights (fp16 updates round away, and the fp16 grad scaler refuses fp16 gradients).
            self.omni.adaptor.float()
        if cfg.lora:
            apply_lora(self.omni, cfg.lora_rank, cfg.lora_alpha, quantized=cfg.qlora)
            if self.state is not None:
                assert self.resume_dir is not None
                restore_lora(self.omni, self.state, self.resume_dir)

    # -- build: what trains, parallelism, optimizer, schedule, resumed state ---------------------

    def build(self) -> None:
        """Freeze for the stage, wrap for DDP/FSDP, create optimizer/schedule/loader, restore a resumed state."""
        cfg, device = self.cfg, self.device
        self.model = model = OmniForTraining(self.omni, cfg.stage)
        params = freeze_for_stage(model)
        model.train()

        dataset = SpeechReplyDataset(self.records, self.omni.tokenizer, self.omni.encoder.n_mels)
        self.sampler = ResumableSampler(dataset, self.dist, cfg.seed)
        self.micro_per_epoch = math.ceil(len(self.sampler) / cfg.batch_size)
        self.steps_per_epoch = math.ceil(self.micro_per_epoch / cfg.grad_accum)
        self.total_steps = cfg.max_steps if cfg.max_steps is not None else max(1, math.ceil(cfg.epochs * self.steps_per_epoch))
        self.loader = torch.utils.data.DataLoader(
            dataset, batch_size=cfg.batch_size, sampler=self.sampler, collate_fn=collate, num_workers=cfg.num_workers
        )

        self.amp_dtype = _autocast_dtype(cfg.precision, device)
        self.ddp_model: nn.Module = model
        if cfg.fsdp:
            if self.amp_dtype == torch.float16:
                raise ConfigError("--fsdp trains in bf16 or fp32; pass --precision bf16 (or fp32).")
            shard_for_fsdp(model, self.amp_dtype)
            params = [p for p in model.parameters() if p.requires_grad]  # now sharded DTensors
            self.amp_dtype = None  # FSDP's policy casts; no autocast on top
        elif self.dist.world_size > 1:
            self.ddp_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        self.params = params
        self.optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate(), weight_decay=cfg.weight_decay)
        # Rounded down: with a warm-up step the very first update has lr 0, a wasted step on short runs.
        self.scheduler = get_cosine_schedule_with_warmup(self.optimizer, int(cfg.warmup_ratio * self.total_steps), self.total_steps)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        if self.state is not None:
            self._restore(self.state)

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

    def train(self) -> FinetuneResult:
        """Run the steps up to the total; Ctrl-C saves a checkpoint at the current step and returns interrupted."""
        cfg = self.cfg
        result = FinetuneResult(output_dir=None, last_checkpoint=self.resume_dir, steps=self.step, model=self.model)
        self.result = result
        self.started = time.monotonic()
        self.samples_seen = 0
        try:
            while self.step < self.total_steps:
                epoch = self.step // self.steps_per_epoch
                self.sampler.set_epoch(epoch)
                self.sampler.start = (self.step % self.steps_per_epoch) * cfg.grad_accum * cfg.batch_size
                batches = iter(self.loader)
                for step_in_epoch in range(self.step % self.steps_per_epoch, self.steps_per_epoch):
                    if self.step >= self.total_steps:
                        break
                    n_micro = min(cfg.grad_accum, self.micro_per_epoch - step_in_epoch * cfg.grad_accum)
                    loss = self._optimizer_step(batches, n_micro)
                    self.step += 1
                    self._report(loss)
                    if cfg.save_every > 0 and self.step % cfg.save_every == 0 and self.step < self.total_steps:
                        result.last_checkpoint = self.save_step()
        except KeyboardInterrupt:
            # Nothing learnt is lost: the current step is saved, --resume continues from it.
            result.interrupted = True
            if self.step > 0:
                result.last_checkpoint = self.save_step()
        return result

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
            dist.all_reduce(loss_sum)
            loss_sum /= self.dist.world_size
        self.result.losses.append(float(loss_sum))
        self.result.steps = self.step
        if self.on_log is not None and self.dist.is_main and (self.step % self.cfg.log_every == 0 or self.step == self.total_steps):
            elapsed = time.monotonic() - self.started
            self.on_log(TrainLog(self.step, self.total_steps, self.step / self.steps_per_epoch, float(loss_sum),
                                 self.scheduler.get_last_lr()[0], self.samples_seen / max(elapsed, 1e-9), elapsed))

    # -- save -------------------------------------------------------------------------------------

    def trainer_state(self) -> dict[str, Any]:
        """What --resume needs besides the weights: optimizer, schedule, step, RNG, and how the run was set up."""
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
            "base_model": str(self.weights_source),
            "adapter": adapter_state(self.model.llm) if cfg.lora else None,
            "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()},
        }

    def _optimizer_state(self) -> dict[str, Any]:
        if not self.cfg.fsdp:
            return self.optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(self.model, self.optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def _contents(self) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
        # Under FSDP gathering weights and optimizer state is collective: every rank takes part.
        # Under DDP only rank 0 writes, so only it builds the CPU copy.
        if self.cfg.fsdp or self.dist.is_main:
            return checkpoint_tensors(self.model, self.cfg.fsdp, self.weights_source), self.trainer_state()
        return {}, None

    def _write(self, path: Path) -> None:
        tensors, state = self._contents()
        if self.dist.is_main:
            save_checkpoint(tensors, self.source, path, state, self.cfg.speech_encoder)

    def save_step(self) -> Path:
        """Write `checkpoint-<step>` (every rank calls this; rank 0 writes) and prune the oldest."""
        path = self.checkpoints.path(self.step)
        if self.checkpoints.is_latest(path):  # Ctrl-C right after a periodic save: it is on disk already
            return path
        self._write(path)
        self.checkpoints.add(path, delete=self.dist.is_main)
        if self.dist.world_size > 1:
            dist.barrier()
        return path

    # -- finish ------------------------------------------------------------------------------------

    def finish(self) -> FinetuneResult:
        """Write `final/`: both the fine-tuned model and a resumable checkpoint."""
        final = Path(self.cfg.output) / FINAL_DIR
        self._write(final)
        if self.dist.world_size > 1:
            dist.barrier()
            dist.destroy_process_group()
        self.result.output_dir = self.result.last_checkpoint = final
        return self.result


def finetune(cfg: FinetuneConfig, on_log: Callable[[TrainLog], None] | None = None) -> FinetuneResult:
    """Run one stage of fine-tuning; returns where the final checkpoint went.

    Ctrl-C saves a checkpoint at the current step (resume with --resume) and returns with
    `interrupted` set. Under torchrun every process runs this; rank 0 writes the files.
    """
    run = Run(cfg, on_log)
    run.prepare()
    run.build()
    result = run.train()
    return result if result.interrupted else run.finish()
