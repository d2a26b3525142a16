"""Speech in, text and speech out, streamed: the one contract chat, the CLI, benchmarks and tests consume.

`SpeechToSpeech.respond(audio, history)` yields events as they happen: text deltas as tokens
are generated, units as the speech decoder emits them, audio chunks as soon as enough units
are pending, and a final Done. Every event carries a `time.monotonic()` stamp so latency is
measured where it happens, and the stage timings of the work that produced it (`StageTimings`
on Done: features, encoder, adaptor, prefill, and each LLM, speech decoder and vocoder step).
`History` holds the finished turns a conversation passes back, within the context budget.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import torch

from omni_cli.config import ReplyOptions, SamplingConfig, StreamingConfig
from omni_cli.errors import ConfigError, OmniError
from omni_cli.model.adaptor import SpeechAdaptor
from omni_cli.model.features import CHUNK_SAMPLES, HOP_LENGTH, log_mel_spectrogram, split_into_windows
from omni_cli.model.llm import (
    SPEECH_PLACEHOLDER,
    SYSTEM_MESSAGE,
    GeneratedToken,
    IncrementalDetokenizer,
    LlmSteps,
    Turn,
    build_prompt_ids,
    generate,
    speech_turn,
    splice_speech,
    stop_token_ids,
)
from omni_cli.model.loading import OmniModel, load_omni, resolve_placement
from omni_cli.model.unit_decoder import UnitSteps, UnitStream
from omni_cli.model.vocoder import UnitVocoder, VocoderStream
from omni_cli.model.vocoder_loading import load_vocoder
from omni_cli.weights.model_files import ModelFiles

T = TypeVar("T")


@dataclass
class StageTimings:
    """Where one reply's time went, in milliseconds (time.perf_counter); filled as the reply runs, complete on Done.

    On a GPU, work is queued and the CPU runs ahead: unless the pipeline was made with
    `sync_timings=True` (benchmarks), a stage's queued work is counted where the CPU next waits
    for a result (each token's sampling, each audio chunk's copy to the CPU), not in the stage itself.
    """

    features_ms: float = 0.0  # log-mel of every 30 s window; 0 for typed text
    encoder_ms: float = 0.0
    adaptor_ms: float = 0.0
    prefill_ms: float = 0.0  # the whole prompt through the LLM, and the first token
    llm_steps_ms: list[float] = field(default_factory=list)  # each later token
    decoder_steps_ms: list[float] = field(default_factory=list)  # the speech decoder, each token
    vocoder_ms: list[float] = field(default_factory=list)  # each audio chunk rendered


class StageClock:
    """Times calls with time.perf_counter; with `synchronize` on CUDA, waits for queued GPU work before each reading.

    Synchronizing costs the GPU its run-ahead, so replies only pay for it when asked.
    """

    def __init__(self, device: torch.device, synchronize: bool = False) -> None:
        self.device = device
        self.synchronize = synchronize and device.type == "cuda"

    def now(self) -> float:
        if self.synchronize:
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def timed(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> tuple[T, float]:
        """`fn(*args, **kwargs)` and the milliseconds it took."""
        start = self.now()
        out = fn(*args, **kwargs)
        return out, (self.now() - start) * 1000


@dataclass(frozen=True)
class TextDelta:
    """New reply text, as soon as its token is generated."""

    text: str
    t: float
    llm_ms: float | None = None  # the LLM step (the prefill for the first token) that completed this text
    tokens: int = 0  # LLM tokens generated so far, this one included


@dataclass(frozen=True)
class Units:
    """Speech units newly emitted by the speech decoder (CTC-collapsed)."""

    units: list[int]
    t: float
    decoder_ms: float | None = None  # the speech decoder step that emitted them
    tokens: int = 0  # LLM tokens generated so far


@dataclass(frozen=True)
class AudioChunk:
    """16 kHz float32 audio for the units pushed since the previous chunk."""

    audio: np.ndarray
    t: float
    index: int
    sample_rate: int
    vocoder_ms: float | None = None  # rendering this chunk
    tokens: int = 0  # LLM tokens generated when it was rendered


@dataclass(frozen=True)
class Done:
    """End of the reply: the whole text, all units, why it stopped, and where the time went."""

    text: str
    units: list[int]
    t: float
    tokens: int
    stopped: str  # "eos", "budget" or "interrupted"
    # This turn's speech embeddings on the CPU (None for typed text), for the caller's history.
    user_speech: torch.Tensor | None = None
    timings: StageTimings = field(default_factory=StageTimings)
    prompt_positions: int = 0  # the prompt's length in LLM positions (speech frames included)


Event = TextDelta | Units | AudioChunk | Done

# Static-cache room beyond StreamingConfig.context_budget, which does not count the system
# prompt and the chat template (about 60 tokens with Llama-3's tokenizer).
PROMPT_MARGIN = 256


def text_positions(text: str) -> int:
    """Rough prompt positions a typed text costs: characters / 3, plus its turn's template tokens."""
    return len(text) // 3 + 16


# What a spoken question's turn costs beside its speech frames (the template and the default instruction).
SPEECH_TURN_POSITIONS = 32


class QuestionTooLong(OmniError):
    """A question that cannot fit the context budget with room for its reply; raised before any model work."""

    def __init__(self, positions: int, fits: int, reply_tokens: int, budget: int) -> None:
        super().__init__(
            f"the question is about {positions} prompt positions long, but {max(fits, 0)} fit beside a "
            f"{reply_tokens}-token reply in the context budget of {budget}; shorten the question (or its "
            "system prompt), ask for a shorter reply, or raise --context-budget."
        )
        self.positions = positions
        self.fits = fits


@dataclass
class HistoryTurn:
    """One finished exchange kept for multi-turn memory: the user's speech embeddings or text, and the reply."""

    user_speech: torch.Tensor | None
    user_text: str | None
    reply: str

    def positions(self) -> int:
        """Rough prompt positions this turn costs (speech frames + text characters / 3)."""
        speech = 0 if self.user_speech is None else int(self.user_speech.shape[0])
        return speech + text_positions((self.user_text or "") + self.reply)


class History:
    """Finished turns, oldest first, for multi-turn memory.

    `budget` (prompt positions) bounds what is kept: turns that could never fit a prompt again
    are dropped as new ones arrive, so a long session does not keep growing (speech embeddings
    are the bulk). None keeps every turn. The pipeline picks, for each prompt, the newest turns
    that fit what is left of its budget once the new question and the reply have room.
    """

    def __init__(self, turns: Iterable[HistoryTurn] = (), budget: int | None = None) -> None:
        self.budget = budget
        self.turns: list[HistoryTurn] = []
        for turn in turns:
            self.append(turn)

    def append(self, turn: HistoryTurn) -> None:
        """Keep a finished turn, dropping the oldest ones beyond the budget."""
        self.turns.append(turn)
        if self.budget is not None:
            self.turns = self.newest_within(self.budget)

    def copy(self) -> History:
        """The same turns in a list of its own: a reply built on another thread reads the copy while this one changes."""
        twin = History(budget=self.budget)
        twin.turns = list(self.turns)
        return twin

    def newest_within(self, positions: int) -> list[HistoryTurn]:
        """The newest turns whose positions add up to at most `positions`, oldest first."""
        kept: list[HistoryTurn] = []
        for turn in reversed(self.turns):
            positions -= turn.positions()
            if positions < 0:
                break
            kept.append(turn)
        return kept[::-1]

    def __iter__(self) -> Iterator[HistoryTurn]:
        return iter(self.turns)

    def __len__(self) -> int:
        return len(self.turns)


@dataclass
class ReplyState:
    """Streaming state owned by one reply: decoder cache and CTC carry, vocoder context, pending units, timings."""

    detok: IncrementalDetokenizer
    unit_stream: UnitStream | None
    vocoder_stream: VocoderStream | None
    timings: StageTimings
    pending: list[int] = field(default_factory=list)
    units: list[int] = field(default_factory=list)
    tokens: int = 0
    chunks: int = 0


class SpeechToSpeech:
    """The streaming speech-to-speech pipeline over a loaded model and (optionally) a vocoder."""

    def __init__(
        self, model: OmniModel, vocoder: UnitVocoder | None = None, streaming: StreamingConfig | None = None, sync_timings: bool = False
    ) -> None:
        """`sync_timings`: make each stage timing its own on a GPU by synchronizing around it (benchmarks; slows replies)."""
        self.model = model
        self.vocoder = vocoder
        self.streaming = streaming or StreamingConfig()
        self.clock = StageClock(model.device, synchronize=sync_timings)
        generation_config = getattr(model.llm, "generation_config", None)
        self.stop_ids = stop_token_ids(model.tokenizer, getattr(generation_config, "eos_token_id", None))
        self._make_steps(self.streaming.decode_steps)
        decoder = model.unit_decoder
        if vocoder is not None and decoder is not None and decoder.cfg.unit_vocab_size > vocoder.config.num_embeddings:
            raise ConfigError(
                f"the speech decoder emits {decoder.cfg.unit_vocab_size} kinds of units but the vocoder knows "
                f"{vocoder.config.num_embeddings}; pass the vocoder that belongs to this model."
            )

    @property
    def sample_rate(self) -> int | None:
        """The rate of the reply audio (the vocoder's); None when replies are text only."""
        return None if self.vocoder is None else int(self.vocoder.config.sampling_rate)

    @property
    def chunk_units(self) -> int:
        """Units per audio chunk after the first (Ω): what the player must bridge between chunks."""
        return self.streaming.chunk_units

    @property
    def context_budget(self) -> int:
        """Prompt positions earlier turns, the question and the reply may take together (StreamingConfig.context_budget)."""
        return self.streaming.context_budget

    @classmethod
    def load(
        cls, files: ModelFiles, precision: str = "auto", device: str | None = None, streaming: StreamingConfig | None = None
    ) -> SpeechToSpeech:
        """Load the model (and its vocoder, when `files` has one) and wrap them in the streaming pipeline."""
        placement = resolve_placement(precision, device)
        # The vocoder is small: loaded first, so a wrong --vocoder fails before the LLM loads. In
        # fp32 whatever the LLM's precision: in half precision the predicted durations round
        # differently, changing the audio's length.
        vocoder = None
        if files.vocoder_dir is not None:
            vocoder = load_vocoder(files.vocoder_dir, dtype=torch.float32, device=placement.device, config=files.vocoder_config)
        return cls(load_omni(files, precision=precision, device=device), vocoder, streaming)

    def _make_steps(self, mode: str) -> None:
        static, compiled = mode != "eager", mode == "compiled"
        # The context budget does not count the system prompt and the chat template's tokens.
        capacity = self.context_budget + PROMPT_MARGIN
        self.llm_steps = LlmSteps(self.model.llm, static_cache=static, compile=compiled, capacity=capacity)
        decoder = self.model.unit_decoder
        # The speech decoder only runs when there is a vocoder to speak with.
        self.unit_steps = None if decoder is None or self.vocoder is None else UnitSteps(
            decoder, static_cache=static, compile=compiled, capacity_tokens=self.streaming.sampling.max_new_tokens
        )

    def warm_up(self) -> str | None:
        """Run a few decoding steps so one-off work (torch.compile) happens now, not in the first reply.

        If compiling fails (no compiler, unsupported quantization), the pipeline goes on with
        uncompiled static-cache steps and the reason is returned for the caller to show.
        """
        m = self.model
        with torch.inference_mode():
            ids = build_prompt_ids(m.tokenizer, [Turn("user", "Hello.")])
            embeds = splice_speech(m.llm.get_input_embeddings(), ids, [])
        try:
            # Prefill, then steps that compile and replay (CUDA graph capture) — the LLM's and the speech decoder's.
            stream = None if self.unit_steps is None else self.unit_steps.decoder.start_stream(self.unit_steps)
            for tok in generate(m.llm, embeds, set(), SamplingConfig(max_new_tokens=4, ignore_stop=True), steps=self.llm_steps):
                if stream is not None:
                    stream.step(tok.hidden)
        except Exception as exc:  # noqa: BLE001 - any compiler failure means: run uncompiled
            if not self.llm_steps.compiled:
                raise
            self._make_steps("static")
            with contextlib.suppress(Exception):
                torch.compiler.reset()  # drop dynamo's caches (and what they hold) from the failed attempt
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
            reason = (str(exc).strip().splitlines() or [""])[0][:160]
            detail = f": {reason}" if reason else ""
            return f"compiling the decoding steps failed ({type(exc).__name__}{detail}); running them uncompiled."
        return None

    @torch.inference_mode()
    def encode_speech(self, audio: np.ndarray, timings: StageTimings | None = None) -> torch.Tensor:
        """16 kHz mono audio → speech embeddings (n, llm_hidden); the stages' times are added to `timings`.

        Like the reference, each 30 s window is padded to 30 s before the encoder; speech
        longer than 30 s is encoded window by window and the embeddings concatenated, so
        nothing is dropped.
        """
        m = self.model
        timings = timings or StageTimings()
        timed = self.clock.timed
        outs = []
        for window in split_into_windows(np.asarray(audio, dtype=np.float32), CHUNK_SAMPLES):
            mel, ms = timed(log_mel_spectrogram, window, n_mels=m.encoder.n_mels, pad_to=CHUNK_SAMPLES, device=m.device)
            timings.features_ms += ms
            frames, ms = timed(m.encoder, mel.unsqueeze(0).to(dtype=m.placement.dtype))
            timings.encoder_ms += ms
            speech, ms = timed(m.adaptor, frames)
            timings.adaptor_ms += ms
            outs.append(speech[0])
        return torch.cat(outs, dim=0)

    def question_positions(self, audio: np.ndarray | str, options: ReplyOptions | None = None) -> int:
        """Rough prompt positions a question takes (its text or speech frames, its instruction and a
        system prompt of its own), counted without running the model: cheap enough for any thread."""
        options = options or ReplyOptions()
        # The reference's system prompt is within PROMPT_MARGIN; one of the request's own is not.
        system = 0 if options.system is None else text_positions(options.system)
        if isinstance(audio, str):
            return system + text_positions(audio)
        # Every 30 s window is padded to 30 s before the encoder: each gives the same number of frames.
        per_window = SpeechAdaptor.output_length(CHUNK_SAMPLES // HOP_LENGTH, self.model.adaptor.downsample)
        windows = len(split_into_windows(np.asarray(audio), CHUNK_SAMPLES))
        instruction = 0 if options.speech_instruction is None else len(options.speech_instruction) // 3
        return system + windows * per_window + SPEECH_TURN_POSITIONS + instruction

    def check_question(self, audio: np.ndarray | str, options: ReplyOptions | None = None) -> int:
        """The question's prompt positions (`question_positions`); QuestionTooLong when it cannot fit
        the context budget with room for the reply's tokens.

        `prompt_embeds` checks every question before any model work; a front door may call it
        sooner (before queueing for the model) to refuse at once.
        """
        options = options or ReplyOptions()
        positions = self.question_positions(audio, options)
        reply_tokens = self._sampling(options).max_new_tokens
        fits = self.context_budget - reply_tokens
        if positions > fits:
            # Without this, the prompt's prefill grows with its square and nothing can stop it midway.
            raise QuestionTooLong(positions, fits, reply_tokens, self.context_budget)
        return positions

    def _turns(self, history: History, user: Turn, user_cost: int, max_new_tokens: int) -> tuple[list[Turn], list[torch.Tensor]]:
        # Room is kept for the question and the reply itself.
        room = self.context_budget - user_cost - max_new_tokens
        turns: list[Turn] = []
        speech: list[torch.Tensor] = []
        for h in history.newest_within(room):
            if h.user_speech is not None:
                turns.append(speech_turn())
                speech.append(h.user_speech)
            else:
                turns.append(Turn("user", h.user_text or ""))
            turns.append(Turn("assistant", h.reply))
        turns.append(user)
        return turns, speech

    def prompt_embeds(
        self,
        audio: np.ndarray | str,
        history: History | Sequence[HistoryTurn] = (),
        timings: StageTimings | None = None,
        options: ReplyOptions | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One user turn's prompt as LLM input embeddings, and the turn's own speech embeddings (None for text).

        The prompt holds the newest earlier turns of `history` that fit the context budget; the
        speech stages' times are added to `timings`; `options` may change the system prompt and
        the instruction sent with speech. A question that cannot fit the budget with room for the
        reply raises QuestionTooLong before anything runs.
        """
        m = self.model
        options = options or ReplyOptions()
        cost = self.check_question(audio, options)
        if not isinstance(history, History):
            history = History(history)
        reply_room = self._sampling(options).max_new_tokens
        with torch.inference_mode():
            if isinstance(audio, str):
                speech_now = None
                turns, speech = self._turns(history, Turn("user", audio), cost, reply_room)
            else:
                speech_now = self.encode_speech(audio, timings)
                question = speech_turn() if options.speech_instruction is None else speech_turn(f"{SPEECH_PLACEHOLDER}\n{options.speech_instruction}")
                turns, speech = self._turns(history, question, cost, reply_room)
                speech.append(speech_now)
            system = SYSTEM_MESSAGE if options.system is None else options.system
            prompt_ids = build_prompt_ids(m.tokenizer, turns, system)
            return splice_speech(m.llm.get_input_embeddings(), prompt_ids, speech), speech_now

    def respond(
        self,
        audio: np.ndarray | str,
        history: History | Sequence[HistoryTurn] = (),
        should_stop: Callable[[], bool] | None = None,
        options: ReplyOptions | None = None,
    ) -> Iterator[Event]:
        """Answer one user turn (16 kHz audio, or typed text) and stream the reply as events.

        The prompt holds the newest earlier turns of `history` that fit the context budget. The
        final Done event carries this turn's speech embeddings (None for text) so the caller can
        keep them in its history, and the reply's stage timings. `options` changes this reply's
        system prompt, sampling or speaking (the pipeline's settings otherwise).
        """
        options = options or ReplyOptions()
        room = self.streaming.sampling.max_new_tokens
        if options.speak and self.unit_steps is not None and self.unit_steps.slot is not None and self._sampling(options).max_new_tokens > room:
            # The speech decoder's static cache holds that many tokens' frames.
            raise ValueError(f"a spoken reply here is at most {room} tokens (the pipeline's max_new_tokens)")
        timings = StageTimings()
        embeds, speech_now = self.prompt_embeds(audio, history, timings, options)
        # Kept by callers for multi-turn history: on the CPU, so a long session does not fill the GPU.
        user_speech = None if speech_now is None else speech_now.detach().cpu()
        yield from self._stream(embeds, should_stop, user_speech, timings, options)

    def _sampling(self, options: ReplyOptions) -> SamplingConfig:
        return options.sampling or self.streaming.sampling

    def _stream(
        self,
        embeds: torch.Tensor,
        should_stop: Callable[[], bool] | None,
        user_speech: torch.Tensor | None,
        timings: StageTimings,
        options: ReplyOptions,
    ) -> Iterator[Event]:
        m = self.model
        speaking = options.speak and self.vocoder is not None and m.unit_decoder is not None
        state = ReplyState(
            detok=IncrementalDetokenizer(m.tokenizer),
            unit_stream=m.unit_decoder.start_stream(self.unit_steps) if speaking else None,
            vocoder_stream=self._vocoder_stream() if speaking else None,
            timings=timings,
        )
        stopped = "budget"
        tokens = generate(m.llm, embeds, self.stop_ids, self._sampling(options), should_stop, steps=self.llm_steps)
        while True:
            tok, llm_ms = self.clock.timed(next, tokens, None)
            if tok is None:  # the token budget is spent, or should_stop() ended generation before a step
                if should_stop is not None and should_stop():
                    stopped = "interrupted"
                break
            if state.tokens == 0:
                timings.prefill_ms = llm_ms
            else:
                timings.llm_steps_ms.append(llm_ms)
            state.tokens += 1
            yield from self._token_events(state, tok, llm_ms)
            if tok.is_stop:
                stopped = "eos"
                break
            if should_stop is not None and should_stop():
                stopped = "interrupted"
                break
        tail = state.detok.finish()  # text the clean-up held back until the reply ended
        if tail:
            yield TextDelta(tail, time.monotonic(), tokens=state.tokens)
        if state.vocoder_stream is not None and stopped != "interrupted":
            # The vocoder stream holds back the tail of each chunk to re-render it against the
            # next units; at the end of the reply that tail comes out with the last units.
            last = self._render(state, final=True)
            if last.audio.size:
                yield last
        prompt_positions = int(embeds.shape[1])
        yield Done(state.detok.text, state.units, time.monotonic(), state.tokens, stopped, user_speech, timings, prompt_positions)

    def _token_events(self, state: ReplyState, tok: GeneratedToken, llm_ms: float) -> Iterator[Event]:
        """One generated token's events: its text, the units its hidden state gives, and a chunk of audio once enough are pending."""
        if not tok.is_stop:
            delta = state.detok.push(tok.token_id)
            if delta:
                yield TextDelta(delta, time.monotonic(), llm_ms, state.tokens)
        if state.unit_stream is None:
            return
        new, decoder_ms = self.clock.timed(state.unit_stream.step, tok.hidden)
        state.timings.decoder_steps_ms.append(decoder_ms)
        if new:
            state.pending.extend(new)
            state.units.extend(new)
            yield Units(list(new), time.monotonic(), decoder_ms, state.tokens)
        cfg = self.streaming
        threshold = cfg.chunk_units if state.chunks else (cfg.first_chunk_units or cfg.chunk_units)
        if len(state.pending) >= threshold:
            yield self._render(state)

    def _vocoder_stream(self) -> VocoderStream:
        assert self.vocoder is not None
        if self.streaming.context_units is None:
            return VocoderStream(self.vocoder)
        return VocoderStream(self.vocoder, context_units=self.streaming.context_units)

    def _render(self, state: ReplyState, final: bool = False) -> AudioChunk:
        assert self.vocoder is not None
        audio, ms = self.clock.timed(self._vocode, state, final)
        state.timings.vocoder_ms.append(ms)
        state.pending = []
        chunk = AudioChunk(audio, time.monotonic(), state.chunks, self.vocoder.config.sampling_rate, ms, state.tokens)
        state.chunks += 1
        return chunk

    @staticmethod
    def _vocode(state: ReplyState, final: bool) -> np.ndarray:
        assert state.vocoder_stream is not None
        parts = [state.vocoder_stream.push(state.pending)] if state.pending else []
        if final:
            parts.append(state.vocoder_stream.flush())
        return np.asarray(np.concatenate(parts) if parts else np.zeros(0, dtype=np.float32), dtype=np.float32)
