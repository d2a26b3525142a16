"""Settings as small dataclasses: the model's, read from the released config.json files, and
each run's (sampling, streaming, chat, fine-tuning), whose defaults are the CLI's defaults.

Every size the code uses comes from here, so a checkpoint with other sizes (a tiny test
model, a future release) loads without code changes. This module imports no torch: the CLI
reads its option defaults and choices from it, so `omni --help` and option errors are instant.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omni_cli.errors import ConfigError

OMNI_MODEL_TYPE = "omni_speech2s_llama"
# Accepted too: the speech-to-text-only variant has no speech generator.
OMNI_MODEL_TYPES = (OMNI_MODEL_TYPE, "omni_speech_llama")

# Whisper hears 30 s of 16 kHz audio per encoder pass: longer speech is encoded window by
# window. Defined here, torch-free, for the model's features and for counting windows in the CLI.
WHISPER_WINDOW_SAMPLES = 30 * 16000


def parse_json(text: str) -> Any:
    """`json.loads`, whose every failure is a ValueError with a short reason.

    Besides syntax errors (json.JSONDecodeError), json.loads fails on a number of more than
    4300 digits (a ValueError advising an interpreter setting) and on nesting deeper than the
    recursion limit (a RecursionError): both are said in a few words instead.
    """
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("nested too deeply to read") from None
    except json.JSONDecodeError:
        raise
    except ValueError as exc:
        if "digits" not in str(exc):
            raise
        raise ValueError("a number too long to read (more than 4300 digits)") from None


def read_json(path: Path, what: str) -> dict[str, Any]:
    """Read a JSON object from `path`, turning every failure into one readable line."""
    if not path.is_file():
        raise ConfigError(f"{path} not found: is this a {what}?")
    try:
        data = parse_json(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path} is not valid JSON ({exc}); re-download the {what}.") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path} does not hold a JSON object; re-download the {what}.")
    return data


def _require(raw: dict[str, Any], key: str, kind: type, source: str) -> Any:
    if key not in raw:
        raise ConfigError(f"{source} lacks the key '{key}'; it is not a complete LLaMA-Omni config.")
    value = raw[key]
    if kind is float and isinstance(value, int):
        value = float(value)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise ConfigError(f"{source}: '{key}' should be {kind.__name__}, found {value!r}.")
    return value


@dataclass(frozen=True)
class SpeechDecoderConfig:
    """Sizes of the streaming CTC speech decoder (`speech_generator` in the checkpoint)."""

    num_layers: int
    hidden_size: int
    num_heads: int
    intermediate_size: int
    upsample_factor: int
    unit_vocab_size: int

    @property
    def blank_id(self) -> int:
        """CTC blank is the id right after the last unit, as in the reference."""
        return self.unit_vocab_size

    @classmethod
    def parse(cls, spec: str, upsample_factor: int, unit_vocab_size: int) -> SpeechDecoderConfig:
        """Parse the reference's "(layers,hidden,heads,ffn)" string."""
        m = re.fullmatch(r"\s*\(?\s*(\d+)\s*,\s*(\d+)\s*,\s*(\d+)\s*,\s*(\d+)\s*\)?\s*", spec)
        if not m:
            raise ConfigError(
                f"ctc_decoder_config {spec!r} is not of the form '(layers,hidden,heads,ffn)'."
            )
        layers, hidden, heads, ffn = (int(g) for g in m.groups())
        if hidden % heads:
            raise ConfigError(f"ctc_decoder_config {spec!r}: hidden {hidden} is not divisible by heads {heads}.")
        return cls(layers, hidden, heads, ffn, upsample_factor, unit_vocab_size)

    def to_spec(self) -> str:
        """The reference string form, for writing config.json."""
        return f"({self.num_layers},{self.hidden_size},{self.num_heads},{self.intermediate_size})"


@dataclass(frozen=True)
class OmniConfig:
    """The LLaMA-Omni checkpoint config: a Llama config plus the speech keys.

    `raw` keeps every key of config.json (unknown ones included) so the Llama part can be
    handed to transformers unchanged and the file can be written back as it was.
    """

    raw: dict[str, Any]
    model_type: str
    hidden_size: int
    speech_encoder: str | None
    speech_encoder_type: str
    speech_encoder_ds_rate: int
    speech_encoder_hidden_size: int
    speech_projector_type: str
    speech_decoder: SpeechDecoderConfig | None

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config.json") -> OmniConfig:
        """Validate and read the keys we use; keep the rest untouched in `raw`."""
        model_type = raw.get("model_type")
        if model_type not in OMNI_MODEL_TYPES:
            raise ConfigError(
                f"{source} has model_type {model_type!r}, not {OMNI_MODEL_TYPE!r}: "
                "point --model at a LLaMA-Omni checkpoint directory."
            )
        encoder_type = raw.get("speech_encoder_type", "whisper")
        if encoder_type != "whisper":
            raise ConfigError(f"{source}: speech_encoder_type {encoder_type!r} is not supported (only 'whisper').")
        projector_type = raw.get("speech_projector_type", "linear")
        if projector_type != "linear":
            raise ConfigError(f"{source}: speech_projector_type {projector_type!r} is not supported (only 'linear').")
        decoder: SpeechDecoderConfig | None = None
        generator_type = raw.get("speech_generator_type")
        if generator_type is not None:
            if generator_type != "ctc":
                raise ConfigError(f"{source}: speech_generator_type {generator_type!r} is not supported (only 'ctc').")
            decoder = SpeechDecoderConfig.parse(
                str(_require(raw, "ctc_decoder_config", str, source)),
                _require(raw, "ctc_upsample_factor", int, source),
                _require(raw, "unit_vocab_size", int, source),
            )
        speech_encoder = raw.get("speech_encoder")
        return cls(
            raw=dict(raw),
            model_type=model_type,
            hidden_size=_require(raw, "hidden_size", int, source),
            speech_encoder=str(speech_encoder) if speech_encoder else None,
            speech_encoder_type=encoder_type,
            speech_encoder_ds_rate=_require(raw, "speech_encoder_ds_rate", int, source),
            speech_encoder_hidden_size=_require(raw, "speech_encoder_hidden_size", int, source),
            speech_projector_type=projector_type,
            speech_decoder=decoder,
        )

    @classmethod
    def load(cls, model_dir: Path) -> OmniConfig:
        """Read `model_dir/config.json`."""
        path = Path(model_dir) / "config.json"
        if not Path(model_dir).is_dir():
            raise ConfigError(f"model directory {model_dir} does not exist; pass --model a LLaMA-Omni checkpoint directory.")
        return cls.from_dict(read_json(path, "LLaMA-Omni checkpoint"), str(path))

    def llama_dict(self) -> dict[str, Any]:
        """The config as transformers' LlamaConfig expects it (our extra keys are harmless there)."""
        out = dict(self.raw)
        out["model_type"] = "llama"
        return out

    def save(self, model_dir: Path) -> None:
        """Write config.json with every key read (plus any edits made to `raw`), keys sorted."""
        path = Path(model_dir) / "config.json"
        path.write_text(json.dumps(self.raw, indent=2, sort_keys=True) + "\n", encoding="utf-8")


@dataclass(frozen=True)
class DurationPredictorConfig:
    """`dur_predictor_params` of the unit vocoder."""

    encoder_embed_dim: int
    var_pred_hidden_dim: int
    var_pred_kernel_size: int
    var_pred_dropout: float


@dataclass(frozen=True)
class VocoderConfig:
    """The fairseq CodeHiFiGAN config.json: embedding, duration predictor and generator sizes."""

    upsample_rates: tuple[int, ...]
    upsample_kernel_sizes: tuple[int, ...]
    upsample_initial_channel: int
    resblock_kernel_sizes: tuple[int, ...]
    resblock_dilation_sizes: tuple[tuple[int, ...], ...]
    num_embeddings: int
    embedding_dim: int
    model_in_dim: int
    duration_predictor: DurationPredictorConfig | None
    sampling_rate: int = 16000
    resblock: str = "1"
    raw: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def hop_length(self) -> int:
        """Output samples per unit frame: the product of the upsampling rates (320 = 20 ms)."""
        return math.prod(self.upsample_rates)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "vocoder config.json") -> VocoderConfig:
        """Read the keys the generator needs; unknown keys (mel settings, training) are kept in `raw`."""
        try:
            dur = raw.get("dur_predictor_params")
            duration = (
                DurationPredictorConfig(
                    int(dur["encoder_embed_dim"]),
                    int(dur["var_pred_hidden_dim"]),
                    int(dur["var_pred_kernel_size"]),
                    float(dur.get("var_pred_dropout", 0.0)),
                )
                if dur
                else None
            )
            cfg = cls(
                upsample_rates=tuple(int(x) for x in raw["upsample_rates"]),
                upsample_kernel_sizes=tuple(int(x) for x in raw["upsample_kernel_sizes"]),
                upsample_initial_channel=int(raw["upsample_initial_channel"]),
                resblock_kernel_sizes=tuple(int(x) for x in raw["resblock_kernel_sizes"]),
                resblock_dilation_sizes=tuple(tuple(int(d) for d in ds) for ds in raw["resblock_dilation_sizes"]),
                num_embeddings=int(raw["num_embeddings"]),
                embedding_dim=int(raw["embedding_dim"]),
                model_in_dim=int(raw.get("model_in_dim", raw["embedding_dim"])),
                duration_predictor=duration,
                sampling_rate=int(raw.get("sampling_rate", 16000)),
                resblock=str(raw.get("resblock", "1")),
                raw=dict(raw),
            )
        except KeyError as exc:
            raise ConfigError(f"{source} lacks the key {exc.args[0]!r}; it is not a unit vocoder config.") from exc
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{source} has a malformed value ({exc}); re-download the vocoder config.") from exc
        if len(cfg.upsample_rates) != len(cfg.upsample_kernel_sizes):
            raise ConfigError(f"{source}: upsample_rates and upsample_kernel_sizes differ in length.")
        if len(cfg.resblock_kernel_sizes) != len(cfg.resblock_dilation_sizes):
            raise ConfigError(f"{source}: resblock_kernel_sizes and resblock_dilation_sizes differ in length.")
        return cfg

    @classmethod
    def load(cls, path: Path) -> VocoderConfig:
        """Read a vocoder config.json."""
        return cls.from_dict(read_json(Path(path), "unit vocoder config"), str(path))

    def to_dict(self) -> dict[str, Any]:
        """The config.json form (original extra keys kept)."""
        out = dict(self.raw)
        out.update(
            upsample_rates=list(self.upsample_rates),
            upsample_kernel_sizes=list(self.upsample_kernel_sizes),
            upsample_initial_channel=self.upsample_initial_channel,
            resblock_kernel_sizes=list(self.resblock_kernel_sizes),
            resblock_dilation_sizes=[list(d) for d in self.resblock_dilation_sizes],
            num_embeddings=self.num_embeddings,
            embedding_dim=self.embedding_dim,
            model_in_dim=self.model_in_dim,
            sampling_rate=self.sampling_rate,
            resblock=self.resblock,
        )
        if self.duration_predictor is not None:
            d = self.duration_predictor
            out["dur_predictor_params"] = {
                "encoder_embed_dim": d.encoder_embed_dim,
                "var_pred_hidden_dim": d.var_pred_hidden_dim,
                "var_pred_kernel_size": d.var_pred_kernel_size,
                "var_pred_dropout": d.var_pred_dropout,
            }
        return out


# ---------------------------------------------------------------------------------------------
# Run settings (the CLI's defaults live here, once)

# --precision for inference: auto = fp16 on CUDA, fp32 on the CPU.
PRECISIONS = ("auto", "fp32", "fp16", "bf16", "8bit", "4bit")
# --precision for training: master weights stay fp32; these are the compute precisions.
TRAIN_PRECISIONS = ("auto", "fp32", "bf16", "fp16")
# --decode-steps: "eager" (growing KV caches), "static" (preallocated caches) or "compiled"
# (static + torch.compile; CUDA graphs on a GPU).
DECODE_MODES = ("eager", "static", "compiled")
# How to install the optional extras: the package is not on PyPI under our name, so name the
# libraries themselves (or the extra, from a checkout).
QUANT_INSTALL = "pip install 'bitsandbytes>=0.43' 'accelerate>=1.0' (or, in the omni checkout: pip install -e '.[quant]')"
TRAIN_INSTALL = "pip install 'peft>=0.12' 'accelerate>=1.0' (or, in the omni checkout: pip install -e '.[train]')"
# --report-to: where the loss log goes besides OUTPUT/train_log.jsonl.
REPORT_TO = ("none", "tensorboard")
# Paper values (section 4): 2e-5 for stage 1, 2e-4 for stage 2.
DEFAULT_LR = {1: 2e-5, 2: 2e-4}


@dataclass(frozen=True)
class SamplingConfig:
    """How to pick the next token; temperature 0 is greedy (the reference CLI's setting)."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    # Forced length for benchmarks with random weights: ignore stop tokens until the budget is spent.
    ignore_stop: bool = False


@dataclass(frozen=True)
class ReplyOptions:
    """What one reply may change of the pipeline's settings (a server's requests differ from each other).

    `system`: the system prompt (None: the reference's); `speech_instruction`: the text sent with a
    spoken question (None: the reference's "Please directly answer ..."); `sampling`: None keeps the
    pipeline's; `speak=False`: text only, the speech decoder and the vocoder do not run.
    """

    system: str | None = None
    speech_instruction: str | None = None
    sampling: SamplingConfig | None = None
    speak: bool = True


@dataclass(frozen=True)
class StreamingConfig:
    """How a reply streams: when units go to the vocoder (every `chunk_units`, Ω, the first chunk
    possibly sooner), how much history the prompt may hold, and how decoding steps run."""

    chunk_units: int = 40
    first_chunk_units: int | None = None
    context_units: int | None = None  # vocoder left context; None keeps the vocoder's default
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    # Earlier turns are dropped, oldest first, once the prompt would exceed this many positions.
    context_budget: int = 4096
    # See DECODE_MODES. Static caches hold context_budget positions for the LLM and
    # max_new_tokens tokens' frames for the speech decoder.
    decode_steps: str = "eager"

    def __post_init__(self) -> None:
        if self.decode_steps not in DECODE_MODES:
            raise ConfigError(f"unknown decode-steps mode {self.decode_steps!r}; choose one of {', '.join(DECODE_MODES)}.")


@dataclass(frozen=True)
class ChatOptions:
    """What `omni chat` was asked for, apart from the model and the reply settings."""

    session_dir: Path
    text: bool = False
    # None: full duplex (speaking over a reply interrupts it) once the echo canceller has
    # converged, half-duplex without one; True: always (a headset); False: never.
    barge_in: bool | None = None
    echo_cancellation: bool = True
    input_device: str | None = None
    output_device: str | None = None
    # 500: the shortest hang-over that cut no question at a 400 ms mid-sentence pause
    # (benchmarks/turn_taking.py); the reply is prepared during it (speculate_ms).
    hangover_ms: int = 500
    # In full duplex the turn ends after this much silence: a person answers ~200 ms after the
    # other stops. A guess that can be taken back: speech within ConversationSettings.rejoin_ms
    # stops the reply and goes on with the question (benchmarks/heard_latency.py --pause-ms
    # measures what a mid-sentence pause costs). 0: the hang-over always.
    answer_after_ms: int = 200
    # Start the reply (encode, prefill, generate up to its first audio) after this much silence,
    # so that it is ready when the turn ends; dropped if you speak on. 0: off.
    speculate_ms: int = 60
    vad_aggressiveness: int = 2


# A conversation starts speaking with a smaller first chunk than a file reply (whose
# first chunk is StreamingConfig.first_chunk_units: Ω).
CHAT_FIRST_CHUNK_UNITS = 10


@dataclass
class FinetuneConfig:
    """One fine-tuning run. Defaults are the paper's: 3 epochs, batch 32, 3 % warm-up, cosine decay."""

    stage: int
    data: Path
    output: Path
    model: Path | None = None  # with `resume`: the base model when it moved (default: the one the run started from)
    speech_encoder: Path | None = None
    epochs: float = 3.0
    max_steps: int | None = None  # overrides epochs
    batch_size: int = 32  # the global batch: samples per optimizer step over all processes (the paper's 32)
    micro_batch_size: int = 8  # at most this many samples per process per forward pass (memory)
    lr: float | None = None  # None: the paper's value for the stage
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 42
    precision: str = "auto"  # auto: bf16 (fp16 without bf16 support) on CUDA, fp32 on CPU
    device: str | None = None
    save_every: int = 500
    keep_checkpoints: int = 2
    num_workers: int = 0
    resume: Path | None = None  # a run's settings come from its checkpoint (train/run_settings.py)
    export_only: bool = False  # with `resume`: write OUTPUT/final from the checkpoint, train nothing
    report_to: str = "none"  # or "tensorboard": the loss log also as TensorBoard events (OUTPUT/tensorboard)
    lora: bool = False
    lora_rank: int = 16
    lora_alpha: int = 32
    qlora: bool = False
    fsdp: bool = False  # shard the model over the torchrun processes (stage 1 full fine-tuning)
    max_length: int = 2048

    def __post_init__(self) -> None:
        # QLoRA is LoRA on a 4-bit LLM: asking for it asks for LoRA.
        if self.qlora:
            self.lora = True
        if not (self.epochs > 0 and math.isfinite(self.epochs)):
            raise ConfigError(f"--epochs must be a number more than 0 (a fraction such as 0.5 is fine), got {self.epochs}.")
        if self.lr is not None and not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"--lr must be a number more than 0, got {self.lr}.")
        if not 0 <= self.warmup_ratio <= 1:
            raise ConfigError(f"--warmup-ratio must be between 0 and 1, got {self.warmup_ratio}.")
        if self.report_to not in REPORT_TO:
            raise ConfigError(f"--report-to {self.report_to!r}: choose one of {', '.join(REPORT_TO)}.")
        if self.batch_size < 1 or self.micro_batch_size < 1:
            raise ConfigError("--batch-size and --micro-batch-size must be at least 1.")

    def learning_rate(self) -> float:
        """The peak learning rate: given, or the paper's for this stage."""
        return self.lr if self.lr is not None else DEFAULT_LR[self.stage]

    def batch_split(self, world_size: int) -> tuple[int, int]:
        """(samples per process per micro-step, micro-steps per optimizer step) making up the global batch.

        Each process takes batch_size / world_size samples per step, in the largest micro-batches
        of at most micro_batch_size that divide it, so the global batch is exactly batch_size.
        """
        if self.batch_size % world_size:
            lower = max(world_size, self.batch_size - self.batch_size % world_size)
            raise ConfigError(
                f"--batch-size {self.batch_size} is the global batch and does not split evenly over {world_size} "
                f"processes; pass a multiple of {world_size} (e.g. {lower})."
            )
        per_process = self.batch_size // world_size
        micro = max(d for d in range(1, min(self.micro_batch_size, per_process) + 1) if per_process % d == 0)
        return micro, per_process // micro


# Addresses `omni serve` may bind without an API key: only this machine can reach them.
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


@dataclass(frozen=True)
class ServeOptions:
    """What `omni serve` was asked for, apart from the model and the reply settings, and its limits."""

    host: str = "127.0.0.1"
    port: int = 8000  # 0: any free port (the ready line says which)
    api_key: str | None = None
    model_name: str = "llama-omni"  # what /v1/models lists and replies name
    # Requests waiting for the model beyond the one being answered; more are refused (HTTP 503).
    max_waiting: int = 8
    # Realtime sessions with barge-in on answer after this much silence, as `omni chat` does (0: the
    # session's silence_duration_ms); going on within a second withdraws the reply (ChatOptions).
    answer_after_ms: int = ChatOptions.answer_after_ms
    max_request_bytes: int = 32 * 1024 * 1024  # a chat completion's JSON body (base64 audio is most of it)
    max_message_bytes: int = 4 * 1024 * 1024  # one Realtime WebSocket message (~30 s of 24 kHz PCM16 in base64)
    max_buffered_s: float = 120.0  # client audio not yet taken by the conversation (the longest question is 2 min)
    audio_ttl_s: int = 3600  # how long a reply's audio id stays valid for a later request's history

    @property
    def loopback(self) -> bool:
        """True when only this machine can reach the server."""
        return self.host in LOOPBACK_HOSTS or self.host.startswith("127.")
