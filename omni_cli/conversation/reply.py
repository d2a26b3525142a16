"""One reply in progress: what it has produced, how it ended, and what of it was heard.

"What was heard is what the history keeps": a reply cut short while its audio played is
remembered only as far as its speech was heard. Each audio chunk says how many LLM tokens had
been generated when it was rendered (its units come from those tokens' hidden states), so
heard seconds map to tokens (interpolated inside the chunk being played) and tokens to the text
streamed by then.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from omni_cli.audio.io import SAMPLE_RATE
from omni_cli.conversation.events import ReplyEnd
from omni_cli.pipeline import AudioChunk, Done, Event, TextDelta

def milliseconds_since(start: float, end: float | None) -> float | None:
    """`end - start` in milliseconds, rounded; None when `end` never happened."""
    return None if end is None else round((end - start) * 1000, 1)


# The pipeline's own word for how generation ended → the reply's end (its "interrupted" is ours:
# the cut says why).
PIPELINE_ENDS: dict[str, ReplyEnd] = {"eos": "completed", "budget": "budget"}


@dataclass
class ReplyProgress:
    """What one reply has produced so far, and how it ended; owned by the conversation's thread.

    `cancel_requested` is the one field another thread writes (cancel()).
    """

    turn: int
    speech_end_t: float  # timings are measured from here (see UserTurn)
    spoken: bool = False  # its audio goes to a sink: what was heard is measured in audio
    text: str = ""  # all the text: Done's once it came
    streamed: str = ""  # the text deltas so far
    text_marks: list[tuple[int, int]] = field(default_factory=list)  # (tokens, len(streamed)) after each delta
    units: int = 0
    tokens: int = 0
    chunks: list[np.ndarray] = field(default_factory=list)
    chunk_samples: list[int] = field(default_factory=list)  # kept when the chunks are let go
    chunk_tokens: list[int] = field(default_factory=list)  # tokens generated when each chunk was rendered
    audio_rate: int = SAMPLE_RATE
    first_text_t: float | None = None
    voiced_end_stream_t: float | None = None  # see UserTurn
    audio_end_stream_t: float = 0.0
    played: bool = False  # some of its audio was handed to the sink
    playback_t: float | None = None  # when its first audio was handed to the sink
    first_audio_t: float | None = None  # the first reply sample out of the sink
    heard_seconds: float | None = None  # how much was played, when it did not play to its end
    heard_cap: float | None = None  # truncate(): the client heard no more than this
    generation_end: str = ""  # the pipeline's Done.stopped
    cut: ReplyEnd | None = None  # "interrupted" (speech) or "cancelled" (cancel/stop): playback and generation stopped
    cancel_requested: bool = False
    barge_in_t: float | None = None
    withdrawn_at: float | None = None  # stream time of the speech that went on with the question
    error: str | None = None
    speculative: bool = False
    heard_quietly: bool = False  # half-duplex: the mic was listened to, not for barge-in
    user_speech: Any = None  # the turn's speech embeddings from Done, kept in the history

    @property
    def audio_seconds(self) -> float:
        return sum(c.size for c in self.chunks) / self.audio_rate

    @property
    def end(self) -> ReplyEnd:
        """Why it stopped, as ReplyDone says it."""
        if self.error is not None:
            return "error"
        if self.cut is not None:
            return self.cut
        # A Done that said "interrupted" without a cut here, or no Done at all: cut from outside.
        return PIPELINE_ENDS.get(self.generation_end, "cancelled")

    def count(self, event: Event) -> None:
        """Keep the token count up to date from any event (Done may never come)."""
        self.tokens = max(self.tokens, getattr(event, "tokens", 0))

    def add_text(self, delta: TextDelta, now: float) -> None:
        """A text delta, shown `now` (a speculative reply's text waited for the end of the turn)."""
        if self.first_text_t is None:
            self.first_text_t = max(delta.t, now)
        self.streamed += delta.text
        self.text = self.streamed
        self.text_marks.append((max(delta.tokens, self.tokens), len(self.streamed)))

    def add_chunk(self, chunk: AudioChunk) -> None:
        self.audio_rate = chunk.sample_rate
        self.chunks.append(chunk.audio)
        self.chunk_samples.append(chunk.audio.size)
        self.chunk_tokens.append(max(chunk.tokens, self.tokens))

    def take_done(self, done: Done) -> None:
        """The pipeline's last word: the whole text and how generation ended."""
        self.text, self.units, self.tokens, self.generation_end = done.text, len(done.units), done.tokens, done.stopped
        self.user_speech = done.user_speech

    def tokens_heard(self, seconds: float) -> int:
        """How many tokens' speech lies within the first `seconds` of the reply's audio."""
        start, tokens_before = 0.0, 0
        for samples, tokens in zip(self.chunk_samples, self.chunk_tokens, strict=True):
            length = samples / self.audio_rate
            if seconds < start + length:
                part = max(0.0, seconds - start) / length if length > 0 else 0.0
                return tokens_before + int(part * (tokens - tokens_before))
            start, tokens_before = start + length, tokens
        return tokens_before

    def text_within(self, tokens: int) -> str:
        """The text streamed by the time `tokens` tokens had been generated."""
        end = 0
        for mark_tokens, length in self.text_marks:
            if mark_tokens > tokens:
                break
            end = length
        return self.streamed[:end]

    def heard_limit(self) -> float | None:
        """Seconds of its audio the user heard when that was not all of it: cut while playing (or
        before any of it played), or truncated by the client; None when all of it counts."""
        limits = [self.heard_cap] if self.heard_cap is not None else []
        if self.cut is not None and self.spoken:
            if not self.played:
                limits.append(0.0)
            elif self.heard_seconds is not None:
                limits.append(self.heard_seconds)
        return min(limits) if limits else None

    def heard_text(self) -> str:
        """What the history keeps: the text of the speech heard when the reply was cut or
        truncated, else all of it (without a sink, the text shown is what was heard)."""
        limit = self.heard_limit()
        if limit is None:
            return self.text
        return self.text_within(self.tokens_heard(limit))

    def heard_audio(self) -> np.ndarray | None:
        """The reply's audio as far as it was heard (None when it had none)."""
        if not self.chunks:
            return None
        audio = np.concatenate(self.chunks)
        limits = [s for s in (self.heard_seconds, self.heard_cap) if s is not None]
        if limits:
            audio = audio[: int(round(min(limits) * self.audio_rate))]
        return audio
