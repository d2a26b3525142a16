"""End of speech → first audio, broken down by component, against the reference's algorithm.

For one question WAV the script times, in one run on the same weights:
- ours: features, encoder, adaptor, prefill, LLM steps until the first chunk, KV-cached unit
  decoding, streaming vocoder; then the whole reply (total time, real-time factor);
- the reference's way: the speech decoder re-run over the whole prefix at every token, every
  chunk vocoded on its own, the same 30 s padded input.
It prints one JSON line per chunk size (Ω). Sizes: `tiny` (CPU, CI-sized) and `full` (the
released architecture sizes with random weights: Whisper-large-v3 encoder, Llama-3.1-8B,
(2,4096,32,11008) decoder, the LJ vocoder) for a CUDA GPU.

    python benchmarks/latency.py                                   # tiny, CPU
    python benchmarks/latency.py --size full --device cuda --chunk-units 10 40
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from omni_cli.audio.io import load_audio
from omni_cli.model.features import CHUNK_SAMPLES, log_mel_spectrogram
from omni_cli.config import DECODE_MODES, SamplingConfig
from omni_cli.model.llm import LlmSteps, build_prompt_ids, generate, speech_turn, splice_speech
from omni_cli.model.loading import OmniModel, Placement, load_omni
from omni_cli.model.unit_decoder import UnitSteps, collapse_ctc
from omni_cli.model.vocoder import UnitVocoder, VocoderStream
from omni_cli.model.vocoder_loading import load_vocoder

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_WAV = ROOT / "tests" / "data" / "helpful_base_1.wav"


class Clock:
    """Wall time that waits for the GPU, so each figure is the component's own."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def time(self, fn: Callable[[], object]) -> tuple[object, float]:
        start = self.now()
        out = fn()
        return out, self.now() - start


def build_full(device: torch.device, dtype: torch.dtype, llm_layers: int = 32, encoder_layers: int = 32) -> tuple[OmniModel, UnitVocoder]:
    """The released architecture at full size with random weights, built directly on the device.

    `llm_layers`/`encoder_layers` below 32 keep every width but cut the depth: a smoke run of the
    full-size code path on a machine without the memory for all of it.
    """
    from transformers import LlamaConfig, LlamaForCausalLM, WhisperConfig

    from omni_cli.config import OmniConfig, VocoderConfig
    from omni_cli.model.adaptor import SpeechAdaptor
    from omni_cli.model.encoder import SpeechEncoder
    from omni_cli.model.unit_decoder import UnitDecoder
    from omni_cli.tiny.omni import make_tiny_tokenizer, tiny_config_dict

    tmp = Path(tempfile.mkdtemp())
    tokenizer = make_tiny_tokenizer(tmp)
    raw = tiny_config_dict(len(tokenizer), int(tokenizer.bos_token_id), int(tokenizer.eos_token_id), "", 1280,
                           hidden=4096, layers=llm_layers, heads=32, kv_heads=8, decoder_spec="(2,4096,32,11008)")
    raw.update(vocab_size=128256, intermediate_size=14336)
    config = OmniConfig.from_dict(raw)
    llama = LlamaConfig(**config.llama_dict())
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            llm = LlamaForCausalLM(llama).eval()
            encoder = SpeechEncoder(WhisperConfig(num_mel_bins=128, d_model=1280, encoder_layers=encoder_layers, encoder_attention_heads=20,
                                                  encoder_ffn_dim=5120, max_source_positions=1500)).eval()
            adaptor = SpeechAdaptor(1280, 4096, 5, 2048).eval()
            decoder = UnitDecoder(config.speech_decoder, llama).eval()
    finally:
        torch.set_default_dtype(previous)
    # The vocoder runs in fp32 whatever the LLM's precision, as in the product.
    with torch.device(device):
        vocoder = UnitVocoder(VocoderConfig.from_dict({
                "upsample_rates": [5, 4, 4, 2, 2], "upsample_kernel_sizes": [11, 8, 8, 4, 4],
                "upsample_initial_channel": 512, "resblock_kernel_sizes": [3, 7, 11],
                "resblock_dilation_sizes": [[1, 3, 5]] * 3, "num_embeddings": 1000, "embedding_dim": 128,
                "model_in_dim": 128, "dur_predictor_params": {"encoder_embed_dim": 128, "var_pred_hidden_dim": 128,
                                                              "var_pred_kernel_size": 3, "var_pred_dropout": 0.5}}))
    model = OmniModel(config, tokenizer, encoder, adaptor, llm, decoder, Placement(device, dtype, None))
    return model, vocoder


def build_tiny(device: torch.device) -> tuple[OmniModel, UnitVocoder]:
    """The tiny random model in the released file formats, loaded the way users load it."""
    from omni_cli.tiny.omni import make_tiny_model

    paths = make_tiny_model(Path(tempfile.mkdtemp()))
    model = load_omni(paths.model_dir, paths.speech_encoder, precision="fp32", device=str(device))
    return model, load_vocoder(paths.vocoder_dir, device=device)


def measure(model: OmniModel, vocoder: UnitVocoder, audio: np.ndarray, chunk: int, tokens: int, clock: Clock,
            steps: tuple[LlmSteps, UnitSteps] | None = None, temperature: float = 0.0, units_per_token: float = 0.0) -> dict:
    """Time one reply our way and the reference's way on the same inputs."""
    dev, dtype = model.device, model.placement.dtype
    out: dict = {}
    with torch.inference_mode():
        mel, out["features_ms"] = clock.time(lambda: log_mel_spectrogram(audio, model.encoder.n_mels, CHUNK_SAMPLES, device=dev))
        frames, out["encoder_ms"] = clock.time(lambda: model.encoder(mel.unsqueeze(0).to(dtype)))
        speech, out["adaptor_ms"] = clock.time(lambda: model.adaptor(frames)[0])
        ids = build_prompt_ids(model.tokenizer, [speech_turn()])
        embeds = splice_speech(model.llm.get_input_embeddings(), ids, [speech])
        # What the 30 s padding costs: the encoder on the question's own length and the prefill of
        # the shorter prompt it gives. Not what omni runs: unpadded outputs differ from padded ones
        # (the released model was trained on padded input), so this only prices the idea.
        short_mel = log_mel_spectrogram(audio, model.encoder.n_mels, None, device=dev)
        short_frames, out["unpadded_encoder_ms"] = clock.time(lambda: model.encoder(short_mel.unsqueeze(0).to(dtype)))
        short = splice_speech(model.llm.get_input_embeddings(), ids, [model.adaptor(short_frames)[0]])
        _, out["unpadded_prefill_ms"] = clock.time(lambda: model.llm.model(inputs_embeds=short))
        _, padded_prefill = clock.time(lambda: model.llm.model(inputs_embeds=embeds))
        out["speech_positions"], out["unpadded_speech_positions"] = int(speech.shape[0]), int(short.shape[1] - embeds.shape[1] + speech.shape[0])
        out["padded_prefill_ms"] = padded_prefill

    sampling = SamplingConfig(max_new_tokens=tokens, ignore_stop=True, temperature=temperature, seed=0)
    llm_steps, unit_steps = steps or (None, None)
    stream = model.unit_decoder.start_stream(unit_steps)
    voc = VocoderStream(vocoder)
    llm_s = unit_s = voc_s = 0.0
    first_chunk_at = None
    llm_steps_first = 0
    pending: list[int] = []
    ours_units: list[int] = []
    hiddens = []
    audio_out = 0
    t0 = clock.now()
    gen = generate(model.llm, embeds, set(), sampling, steps=llm_steps)
    prefill_ms = None
    while True:
        s = clock.now()
        tok = next(gen, None)
        step = clock.now() - s
        if tok is None:
            break
        if prefill_ms is None:
            prefill_ms = step
        else:
            llm_s += step
        hiddens.append(tok.hidden)
        new, dt = clock.time(lambda: stream.step(tok.hidden))
        unit_s += dt
        pending.extend(new)
        ours_units.extend(new)
        if len(pending) >= chunk:
            wav, dt = clock.time(lambda: voc.push(pending))
            voc_s += dt
            audio_out += len(wav)
            pending = []
            if first_chunk_at is None:
                first_chunk_at = clock.now() - t0
                llm_steps_first = len(hiddens)
    tail, dt = clock.time(lambda: np.concatenate([voc.push(pending) if pending else np.zeros(0, np.float32), voc.flush()]))
    voc_s += dt
    audio_out += len(tail)
    total = clock.now() - t0
    front = out["features_ms"] + out["encoder_ms"] + out["adaptor_ms"]
    out.update(prefill_ms=prefill_ms, llm_step_ms=llm_s / max(len(hiddens) - 1, 1),
               unit_step_ms=unit_s / len(hiddens), vocoder_chunk_ms=voc_s / max(1, -(-len(ours_units) // chunk)),
               llm_steps_until_first_chunk=llm_steps_first,
               first_audio_ms=None if first_chunk_at is None else front + first_chunk_at,
               reply_s=front + total, audio_s=audio_out / vocoder.config.sampling_rate)
    out["rtf"] = out["reply_s"] / out["audio_s"] if out["audio_s"] else None
    # The target's measure: what unit decoding + vocoding add per token, over one LLM step.
    out["speech_per_token_over_llm_step"] = (unit_s + voc_s) / len(hiddens) / max(out["llm_step_ms"], 1e-9)
    # Random weights give about one unit per token (a token's 25 identical frames mostly share
    # one label), trained weights several, so the measured first chunk waits for far more LLM
    # steps than it would with the released model. The projection puts the measured per-step
    # costs together at an assumed rate; the first token gives at most one unit (its frames are
    # identical inputs to a causal decoder).
    if units_per_token:
        k = 1 + math.ceil((chunk - 1) / units_per_token)
        out.update(projected_units_per_token=units_per_token, projected_llm_steps_until_first_chunk=k,
                   first_audio_projected_ms=front + prefill_ms + (k - 1) * out["llm_step_ms"]
                   + k * out["unit_step_ms"] + out["vocoder_chunk_ms"])

    # The reference: re-decode the whole prefix at every token; vocode each chunk on its own.
    h = torch.stack(hiddens)
    emitted: list[int] = []
    ref_unit_s = ref_voc_s = 0.0
    ref_first = None
    ref_pending = 0
    with torch.inference_mode():
        for n in range(1, len(hiddens) + 1):
            labels, dt = clock.time(lambda: model.unit_decoder.predict_labels(h[:n]))
            ref_unit_s += dt
            units = collapse_ctc(labels, model.unit_decoder.blank_id)
            ref_pending += len(units) - len(emitted)
            if ref_pending >= chunk:
                _, dt = clock.time(lambda: vocoder.synthesize(units[-ref_pending:]))
                ref_voc_s += dt
                if ref_first is None:
                    # Same LLM time as ours up to this token, plus the reference's decoder and vocoder time so far.
                    ref_first = front + prefill_ms + llm_s * (n - 1) / max(len(hiddens) - 1, 1) + ref_unit_s + dt
                ref_pending = 0
            emitted = units
    assert emitted == ours_units, "re-decoding and streaming gave different units"
    out["units"] = len(ours_units)
    out["units_sha1"] = hashlib.sha1(json.dumps(ours_units).encode()).hexdigest()[:12]  # compares runs and modes
    out.update(ref_unit_decoding_ms=ref_unit_s, ours_unit_decoding_ms=unit_s, ref_first_audio_ms=ref_first,
               unit_decoding_speedup=ref_unit_s / unit_s if unit_s else None)
    if ref_first and out["first_audio_ms"]:
        out["first_audio_ratio_ref_over_ours"] = ref_first / out["first_audio_ms"]
    def shown(key: str, value: object) -> object:
        if not isinstance(value, float):
            return value
        return round(value * 1000, 2) if key.endswith("_ms") else round(value, 3)

    return {k: shown(k, v) for k, v in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=("tiny", "full"), default="tiny")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), default=None)
    parser.add_argument("--wav", type=Path, default=DEFAULT_WAV)
    parser.add_argument("--chunk-units", type=int, nargs="+", default=[10, 40])
    parser.add_argument("--max-new-tokens", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--decode-steps", nargs="+", choices=DECODE_MODES, default=["eager"],
                        help="per-token step modes of the LLM and speech decoder to time side by side "
                        "(compiled: static caches + torch.compile)")
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="sample the reply: random full-size weights tend to repeat one token greedily, which "
                        "gives the speech decoder the same hidden state over and over and few units")
    parser.add_argument("--units-per-token", type=float, default=0.0,
                        help="also report first audio projected from the measured step costs at this many units per "
                        "token (trained weights give several, random weights about one); 0 = off")
    parser.add_argument("--llm-layers", type=int, default=32, help="full size only: fewer layers for a smoke run")
    parser.add_argument("--encoder-layers", type=int, default=32, help="full size only: fewer layers for a smoke run")
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.float16 if device.type == "cuda" else torch.float32)
    torch.manual_seed(0)
    if args.size == "full":
        model, vocoder = build_full(device, dtype, args.llm_layers, args.encoder_layers)
    else:
        model, vocoder = build_tiny(device)
    clock = Clock(device)
    audio = load_audio(args.wav)
    for mode in args.decode_steps:
        static, compiled = mode != "eager", mode == "compiled"
        steps = (LlmSteps(model.llm, static_cache=static, compile=compiled),
                 UnitSteps(model.unit_decoder, static_cache=static, compile=compiled, capacity_tokens=args.max_new_tokens))
        compile_s = None
        for i in range(max(args.warmup, 1 if mode == "compiled" else 0)):
            (_, seconds) = clock.time(lambda: measure(model, vocoder, audio, args.chunk_units[0], 8, clock, steps))
            compile_s = seconds if i == 0 and mode == "compiled" else compile_s
        for chunk in args.chunk_units:
            row = {"benchmark": "latency", "size": args.size,
                   "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
                   "dtype": str(dtype).removeprefix("torch."), "decode_steps": mode, "chunk_units": chunk,
                   "tokens": args.max_new_tokens, "temperature": args.temperature, "wav": args.wav.name}
            if args.size == "full" and (args.llm_layers, args.encoder_layers) != (32, 32):
                row.update(llm_layers=args.llm_layers, encoder_layers=args.encoder_layers)
            if compile_s is not None:
                # The first 8-token warm-up reply, compiling included: an upper bound on the compile time.
                row["compile_warmup_s"] = round(compile_s, 1)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            row.update(measure(model, vocoder, audio, chunk, args.max_new_tokens, clock, steps, args.temperature, args.units_per_token))
            if device.type == "cuda":
                row["gpu_peak_gb"] = round(torch.cuda.max_memory_allocated(device) / 1e9, 2)  # this row's peak, decimal GB
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
