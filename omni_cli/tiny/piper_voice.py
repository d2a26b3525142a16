"""A tiny Piper voice in the released format (`NAME.onnx` + `NAME.onnx.json`), for tests and smoke runs without the 114 MB voice.

Same inputs and output as an exported Piper VITS (`input` phoneme ids (1, T) int64, `input_lengths`
(1,), `scales` (3,) [noise, length, noise_w], → `output` (1, 1, samples)) and the same config
fields, so the piper-tts package phonemizes with its bundled espeak-ng and runs it as it runs a real
voice. The "model" is a random table: each phoneme id becomes `hop` samples. Needs the onnx package.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

# Piper's own markers (pad, start, end), a space, punctuation and the IPA symbols espeak-ng writes for English.
PHONEMES = ["_", "^", "$", " ", ",", ".", "?", "!", "ˈ", "ˌ", "ː", *"abdefhijklmnoprstuvwzæçðŋɐɑɒɔəɚɛɜɡɪɬɹɾʃʊʌʒʔθᵻ"]


def make_tiny_piper_voice(out_dir: Path, name: str = "tiny-voice", *, sample_rate: int = 22050, hop: int = 256, seed: int = 0) -> Path:
    """Write `out_dir/name.onnx` and its `.onnx.json`; returns the `.onnx` path."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    table = (0.3 * rng.standard_normal((len(PHONEMES), hop))).astype(np.float32)
    nodes = [
        helper.make_node("Gather", ["table", "input"], ["frames"], axis=0),  # (1, T, hop)
        helper.make_node("Reshape", ["frames", "shape"], ["flat"]),  # (1, 1, T * hop)
        helper.make_node("Gather", ["scales", "length_index"], ["length_scale"], axis=0),
        helper.make_node("Mul", ["flat", "length_scale"], ["output"]),
    ]
    graph = helper.make_graph(
        nodes, "tiny_piper",
        [
            helper.make_tensor_value_info("input", TensorProto.INT64, [1, "phonemes"]),
            helper.make_tensor_value_info("input_lengths", TensorProto.INT64, [1]),
            helper.make_tensor_value_info("scales", TensorProto.FLOAT, [3]),
        ],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 1, "samples"])],
        initializer=[
            numpy_helper.from_array(table, "table"),
            numpy_helper.from_array(np.array([1, 1, -1], dtype=np.int64), "shape"),
            numpy_helper.from_array(np.array([1], dtype=np.int64), "length_index"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="omni-tiny")
    model.ir_version = 8  # readable by every onnxruntime piper-tts supports
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    onnx_path = out_dir / f"{name}.onnx"
    onnx.save(model, str(onnx_path))
    config = {
        "audio": {"sample_rate": sample_rate, "quality": "tiny"},
        "espeak": {"voice": "en-us"},
        "inference": {"noise_scale": 0.667, "length_scale": 1.0, "noise_w": 0.8},
        "phoneme_type": "espeak",
        "phoneme_id_map": {p: [i] for i, p in enumerate(PHONEMES)},
        "num_symbols": len(PHONEMES),
        "num_speakers": 1,
        "speaker_id_map": {},
        "hop_length": hop,
        "piper_version": "1.0.0",
    }
    onnx_path.with_name(onnx_path.name + ".json").write_text(json.dumps(config, ensure_ascii=False), encoding="utf-8")
    return onnx_path
