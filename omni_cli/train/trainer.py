"""Fine-tuning in the paper's two stages, on one device or many (torchrun: DDP, or FSDP2 with --fsdp).

Stage 1 (speech → text): the adaptor and the LLM learn (fully or with LoRA); the Whisper
encoder and the speech decoder stay frozen. Stage 2 (text hidden states → units): only the
speech decoder learns, with CTC loss on the LLM's last-layer hidden states.

Checkpoints are directories in the released layout (config.json, tokenizer, safetensors
shards with `model.*`, `lm_head.*`, `model.speech_projector.*`, `speech_generator.*`), so
`omni chat --model` loads them, plus `trainer_state.pt` (optimizer, scheduler, step, RNG)
that loads with `torch.load(weights_only=True)` for --resume. Every directory is written
under a temporary name and renamed into place, so an interrupted save never leaves half a
checkpoint.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from safetensors import safe_open
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from transformers import get_cosine_schedule_with_warmup

from omni_cli.errors import CheckpointError, ConfigError
from omni_cli.model.adaptor import SpeechAdaptor
from omni_cli.config import TRAIN_PRECISIONS, FinetuneConfig, OmniConfig
from omni_cli.model.features import CHUNK_SAMPLES, HOP_LENGTH
from omni_cli.model.loading import OmniModel, load_omni, load_tokenizer
from omni_cli.weights.layout import (
    ADAPTOR_PREFIX,
    DECODER_PREFIX,
    IGNORED_PREFIXES,
    SAFETENSORS_INDEX_NAME,
    fsync_file,
    read_shapes,
    weight_files,
    write_shards,
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

TRAINER_STATE_FILE = "trainer_state.pt"
# Files of the source checkpoint copied verbatim next to the new weights.
COPIED_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
)
CHECKPOINT_PREFIX = "checkpoint-"
FINAL_DIR = "final"
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
        if not _is_peft(model.llm):
            model.llm.requires_grad_(True)
        else:  # LoRA: peft has already marked only the adapter weights trainable
            for name, p in model.llm.named_parameters():
                p.requires_grad_("lora_" in name)
    else:
        assert model.unit_decoder is not None
        model.unit_decoder.requires_grad_(True)
    return [p for p in model.parameters() if p.requires_grad]


def _is_peft(llm: nn.Module) -> bool:
    return hasattr(llm, "peft_config")


def apply_lora(omni: OmniModel, rank: int, alpha: int, quantized: bool) -> None:
    """Wrap the LLM with LoRA adapters on every attention and MLP projection (peft)."""
    try:
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    except ImportError as exc:
        raise ConfigError("--lora needs peft: pip install 'omni-cli[train]'.") from exc
    if quantized:
        omni.llm = prepare_model_for_kbit_training(omni.llm, use_gradient_checkpointing=False)
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=0.0,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        task_type="CAUSAL_LM",
    )
    omni.llm = get_peft_model(omni.llm, config)


def llm_state_dict(llm: nn.Module, base_dir: Path | None = None) -> dict[str, torch.Tensor]:
    """The LLM weights under their released names; LoRA adapters are merged in (without changing `llm`).

    QLoRA (a 4/8-bit base): merging into the quantized weights would write packed bytes and
    quantization state, which is not the released layout, and would bake the rounding into
    every weight. Instead each adapter's delta is added, in float32, to the original weight
    read from `base_dir`; every other tensor (and the frozen speech decoder) is the base's own.
    """
    if not _is_peft(llm):
        return {k: v.detach() for k, v in llm.state_dict().items()}
    if _has_quantized_base(llm):
        if base_dir is None:
            raise ValueError("merging QLoRA adapters needs the base checkpoint directory")
        return _merge_into_base(llm, base_dir)
    llm.merge_adapter()
    try:
        state = {}
        for key, value in llm.state_dict().items():
            if "lora_" in key:
                continue
            key = key.removeprefix("base_model.model.").replace(".base_layer.", ".")
            state[key] = value.detach().clone()
    finally:
        llm.unmerge_adapter()
    return state


def _has_quantized_base(llm: nn.Module) -> bool:
    return any(type(m).__name__ in ("Linear4bit", "Linear8bitLt") for m in llm.modules())


def _merge_into_base(llm: nn.Module, base_dir: Path) -> dict[str, torch.Tensor]:
    from peft.tuners.lora import LoraLayer

    # Module references only: each delta is computed when its weight is read, so the host
    # holds the merged tensors and one delta at a time, not every delta at once.
    adapted = {
        name.removeprefix("base_model.model.") + ".weight": module
        for name, module in llm.named_modules()
        if isinstance(module, LoraLayer)
    }
    # The adaptor trains in stage 1 (it comes from the model); the speech decoder is frozen,
    # so its original tensors are kept as they are.
    skipped = (ADAPTOR_PREFIX, *IGNORED_PREFIXES)
    state: dict[str, torch.Tensor] = {}
    for shard in weight_files(base_dir):
        with safe_open(str(shard), framework="pt") as f:
            for key in f.keys():
                if key.startswith(skipped):
                    continue
                tensor = f.get_tensor(key)
                module = adapted.pop(key, None)
                if module is not None:
                    with torch.no_grad():
                        delta = sum(module.get_delta_weight(a).float() for a in module.active_adapters)
                    tensor = tensor.float() + delta.cpu()  # float32: bf16 would round small deltas away
                state[key] = tensor
    if adapted:
        raise CheckpointError(f"{base_dir} has no weight {next(iter(adapted))!r} for a trained adapter; pass the base model it was trained from.")
    return state


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


def replace_directory(tmp: Path, final: Path) -> None:
    """Move a fully written `tmp` onto `final`; an old `final` is removed only after the new one is in place."""
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    if old.exists():
        shutil.rmtree(old)


def save_checkpoint(
    tensors: dict[str, torch.Tensor],
    source_dir: Path,
    out_dir: Path,
    trainer_state: dict[str, Any] | None,
    speech_encoder: Path | None = None,
) -> Path:
    """Write `tensors` (see `checkpoint_tensors`) as a checkpoint directory in the released layout (+ trainer state), atomically.

    config.json is copied unchanged except `speech_encoder`, which is set to the encoder the
    run used (absolute path) when one was given, so `--model DIR` alone finds it.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    for name in COPIED_FILES:
        if (source_dir / name).is_file():
            shutil.copy2(source_dir / name, tmp / name)
    if speech_encoder is not None and (tmp / "config.json").is_file():
        raw = json.loads((tmp / "config.json").read_text(encoding="utf-8"))
        raw["speech_encoder"] = str(Path(speech_encoder).resolve())
        (tmp / "config.json").write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    write_shards(tensors, tmp, durable=True)
    if trainer_state is not None:
        with (tmp / TRAINER_STATE_FILE).open("wb") as f:
            torch.save(trainer_state, f)
            f.flush()
            os.fsync(f.fileno())
    # Copied files too: everything in the folder is on disk before the folder gets its name.
    for written in tmp.iterdir():
        if written.suffix != ".safetensors" and written.name not in (SAFETENSORS_INDEX_NAME, TRAINER_STATE_FILE):
            fsync_file(written)
    replace_directory(tmp, out_dir)
    return out_dir


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


def load_trainer_state(checkpoint: Path) -> dict[str, Any]:
    """A checkpoint's trainer state, loaded safely (tensors and plain types only)."""
    path = checkpoint / TRAINER_STATE_FILE
    if not path.is_file():
        raise CheckpointError(f"{checkpoint} has no {TRAINER_STATE_FILE}; --resume needs a checkpoint written by omni finetune.")
    return torch.load(path, map_location="cpu", weights_only=True)


def checkpoint_step(checkpoint: Path) -> int:
    """The optimizer step a checkpoint was saved at, read from its trainer state (memory-mapped: no full read)."""
    state = torch.load(checkpoint / TRAINER_STATE_FILE, map_location="cpu", weights_only=True, mmap=True)
    return int(state["step"])


def latest_checkpoint(path: Path) -> Path:
    """`path` itself if it is a checkpoint, else the checkpoint under it (`final/` or `checkpoint-N`) with the most steps.

    The step comes from each trainer state, not the folder name: after resuming a finished run
    with more steps, a newer `checkpoint-N` is ahead of the old `final/`.
    """
    path = Path(path)
    if (path / TRAINER_STATE_FILE).is_file():
        return path
    found = [p for p in [path / FINAL_DIR, *path.glob(f"{CHECKPOINT_PREFIX}*")] if (p / TRAINER_STATE_FILE).is_file()]
    if not found:
        raise CheckpointError(f"no checkpoint to resume under {path}; pass --resume a {CHECKPOINT_PREFIX}N directory.")
    # On equal steps `final/` wins (it is the finished model).
    return max(found, key=lambda p: (checkpoint_step(p), p.name == FINAL_DIR))


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


def _restore_lora(omni: OmniModel, state: dict[str, Any], resume_dir: Path | None) -> None:
    """Put a LoRA checkpoint's adapters back on the base LLM and its trained adaptor in place."""
    assert resume_dir is not None
    result = omni.llm.load_state_dict(state["adapter"], strict=False)
    if result.unexpected_keys:
        raise CheckpointError(f"{resume_dir}: adapter weight '{result.unexpected_keys[0]}' does not fit; resume with the same --lora-rank.")
    shapes = read_shapes(weight_files(resume_dir))
    adaptor = {k[len(ADAPTOR_PREFIX) :]: k for k in shapes if k.startswith(ADAPTOR_PREFIX)}
    tensors: dict[str, torch.Tensor] = {}
    for name, key in adaptor.items():
        with safe_open(str(shapes[key][1]), framework="pt") as handle:
            tensors[name] = handle.get_tensor(key)
    omni.adaptor.load_state_dict(tensors, strict=True)


def _source_dir(cfg: FinetuneConfig, resume_dir: Path | None) -> Path:
    if resume_dir is not None:
        return resume_dir
    if cfg.model is None:
        raise ConfigError("pass --model a LLaMA-Omni checkpoint directory (or --resume a checkpoint).")
    return Path(cfg.model)


def finetune(cfg: FinetuneConfig, on_log: Callable[[TrainLog], None] | None = None) -> FinetuneResult:
    """Run one stage of fine-tuning; returns where the final checkpoint went.

    Ctrl-C saves a checkpoint at the current step (resume with --resume) and returns with
    `interrupted` set. Under torchrun every process runs this; rank 0 writes the files.
    """
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
    want_cuda = cfg.device.startswith("cuda") if cfg.device else torch.cuda.is_available()
    dist_info = init_distributed("cuda" if want_cuda else "cpu")
    device = torch.device(cfg.device) if cfg.device else torch.device("cuda" if want_cuda else "cpu")
    if device.type == "cuda" and dist_info.world_size > 1:
        device = torch.device("cuda", dist_info.local_rank)
        torch.cuda.set_device(device)

    resume_dir = latest_checkpoint(cfg.resume) if cfg.resume else None
    state = load_trainer_state(resume_dir) if resume_dir else None
    if state is not None and state["stage"] != cfg.stage:
        raise ConfigError(f"{resume_dir} was written by stage {state['stage']}; resume it with --stage {state['stage']}.")
    if state is not None and bool(state.get("fsdp")) != cfg.fsdp:
        raise ConfigError(f"{resume_dir} was written {'with' if state.get('fsdp') else 'without'} --fsdp; resume it the same way.")
    if state is not None and bool(state.get("lora")) != cfg.lora:
        raise ConfigError(f"{resume_dir} was {'' if state.get('lora') else 'not '}a LoRA run; resume it with the same --lora setting.")
    source = _source_dir(cfg, resume_dir)
    # A LoRA checkpoint holds merged weights; resuming restarts from the base LLM plus the saved adapters.
    weights_source = Path(state["base_model"]) if state is not None and state.get("lora") else source

    # Every record is checked before the weights are loaded (minutes for 8B) and before the
    # first step; one error lists all bad records.
    config = OmniConfig.load(weights_source)
    if cfg.stage == 2 and config.speech_decoder is None:
        raise ConfigError("stage 2 trains the speech decoder, but this checkpoint has none; use a speech-to-speech model.")
    limits = DataLimits(
        unit_vocab_size=config.speech_decoder.unit_vocab_size if config.speech_decoder is not None else 0,
        # Training pads each question to one 30 s window, as SpeechToSpeech.encode_speech does.
        speech_positions=SpeechAdaptor.output_length(CHUNK_SAMPLES // HOP_LENGTH, config.speech_encoder_ds_rate),
        max_length=cfg.max_length,
    )
    records = load_manifest(cfg.data, cfg.stage, load_tokenizer(source), limits)

    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    # Master weights in fp32; bf16/fp16 only inside autocast (or 4-bit for QLoRA).
    omni = load_omni(weights_source, cfg.speech_encoder, precision="4bit" if cfg.qlora else "fp32", device=str(device))
    if cfg.qlora:
        # A 4-bit load puts the speech modules in fp16; the trained adaptor needs fp32 master
        # weights (fp16 updates round away, and the fp16 grad scaler refuses fp16 gradients).
        omni.adaptor.float()
    if cfg.lora:
        apply_lora(omni, cfg.lora_rank, cfg.lora_alpha, quantized=cfg.qlora)
        if state is not None:
            _restore_lora(omni, state, resume_dir)
    model = OmniForTraining(omni, cfg.stage)
    params = freeze_for_stage(model)
    model.train()

    dataset = SpeechReplyDataset(records, omni.tokenizer, omni.encoder.n_mels)
    sampler = ResumableSampler(dataset, dist_info, cfg.seed)
    micro_per_epoch = math.ceil(len(sampler) / cfg.batch_size)
    steps_per_epoch = math.ceil(micro_per_epoch / cfg.grad_accum)
    total_steps = cfg.max_steps if cfg.max_steps is not None else max(1, math.ceil(cfg.epochs * steps_per_epoch))

    amp_dtype = _autocast_dtype(cfg.precision, device)
    ddp_model: nn.Module = model
    if cfg.fsdp:
        if amp_dtype == torch.float16:
            raise ConfigError("--fsdp trains in bf16 or fp32; pass --precision bf16 (or fp32).")
        shard_for_fsdp(model, amp_dtype)
        params = [p for p in model.parameters() if p.requires_grad]  # now sharded DTensors
        amp_dtype = None  # FSDP's policy casts; no autocast on top
    elif dist_info.world_size > 1:
        ddp_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate(), weight_decay=cfg.weight_decay)
    # Rounded down: with a warm-up step the very first update has lr 0, a wasted step on short runs.
    scheduler = get_cosine_schedule_with_warmup(optimizer, int(cfg.warmup_ratio * total_steps), total_steps)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)

    def optimizer_state() -> dict[str, Any]:
        if not cfg.fsdp:
            return optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    step = 0
    if state is not None:
        if cfg.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            set_optimizer_state_dict(model, optimizer, state["optimizer"], options=StateDictOptions(full_state_dict=True))
        else:
            optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
        step = int(state["step"])

    def trainer_state() -> dict[str, Any]:
        return {
            "step": step,
            "stage": cfg.stage,
            "optimizer": optimizer_state(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler.is_enabled() else None,
            "rng": rng_state(),
            "lora": cfg.lora,
            "fsdp": cfg.fsdp,
            "base_model": str(weights_source),
            "adapter": {k: v.detach().cpu().clone() for k, v in model.llm.state_dict().items() if "lora_" in k} if cfg.lora else None,
            "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()},
        }

    saved: list[Path] = []  # the same on every rank, so all ranks skip or save together

    def checkpoint_contents() -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
        # Under FSDP gathering weights and optimizer state is collective: every rank takes part.
        # Under DDP only rank 0 writes, so only it builds the CPU copy.
        if cfg.fsdp or dist_info.is_main:
            return checkpoint_tensors(model, cfg.fsdp, weights_source), trainer_state()
        return {}, None

    def save_step() -> Path:
        path = Path(cfg.output) / f"{CHECKPOINT_PREFIX}{step}"
        if saved and saved[-1] == path:  # Ctrl-C right after a periodic save: it is on disk already
            return path
        tensors, train_state = checkpoint_contents()
        if dist_info.is_main:
            save_checkpoint(tensors, source, path, train_state, cfg.speech_encoder)
        saved.append(path)
        if cfg.keep_checkpoints > 0:
            for old in saved[: -cfg.keep_checkpoints]:  # never the newest: keep_checkpoints >= 1
                if dist_info.is_main:
                    shutil.rmtree(old, ignore_errors=True)
                saved.remove(old)
        if dist_info.world_size > 1:
            dist.barrier()
        return path

    loader = torch.utils.data.DataLoader(
        dataset, batch_size=cfg.batch_size, sampler=sampler, collate_fn=collate, num_workers=cfg.num_workers
    )
    result = FinetuneResult(output_dir=None, last_checkpoint=resume_dir, steps=step, model=model)
    started = time.monotonic()
    samples_seen = 0
    try:
        while step < total_steps:
            epoch = step // steps_per_epoch
            first_micro = (step % steps_per_epoch) * cfg.grad_accum
            sampler.set_epoch(epoch)
            sampler.start = first_micro * cfg.batch_size
            batches = iter(loader)
            for step_in_epoch in range(step % steps_per_epoch, steps_per_epoch):
                if step >= total_steps:
                    break
                n_micro = min(cfg.grad_accum, micro_per_epoch - step_in_epoch * cfg.grad_accum)
                loss_sum = torch.zeros((), device=device)
                for i in range(n_micro):
                    batch = next(batches).to(device)
                    # FSDP reduces gradients every micro-step (correct, a little slower than no_sync).
                    sync = i == n_micro - 1 or dist_info.world_size == 1 or cfg.fsdp
                    ctx = nullcontext() if sync else ddp_model.no_sync()  # type: ignore[operator]
                    amp = nullcontext() if amp_dtype is None else torch.autocast(device.type, dtype=amp_dtype)
                    with ctx, amp:
                        loss = ddp_model(batch) / n_micro
                    scaler.scale(loss).backward()
                    loss_sum += loss.detach()
                    samples_seen += len(batch.record_ids) * dist_info.world_size
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                if dist_info.world_size > 1:
                    dist.all_reduce(loss_sum)
                    loss_sum /= dist_info.world_size
                result.losses.append(float(loss_sum))
                result.steps = step
                if on_log is not None and dist_info.is_main and (step % cfg.log_every == 0 or step == total_steps):
                    elapsed = time.monotonic() - started
                    on_log(TrainLog(step, total_steps, step / steps_per_epoch, float(loss_sum),
                                    scheduler.get_last_lr()[0], samples_seen / max(elapsed, 1e-9), elapsed))
                if cfg.save_every > 0 and step % cfg.save_every == 0 and step < total_steps:
                    result.last_checkpoint = save_step()
    except KeyboardInterrupt:
        # Nothing learnt is lost: the current step is saved, --resume continues from it.
        result.interrupted = True
        if step > 0:
            result.last_checkpoint = save_step()
        return result
    # The final directory is both the fine-tuned model and a resumable checkpoint.
    final = Path(cfg.output) / FINAL_DIR
    tensors, train_state = checkpoint_contents()
    if dist_info.is_main:
        save_checkpoint(tensors, source, final, train_state, cfg.speech_encoder)
    if dist_info.world_size > 1:
        dist.barrier()
        dist.destroy_process_group()
    result.output_dir = result.last_checkpoint = final
    return result
