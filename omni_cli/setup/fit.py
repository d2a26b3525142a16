"""How much GPU memory a model needs at a precision, and whether the GPU has it.

Parameter counts come from the configs: each module is built on torch's meta device (no
memory, no init) from config.json — or from the preset's copy of its size keys before the
download — and its parameters are counted. bitsandbytes quantizes the Linear layers inside
the LLM's decoder layers; embeddings, lm_head, norms and the speech modules stay at the
compute dtype. On top come the KV caches of a long chat and a fixed workspace allowance.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from omni_cli.config import PRECISIONS, SamplingConfig, StreamingConfig
from omni_cli.errors import ConfigError, OmniError, one_line
from omni_cli.weights.presets import GB, Preset, ResolvedModel

if TYPE_CHECKING:
    from omni_cli.weights.model_files import ModelFiles

# Bytes per stored weight. 4-bit NF4 keeps one fp32 absmax per 64 weights (no double quant,
# as load_omni configures it): 0.5 + 4/64. LLM.int8 adds one fp32 scale per row: negligible.
DTYPE_BYTES = {"fp32": 4.0, "fp16": 2.0, "bf16": 2.0}
QUANTIZED_BYTES = {"8bit": 1.0, "4bit": 0.5 + 4 / 64}
# KV-cache budget: a multi-turn chat of the default context budget, and the speech decoder's
# cache for one reply of the default max_new_tokens.
CONTEXT_TOKENS = StreamingConfig.context_budget
REPLY_TOKENS = SamplingConfig.max_new_tokens
# Activations, prefill logits, cuBLAS/allocator workspace: an allowance, not a measurement.
WORKSPACE_BYTES = 1 << 30
# Precisions tried, best quality first, when suggesting one that fits.
FITTING_ORDER = ("fp16", "8bit", "4bit")


@dataclass(frozen=True)
class ModelSizes:
    """Parameter counts of a model's modules and its KV-cache elements per token."""

    llm_linear: int  # weights of the Linear layers in the LLM's decoder layers (quantizable)
    llm_other: int  # embeddings, lm_head, norms, biases
    speech_encoder: int
    adaptor: int
    speech_decoder: int
    vocoder: int
    llm_kv_per_token: int  # K and V elements cached per token over all LLM layers
    decoder_kv_per_token: int  # K and V elements the speech decoder caches per LLM token

    @property
    def total_params(self) -> int:
        """Every parameter of the model."""
        return self.llm_linear + self.llm_other + self.speech_encoder + self.adaptor + self.speech_decoder + self.vocoder


def _numel(module: Any) -> int:
    return sum(p.numel() for p in module.parameters())


def sizes_from_configs(
    omni: dict[str, Any], whisper: dict[str, Any] | None, adaptor_hidden: int, vocoder: dict[str, Any] | None
) -> ModelSizes:
    """Count parameters from config dicts (config.json keys); None parts count as 0."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, WhisperConfig

    from omni_cli.config import OMNI_MODEL_TYPE, OmniConfig, VocoderConfig
    from omni_cli.model.adaptor import SpeechAdaptor
    from omni_cli.model.encoder import SpeechEncoder
    from omni_cli.model.unit_decoder import UnitDecoder
    from omni_cli.model.vocoder import UnitVocoder

    cfg = OmniConfig.from_dict({"model_type": OMNI_MODEL_TYPE, **omni}, "model config")
    llama = LlamaConfig(**cfg.llama_dict())
    with torch.device("meta"):
        llm = LlamaForCausalLM(llama)
        linear = sum(
            m.weight.numel() for m in llm.model.layers.modules() if isinstance(m, torch.nn.Linear)
        )
        other = _numel(llm) - linear
        encoder = _numel(SpeechEncoder(WhisperConfig(**whisper))) if whisper else 0
        adaptor = _numel(
            SpeechAdaptor(cfg.speech_encoder_hidden_size, cfg.hidden_size, cfg.speech_encoder_ds_rate, inner=adaptor_hidden)
        )
        decoder = _numel(UnitDecoder(cfg.speech_decoder, llama)) if cfg.speech_decoder else 0
        voc = _numel(UnitVocoder(VocoderConfig.from_dict(vocoder))) if vocoder else 0
    head_dim = getattr(llama, "head_dim", None) or llama.hidden_size // llama.num_attention_heads
    llm_kv = 2 * llama.num_hidden_layers * llama.num_key_value_heads * head_dim
    dec = cfg.speech_decoder
    decoder_kv = 2 * dec.num_layers * dec.hidden_size * dec.upsample_factor if dec else 0
    return ModelSizes(linear, other, encoder, adaptor, decoder, voc, llm_kv, decoder_kv)


def sizes_for_preset(preset: Preset) -> ModelSizes:
    """Sizes from the preset's copies of the config keys (before anything is downloaded).

    A config table lacking a size key is a one-line ConfigError naming the preset, not a traceback.
    """
    omni = dict(preset.model.config)
    try:
        adaptor_hidden = int(omni.pop("speech_adaptor_hidden"))
        return sizes_from_configs(omni, preset.speech_encoder.config or None, adaptor_hidden, preset.vocoder.config or None)
    except OmniError as exc:
        raise ConfigError(f"preset {preset.source.name}: its config tables cannot size the model ({str(exc).rstrip('.')}).") from exc
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(
            f"preset {preset.source.name}: its config tables cannot size the model ({type(exc).__name__}: {one_line(exc)}); "
            "compare them with models/llama-omni-8b.toml."
        ) from exc


def sizes_for_files(files: ModelFiles) -> ModelSizes:
    """Sizes from the config files read for this run, the preset's copies filling what they lack.

    The encoder given as openai-whisper's .pt (no config.json) counts as 0 parameters without a preset.
    """
    preset = files.preset
    adaptor_hidden = files.adaptor_hidden
    omni = dict(files.config.raw)
    if adaptor_hidden is None:  # reported by the loader; estimate from the preset meanwhile
        if preset is None:
            raise ConfigError(f"{files.model_dir} has no adaptor weights; it is not a LLaMA-Omni checkpoint.")
        omni = dict(preset.model.config)
        adaptor_hidden = int(omni.pop("speech_adaptor_hidden"))
    whisper = files.whisper_config if files.whisper_config is not None else (preset.speech_encoder.config if preset else None)
    vocoder = files.vocoder_config.raw if files.vocoder_config is not None else (preset.vocoder.config if preset else None)
    return sizes_from_configs(omni, whisper or None, adaptor_hidden, vocoder or None)


def sizes_for_model(resolved: ResolvedModel) -> ModelSizes | None:
    """Sizes of a model that may be partly downloaded: its files where readable, else the preset's copies; None if unknown."""
    from omni_cli.weights.model_files import read_model_files

    if resolved.model_dir is not None:
        try:
            return sizes_for_files(read_model_files(resolved.model_dir, resolved.speech_encoder, resolved.vocoder_dir, resolved.preset))
        except OmniError:  # a part missing or unreadable: `omni doctor` reports it; estimate from the preset
            pass
    return sizes_for_preset(resolved.preset) if resolved.preset is not None else None


def estimate_gpu_memory(
    sizes: ModelSizes, precision: str, context_tokens: int = CONTEXT_TOKENS, reply_tokens: int = REPLY_TOKENS
) -> int:
    """Bytes of GPU memory to load the model at `precision` and hold a chat of `context_tokens`.

    "auto" means fp16 (what it picks on CUDA). 8bit/4bit quantize only the LLM's decoder-layer
    Linear weights; everything else (and the caches) stays at fp16.
    """
    if precision == "auto":
        precision = "fp16"
    if precision in QUANTIZED_BYTES:
        compute = DTYPE_BYTES["fp16"]
        llm = sizes.llm_linear * QUANTIZED_BYTES[precision] + sizes.llm_other * compute
    elif precision in DTYPE_BYTES:
        compute = DTYPE_BYTES[precision]
        llm = (sizes.llm_linear + sizes.llm_other) * compute
    else:
        raise ConfigError(f"unknown precision {precision!r}; choose fp16, bf16, 8bit or 4bit.")
    speech = (sizes.speech_encoder + sizes.adaptor + sizes.speech_decoder + sizes.vocoder) * compute
    caches = (sizes.llm_kv_per_token * context_tokens + sizes.decoder_kv_per_token * reply_tokens) * compute
    return int(llm + speech + caches + WORKSPACE_BYTES)


def best_fitting_precision(sizes: ModelSizes, free_bytes: int) -> str | None:
    """The best-quality precision whose estimate fits in `free_bytes`, or None."""
    for precision in FITTING_ORDER:
        if estimate_gpu_memory(sizes, precision) <= free_bytes:
            return precision
    return None


def shown_precision(precision: str) -> str:
    """The precision a GPU load really uses: "auto" means fp16 there."""
    return "fp16" if precision == "auto" else precision


def check_fits(free_bytes: int, sizes: ModelSizes, precision: str, name: str = "the model") -> int:
    """Return the estimate; raise ConfigError naming a precision that fits when it does not."""
    need = estimate_gpu_memory(sizes, precision)
    if need <= free_bytes:
        return need
    shown = shown_precision(precision)
    head = f"{name} needs ~{need / GB:.1f} GB of GPU memory at {shown} but the GPU has {free_bytes / GB:.1f} GB free"
    best = best_fitting_precision(sizes, free_bytes)
    if best is not None and best != shown:
        raise ConfigError(f"{head}; try --precision {best} (~{estimate_gpu_memory(sizes, best) / GB:.1f} GB).")
    smallest = estimate_gpu_memory(sizes, FITTING_ORDER[-1])
    raise ConfigError(
        f"{head}; even --precision {FITTING_ORDER[-1]} needs ~{smallest / GB:.1f} GB: close other GPU programs or use a larger GPU."
    )


def cuda_memory(device: str | None = None) -> tuple[str, int, int] | None:
    """(GPU name, free bytes, total bytes) of the CUDA device, or None without CUDA (or for --device cpu).

    A `cuda:N` this machine does not have is a one-line ConfigError naming the GPUs there are.
    """
    import torch

    if not torch.cuda.is_available():
        return None
    dev = torch.device(device) if device else torch.device("cuda")
    if dev.type != "cuda":
        return None
    count = torch.cuda.device_count()
    if dev.index is not None and dev.index >= count:
        raise ConfigError(f"--device {device}: this machine has {count} CUDA GPU(s), cuda:0 to cuda:{count - 1}.")
    free, total = torch.cuda.mem_get_info(dev)
    return torch.cuda.get_device_name(dev), int(free), int(total)


def check_before_download(resolved: ResolvedModel, precision: str, device: str | None, download_size: str) -> str | None:
    """Before a preset's download is offered: refuse one that could not run here; returns a note to show, or None.

    On a CUDA GPU the estimate must fit at `precision` (the error names a precision that fits).
    Without a CUDA GPU: `--device cuda` and 8bit/4bit are refused; with no `--device` the download
    is refused too, since the model would run on the CPU (a ~20 GB download nobody meant);
    `--device cpu` downloads anyway, with a note on the memory it will take.
    """
    name = resolved.preset.name if resolved.preset is not None else str(resolved.model_dir)
    nothing = f"nothing was downloaded (about {download_size})"
    memory = cuda_memory(device)
    if memory is not None:
        sizes = sizes_for_model(resolved)
        if sizes is not None:
            try:
                check_fits(memory[1], sizes, precision, name)
            except ConfigError as exc:
                raise ConfigError(f"{str(exc).rstrip('.')}; {nothing}.") from exc
        return None
    if device is not None and device.startswith("cuda"):
        raise ConfigError(f"--device {device} was asked for but no CUDA GPU is visible; {nothing}. Drop --device or install a CUDA build of torch.")
    if precision in QUANTIZED_BYTES:
        raise ConfigError(f"--precision {precision} needs a CUDA GPU (bitsandbytes), and this run would be on the CPU; {nothing}.")
    sizes = sizes_for_model(resolved)
    memory_need = f" in fp32 (~{estimate_gpu_memory(sizes, 'fp32') / GB:.0f} GB of memory)" if sizes is not None else ""
    if device is None:
        raise ConfigError(
            f"no CUDA GPU is visible, so {name} would run on the CPU{memory_need}, far too slowly to talk to; {nothing}. "
            "Pass --device cpu to download it and run it on the CPU anyway, or try the tiny model (`omni make-tiny`)."
        )
    return f"omni: note: {name} will run on the CPU{memory_need}: expect minutes per reply."


def check_device_fits(files: ModelFiles, precision: str, device: str | None = None) -> None:
    """Before loading: fail with a suggestion when the CUDA GPU cannot hold the model; no-op on CPU.

    (Before a download, `check_before_download` does this from the preset's sizes.)
    """
    if precision not in PRECISIONS:
        return  # resolve_placement reports it, with the full list
    memory = cuda_memory(device)
    if memory is None:
        return
    check_fits(memory[1], sizes_for_files(files), precision, files.name)


__all__ = [
    "ModelSizes",
    "sizes_from_configs",
    "sizes_for_preset",
    "sizes_for_files",
    "sizes_for_model",
    "estimate_gpu_memory",
    "best_fitting_precision",
    "check_fits",
    "cuda_memory",
    "check_before_download",
    "check_device_fits",
]
