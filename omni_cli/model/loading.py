"""Load a LLaMA-Omni checkpoint directory in the released layout, strictly.

The directory holds config.json (model_type "omni_speech2s_llama"), safetensors shards with
the Llama weights (`model.*`, `lm_head.*`), the adaptor (`model.speech_projector.*`) and the
speech decoder (`speech_generator.*`), and the tokenizer. The Whisper encoder is loaded
separately, from --speech-encoder or the path config.json names.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase, PreTrainedTokenizerFast
from transformers.utils import logging as hf_logging

from omni_cli.config import PRECISIONS, QUANT_INSTALL, OmniConfig
from omni_cli.errors import CheckpointError, ConfigError, one_line
from omni_cli.model.adaptor import SpeechAdaptor
from omni_cli.model.encoder import SpeechEncoder, load_speech_encoder
from omni_cli.model.unit_decoder import UnitDecoder
from omni_cli.weights.layout import ADAPTOR_PREFIX, DECODER_PREFIX, IGNORED_PREFIXES, TOKENIZER_NAME, Shapes
from omni_cli.weights.model_files import ModelFiles, read_model_files


@dataclass(frozen=True)
class Placement:
    """Where and how the weights live: device, compute dtype, and bitsandbytes quantization if any."""

    device: torch.device
    dtype: torch.dtype
    quantization: str | None  # "8bit", "4bit" or None


def resolve_placement(precision: str = "auto", device: str | None = None) -> Placement:
    """Turn --precision/--device into a Placement; quantization needs CUDA."""
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}.")
    dev = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but no CUDA GPU is visible; drop --device or install a CUDA build of torch.")
    if precision in ("8bit", "4bit"):
        if dev.type != "cuda":
            raise ConfigError(f"--precision {precision} needs a CUDA GPU (bitsandbytes); on CPU use --precision fp32.")
        return Placement(dev, torch.float16, precision)
    if precision == "auto":
        dtype = torch.float16 if dev.type == "cuda" else torch.float32
    else:
        dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    return Placement(dev, dtype, None)


@dataclass
class OmniModel:
    """Everything a reply needs, loaded and placed: tokenizer, encoder, adaptor, LLM, speech decoder."""

    config: OmniConfig
    tokenizer: PreTrainedTokenizerBase
    encoder: SpeechEncoder
    adaptor: SpeechAdaptor
    llm: LlamaForCausalLM
    unit_decoder: UnitDecoder | None
    placement: Placement

    @property
    def device(self) -> torch.device:
        """The device the weights live on."""
        return self.placement.device


def check_keys(found: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]], where: str) -> None:
    """Fail with the first offending key named when names or shapes differ."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"{where}: missing weight '{missing[0]}'{more}; the checkpoint is incomplete or not LLaMA-Omni.")
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise CheckpointError(f"{where}: unexpected weight '{unexpected[0]}'{more}; the checkpoint does not match this architecture.")
    for key in sorted(expected):
        if tuple(found[key]) != tuple(expected[key]):
            raise CheckpointError(
                f"{where}: weight '{key}' has shape {tuple(found[key])} but config.json implies {tuple(expected[key])}; "
                "config.json does not match the weights."
            )


def _meta_shapes(module: torch.nn.Module, prefix: str = "") -> dict[str, tuple[int, ...]]:
    return {prefix + k: tuple(v.shape) for k, v in module.state_dict().items()}


def _load_prefixed(
    build: Callable[[], torch.nn.Module], shapes: Shapes, prefix: str, placement: Placement
) -> torch.nn.Module:
    """Build a module without allocating random weights and fill it with the checkpoint's `prefix` tensors."""
    state: dict[str, torch.Tensor] = {}
    by_file: dict[Path, list[str]] = {}
    for key, (_, f) in shapes.items():
        if key.startswith(prefix):
            by_file.setdefault(f, []).append(key)
    for f, keys in by_file.items():
        with safe_open(str(f), framework="pt") as handle:
            for key in keys:
                state[key[len(prefix) :]] = handle.get_tensor(key).to(device=placement.device, dtype=placement.dtype)
    with torch.device("meta"):
        module = build()
    module.load_state_dict(state, strict=True, assign=True)
    return module


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """transformers warns about the speech keys it does not use; we have checked every key ourselves."""
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def load_tokenizer(model_dir: Path) -> PreTrainedTokenizerBase:
    """The checkpoint's tokenizer (tokenizer.json + tokenizer_config.json).

    Not AutoTokenizer: it would read config.json, whose model_type transformers does not know.
    """
    if not (model_dir / TOKENIZER_NAME).is_file():
        raise CheckpointError(f"{model_dir} has no {TOKENIZER_NAME}; re-download the checkpoint.")
    try:
        return PreTrainedTokenizerFast.from_pretrained(str(model_dir))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{model_dir}: no usable tokenizer ({one_line(exc)}); re-download the checkpoint.") from exc


def load_omni(
    model: str | Path | ModelFiles,
    speech_encoder: str | Path | None = None,
    precision: str = "auto",
    device: str | None = None,
    compute_dtype: torch.dtype | None = None,
) -> OmniModel:
    """Load a LLaMA-Omni checkpoint (a directory, or its `ModelFiles` already read) strictly and place it for inference.

    Every tensor name and shape is checked against config.json before anything is
    allocated, so a wrong or partial checkpoint fails in a second with the key named.
    `speech_encoder` overrides config.json's encoder path (only with a directory).
    `compute_dtype` replaces a 8/4-bit load's fp16 compute (QLoRA in bf16: fp16 activations of an
    8B Llama can overflow, and bitsandbytes casts its inputs to its compute dtype whatever autocast says).
    """
    files = model if isinstance(model, ModelFiles) else read_model_files(model, speech_encoder)
    model_dir, config, shapes = files.model_dir, files.config, files.shapes
    placement = resolve_placement(precision, device)
    if compute_dtype is not None and placement.quantization is not None:
        placement = replace(placement, dtype=compute_dtype)
    llama_config = LlamaConfig(**config.llama_dict())

    found = {k: s for k, (s, _) in shapes.items() if not k.startswith(IGNORED_PREFIXES)}
    with torch.device("meta"):
        meta_llm = LlamaForCausalLM(llama_config)
        expected = _meta_shapes(meta_llm)
        if llama_config.tie_word_embeddings and "lm_head.weight" not in found:
            expected.pop("lm_head.weight", None)
        # The adaptor's inner width is not in config.json: read it from the weight (1 if absent,
        # so check_keys names the missing key).
        inner = files.adaptor_hidden or 1
        meta_adaptor = SpeechAdaptor(config.speech_encoder_hidden_size, config.hidden_size, config.speech_encoder_ds_rate, inner=inner)
        expected.update(_meta_shapes(meta_adaptor, ADAPTOR_PREFIX))
        if config.speech_decoder is not None:
            expected.update(_meta_shapes(UnitDecoder(config.speech_decoder, llama_config), DECODER_PREFIX))
    check_keys(found, expected, str(model_dir))

    tokenizer = load_tokenizer(model_dir)
    encoder = load_speech_encoder(files.speech_encoder, dtype=placement.dtype, device=placement.device, config=files.whisper_config)
    if encoder.hidden_size != config.speech_encoder_hidden_size:
        raise ConfigError(
            f"the speech encoder has width {encoder.hidden_size} but config.json says speech_encoder_hidden_size "
            f"{config.speech_encoder_hidden_size}; pass the matching Whisper checkpoint."
        )

    adaptor = _load_prefixed(
        lambda: SpeechAdaptor(config.speech_encoder_hidden_size, config.hidden_size, config.speech_encoder_ds_rate, inner=inner),
        shapes, ADAPTOR_PREFIX, placement,
    )
    unit_decoder = None
    if config.speech_decoder is not None:
        decoder_config = config.speech_decoder
        unit_decoder = _load_prefixed(lambda: UnitDecoder(decoder_config, llama_config), shapes, DECODER_PREFIX, placement)

    kwargs: dict = {"config": llama_config, "dtype": placement.dtype}
    if placement.quantization is not None:
        try:
            from transformers import BitsAndBytesConfig
            import bitsandbytes  # noqa: F401
        except ImportError as exc:
            raise ConfigError(f"--precision {placement.quantization} needs bitsandbytes: {QUANT_INSTALL}.") from exc
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_8bit=placement.quantization == "8bit",
            load_in_4bit=placement.quantization == "4bit",
            bnb_4bit_compute_dtype=placement.dtype,
            bnb_4bit_quant_type="nf4",
        )
    if placement.device.type == "cuda":
        kwargs["device_map"] = {"": placement.device}
    with _quiet_transformers():
        llm = LlamaForCausalLM.from_pretrained(str(model_dir), **kwargs)
    llm.eval()
    for module in (encoder, adaptor, unit_decoder):
        if module is not None:
            module.eval()
    return OmniModel(config, tokenizer, encoder, adaptor, llm, unit_decoder, placement)
