"""The CTC speech decoder (`speech_generator` in the checkpoint): LLM hidden states → units.

Each hidden state of a generated token is repeated `upsample_factor` times, projected, run
through a few causal Llama decoder layers and classified per frame into units + blank; the
frame labels are CTC-collapsed into discrete units for the vocoder.

Three ways in, one set of weights:
- `UnitDecoder.forward` / `predict_units`: the reference's offline computation over a whole
  reply (batched, right-padded), used for training and as the ground truth.
- `UnitDecoder.start_stream()` → `UnitStream.step(h_t)`: one reply decoded token by token.
  Because attention is causal and upsampling is per token, running only the new frames
  against a KV cache gives the same frames as re-running the prefix (the reference does the
  latter at every step, which is quadratic).
- `UnitDecoder.ctc_loss`: the reference's training loss.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import LlamaConfig
from transformers.cache_utils import Cache, DynamicCache, StaticCache
from transformers.masking_utils import create_causal_mask
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

from omni_cli.config import OmniConfig, SamplingConfig, SpeechDecoderConfig
from omni_cli.errors import ConfigError
from omni_cli.model.decode_steps import CompileBackend, CompiledStep, StaticCacheSlot

# Padding value of target unit sequences, as in the reference's data collator.
IGNORE_INDEX = -100

ATTENTION_IMPLEMENTATIONS = ("sdpa", "eager")


def _keyword_names(fn: Any) -> frozenset[str]:
    return frozenset(inspect.signature(fn).parameters)


# transformers 5.x renamed some keywords between minor releases (past_key_values → cache,
# input_embeds → inputs_embeds, cache_position dropped). A keyword a function does not know
# would vanish silently into **kwargs (e.g. the cache, giving wrong results), so we look
# the names up once instead of guessing.
_MASK_KEYWORDS = _keyword_names(create_causal_mask)
_LAYER_KEYWORDS = _keyword_names(LlamaDecoderLayer.forward)
_MASK_CACHE_KW = "cache" if "cache" in _MASK_KEYWORDS else "past_key_values"
_MASK_EMBEDS_KW = "inputs_embeds" if "inputs_embeds" in _MASK_KEYWORDS else "input_embeds"
_LAYER_CACHE_KW = "cache" if "cache" in _LAYER_KEYWORDS else "past_key_values"


def collapse_ctc(labels: Sequence[int] | Tensor, blank: int) -> list[int]:
    """CTC-collapse a whole label sequence: merge repeats, then drop blanks."""
    return CtcCollapser(blank).push(labels)


class CtcCollapser:
    """CTC collapse over a sequence that arrives in pieces.

    Carries the label of the last frame seen, so a unit that continues across a push is not
    emitted twice: pushing pieces gives exactly the collapse of their concatenation. Every
    unit is emitted at its first frame, so nothing is ever held back.
    """

    def __init__(self, blank: int) -> None:
        self.blank = blank
        self.previous: int | None = None

    def push(self, labels: Sequence[int] | Tensor) -> list[int]:
        """Collapse the next frame labels; return the units they start."""
        frames = torch.as_tensor(labels, dtype=torch.long).detach().reshape(-1).cpu()
        if frames.numel() == 0:
            return []
        before = torch.empty_like(frames)
        before[0] = -1 if self.previous is None else self.previous
        before[1:] = frames[:-1]
        keep = (frames != before) & (frames != self.blank)
        self.previous = int(frames[-1])
        return frames[keep].tolist()


class UnitDecoder(nn.Module):
    """The reference CTC speech decoder: input_proj → Llama decoder layers → output_proj.

    Built from the LLM's Llama config (rope settings, rms_norm_eps) with the sizes of
    `ctc_decoder_config`, so the released `speech_generator.*` weights load unchanged.
    """

    def __init__(
        self,
        cfg: SpeechDecoderConfig,
        llm_config: LlamaConfig,
        attn_implementation: str = "sdpa",
    ) -> None:
        super().__init__()
        if attn_implementation not in ATTENTION_IMPLEMENTATIONS:
            raise ConfigError(
                f"attention implementation {attn_implementation!r} is not one of {ATTENTION_IMPLEMENTATIONS}."
            )
        self.cfg = cfg
        self.config = self._layer_config(cfg, llm_config, attn_implementation)
        self.input_proj = nn.Linear(llm_config.hidden_size, cfg.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(self.config, i) for i in range(cfg.num_layers))
        self.output_proj = nn.Linear(cfg.hidden_size, cfg.unit_vocab_size + 1)
        # Kept outside the module tree on purpose: no state_dict keys, and `.to(bfloat16)`
        # cannot round the rotary frequencies (at position 25·256 a bf16 frequency is off
        # by radians). It is rebuilt on the device of first use (also after a meta-device init).
        self._rotary = (LlamaRotaryEmbedding(self.config),)

    @staticmethod
    def _layer_config(cfg: SpeechDecoderConfig, llm_config: LlamaConfig, attn_implementation: str) -> LlamaConfig:
        """The LLM's config with the decoder's sizes, as the reference builds it."""
        config = copy.deepcopy(llm_config)
        config.hidden_size = cfg.hidden_size
        config.num_hidden_layers = cfg.num_layers
        config.num_attention_heads = cfg.num_heads
        config.num_key_value_heads = cfg.num_heads
        config.intermediate_size = cfg.intermediate_size
        # The LLM's head_dim would survive the copy otherwise; the reference derives it.
        config.head_dim = cfg.hidden_size // cfg.num_heads
        config._attn_implementation = attn_implementation
        return config

    @classmethod
    def from_omni_config(cls, omni: OmniConfig, attn_implementation: str = "sdpa") -> UnitDecoder:
        """Build the decoder a LLaMA-Omni config.json describes (random weights)."""
        if omni.speech_decoder is None:
            raise ConfigError(
                "this checkpoint has no speech decoder (no speech_generator_type); "
                "use a speech-to-speech LLaMA-Omni model."
            )
        return cls(omni.speech_decoder, LlamaConfig(**omni.llama_dict()), attn_implementation)

    @property
    def blank_id(self) -> int:
        """The CTC blank label (= unit_vocab_size)."""
        return self.cfg.blank_id

    def _rotary_embeddings(self, frames: Tensor, position_ids: Tensor) -> tuple[Tensor, Tensor]:
        rotary = self._rotary[0]
        if rotary.inv_freq.device != frames.device:
            # Recomputed, not moved: a meta tensor cannot be moved. Outside inference mode so
            # the float32 frequencies stay usable for training as well.
            with torch.inference_mode(False), torch.device(frames.device):
                rotary = LlamaRotaryEmbedding(self.config)
            self._rotary = (rotary,)
        return rotary(frames, position_ids)

    def _run_layers(
        self,
        frames: Tensor,
        position_ids: Tensor,
        cache: Cache | None,
    ) -> Tensor:
        """input_proj → layers → output_proj over upsampled frames (B, T, H_llm) → logits."""
        states = self.input_proj(frames)
        mask_kwargs: dict[str, Any] = {
            _MASK_EMBEDS_KW: states,
            "attention_mask": None,
            _MASK_CACHE_KW: cache,
            "position_ids": position_ids,
        }
        cache_position = position_ids[0]
        if "cache_position" in _MASK_KEYWORDS:
            mask_kwargs["cache_position"] = cache_position
        attention_mask = create_causal_mask(config=self.config, **mask_kwargs)
        position_embeddings = self._rotary_embeddings(states, position_ids)
        layer_kwargs: dict[str, Any] = {_LAYER_CACHE_KW: cache}
        if "cache_position" in _LAYER_KEYWORDS:
            layer_kwargs["cache_position"] = cache_position
        for layer in self.layers:
            out = layer(
                states,
                attention_mask=attention_mask,
                position_ids=position_ids,
                use_cache=cache is not None,
                position_embeddings=position_embeddings,
                **layer_kwargs,
            )
            states = out[0] if isinstance(out, tuple) else out  # older layers return tuples
        return self.output_proj(states)

    def upsample(
        self,
        hidden: Tensor,
        lengths: Tensor | None = None,
        target_lengths: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Repeat each hidden state into frames (the reference's uniform assignment).

        Sample b gets up_b = max(lengths_b · factor, target_lengths_b) frames; frame j copies
        hidden state floor(j · lengths_b / up_b). Returns right-padded frames (B, T, H) with
        zeros in the padding, the frame mask (B, T) (True = real frame) and position ids
        0..T-1 (B, T).
        """
        batch, steps, _ = hidden.shape
        device = hidden.device
        src = torch.full((batch,), steps, device=device) if lengths is None else lengths.to(device, torch.long)
        if bool((src < 1).any()) or bool((src > steps).any()):
            raise ValueError(f"lengths must lie in 1..{steps}, got {src.tolist()}")
        up = src * self.cfg.upsample_factor
        if target_lengths is not None:
            up = torch.maximum(up, target_lengths.to(device, torch.long))
        total = int(up.max())
        frame_index = torch.arange(total, device=device)
        frame_mask = frame_index[None, :] < up[:, None]
        source_index = (frame_index[None, :] * src[:, None]) // up[:, None]
        source_index = source_index.masked_fill(~frame_mask, 0)
        frames = torch.gather(hidden, 1, source_index[..., None].expand(batch, total, hidden.shape[-1]))
        frames = frames.masked_fill(~frame_mask[..., None], 0)
        position_ids = frame_index[None, :].expand(batch, total)
        return frames, frame_mask, position_ids

    def _frame_logits(
        self,
        hidden: Tensor,
        lengths: Tensor | None,
        target_lengths: Tensor | None,
    ) -> tuple[Tensor, Tensor]:
        frames, frame_mask, position_ids = self.upsample(hidden, lengths, target_lengths)
        # No padding mask needed: padding is on the right and attention is causal, so real
        # frames never see it (a test proves per-sample equality); SDPA keeps its causal kernel.
        return self._run_layers(frames, position_ids, cache=None), frame_mask

    def forward(
        self,
        hidden: Tensor,
        lengths: Tensor | None = None,
        target_lengths: Tensor | None = None,
    ) -> Tensor:
        """Per-frame CTC logits (B, T, V+1) for right-padded hidden states (B, N, H_llm).

        `lengths` (B,) are the real numbers of hidden states (all N when None); frames past a
        sample's length are padding and their logits are meaningless.
        """
        return self._frame_logits(hidden, lengths, target_lengths)[0]

    @torch.inference_mode()
    def predict_labels(self, hidden: Tensor) -> Tensor:
        """Per-frame argmax labels (N · factor,) of one whole reply (N, H_llm), as the reference."""
        logits = self(hidden[None].to(self.input_proj.weight))
        return F.log_softmax(logits.float(), dim=-1).argmax(dim=-1)[0]

    def predict_units(self, hidden: Tensor) -> list[int]:
        """Units of one whole reply (N, H_llm): the reference's offline decoding."""
        return collapse_ctc(self.predict_labels(hidden), self.blank_id)

    def ctc_loss(
        self,
        hidden: Tensor,
        lengths: Tensor | None,
        targets: Tensor,
        target_lengths: Tensor | None = None,
        normaliser: Tensor | None = None,
    ) -> Tensor:
        """The reference training loss: summed CTC over the batch / total target length.

        `targets` (B, L) hold unit ids right-padded with -100 (or anything, when
        `target_lengths` gives the lengths). Frames are max(N·factor, target length) long.
        `normaliser` replaces the batch's own total target length (gradient accumulation
        divides every micro-batch by the whole batch's).
        """
        if target_lengths is None:
            target_lengths = targets.ne(IGNORE_INDEX).long().sum(dim=-1)
        target_lengths = target_lengths.to(targets.device, torch.long)
        logits, frame_mask = self._frame_logits(hidden, lengths, target_lengths)
        log_probs = F.log_softmax(logits.float(), dim=-1, dtype=torch.float32)
        target_mask = torch.arange(targets.shape[1], device=targets.device)[None, :] < target_lengths[:, None]
        loss = F.ctc_loss(
            log_probs.transpose(0, 1),
            targets.masked_select(target_mask),
            frame_mask.long().sum(dim=-1),
            target_lengths,
            blank=self.blank_id,
            reduction="sum",
            zero_infinity=True,
        )
        if normaliser is not None:
            return loss / normaliser
        # clamp: an all-empty batch gives 0 instead of the reference's division by zero.
        return loss / target_lengths.sum().clamp(min=1)

    def start_stream(self, steps: UnitSteps | None = None) -> UnitStream:
        """A fresh incremental decoding state for one reply (`steps`: how its steps run)."""
        return UnitStream(self, steps)


class UnitSteps:
    """How the speech decoder's per-token steps run: eagerly with a growing cache (default), or
    on a preallocated static cache of `capacity_tokens` tokens' frames and, optionally, as a
    `torch.compile`d step (see decode_steps). One reply at a time."""

    def __init__(
        self,
        decoder: UnitDecoder,
        static_cache: bool = False,
        compile: bool = False,
        capacity_tokens: int = SamplingConfig.max_new_tokens,
        compile_backend: CompileBackend = "inductor",
    ) -> None:
        if compile and not static_cache:
            raise ValueError("compiled speech-decoder steps need the static cache (compile=True, static_cache=True)")
        self.decoder = decoder
        capacity = capacity_tokens * decoder.cfg.upsample_factor
        self.slot = StaticCacheSlot(decoder.config, capacity) if static_cache else None
        self.compiled = compile
        self._compiled_run = CompiledStep(self._run, compile_backend) if compile else None

    def _run(self, frames: Tensor, position_ids: Tensor, cache: Cache) -> tuple[Tensor]:
        return (self.decoder._run_layers(frames, position_ids, cache),)

    def new_cache(self, holder: object) -> Cache:
        """A cache for one reply, held by `holder` (its UnitStream)."""
        if self.slot is None:
            return DynamicCache(config=self.decoder.config)
        return self.slot.borrow(holder)

    def run(self, frames: Tensor, start: int, cache: Cache, holder: object) -> Tensor:
        """Frames (1, n, H_llm) at positions start.. against `cache` → per-frame logits."""
        end = start + frames.shape[1]
        position_ids = torch.arange(start, end, device=frames.device)[None]
        if isinstance(cache, StaticCache) and self.slot is not None:
            self.slot.check(holder)
            if end > self.slot.capacity:
                raise RuntimeError(
                    f"the reply outgrew the speech decoder's static cache ({self.slot.capacity} frames); "
                    "raise its capacity (max new tokens) or use eager steps"
                )
            # The first step fills the empty cache eagerly (as the LLM's prefill does), so the
            # compiled step only ever sees an initialised cache: one graph for every later step.
            if self._compiled_run is not None and start > 0:
                return self._compiled_run(frames.device, frames, position_ids, cache)[0]
        return self._run(frames, position_ids, cache)[0]


class UnitStream:
    """Incremental decoding of ONE reply: KV cache, next frame position and CTC carry.

    `step(h_t)` runs only the new token's frames through the layers against the cache and
    returns the units they start; the concatenation of all steps equals
    `UnitDecoder.predict_units` on the whole reply.
    """

    def __init__(self, decoder: UnitDecoder, steps: UnitSteps | None = None) -> None:
        self.decoder = decoder
        self.steps = steps or UnitSteps(decoder)
        self.cache = self.steps.new_cache(self)
        self.position = 0
        self.collapser = CtcCollapser(decoder.blank_id)
        self.last_labels: Tensor | None = None  # per-frame argmax of the latest step

    @torch.inference_mode()
    def step(self, hidden: Tensor) -> list[int]:
        """Decode the next token(s): hidden (H_llm,) or (k, H_llm) → new units."""
        decoder = self.decoder
        weight = decoder.input_proj.weight
        hidden = hidden.to(device=weight.device, dtype=weight.dtype).reshape(-1, hidden.shape[-1])
        if hidden.shape[0] == 0:
            return []
        frames = hidden.repeat_interleave(decoder.cfg.upsample_factor, dim=0)[None]
        count = frames.shape[1]
        logits = self.steps.run(frames, self.position, self.cache, self)
        self.position += count
        labels = F.log_softmax(logits[0].float(), dim=-1).argmax(dim=-1)
        self.last_labels = labels
        return self.collapser.push(labels)
