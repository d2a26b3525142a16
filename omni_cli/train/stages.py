"""What each stage trains: the model loaded for training (precision, LoRA), as a module whose forward is
the stage's loss, which parameters learn, and the tensors a resume point and the exported model hold.

Stage 1 (speech → text): the adaptor and the LLM learn (fully or with LoRA); the Whisper
encoder and the speech decoder stay frozen. Stage 2 (text hidden states → units): only the
speech decoder learns, with CTC loss on the LLM's last-layer hidden states.

A loss is summed over a micro-batch's targets and divided by `normaliser`, the targets of the
whole global batch per process (reply tokens in stage 1, unit targets in stage 2, as the
reference normalises one batch), so micro-batches and processes only change memory, not the update.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from omni_cli.config import FinetuneConfig
from omni_cli.errors import ConfigError
from omni_cli.model.loading import OmniModel, load_omni, resolve_placement
from omni_cli.train.data import Batch, assemble_inputs, reply_hidden_states
from omni_cli.train.lora import apply_lora, is_peft, merged_llm_state
from omni_cli.weights.layout import ADAPTOR_PREFIX, DECODER_PREFIX
from omni_cli.weights.model_files import ModelFiles


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
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


def check_qlora_device(device: torch.device) -> None:
    """QLoRA's 4-bit LLM needs bitsandbytes on a CUDA GPU: refuse any other device in one line."""
    try:
        resolve_placement("4bit", str(device))
    except ConfigError:
        if device.type == "cuda":
            raise  # what is wrong with the GPU the user asked for
        raise ConfigError(
            f"--qlora keeps the LLM in 4 bit (bitsandbytes), which needs a CUDA GPU, but this run is on {device}; "
            "use --lora on CPU."
        ) from None


def load_for_training(cfg: FinetuneConfig, files: ModelFiles, device: torch.device) -> OmniModel:
    """The model as the run trains it: fp32 master weights (bf16/fp16 only inside autocast), or for QLoRA
    a 4-bit LLM computing in the training precision (bf16 on GPUs that have it); LoRA adapters when asked."""
    if cfg.qlora:
        compute = autocast_dtype(cfg.precision, device) or torch.float32
        omni = load_omni(files, precision="4bit", device=str(device), compute_dtype=compute)
        # The 4-bit load puts the speech modules in the compute dtype; the trained adaptor needs
        # fp32 master weights (half-precision updates round away, and the fp16 grad scaler
        # refuses fp16 gradients).
        omni.adaptor.float()
    else:
        omni = load_omni(files, precision="fp32", device=str(device))
    if cfg.lora:
        apply_lora(omni, cfg.lora_rank, cfg.lora_alpha, quantized=cfg.qlora)
    return omni


def target_count(batch: Batch, stage: int) -> int:
    """The targets a batch's loss sums over: reply tokens (stage 1; each is predicted once) or unit targets (stage 2)."""
    if stage == 1:
        return sum(len(reply) for reply in batch.reply_ids)
    assert batch.units is not None
    return int((batch.units >= 0).sum())


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

    def forward(self, batch: Batch, normaliser: torch.Tensor) -> torch.Tensor:
        """The stage's loss on one batch, summed over its targets / `normaliser`: LM cross-entropy (stage 1) or CTC (stage 2)."""
        embed_tokens = self.llm.get_input_embeddings()
        if self.stage == 1:
            speech = self.speech_embeddings(batch.mels)
            inputs, mask, labels = assemble_inputs(embed_tokens, batch, speech)
            # transformers sums the token losses and divides by num_items_in_batch when given.
            return self.llm(inputs_embeds=inputs, attention_mask=mask, labels=labels, num_items_in_batch=normaliser).loss
        assert self.unit_decoder is not None and batch.units is not None
        with torch.no_grad():
            speech = self.speech_embeddings(batch.mels)
            inputs, mask, labels = assemble_inputs(embed_tokens, batch, speech)
            hidden = self.llm.model(inputs_embeds=inputs, attention_mask=mask).last_hidden_state
            reply_hidden, lengths = reply_hidden_states(hidden, labels)
        weight = self.unit_decoder.input_proj.weight
        return self.unit_decoder.ctc_loss(reply_hidden.to(weight.dtype), lengths, batch.units, normaliser=normaliser)


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
