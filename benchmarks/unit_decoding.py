"""Streaming unit decoding: our KV-cached `UnitStream.step` vs the reference's re-decoding.

The reference re-runs the speech decoder over the whole reply prefix at every LLM step and
emits the units past those already emitted (quadratic in reply length); ours runs only the
new token's frames against a KV cache. Both are timed in one run on the same random
weights and hidden states, their units are compared, and one JSON line is printed.

    python benchmarks/unit_decoding.py                       # tiny-ish sizes, CPU
    python benchmarks/unit_decoding.py --size full --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

import torch
import transformers

from omni_cli.config import SpeechDecoderConfig
from omni_cli.model.unit_decoder import UnitDecoder, collapse_ctc

# (layers, hidden, heads, ffn), LLM hidden size. "full" is the released model's decoder.
SIZES = {
    "tiny": ("(2,128,4,344)", 256),
    "full": ("(2,4096,32,11008)", 4096),
}


def build_decoder(size: str, factor: int, units: int, device: str, dtype: torch.dtype, attn: str) -> UnitDecoder:
    """A randomly initialised decoder of the given size, on `device` in `dtype`."""
    spec, llm_hidden = SIZES[size]
    llm = transformers.LlamaConfig(
        hidden_size=llm_hidden,
        num_attention_heads=32 if llm_hidden % 32 == 0 else 4,
        num_key_value_heads=8 if llm_hidden % 32 == 0 else 4,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        # The released LLM's rope scaling (Llama-3.1).
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        max_position_embeddings=131072,
    )
    cfg = SpeechDecoderConfig.parse(spec, factor, units)
    with torch.device(device):
        decoder = UnitDecoder(cfg, llm, attn_implementation=attn)
    return decoder.to(dtype).eval()


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(device: str, fn: Callable[[], object]) -> tuple[float, object]:
    synchronize(device)
    start = time.perf_counter()
    out = fn()
    synchronize(device)
    return time.perf_counter() - start, out


def incremental(decoder: UnitDecoder, hidden: torch.Tensor) -> tuple[list[int], torch.Tensor, list[float]]:
    """Ours: one `step` per LLM token. Returns units, frame labels, per-step seconds."""
    stream = decoder.start_stream()
    units: list[int] = []
    labels = []
    steps = []
    for h in hidden:
        start = time.perf_counter()
        units += stream.step(h)  # .tolist() inside synchronises
        steps.append(time.perf_counter() - start)
        labels.append(stream.last_labels)
    return units, torch.cat(labels), steps


def reference_way(decoder: UnitDecoder, hidden: torch.Tensor) -> tuple[list[int], torch.Tensor]:
    """The reference: at token t, decode hidden[:t+1] from scratch, emit the units past those emitted."""
    units: list[int] = []
    labels = hidden.new_empty(0, dtype=torch.long)
    for t in range(1, len(hidden) + 1):
        labels = decoder.predict_labels(hidden[:t])
        units += collapse_ctc(labels, decoder.blank_id)[len(units) :]
    return units, labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument("--attn", choices=["sdpa", "eager"], default="sdpa")
    parser.add_argument("--lengths", default="50,100,200", help="reply lengths in LLM tokens")
    parser.add_argument("--upsample-factor", type=int, default=25)
    parser.add_argument("--unit-vocab-size", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", type=int, default=0, help="CPU threads for torch (0: torch's default); 1 is steadier on a busy machine"
    )
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    dtype = getattr(torch, args.dtype)
    torch.manual_seed(args.seed)
    decoder = build_decoder(args.size, args.upsample_factor, args.unit_vocab_size, args.device, dtype, args.attn)
    llm_hidden = decoder.input_proj.in_features

    with torch.inference_mode():
        warm = torch.randn(4, llm_hidden, device=args.device, dtype=dtype)
        incremental(decoder, warm)
        reference_way(decoder, warm)

        results = []
        for n in (int(x) for x in args.lengths.split(",")):
            hidden = torch.randn(n, llm_hidden, device=args.device, dtype=dtype)
            ours_s, (ours_units, ours_labels, step_s) = timed(args.device, lambda: incremental(decoder, hidden))
            ref_s, (ref_units, ref_labels) = timed(args.device, lambda: reference_way(decoder, hidden))
            results.append(
                {
                    "tokens": n,
                    "frames": n * args.upsample_factor,
                    "incremental_s": round(ours_s, 4),
                    "reference_s": round(ref_s, 4),
                    "speedup": round(ref_s / ours_s, 2),
                    "incremental_step_ms_mean": round(1000 * sum(step_s) / n, 3),
                    "incremental_step_ms_max": round(1000 * max(step_s), 3),
                    "units": len(ours_units),
                    "units_agree": ours_units == ref_units,
                    "frame_labels_agree": round(float((ours_labels == ref_labels).float().mean()), 6),
                }
            )

    print(
        json.dumps(
            {
                "benchmark": "unit_decoding",
                "device": torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "cpu",
                "torch_threads": torch.get_num_threads(),
                "dtype": args.dtype,
                "attn": args.attn,
                "size": args.size,
                "decoder": SIZES[args.size][0],
                "llm_hidden": llm_hidden,
                "upsample_factor": args.upsample_factor,
                "unit_vocab_size": args.unit_vocab_size,
                "results": results,
            }
        )
    )


if __name__ == "__main__":
    main()
