"""LoRA and QLoRA for stage 1: adapters on the LLM (peft), and their weights merged into the released layout.

A LoRA run trains small adapter matrices beside the frozen LLM weights. Checkpoints must
still load in `omni chat`, so each save writes the LLM with the adapters merged in; with
QLoRA (a 4-bit base) the adapters are added to the original weights read from the base
checkpoint, never to their 4-bit rounding.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from omni_cli.errors import CheckpointError, ConfigError
from omni_cli.model.loading import OmniModel
from omni_cli.weights.layout import ADAPTOR_PREFIX, IGNORED_PREFIXES, read_shapes, weight_files

TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


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
        target_modules=list(TARGET_MODULES),
        task_type="CAUSAL_LM",
    )
    omni.llm = get_peft_model(omni.llm, config)


def is_peft(llm: nn.Module) -> bool:
    """Whether the LLM carries LoRA adapters."""
    return hasattr(llm, "peft_config")


def restore_lora(omni: OmniModel, state: dict[str, Any], resume_dir: Path) -> None:
    """Put a LoRA checkpoint's adapters back on the base LLM and its trained adaptor in place."""
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


def adapter_state(llm: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter weights alone, copied to the CPU (what a LoRA resume needs besides the base)."""
    return {k: v.detach().cpu().clone() for k, v in llm.state_dict().items() if "lora_" in k}


def llm_state_dict(llm: nn.Module, base_dir: Path | None = None) -> dict[str, torch.Tensor]:
    """The LLM weights under their released names; LoRA adapters are merged in (without changing `llm`).

    QLoRA (a 4/8-bit base): merging into the quantized weights would write packed bytes and
    quantization state, which is not the released layout, and would bake the rounding into
    every weight. Instead each adapter's delta is added, in float32, to the original weight
    read from `base_dir`; every other tensor (and the frozen speech decoder) is the base's own.
    """
    if not is_peft(llm):
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
