"""Memory of the whole model loaded the way users load it, and of one spoken reply.

Writes a random-weight checkpoint in the released file layout (config.json, sharded
safetensors + index, tokenizer; a transformers Whisper; the fairseq vocoder pickle), loads it
through `load_omni` and `load_vocoder` at --precision, runs one forced-length reply through
`SpeechToSpeech`, and prints one JSON line: what was measured next to the estimate of
`omni_cli.setup.fit` (the one `omni chat` checks before loading).

On CUDA: the allocator's peaks after loading and after the reply, the device's used memory
as nvidia-smi sees it (CUDA context included), and `fits_10gb` = peak reserved + memory
outside torch's allocator <= 10 GB (decimal: 10e9 bytes, under a 10 GiB card's total).
On CPU: parameter and buffer bytes of the loaded modules and the process's peak RSS.

`--size full` is the released architecture with random weights, sizes read from the
llama-omni-8b preset (Whisper-large-v3 encoder, Llama-3.1-8B, (2,4096,32,11008) decoder, the
LJ vocoder): ~18 GB written in bfloat16, shard by shard. Pass --workdir to keep it; a later
run with the same sizes reuses it and skips the writing. Keep --workdir out of $OUT.

    python benchmarks/memory.py                                                   # tiny, CPU
    python benchmarks/memory.py --size full --precision 4bit --workdir /tmp/omni-full
    python benchmarks/memory.py --size full --precision fp16 --workdir /tmp/omni-full
    python benchmarks/memory.py --size full --llm-layers 1 --encoder-layers 1 --device cpu --precision fp32 --max-new-tokens 4
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import shutil
import sys
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from omni_cli.audio.io import load_audio
from omni_cli.errors import ConfigError, OmniError, one_line
from omni_cli.setup.fit import WORKSPACE_BYTES, estimate_gpu_memory, sizes_for_model
from omni_cli.config import DECODE_MODES, QUANT_INSTALL, SamplingConfig, StreamingConfig
from omni_cli.model.llm import build_prompt_ids, speech_turn
from omni_cli.model.loading import (
    PRECISIONS,
    OmniModel,
    Placement,
    load_omni,
    resolve_placement,
)
from omni_cli.model.vocoder import UnitVocoder
from omni_cli.model.vocoder_loading import load_vocoder
from omni_cli.pipeline import AudioChunk, Done, SpeechToSpeech
from omni_cli.weights.layout import SAFETENSORS_NAME, plan_shards, shard_name, write_index
from omni_cli.weights.presets import GB, ResolvedModel, get_preset
from omni_cli.tiny.omni import TinyModelPaths

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_WAV = ROOT / "tests" / "data" / "helpful_base_1.wav"
FULL_PRESET = "llama-omni-8b"
# The target: the whole model and one reply within a 10 GB card.
TARGET_BYTES = 10 * GB
# Written when a checkpoint is complete; a workdir without it is written again.
COMPLETE_MARKER = "complete.json"
# Shard size of the written checkpoint: bounds host memory while writing (~2 GB held at once).
SHARD_BYTES = 2 * 10**9
# Random weights: transformers' initializer_range; small enough that 32 random layers stay finite in fp16.
WEIGHT_STD = 0.02
FULL_DTYPE = torch.bfloat16  # the LLaMA-Omni release stores bf16
WHISPER_DTYPE = torch.float16  # openai/whisper-large-v3's model.safetensors is fp16


# ---------------------------------------------------------------------------------------------
# Writing a random checkpoint


@dataclass(frozen=True)
class FullSpec:
    """The full-size architecture, from the preset's copies of the released config keys, at a chosen depth."""

    omni: dict[str, Any]
    adaptor_hidden: int
    whisper: dict[str, Any]
    vocoder: dict[str, Any]

    @classmethod
    def from_preset(cls, llm_layers: int | None, encoder_layers: int | None) -> FullSpec:
        """The preset's sizes; `llm_layers` / `encoder_layers` override the depths (smoke runs)."""
        preset = get_preset(FULL_PRESET)
        omni = dict(preset.model.config)
        adaptor_hidden = int(omni.pop("speech_adaptor_hidden"))
        whisper = dict(preset.speech_encoder.config)
        if llm_layers is not None:
            omni["num_hidden_layers"] = llm_layers
        if encoder_layers is not None:
            whisper["encoder_layers"] = encoder_layers
        return cls(omni, adaptor_hidden, whisper, dict(preset.vocoder.config))

    def describe(self) -> dict[str, Any]:
        """What identifies a written checkpoint (compared with the marker before reusing one)."""
        return {"omni": self.omni, "adaptor_hidden": self.adaptor_hidden, "whisper": self.whisper,
                "vocoder": self.vocoder, "std": WEIGHT_STD, "dtype": str(FULL_DTYPE)}


def random_weight(key: str, shape: tuple[int, ...], dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
    """A random tensor for one checkpoint entry: norms at 1, biases at 0, the rest N(0, WEIGHT_STD)."""
    if key.endswith("norm.weight"):
        return torch.ones(shape, dtype=dtype)
    if key.endswith(".bias"):
        return torch.zeros(shape, dtype=dtype)
    return torch.empty(shape, dtype=dtype).normal_(0.0, WEIGHT_STD, generator=generator)


def write_random_safetensors(
    shapes: dict[str, tuple[int, ...]], out_dir: Path, dtype: torch.dtype, seed: int, what: str, index: bool
) -> None:
    """Write random weights of these names and shapes as released: shards + model.safetensors.index.json,
    or one model.safetensors when `index` is False. Only one shard is in memory at a time."""
    itemsize = torch.empty(0, dtype=dtype).element_size()
    sizes = {k: int(np.prod(s)) * itemsize for k, s in shapes.items()}
    shards = plan_shards(sizes, SHARD_BYTES) if index else [list(shapes)]
    generator = torch.Generator().manual_seed(seed)
    total = sum(sizes.values())
    weight_map: dict[str, str] = {}
    done = 0
    start = time.perf_counter()
    for i, keys in enumerate(shards):
        name = shard_name(i, len(shards)) if index else SAFETENSORS_NAME
        part = {k: random_weight(k, shapes[k], dtype, generator) for k in keys}
        save_file(part, str(out_dir / name), metadata={"format": "pt"})
        done += sum(t.numel() * itemsize for t in part.values())
        weight_map.update(dict.fromkeys(keys, name))
        del part
        elapsed = time.perf_counter() - start
        print(f"  {what}: wrote {name} ({done / GB:.1f} of {total / GB:.1f} GB, {elapsed:.0f} s)", file=sys.stderr, flush=True)
    if index:
        write_index(out_dir, weight_map, total)


def meta_state_shapes(module: torch.nn.Module, prefix: str = "", skip: Iterable[str] = ()) -> dict[str, tuple[int, ...]]:
    """State-dict names and shapes of a module built on the meta device, in order."""
    skipped = tuple(skip)
    return {prefix + k: tuple(v.shape) for k, v in module.state_dict().items() if not k.startswith(skipped)}


def write_full_whisper(spec: FullSpec, out_dir: Path, seed: int) -> Path:
    """A transformers Whisper directory (config.json + model.safetensors) of the spec's encoder sizes."""
    from transformers import WhisperForConditionalGeneration

    from omni_cli.tiny.whisper import tiny_whisper_config

    w = spec.whisper
    config = tiny_whisper_config(w["num_mel_bins"], w["d_model"], w["encoder_layers"], w["encoder_attention_heads"])
    config.encoder_ffn_dim = w["encoder_ffn_dim"]
    config.max_source_positions = w["max_source_positions"]
    config.dtype = WHISPER_DTYPE
    out_dir.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(out_dir))
    with torch.device("meta"):
        model = WhisperForConditionalGeneration(config)
    # proj_out is tied to the decoder's embeddings: save_pretrained leaves it out, so do we.
    shapes = meta_state_shapes(model, skip=("proj_out.",))
    write_random_safetensors(shapes, out_dir, WHISPER_DTYPE, seed, "speech encoder", index=False)
    return out_dir


def write_full_vocoder(spec: FullSpec, out_dir: Path, seed: int) -> Path:
    """The fairseq vocoder layout (config.json + g_00500000 pickle) at the spec's (released) sizes."""
    from omni_cli.config import VocoderConfig
    from omni_cli.tiny.vocoder import (
        TINY_CHECKPOINT_NAME,
        tiny_generator_state,
        tiny_vocoder_config,
    )

    raw = tiny_vocoder_config()
    raw.update(spec.vocoder)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(raw, indent=2) + "\n", encoding="utf-8")
    torch.save({"generator": tiny_generator_state(VocoderConfig.from_dict(raw), seed)}, out_dir / TINY_CHECKPOINT_NAME)
    return out_dir


def write_full_model(spec: FullSpec, root: Path, seed: int) -> TinyModelPaths:
    """The released LLaMA-Omni layout at full width (random bf16 weights), plus its encoder and vocoder."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from omni_cli.config import OmniConfig
    from omni_cli.model.adaptor import SpeechAdaptor
    from omni_cli.model.loading import ADAPTOR_PREFIX, DECODER_PREFIX
    from omni_cli.model.unit_decoder import UnitDecoder
    from omni_cli.tiny.omni import make_tiny_tokenizer, tiny_config_dict

    vocoder_dir = write_full_vocoder(spec, root / "vocoder", seed)
    speech_encoder = write_full_whisper(spec, root / "whisper", seed + 1)
    model_dir = root / "omni"
    model_dir.mkdir(parents=True, exist_ok=True)
    o = spec.omni
    tokenizer = make_tiny_tokenizer(model_dir)
    raw = tiny_config_dict(
        len(tokenizer), int(tokenizer.bos_token_id), int(tokenizer.eos_token_id), str(speech_encoder),
        o["speech_encoder_hidden_size"], hidden=o["hidden_size"], layers=o["num_hidden_layers"],
        heads=o["num_attention_heads"], kv_heads=o["num_key_value_heads"], decoder_spec=o["ctc_decoder_config"],
    )
    # The tokenizer is tiny; the embedding table keeps the released vocabulary (ids past it decode to nothing).
    raw.update(o)
    raw["torch_dtype"] = str(FULL_DTYPE).removeprefix("torch.")
    config = OmniConfig.from_dict(raw)
    config.save(model_dir)
    (model_dir / "generation_config.json").write_text(
        json.dumps({"bos_token_id": raw["bos_token_id"], "eos_token_id": raw["eos_token_id"], "do_sample": False}) + "\n"
    )
    llama = LlamaConfig(**config.llama_dict())
    assert config.speech_decoder is not None
    with torch.device("meta"):
        shapes = meta_state_shapes(LlamaForCausalLM(llama))
        adaptor = SpeechAdaptor(config.speech_encoder_hidden_size, config.hidden_size, config.speech_encoder_ds_rate,
                                inner=spec.adaptor_hidden)
        shapes.update(meta_state_shapes(adaptor, ADAPTOR_PREFIX))
        shapes.update(meta_state_shapes(UnitDecoder(config.speech_decoder, llama), DECODER_PREFIX))
    write_random_safetensors(shapes, model_dir, FULL_DTYPE, seed + 2, "LLaMA-Omni", index=True)
    return TinyModelPaths(model_dir=model_dir, speech_encoder=speech_encoder, vocoder_dir=vocoder_dir)


def full_checkpoint_bytes(spec: FullSpec) -> int:
    """Roughly what write_full_model puts on disk (LLM + adaptor + decoder in bf16, encoder in fp16)."""
    from omni_cli.setup.fit import sizes_from_configs

    sizes = sizes_from_configs(spec.omni, spec.whisper, spec.adaptor_hidden, None)
    return 2 * sizes.total_params


def prepare_checkpoint(size: str, root: Path, spec: FullSpec | None, seed: int) -> tuple[TinyModelPaths, float | None]:
    """The checkpoint under `root` (written unless a complete one with the same sizes is there) and the writing time."""
    name = "tiny" if spec is None else f"full-llm{spec.omni['num_hidden_layers']}-enc{spec.whisper['encoder_layers']}"
    where = root / name
    described = {"size": size, "seed": seed, **({} if spec is None else spec.describe())}
    marker = where / COMPLETE_MARKER
    if marker.is_file():
        saved = json.loads(marker.read_text())
        if saved.get("described") == described:
            paths = saved["paths"]
            print(f"reusing the checkpoint in {where}", file=sys.stderr, flush=True)
            return TinyModelPaths(Path(paths["model_dir"]), Path(paths["speech_encoder"]), Path(paths["vocoder_dir"])), None
    if where.exists():
        shutil.rmtree(where)  # incomplete or other sizes: ours to replace
    where.mkdir(parents=True)
    start = time.perf_counter()
    if spec is None:
        from omni_cli.tiny.omni import make_tiny_model

        paths = make_tiny_model(where, seed=seed)
    else:
        need = full_checkpoint_bytes(spec)
        free = shutil.disk_usage(where).free
        if free < need * 1.05:
            raise ConfigError(f"writing the full-size checkpoint needs ~{need / GB:.0f} GB but {where} has "
                              f"{free / GB:.0f} GB free; pass --workdir on a larger disk.")
        print(f"writing a random full-size checkpoint (~{need / GB:.1f} GB) to {where}", file=sys.stderr, flush=True)
        paths = write_full_model(spec, where, seed)
    seconds = time.perf_counter() - start
    marker.write_text(json.dumps({"described": described, "paths": {k: str(v) for k, v in vars(paths).items()}}) + "\n")
    return paths, seconds


# ---------------------------------------------------------------------------------------------
# Measuring


def module_bytes(modules: Iterable[torch.nn.Module | None]) -> tuple[int, int]:
    """(parameter bytes, buffer bytes) of the modules as stored (a 4-bit weight counts its packed bytes)."""
    params = buffers = 0
    for module in modules:
        if module is None:
            continue
        params += sum(p.numel() * p.element_size() for p in module.parameters())
        buffers += sum(b.numel() * b.element_size() for b in module.buffers())
    return params, buffers


def reset_peak_rss() -> bool:
    """Restart the kernel's peak-RSS count (so writing the checkpoint does not count); False where unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_bytes(was_reset: bool) -> int:
    """The process's peak resident memory since the reset (VmHWM), else since start (getrusage)."""
    if was_reset:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    # ru_maxrss is in kilobytes on Linux, bytes on macOS.
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def precision_name(placement: Placement) -> str:
    """The precision a placement really uses ("auto" resolved), as setup/fit.py names it."""
    if placement.quantization:
        return placement.quantization
    return {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[placement.dtype]


def reply(
    model: OmniModel, vocoder: UnitVocoder, audio: np.ndarray, tokens: int, chunk_units: int, decode_steps: str = "eager"
) -> dict[str, Any]:
    """One forced-length spoken reply through the streaming pipeline; what it produced and how long it took."""
    streaming = StreamingConfig(chunk_units=chunk_units, sampling=SamplingConfig(max_new_tokens=tokens, ignore_stop=True),
                                decode_steps=decode_steps)
    pipeline = SpeechToSpeech(model, vocoder, streaming)
    if decode_steps == "compiled":
        pipeline.warm_up()  # as `omni chat` does at start: the graphs' memory counts too
    samples, rate, done = 0, vocoder.config.sampling_rate, None
    start = time.perf_counter()
    for event in pipeline.respond(audio):
        if isinstance(event, AudioChunk):
            samples += event.audio.size
            rate = event.sample_rate
        elif isinstance(event, Done):
            done = event
    seconds = time.perf_counter() - start
    assert done is not None and done.user_speech is not None
    # Positions the LLM's KV cache held: the prompt (the speech slot replaced by its frames) plus the reply.
    prompt = len(build_prompt_ids(model.tokenizer, [speech_turn()])) - 1
    prompt += int(done.user_speech.shape[0])
    return {"reply_s": round(seconds, 2), "reply_tokens": done.tokens, "reply_units": len(done.units),
            "reply_audio_s": round(samples / rate, 2), "kv_positions": prompt + done.tokens}


def cuda_figures(device: torch.device) -> dict[str, int]:
    """The caching allocator's current and peak figures and the device's used memory, in bytes."""
    torch.cuda.synchronize(device)
    free, total = torch.cuda.mem_get_info(device)
    return {"allocated": torch.cuda.memory_allocated(device), "reserved": torch.cuda.memory_reserved(device),
            "peak_allocated": torch.cuda.max_memory_allocated(device), "peak_reserved": torch.cuda.max_memory_reserved(device),
            "used": total - free, "total": total}


def measure(
    paths: TinyModelPaths, precision: str, device: str | None, wav: Path, tokens: int, chunk_units: int,
    decode_steps: str = "eager",
) -> dict[str, Any]:
    """Load through the users' path, run one reply, and return the row's figures (bytes, seconds)."""
    placement = resolve_placement(precision, device)
    dev = placement.device
    cuda = dev.type == "cuda"
    row: dict[str, Any] = {}
    if cuda:
        free, total = torch.cuda.mem_get_info(dev)  # creates the CUDA context before the baseline
        row["context_gb"] = (total - free) / GB  # before anything is allocated: context (+ other processes)
        torch.cuda.reset_peak_memory_stats(dev)
    rss_reset = reset_peak_rss()
    start = time.perf_counter()
    # As `omni chat` does: the vocoder first, in fp32 whatever the LLM's precision.
    vocoder = load_vocoder(paths.vocoder_dir, dtype=torch.float32, device=dev)
    model = load_omni(paths.model_dir, paths.speech_encoder, precision=precision, device=device)
    row["load_s"] = round(time.perf_counter() - start, 2)
    params, buffers = module_bytes([model.encoder, model.adaptor, model.llm, model.unit_decoder, vocoder])
    row.update(param_bytes=params, buffer_bytes=buffers, weights_gb=(params + buffers) / GB)
    if cuda:
        after_load = cuda_figures(dev)
        row.update(load_peak_allocated_gb=after_load["peak_allocated"] / GB, load_allocated_gb=after_load["allocated"] / GB,
                   load_reserved_gb=after_load["reserved"] / GB)

    row.update(reply(model, vocoder, load_audio(wav), tokens, chunk_units, decode_steps))

    name = precision_name(placement)
    row["precision"] = name
    sizes = sizes_for_model(ResolvedModel(paths.model_dir, paths.speech_encoder, paths.vocoder_dir, None))
    if sizes is not None:
        row["estimate_weight_bytes"] = estimate_gpu_memory(sizes, name, 0, 0) - WORKSPACE_BYTES
        row["estimate_weights_gb"] = row["estimate_weight_bytes"] / GB
        # What `omni chat` checks (a 4096-token chat), and the same formula at this run's KV length.
        row["estimate_gb"] = estimate_gpu_memory(sizes, name) / GB
        row["estimate_this_reply_gb"] = estimate_gpu_memory(sizes, name, row["kv_positions"], row["reply_tokens"]) / GB
    if cuda:
        end = cuda_figures(dev)
        outside = end["used"] - end["reserved"]  # CUDA context, kernels, library handles: not torch's allocator
        peak_device = end["peak_reserved"] + outside
        row.update(peak_allocated_gb=end["peak_allocated"] / GB, peak_reserved_gb=end["peak_reserved"] / GB,
                   outside_allocator_gb=outside / GB, device_used_gb=end["used"] / GB, device_peak_gb=peak_device / GB,
                   device_total_gb=end["total"] / GB, fits_10gb=bool(peak_device <= TARGET_BYTES))
    else:
        row["peak_rss_gb"] = peak_rss_bytes(rss_reset) / GB
    return row


def check_can_run(precision: str, device: str | None) -> None:
    """Fail in a second, before writing gigabytes, on what load_omni would refuse after the writing."""
    placement = resolve_placement(precision, device)
    if placement.quantization and find_spec("bitsandbytes") is None:
        raise ConfigError(f"--precision {placement.quantization} needs bitsandbytes: {QUANT_INSTALL}.")


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Write (or reuse) the checkpoint, measure, and build the JSON row."""
    check_can_run(args.precision, args.device)
    spec = FullSpec.from_preset(args.llm_layers, args.encoder_layers) if args.size == "full" else None
    torch.manual_seed(args.seed)
    with tempfile.TemporaryDirectory(prefix="omni-memory-", ignore_cleanup_errors=True) as tmp:
        root = Path(args.workdir) if args.workdir else Path(tmp)
        paths, write_s = prepare_checkpoint(args.size, root, spec, args.seed)
        figures = measure(paths, args.precision, args.device, args.wav, args.max_new_tokens, args.chunk_units, args.decode_steps)
    dev = resolve_placement(args.precision, args.device).device
    row: dict[str, Any] = {
        "benchmark": "memory", "size": args.size, "precision": figures.pop("precision"),
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "wav": args.wav.name, "chunk_units": args.chunk_units,
        "max_new_tokens": args.max_new_tokens, "decode_steps": args.decode_steps, "write_s": None if write_s is None else round(write_s, 1),
    }
    if spec is not None:
        row.update(llm_layers=spec.omni["num_hidden_layers"], encoder_layers=spec.whisper["encoder_layers"])
    row.update(figures)
    return {k: (round(v, 2) if k.endswith("_gb") else v) for k, v in row.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=("tiny", "full"), default="tiny")
    parser.add_argument("--precision", choices=PRECISIONS, default="auto", help="as `omni chat --precision`")
    parser.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda when visible)")
    parser.add_argument("--workdir", type=Path, default=None, help="keep the written checkpoint here and reuse it")
    parser.add_argument("--wav", type=Path, default=DEFAULT_WAV)
    parser.add_argument("--max-new-tokens", type=int, default=256,
                        help="forced reply length (default: the reference CLI's)")
    parser.add_argument("--chunk-units", type=int, default=10)
    parser.add_argument("--decode-steps", choices=DECODE_MODES, default="eager",
                        help="as `omni chat --decode-steps`: static/compiled add preallocated caches (and CUDA graphs)")
    parser.add_argument("--seed", type=int, default=0)
    # Depth overrides prove the full-width writing and loading on a small machine; omit them to measure.
    parser.add_argument("--llm-layers", type=int, default=None, help="(smoke runs, --size full) LLM depth")
    parser.add_argument("--encoder-layers", type=int, default=None, help="(smoke runs, --size full) Whisper depth")
    args = parser.parse_args()
    if args.size == "tiny" and (args.llm_layers is not None or args.encoder_layers is not None):
        parser.error("--llm-layers and --encoder-layers only apply to --size full")
    try:
        row = run(args)
    except OmniError as exc:
        print(f"error: {one_line(exc)}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
