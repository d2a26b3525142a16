"""The language model half: the reference prompt, speech splicing, and token-by-token generation.

Generation yields every new token together with the last-layer hidden state that produced it,
because that hidden state is what the speech decoder turns into units while text is still
being written.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from transformers import Cache, DynamicCache, LlamaForCausalLM, LlamaModel, PreTrainedTokenizerBase, StaticCache
from transformers.generation.logits_process import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from omni_cli.config import SamplingConfig, StreamingConfig
from omni_cli.model.decode_steps import CompileBackend, CompiledStep, StaticCacheSlot

SPEECH_PLACEHOLDER = "<speech>"
# What a speech turn carries through the chat template instead of "<speech>", so a user who
# types (or a reply that says) "<speech>" gets text, not a speech slot. A private-use
# character never appears in tokenized text: text turns are stripped of it.
_SPEECH_SLOT = "\ue000speech\ue000"
# Marks where speech embeddings go in the token ids; never a real vocabulary id (as in the reference).
SPEECH_TOKEN_INDEX = -200

SYSTEM_MESSAGE = (
    "You are a helpful language and speech assistant. You are able to understand the speech content "
    "that the user provides, and assist the user with a variety of tasks using natural language."
)
SPEECH_INSTRUCTION = "Please directly answer the questions in the user's speech."
SPEECH_PROMPT = f"{SPEECH_PLACEHOLDER}\n{SPEECH_INSTRUCTION}"  # the reference's user message: the speech, then the instruction

# The plain Llama-3 chat format, which is what the reference builds. The released tokenizer
# carries Llama-3.1's template, which adds knowledge-cutoff and date lines to the system turn;
# passing this template keeps our prompt byte-identical to the reference's.
LLAMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
STOP_TOKENS = ("<|eot_id|>", "<|end_of_text|>")
# transformers 5.24 renamed the model's `past_key_values` keyword to `cache`. A keyword the
# model does not know vanishes into **kwargs: no cache, every step would see one token. So
# the name is looked up, not assumed.
_CACHE_KW = "cache" if "cache" in inspect.signature(LlamaModel.forward).parameters else "past_key_values"


@dataclass(frozen=True)
class Turn:
    """One message of the conversation; a `speech` turn holds one spliced utterance where `<speech>` stands."""

    role: str
    content: str
    speech: bool = False

    def rendered(self) -> str:
        """The content as the template sees it: the speech slot marked, stray markers removed."""
        text = self.content.replace(_SPEECH_SLOT[0], "")
        return text.replace(SPEECH_PLACEHOLDER, _SPEECH_SLOT, 1) if self.speech else text


def speech_turn(content: str = SPEECH_PROMPT) -> Turn:
    """A user message holding one spoken question (`content` with one <speech>); by default the reference's."""
    return Turn("user", content, speech=True)


def build_prompt_ids(tokenizer: PreTrainedTokenizerBase, turns: Sequence[Turn], system: str = SYSTEM_MESSAGE) -> list[int]:
    """Render `system` (the reference's system prompt by default) + `turns` through the Llama-3 chat
    template and tokenize around the speech slots.

    Each speech slot becomes one SPEECH_TOKEN_INDEX entry, to be replaced by speech embeddings.
    Tokenization follows the reference (LLaVA's `tokenizer_image_token`): every piece is
    tokenized with the tokenizer's special tokens, the first piece keeps the BOS the tokenizer
    adds, later pieces drop it. The rendered text already starts with `<|begin_of_text|>`, so
    with the released Llama-3 tokenizer the prompt starts with two BOS ids, exactly as the
    released weights were trained and are run by the reference.
    """
    messages = [{"role": "system", "content": Turn("system", system).rendered()}]
    messages += [{"role": t.role, "content": t.rendered()} for t in turns]
    text = tokenizer.apply_chat_template(
        messages, chat_template=LLAMA3_CHAT_TEMPLATE, tokenize=False, add_generation_prompt=True
    )
    pieces = [tokenizer(piece)["input_ids"] for piece in text.split(_SPEECH_SLOT)]
    bos = tokenizer.bos_token_id
    adds_bos = bool(pieces[0]) and bos is not None and pieces[0][0] == bos
    ids: list[int] = [bos] if adds_bos else []
    skip = 1 if adds_bos else 0
    for i, piece in enumerate(pieces):
        if i:
            ids.append(SPEECH_TOKEN_INDEX)
        ids.extend(piece[skip:])
    return ids


def splice_speech(
    embed_tokens: torch.nn.Module, prompt_ids: Sequence[int], speech: Sequence[torch.Tensor]
) -> torch.Tensor:
    """Input embeddings (1, T, H) with each SPEECH_TOKEN_INDEX replaced by one (n_i, H) speech tensor, in order."""
    n_slots = sum(1 for i in prompt_ids if i == SPEECH_TOKEN_INDEX)
    if n_slots != len(speech):
        raise ValueError(f"prompt has {n_slots} <speech> slots but {len(speech)} utterances were given")
    weight = embed_tokens.weight
    ids = torch.tensor(prompt_ids, device=weight.device)
    text_mask = ids != SPEECH_TOKEN_INDEX
    text_embeds = embed_tokens(ids[text_mask])
    pieces: list[torch.Tensor] = []
    slot, start, text_pos = 0, 0, 0
    for pos, token in enumerate(prompt_ids):
        if token != SPEECH_TOKEN_INDEX:
            continue
        n_text = pos - start
        pieces.append(text_embeds[text_pos : text_pos + n_text])
        text_pos += n_text
        pieces.append(speech[slot].to(device=weight.device, dtype=text_embeds.dtype))
        slot += 1
        start = pos + 1
    pieces.append(text_embeds[text_pos:])
    return torch.cat(pieces, dim=0).unsqueeze(0)


@dataclass(frozen=True)
class GeneratedToken:
    """One generated token id and the last-layer hidden state (after the final norm) that produced it."""

    token_id: int
    hidden: torch.Tensor
    is_stop: bool


@dataclass
class GenerationState:
    """What one reply's generation owns: its KV cache and how far it got."""

    cache: Cache | None = None
    tokens: list[int] = field(default_factory=list)


class LlmSteps:
    """How the LLM's one-token decoding steps run: eagerly with a growing cache (default), or
    on a preallocated static KV cache and, optionally, as a `torch.compile`d step.

    The static cache is reset per reply, so one LlmSteps serves one reply at a time; a prompt
    that would not fit falls back to a growing cache (same tokens, just not compiled).
    """

    def __init__(
        self,
        llm: LlamaForCausalLM,
        static_cache: bool = False,
        compile: bool = False,
        capacity: int = StreamingConfig.context_budget,
        compile_backend: CompileBackend = "inductor",
    ) -> None:
        if compile and not static_cache:
            raise ValueError("compiled LLM steps need the static cache (compile=True, static_cache=True)")
        self.llm = llm
        self.slot = StaticCacheSlot(llm.config, capacity) if static_cache else None
        self.compiled = compile
        self._compiled_step = CompiledStep(self._step, compile_backend) if compile else None

    def _step(self, embeds: torch.Tensor, position_ids: torch.Tensor, cache: Cache) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.llm.model(inputs_embeds=embeds, position_ids=position_ids, use_cache=True, **{_CACHE_KW: cache})
        hidden = out.last_hidden_state[0, -1]
        return hidden, self.llm.lm_head(hidden)

    def start(self, state: GenerationState, needed: int) -> None:
        """Give one reply of `needed` positions (prompt + new tokens) its cache."""
        if self.slot is None or needed > self.slot.capacity:
            state.cache = DynamicCache(config=self.llm.config)
        else:
            state.cache = self.slot.borrow(state)

    def prefill(self, embeds: torch.Tensor, state: GenerationState) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the prompt (1, T, H) eagerly; return the last position's hidden state and logits."""
        positions = torch.arange(embeds.shape[1], device=embeds.device)[None]
        return self._step(embeds, positions, self._cache_of(state))

    def step(self, embeds: torch.Tensor, position: int, state: GenerationState) -> tuple[torch.Tensor, torch.Tensor]:
        """One token's embedding (1, 1, H) at `position` → its hidden state and logits."""
        cache = self._cache_of(state)
        positions = torch.tensor([[position]], device=embeds.device)
        if self._compiled_step is not None and isinstance(cache, StaticCache):
            hidden, logits = self._compiled_step(embeds.device, embeds, positions, cache)
            return hidden, logits
        return self._step(embeds, positions, cache)

    def _cache_of(self, state: GenerationState) -> Cache:
        if self.slot is not None and isinstance(state.cache, StaticCache):
            self.slot.check(state)
        return state.cache


def stop_token_ids(tokenizer: PreTrainedTokenizerBase, generation_eos: int | Sequence[int] | None = None) -> set[int]:
    """Ids that end a reply: `<|eot_id|>`, `<|end_of_text|>`, the tokenizer's EOS, and the
    checkpoint's generation_config eos ids (Llama-3.1 adds `<|eom_id|>` there), as the
    reference's `generate` stops on them."""
    ids = {tokenizer.convert_tokens_to_ids(t) for t in STOP_TOKENS}
    ids.discard(tokenizer.unk_token_id)
    ids.discard(None)
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    if generation_eos is not None:
        ids.update([generation_eos] if isinstance(generation_eos, int) else generation_eos)
    return {int(i) for i in ids}


def _sampler(cfg: SamplingConfig) -> LogitsProcessorList:
    warpers = LogitsProcessorList()
    if cfg.temperature > 0:
        warpers.append(TemperatureLogitsWarper(cfg.temperature))
        if cfg.top_k > 0:
            warpers.append(TopKLogitsWarper(cfg.top_k))
        if cfg.top_p < 1.0:
            warpers.append(TopPLogitsWarper(cfg.top_p))
    return warpers


@torch.inference_mode()
def generate(
    llm: LlamaForCausalLM,
    inputs_embeds: torch.Tensor,
    stop_ids: set[int],
    sampling: SamplingConfig = SamplingConfig(),
    should_stop: Callable[[], bool] | None = None,
    steps: LlmSteps | None = None,
) -> Iterator[GeneratedToken]:
    """Yield tokens one at a time with their hidden states, using a KV cache.

    The stop token itself is yielded (flagged `is_stop`): the reference feeds its hidden state
    to the speech decoder too. `should_stop`, if given, is a callable checked before each step
    so a caller (barge-in) can end the reply early. `steps` chooses how decoding steps run
    (eager with a growing cache when None).
    """
    steps = steps or LlmSteps(llm)
    state = GenerationState()
    steps.start(state, int(inputs_embeds.shape[1]) + sampling.max_new_tokens)
    warpers = _sampler(sampling)
    generator = None
    if sampling.temperature > 0 and sampling.seed is not None:
        generator = torch.Generator(device=inputs_embeds.device).manual_seed(sampling.seed)
    position = int(inputs_embeds.shape[1])
    for i in range(sampling.max_new_tokens):
        if should_stop is not None and should_stop():
            return
        if i == 0:
            hidden, logits = steps.prefill(inputs_embeds, state)
        else:
            step_input = llm.model.embed_tokens(torch.tensor([[state.tokens[-1]]], device=inputs_embeds.device))
            hidden, logits = steps.step(step_input, position, state)
            position += 1
        logits = logits.float().unsqueeze(0)
        if sampling.temperature > 0:
            ids_so_far = torch.tensor([state.tokens or [0]], device=logits.device)
            probs = torch.softmax(warpers(ids_so_far, logits), dim=-1)
            token = int(torch.multinomial(probs, 1, generator=generator)[0, 0])
        else:
            token = int(logits.argmax(dim=-1)[0])
        state.tokens.append(token)
        is_stop = token in stop_ids and not sampling.ignore_stop
        yield GeneratedToken(token, hidden, is_stop)
        if is_stop:
            return


# transformers 4.x's `clean_up_tokenization` (which the reference's transformers 4.43 applies when
# the tokenizer config sets `clean_up_tokenization_spaces`, as Llama-3.1's does): applied in this
# order over the whole text. transformers 5 skips it for BPE tokenizers, so we apply it ourselves.
_CLEAN_UPS = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
              (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))
_LONGEST_CLEAN_UP = max(len(before) for before, _ in _CLEAN_UPS)


def clean_up_tokenization(text: str) -> str:
    """The reference's space clean-up: "Hello . How are you ?" → "Hello. How are you?"."""
    for before, after in _CLEAN_UPS:
        text = text.replace(before, after)
    return text


def _unsettled_tail(text: str) -> int:
    """Where the end of `text` could still change under the clean-up once more text follows: the
    earliest space that starts a pattern which is unfinished or reaches past that point."""
    settled = len(text)
    moved = True
    while moved:
        moved = False
        for start in range(max(0, settled - _LONGEST_CLEAN_UP + 1), settled):
            rest = text[start:]
            if text[start] == " " and any(
                before.startswith(rest) or (rest.startswith(before) and start + len(before) > settled)
                for before, _ in _CLEAN_UPS
            ):
                settled, moved = start, True
                break
    return settled


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas that add up to exactly the reply's text.

    Multi-byte characters are not split, and when the checkpoint's tokenizer config asks for
    `clean_up_tokenization_spaces` (Llama-3.1's does) the text is cleaned as the reference's
    transformers cleans it; the few characters that the next token could still change are held
    back until it arrives (or until `finish()`).
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer
        self.clean_up = bool(getattr(tokenizer, "clean_up_tokenization_spaces", False))
        self.ids: list[int] = []
        self.emitted = ""
        self._raw = ""

    def push(self, token_id: int) -> str:
        """Add one id; return the text it settles (possibly empty while a character or a clean-up is unfinished)."""
        self.ids.append(token_id)
        raw = self.tokenizer.decode(self.ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        if raw.endswith("\ufffd"):
            return ""
        self._raw = raw
        return self._emit(clean_up_tokenization(raw[: _unsettled_tail(raw)]) if self.clean_up else raw)

    def finish(self) -> str:
        """The held-back end of the text, once the reply has no more tokens."""
        return self._emit(self.text)

    def _emit(self, settled: str) -> str:
        # The clean-up only ever touches the unsettled tail, so the settled text only grows.
        delta = settled[len(self.emitted) :] if settled.startswith(self.emitted) else ""
        self.emitted += delta
        return delta

    @property
    def text(self) -> str:
        """The whole reply's text so far, cleaned as the reference cleans it."""
        return clean_up_tokenization(self._raw) if self.clean_up else self._raw
