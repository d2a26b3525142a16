"""End of speech → first audio, broken down by stage, against the reference's algorithm.

For one question WAV the script times, in one run on the same weights:
- ours: `SpeechToSpeech.respond()` itself, the code `omni chat` and `transcribe-and-reply` run,
  with synchronized stage timings read from its events (features, encoder, adaptor, prefill,
  each LLM, speech decoder and vocoder step); first audio, the whole reply, real-time factor;
- the reference's way, the one deliberate second path: the same reply's hidden states (the
  same prompt, seed and steps) through the speech decoder re-run over the whole prefix at every
  token, every chunk vocoded on its own;
- what the 30 s padding costs: the encoder and the prefill on the question's own length.
It prints one JSON line per step mode and chunk size (Ω). Sizes: `tiny` (CPU, CI-sized) and
`full` (the released architecture sizes with random weights: Whisper-large-v3 encoder,
Llama-3.1-8B, (2,4096,32,11008) decoder, the LJ vocoder) for a CUDA GPU.

    python benchmarks/latency.py                                   # tiny, CPU
    python benchmarks/latency.py --size full --device cuda --chunk-units 10 40
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from omni_cli.audio.io import load_audio
from omni_cli.config import DECODE_MODES, SamplingConfig, StreamingConfig
from omni_cli.model.features import log_mel_spectrogram
from omni_cli.model.llm import build_prompt_ids, generate, speech_turn, splice_speech
from omni_cli.model.loading import OmniModel, Placement, load_omni
from omni_cli.model.unit_decoder import collapse_ctc
from omni_cli.model.vocoder import UnitVocoder
from omni_cli.model.vocoder_loading import load_vocoder
from omni_cli.pipeline import AudioChunk, Done, SpeechToSpeech

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_WAV = ROOT / "tests" / "data" / "helpful_base_1.wav"


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


def padding_price(pipeline: SpeechToSpeech, audio: np.ndarray) -> dict:
    """The encoder and the prefill on the question's own length next to the 30 s padded input omni feeds.

    Not what omni runs: unpadded outputs differ from padded ones (the released model was
    trained on padded input), so this only prices the idea.
    """
    model, timed = pipeline.model, pipeline.clock.timed
    out: dict = {}
    with torch.inference_mode():
        padded, speech = pipeline.prompt_embeds(audio)
        assert speech is not None
        short_mel = log_mel_spectrogram(audio, model.encoder.n_mels, None, device=model.device)
        short_frames, out["unpadded_encoder_ms"] = timed(model.encoder, short_mel.unsqueeze(0).to(model.placement.dtype))
        ids = build_prompt_ids(model.tokenizer, [speech_turn()])
        short = splice_speech(model.llm.get_input_embeddings(), ids, [model.adaptor(short_frames)[0]])
        _, out["unpadded_prefill_ms"] = timed(model.llm.model, inputs_embeds=short)
        _, out["padded_prefill_ms"] = timed(model.llm.model, inputs_embeds=padded)
    out["speech_positions"] = int(speech.shape[0])
    out["unpadded_speech_positions"] = int(short.shape[1] - padded.shape[1] + speech.shape[0])
    return out


def ours(pipeline: SpeechToSpeech, audio: np.ndarray, units_per_token: float = 0.0) -> tuple[dict, Done, list[AudioChunk]]:
    """One reply through `respond()`: first audio and whole reply as the events arrive, and its stage timings."""
    pipeline.clock.now()  # queued GPU work (the last reply's) is not counted in this one
    start = time.monotonic()  # the clock events are stamped with
    chunks: list[AudioChunk] = []
    for event in pipeline.respond(audio):
        if isinstance(event, AudioChunk):
            chunks.append(event)
    assert isinstance(event, Done) and chunks, "the reply produced no audio"
    done, t = event, event.timings
    chunk = pipeline.streaming.chunk_units
    out: dict = {"features_ms": t.features_ms, "encoder_ms": t.encoder_ms, "adaptor_ms": t.adaptor_ms, "prefill_ms": t.prefill_ms,
                 "llm_step_ms": float(np.mean(t.llm_steps_ms or [0.0])), "unit_step_ms": float(np.mean(t.decoder_steps_ms)),
                 "vocoder_chunk_ms": float(np.mean(t.vocoder_ms)), "llm_steps_until_first_chunk": chunks[0].tokens,
                 "first_audio_ms": (chunks[0].t - start) * 1000, "reply_s": done.t - start,
                 "audio_s": sum(c.audio.size for c in chunks) / chunks[0].sample_rate}
    out["rtf"] = out["reply_s"] / out["audio_s"] if out["audio_s"] else None
    # The target's measure: what unit decoding + vocoding add per token, over one LLM step.
    out["speech_per_token_over_llm_step"] = (sum(t.decoder_steps_ms) + sum(t.vocoder_ms)) / done.tokens / max(out["llm_step_ms"], 1e-9)
    # Random weights give about one unit per token (a token's 25 identical frames mostly share
    # one label), trained weights several, so the measured first chunk waits for far more LLM
    # steps than it would with the released model. The projection puts the measured per-step
    # costs together at an assumed rate; the first token gives at most one unit (its frames are
    # identical inputs to a causal decoder).
    if units_per_token:
        k = 1 + math.ceil((chunk - 1) / units_per_token)
        front = t.features_ms + t.encoder_ms + t.adaptor_ms
        out.update(projected_units_per_token=units_per_token, projected_llm_steps_until_first_chunk=k,
                   first_audio_projected_ms=front + t.prefill_ms + (k - 1) * out["llm_step_ms"]
                   + k * out["unit_step_ms"] + out["vocoder_chunk_ms"])
    return out, done, chunks


def reference(pipeline: SpeechToSpeech, audio: np.ndarray, done: Done, first_chunk: AudioChunk, first_audio_ms: float) -> dict:
    """The reference's algorithm on the same reply: re-decode the whole prefix at every token; vocode each chunk on its own."""
    model, timed, vocoder = pipeline.model, pipeline.clock.timed, pipeline.vocoder
    assert vocoder is not None and model.unit_decoder is not None
    chunk = pipeline.streaming.chunk_units
    with torch.inference_mode():
        # The same hidden states as ours: the same prompt, seeded sampling and decoding steps.
        embeds, _ = pipeline.prompt_embeds(audio)
        tokens = generate(model.llm, embeds, pipeline.stop_ids, pipeline.streaming.sampling, steps=pipeline.llm_steps)
        h = torch.stack([tok.hidden for tok in tokens])
        emitted: list[int] = []
        unit_ms = first_speech_ms = 0.0
        pending = 0
        for n in range(1, h.shape[0] + 1):
            labels, ms = timed(model.unit_decoder.predict_labels, h[:n])
            unit_ms += ms
            units = collapse_ctc(labels, model.unit_decoder.blank_id)
            pending += len(units) - len(emitted)
            if pending >= chunk:
                _, ms = timed(vocoder.synthesize, units[-pending:])
                if not first_speech_ms:
                    first_speech_ms = unit_ms + ms
                pending = 0
            emitted = units
        if pending:  # the rest, vocoded at the end of the reply
            _, ms = timed(vocoder.synthesize, emitted[-pending:])
            first_speech_ms = first_speech_ms or unit_ms + ms
    assert emitted == done.units, "re-decoding and streaming gave different units"
    # Same units, so the first chunk comes at the same token: the same path to it as ours
    # (prompt, prefill, LLM steps), with our speech decoder and vocoder time swapped for the reference's.
    t = done.timings
    ours_first_speech_ms = sum(t.decoder_steps_ms[: first_chunk.tokens]) + t.vocoder_ms[0]
    ref_first = first_audio_ms - ours_first_speech_ms + first_speech_ms
    ours_unit_ms = sum(t.decoder_steps_ms)
    return {"units": len(done.units), "units_sha1": hashlib.sha1(json.dumps(done.units).encode()).hexdigest()[:12],  # compares runs and modes
            "ref_unit_decoding_ms": unit_ms, "ours_unit_decoding_ms": ours_unit_ms, "ref_first_audio_ms": ref_first,
            "unit_decoding_speedup": unit_ms / ours_unit_ms if ours_unit_ms else None,
            "first_audio_ratio_ref_over_ours": ref_first / first_audio_ms}


def measure(pipeline: SpeechToSpeech, audio: np.ndarray, chunk: int, tokens: int, units_per_token: float = 0.0) -> dict:
    """One reply of `tokens` tokens at Ω = `chunk` (set on the pipeline), ours and the reference's way, and the padding's price."""
    pipeline.streaming = dataclasses.replace(pipeline.streaming, chunk_units=chunk,
                                             sampling=dataclasses.replace(pipeline.streaming.sampling, max_new_tokens=tokens))
    padding = padding_price(pipeline, audio)
    row, done, chunks = ours(pipeline, audio, units_per_token)
    out = {**row, **padding, **reference(pipeline, audio, done, chunks[0], row["first_audio_ms"])}
    return {k: round(v, 2 if k.endswith("_ms") else 3) if isinstance(v, float) else v for k, v in out.items()}


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
    audio = load_audio(args.wav)
    for mode in args.decode_steps:
        sampling = SamplingConfig(max_new_tokens=args.max_new_tokens, ignore_stop=True, temperature=args.temperature, seed=0)
        pipeline = SpeechToSpeech(model, vocoder, StreamingConfig(sampling=sampling, decode_steps=mode), sync_timings=True)
        compile_s = None
        if mode == "compiled":
            # What `omni chat --decode-steps compiled` pays once at start: compiling the steps (and capturing CUDA graphs).
            start = time.perf_counter()
            problem = pipeline.warm_up()
            compile_s = time.perf_counter() - start
            if problem:
                raise SystemExit(f"latency.py: {problem}")
        for _ in range(args.warmup):
            measure(pipeline, audio, args.chunk_units[0], 8)
        for chunk in args.chunk_units:
            row = {"benchmark": "latency", "size": args.size,
                   "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
                   "dtype": str(dtype).removeprefix("torch."), "decode_steps": mode, "chunk_units": chunk,
                   "tokens": args.max_new_tokens, "temperature": args.temperature, "wav": args.wav.name}
            if args.size == "full" and (args.llm_layers, args.encoder_layers) != (32, 32):
                row.update(llm_layers=args.llm_layers, encoder_layers=args.encoder_layers)
            if compile_s is not None:
                row["compile_warmup_s"] = round(compile_s, 1)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            row.update(measure(pipeline, audio, chunk, args.max_new_tokens, args.units_per_token))
            if device.type == "cuda":
                row["gpu_peak_gb"] = round(torch.cuda.max_memory_allocated(device) / 1e9, 2)  # this row's peak, decimal GB
            print(json.dumps(row), flush=True)

if __name__ == "__main__":
    main()
