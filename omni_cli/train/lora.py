"""LoRA and QLoRA for stage 1: adapters on the LLM (peft), and their weights merged into the released layout.

A LoRA run trains small adapter matrices beside the frozen LLM weights; a resume point keeps
just the adapters. The exported model must load in `omni chat`, so it holds the LLM with the
adapters merged in, computed out of place; with QLoRA (a 4-bit base) the adapters are added
to the original weights read from the base checkpoint, never to their 4-bit rounding.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from omni_cli.config import TRAIN_INSTALL
from omni_cli.errors import CheckpointError, ConfigError
from omni_cli.model.loading import OmniModel
from omni_cli.weights.layout import ADAPTOR_PREFIX, IGNORED_PREFIXES, weight_files

TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def apply_lora(omni: OmniModel, rank: int, alpha: int, quantized: bool) -> None:
    """Wrap the LLM with LoRA adapters on every attention and MLP projection (peft)."""
    try:
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    except ImportError as exc:
        raise ConfigError(f"--lora needs peft: {TRAIN_INSTALL}.") from exc
    if quantized:
        omni.llm = prepare_model_for_kbit_training(omni.llm, use_gradient_checkpointing=False)
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=0.0,
        target_modules=list(TARGET_MODULES),
        task_type="CAUSAL_LM",
    )
    omni.llm = get_peft_model(omni.llm, config)


def is_peft(llm: nn.Module) -> bool:
    """Whether the LLM carries LoRA adapters."""
    return hasattr(llm, "peft_config")


def merged_llm_state(llm: nn.Module, base_dir: Path | None = None) -> dict[str, torch.Tensor]:
    """The LLM weights under their released names, LoRA adapters merged in: new tensors, `llm` untouched.

    Each adapted weight is computed out of place as W + Δ in float32 (peft's in-place
    merge and unmerge would leave rounding residue in the trained model at every save).
    QLoRA (a 4/8-bit base): W is the original weight read from `base_dir`, not its 4-bit
    rounding, and every other tensor (and the frozen speech decoder) is the base's own, so
    the result is the released layout rather than packed bytes and quantization state.
    """
    if not is_peft(llm):
        return {k: v.detach() for k, v in llm.state_dict().items()}
    from peft.tuners.lora import LoraLayer

    # Module references only: each delta is computed when its weight is read, so the host
    # holds the merged tensors and one delta at a time, not every delta at once.
    adapted = {
        _released_name(name) + ".weight": module for name, module in llm.named_modules() if isinstance(module, LoraLayer)
    }
    if _has_quantized_base(llm):
        if base_dir is None:
            raise ValueError("merging QLoRA adapters needs the base checkpoint directory")
        base = _base_weights(base_dir)
    else:
        base = ((_released_name(k), v.detach()) for k, v in llm.state_dict().items() if "lora_" not in k)
    state: dict[str, torch.Tensor] = {}
    for key, tensor in base:
        module = adapted.pop(key, None)
        if module is not None:
            with torch.no_grad():
                delta = sum(module.get_delta_weight(a).float() for a in module.active_adapters)
            # On the host, in float32: bf16 would round small deltas away.
            tensor = tensor.to("cpu", torch.float32) + delta.cpu()
        state[key] = tensor
    if adapted:
        raise CheckpointError(f"{base_dir} has no weight {next(iter(adapted))!r} for a trained adapter; pass the base model it was trained from.")
    return state


def _released_name(peft_name: str) -> str:
    return peft_name.removeprefix("base_model.model.").replace(".base_layer.", ".")


def _has_quantized_base(llm: nn.Module) -> bool:
    return any(type(m).__name__ in ("Linear4bit", "Linear8bitLt") for m in llm.modules())


def _base_weights(base_dir: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """The base checkpoint's LLM and speech-decoder tensors, one at a time (the adaptor trains: it comes from the model)."""
    skipped = (ADAPTOR_PREFIX, *IGNORED_PREFIXES)
    for shard in weight_files(base_dir):
        with safe_open(str(shard), framework="pt") as f:
            for key in f.keys():
                if not key.startswith(skipped):
                    yield key, f.get_tensor(key)
