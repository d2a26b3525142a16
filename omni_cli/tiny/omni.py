"""A tiny random LLaMA-Omni checkpoint in exactly the released layout.

Same config keys, same state-dict key names, same file kinds (sharded safetensors with an
index, a Llama-3-style tokenizer, an openai/transformers Whisper, the fairseq vocoder
pickle), only small. Tests and smoke runs load it through the code path users take.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from omni_cli.config import OMNI_MODEL_TYPE, OmniConfig
from omni_cli.model.adaptor import SpeechAdaptor
from omni_cli.model.llm import LLAMA3_CHAT_TEMPLATE, SPEECH_INSTRUCTION, SYSTEM_MESSAGE
from omni_cli.model.unit_decoder import UnitDecoder
from omni_cli.tiny.vocoder import make_tiny_vocoder
from omni_cli.tiny.whisper import make_tiny_whisper
from omni_cli.weights.layout import ADAPTOR_PREFIX, DECODER_PREFIX, write_shards

SPECIAL_TOKENS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
]
_CORPUS = [
    SYSTEM_MESSAGE,
    SPEECH_INSTRUCTION,
    "system user assistant",
    "The capital of France is Paris. Water boils at one hundred degrees.",
    "Hello! How can I help you today? I am a helpful speech assistant.",
    "Here are three tips for staying healthy: eat well, sleep enough, and move every day.",
    "What is the weather like? Tell me a joke. How do I bake bread?",
    "0123456789 ,.;:!?'\"()-",
]


@dataclass(frozen=True)
class TinyModelPaths:
    """Where the parts of a tiny model were written: pass them as --model, --speech-encoder, --vocoder."""

    model_dir: Path
    speech_encoder: Path
    vocoder_dir: Path


def make_tiny_tokenizer(out_dir: Path, vocab_size: int = 384) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE offline with the Llama-3 special tokens and BOS post-processor; save it to `out_dir`."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    # Like the released Llama-3 tokenizer: plain calls add <|begin_of_text|> in front.
    bos = "<|begin_of_text|>"
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = LLAMA3_CHAT_TEMPLATE
    fast.save_pretrained(str(out_dir))
    return fast


def tiny_config_dict(
    vocab_size: int,
    bos_id: int,
    eos_id: int,
    speech_encoder: str,
    encoder_hidden: int,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    decoder_spec: str = "(2,64,4,128)",
) -> dict[str, Any]:
    """A config.json with every key of the released one, at tiny sizes."""
    return {
        "_name_or_path": "tiny-omni",
        "architectures": ["OmniSpeech2SLlamaForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": bos_id,
        "eos_token_id": [eos_id],
        "hidden_act": "silu",
        "hidden_size": hidden,
        "initializer_range": 0.02,
        "intermediate_size": hidden * 2,
        "max_position_embeddings": 131072,
        "mlp_bias": False,
        "model_type": OMNI_MODEL_TYPE,
        "num_attention_heads": heads,
        "num_hidden_layers": layers,
        "num_key_value_heads": kv_heads,
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-05,
        "rope_scaling": {
            "factor": 8.0,
            "high_freq_factor": 4.0,
            "low_freq_factor": 1.0,
            "original_max_position_embeddings": 8192,
            "rope_type": "llama3",
        },
        "rope_theta": 500000.0,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "use_cache": True,
        "vocab_size": vocab_size,
        "speech_encoder": speech_encoder,
        "speech_encoder_type": "whisper",
        "speech_projector_type": "linear",
        "speech_encoder_ds_rate": 5,
        "speech_encoder_hidden_size": encoder_hidden,
        "speech_generator_type": "ctc",
        "ctc_decoder_config": decoder_spec,
        "ctc_upsample_factor": 25,
        "ctc_loss_weight": 1.0,
        "unit_vocab_size": 1000,
        "speech_normalize": False,
        "tune_speech_generator_only": True,
        "freeze_speech_projector": False,
        "speech_projector_lr": None,
    }


def make_tiny_model(root: Path, seed: int = 0, encoder_format: str = "hf") -> TinyModelPaths:
    """Write a complete tiny LLaMA-Omni (checkpoint, Whisper encoder, vocoder) under `root`."""
    root = Path(root)
    model_dir = root / "tiny-omni"
    model_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    encoder_hidden = 32
    if encoder_format == "openai":
        speech_encoder = make_tiny_whisper(root / "tiny-large-v3.pt", fmt="openai", d_model=encoder_hidden, seed=seed)
    else:
        speech_encoder = make_tiny_whisper(root / "tiny-whisper", fmt="hf", d_model=encoder_hidden, seed=seed)
    vocoder_dir = make_tiny_vocoder(root / "tiny-vocoder", seed=seed)

    tokenizer = make_tiny_tokenizer(model_dir)
    raw = tiny_config_dict(
        vocab_size=len(tokenizer),
        bos_id=int(tokenizer.bos_token_id),
        eos_id=int(tokenizer.eos_token_id),
        speech_encoder=str(speech_encoder),
        encoder_hidden=encoder_hidden,
    )
    config = OmniConfig.from_dict(raw)
    config.save(model_dir)
    (model_dir / "generation_config.json").write_text(
        json.dumps({"bos_token_id": raw["bos_token_id"], "eos_token_id": raw["eos_token_id"], "do_sample": False}) + "\n"
    )

    torch.manual_seed(seed)
    llama_config = LlamaConfig(**config.llama_dict())
    llm = LlamaForCausalLM(llama_config)
    # Random init is small; larger logits make greedy replies vary instead of repeating one token.
    with torch.no_grad():
        llm.lm_head.weight.mul_(8.0)
    adaptor = SpeechAdaptor(encoder_hidden, config.hidden_size, config.speech_encoder_ds_rate, inner=48)
    assert config.speech_decoder is not None
    decoder = UnitDecoder(config.speech_decoder, llama_config)
    with torch.no_grad():
        decoder.output_proj.weight.mul_(20.0)

    tensors: dict[str, torch.Tensor] = dict(llm.state_dict())
    tensors.update({ADAPTOR_PREFIX + k: v for k, v in adaptor.state_dict().items()})
    tensors.update({DECODER_PREFIX + k: v for k, v in decoder.state_dict().items()})
    write_shards(tensors, model_dir, count=2)  # sharded with an index, as released
    return TinyModelPaths(model_dir=model_dir, speech_encoder=Path(speech_encoder), vocoder_dir=Path(vocoder_dir))
