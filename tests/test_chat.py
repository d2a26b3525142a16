"""ChatSession driven by fakes: a scripted pipeline, mic frames cut from a real question, a fake player.

Fast and device-free: turn-taking, multi-turn history, text mode, the transcript written as
it goes (and surviving a failing turn), barge-in and half-duplex, Ctrl-C, a lost microphone;
then the `omni chat --help` / `omni devices` commands and one typed turn through the CLI.
"""

from __future__ import annotations

import io
import json
import os
import signal
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from rich.console import Console
from typer.testing import CliRunner

from omni_cli.audio.devices import DeviceInfo
from omni_cli.audio.io import load_audio
from omni_cli.audio.playback_buffer import faded_in
from omni_cli.audio.vad import EndpointerConfig, frames
from omni_cli.chat.session import ChatSession, sigint_ends_session
from omni_cli.conversation.replying import FADE_IN_S
from omni_cli.conversation.turns import ConversationSettings, MicrophoneLost
from omni_cli.chat.view import ChatView
from omni_cli.cli import app
from omni_cli.errors import AudioInputError, ConfigError
from omni_cli.pipeline import AudioChunk, Done, History, HistoryTurn, TextDelta, Units
from omni_cli.chat.transcript import SessionRecorder

RATE = 16000
FRAME_MS = 30
FRAME = RATE * FRAME_MS // 1000


# -- fakes ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FakeSpeech:
    """Stands in for a turn's speech embeddings: a name, and the positions they would take in a prompt."""

    name: str
    shape: tuple[int, ...] = (300,)


class FakePipeline:
    """Replies word by word: a TextDelta and Units per token, an AudioChunk every `chunk_every` tokens.

    `on_token(call, i)` runs after each token (tests inject mic frames or Ctrl-C there);
    `fail_on_call` makes that call raise after its first tokens, as a model fault would. Each
    next token takes `token_s` (a fast GPU's pace): the model runs on its own thread, and what
    on_token set off (a barge-in, a Ctrl-C) is acted on meanwhile, as with a real model.
    """

    sample_rate: int | None = None  # text only: run_chat opens no speaker
    context_budget = 4096

    def __init__(self, tokens: int = 6, chunk_every: int = 2, on_token: Callable[[int, int], None] | None = None, token_s: float = 0.01) -> None:
        self.tokens = tokens
        self.token_s = token_s
        self.chunk_every = chunk_every
        self.on_token = on_token
        self.fail_on_call: int | None = None
        self.calls: list[tuple[object, list[HistoryTurn]]] = []
        self.played_tokens: list[int] = []
        self.chunks_yielded: list[np.ndarray] = []

    def respond(self, audio: np.ndarray | str, history: History, should_stop: Callable[[], bool] | None = None) -> Iterator[object]:
        call = len(self.calls)
        self.calls.append((audio, list(history)))
        speech = None if isinstance(audio, str) else FakeSpeech(f"embeddings-of-call-{call}")
        words: list[str] = []
        stopped, n = "eos", 0
        for i in range(self.tokens):
            n += 1
            if self.fail_on_call == call and i == 2:
                raise RuntimeError("CUDA out of memory.\nTried to allocate 2 GiB")
            word = f"w{call}.{i} "
            words.append(word)
            yield TextDelta(word, time.monotonic(), tokens=n)
            yield Units([i % 1000], time.monotonic(), tokens=n)
            if (i + 1) % self.chunk_every == 0:
                chunk = np.full(160, 0.1 * (call + 1), np.float32)
                self.chunks_yielded.append(chunk)
                yield AudioChunk(chunk, time.monotonic(), i // self.chunk_every, RATE, tokens=n)
            if self.on_token is not None:
                self.on_token(call, i)
            time.sleep(self.token_s)  # the next token's work; should_stop() is looked at before it is kept
            if should_stop is not None and should_stop():
                stopped = "interrupted"
                break
        self.played_tokens.append(n)
        yield Done("".join(words), list(range(n)), 0.0, n, stopped, speech)


class FakeMic:
    """Frames from a queue; when it runs dry, `on_empty` runs (e.g. to end the session) and read() returns None.

    `later` holds what the user says next: the next one is fed when the queue runs dry while
    the session listens (so half-duplex does not drop it as heard-while-replying).
    """

    def __init__(self, audio: np.ndarray | None = None, on_empty: Callable[[], None] | None = None, later: Sequence[np.ndarray] = ()) -> None:
        self.queue: deque[np.ndarray] = deque()
        self.on_empty = on_empty
        self.later = deque(later)
        self.cleared = 0
        self.frame_end_t: float | None = None  # frames count as heard when read
        if audio is not None:
            self.feed(audio)

    def feed(self, audio: np.ndarray) -> None:
        self.queue.extend(frames(audio, RATE, FRAME_MS))

    def read(self, timeout: float | None = None) -> np.ndarray | None:
        if self.queue:
            return self.queue.popleft()
        if self.on_empty is not None:
            self.on_empty()
        return None

    def clear(self) -> int:
        n = len(self.queue)
        self.queue.clear()
        self.cleared += n
        return n


class FakePlayer:
    """Plays instantly except that `playing` stays True for `polls_per_chunk` checks per queued chunk."""

    sample_rate = RATE
    output_latency = 0.0

    def __init__(self, polls_per_chunk: int = 0) -> None:
        self.polls_per_chunk = polls_per_chunk
        self.played: list[np.ndarray] = []
        self.first_audio_time: float | None = None
        self.stops = 0
        self.finished = False
        self.burst_samples = 0
        self._remaining = 0
        self._burst = False

    def play(self, chunk: np.ndarray) -> None:
        if not self._burst:
            self._burst, self.first_audio_time = True, time.monotonic()
            self.burst_samples = 0
        self.played.append(chunk)
        self.burst_samples += chunk.size
        self._remaining += self.polls_per_chunk

    @property
    def heard_seconds(self) -> float:
        """As if the device had played half of what it was given."""
        return self.burst_samples / 2 / RATE

    def silent_time(self, timeout: float = 0.2) -> float | None:
        return time.monotonic()

    def finish(self) -> None:
        self.finished = True
        self._burst = False

    def wait_idle(self, timeout: float | None = None) -> bool:
        self.finish()
        return True

    def stop(self) -> None:
        self.stops += 1
        self._remaining = 0
        self._burst = False

    @property
    def playing(self) -> bool:
        if self._remaining > 0:
            self._remaining -= 1
            return True
        return False


# -- helpers ----------------------------------------------------------------------------------


def played_only(player: FakePlayer, value: np.float32) -> bool:
    """The player got only FakePipeline chunks of `value` (one reply's), the first with its soft start."""
    first, *rest = player.played
    return np.allclose(first, faded_in(np.full_like(first, value), RATE, FADE_IN_S)) and all(np.all(c == value) for c in rest)


def silence(ms: int) -> np.ndarray:
    return np.zeros(RATE * ms // 1000, np.float32)


@pytest.fixture(scope="module")
def speech(question_wavs: list[Path]) -> np.ndarray:
    """A real spoken question at 16 kHz."""
    return load_audio(question_wavs[0])


def endpointing(**config: object) -> EndpointerConfig:
    return EndpointerConfig(frame_ms=FRAME_MS, **{"hangover_ms": 300, **config})


def plain_view() -> tuple[ChatView, io.StringIO]:
    out = io.StringIO()
    return ChatView(Console(file=out, force_terminal=False, width=120), live=False), out


def transcript(directory: Path) -> list[dict]:
    return [json.loads(line) for line in (directory / "transcript.jsonl").read_text().splitlines()]


def make_session(
    tmp_path: Path,
    pipeline: FakePipeline,
    mic: FakeMic | None,
    player: FakePlayer | None,
    barge_in: bool | None = False,
    echo: object = None,
    endpointing_config: dict | None = None,
    **settings: object,
) -> tuple[ChatSession, io.StringIO]:
    view, out = plain_view()
    session = ChatSession(
        pipeline,
        view,
        SessionRecorder(tmp_path / "session"),
        mic=mic,
        player=player,
        settings=ConversationSettings(
            turn_detection=endpointing(**(endpointing_config or {})), barge_in=barge_in, poll_s=0.0, mic_timeout_s=0.2, **settings
        ),
        echo=echo,
    )
    if mic is not None and mic.on_empty is None:
        # Out of frames while listening = the user pressed Ctrl-C; while replying it is just a quiet moment.
        def on_empty() -> None:
            if session.replying:
                return
            if mic.later:
                mic.feed(mic.later.popleft())
            else:
                session.request_stop()

        mic.on_empty = on_empty
    return session, out


# -- turn-taking and memory ---------------------------------------------------------------------


def test_spoken_turns_are_answered_with_history_and_saved(tmp_path: Path, speech: np.ndarray) -> None:
    mic = FakeMic(np.concatenate([silence(300), speech, silence(600)]), later=[np.concatenate([speech[:RATE], silence(600)])])
    pipeline, player = FakePipeline(tokens=6), FakePlayer()
    session, out = make_session(tmp_path, pipeline, mic, player)
    session.run_voice()
    session.close("ctrl-c")

    assert len(pipeline.calls) == 2
    (first_audio, first_history), (second_audio, second_history) = pipeline.calls
    assert first_history == []
    # The utterance holds the whole question (plus pre-roll and hangover), not the silence around it.
    assert speech.size <= first_audio.size < speech.size + RATE
    assert RATE <= second_audio.size < 2 * RATE
    # Turn 2 sees turn 1: its speech embeddings and the reply text.
    assert second_history == [HistoryTurn(user_speech=FakeSpeech("embeddings-of-call-0"), user_text=None, reply="".join(f"w0.{i} " for i in range(6)))]
    assert [len(h) for h in (session.history,)] == [2]

    rows = transcript(tmp_path / "session")
    assert [r["type"] for r in rows] == ["listening", "user", "assistant", "user", "assistant", "end"]
    user, reply = rows[1], rows[2]
    # The lines' keys, in order: what tools reading transcripts rely on.
    assert list(user) == ["type", "time", "turn", "end_t", "speech_end_t", "end_of_turn_ms", "wav", "seconds", "decided_t"]
    assert list(reply) == ["type", "time", "turn", "text", "tokens", "units", "stopped", "wav", "audio_seconds",
                           "first_text_ms", "playback_t", "first_audio_t", "latency_ms"]
    saved, rate = sf.read(tmp_path / "session" / user["wav"], dtype="float32")
    assert rate == RATE and saved.size == first_audio.size
    np.testing.assert_allclose(saved, first_audio, atol=1 / 32768 + 1e-6)  # 16-bit WAV
    assert reply["text"] == "".join(f"w0.{i} " for i in range(6)) and reply["tokens"] == 6 and reply["units"] == 6
    assert reply["stopped"] == "eos" and reply["audio_seconds"] == pytest.approx(3 * 160 / RATE)
    reply_audio, _ = sf.read(tmp_path / "session" / reply["wav"], dtype="float32")
    # What was played: the reply with its soft start (30 ms rising from silence).
    first, *rest = pipeline.chunks_yielded[:3]
    played = np.concatenate([faded_in(first, RATE, FADE_IN_S), *rest])
    np.testing.assert_allclose(reply_audio, played, atol=1e-4)
    # Latency is measured from the true end of speech (the last voiced frame) to the first audio out;
    # the end-of-turn decision came one hang-over (300 ms here) after that end.
    assert 300 <= user["end_of_turn_ms"] <= 300 + 30 + 200
    assert user["end_t"] - user["speech_end_t"] == pytest.approx(user["end_of_turn_ms"] / 1000, abs=1e-3)
    assert reply["first_audio_t"] >= user["end_t"]
    assert reply["latency_ms"] == pytest.approx((reply["first_audio_t"] - user["speech_end_t"]) * 1000, abs=0.1)
    assert rows[-1] == {**rows[-1], "turns": 2, "reason": "ctrl-c"}
    assert "you [1]: (spoken" in out.getvalue() and "w0.5" in out.getvalue()
    assert len(player.played) == 6 and player.finished


def test_text_mode_answers_typed_lines_with_history(tmp_path: Path) -> None:
    pipeline = FakePipeline(tokens=3)
    session, out = make_session(tmp_path, pipeline, mic=None, player=None)
    lines = iter(["hello there", "   ", "and then?", None])
    session.run_text(lambda: next(lines))
    session.close("end of input")

    assert [audio for audio, _ in pipeline.calls] == ["hello there", "and then?"]
    assert pipeline.calls[1][1] == [HistoryTurn(user_speech=None, user_text="hello there", reply="w0.0 w0.1 w0.2 ")]
    rows = transcript(tmp_path / "session")
    assert [(r["type"], r.get("text")) for r in rows[:2]] == [("user", "hello there"), ("assistant", "w0.0 w0.1 w0.2 ")]
    assert "wav" not in rows[0]  # typed: no user WAV
    assert "wav" in rows[1]  # the reply audio is still saved (no speaker: text on screen only)
    assert "latency_ms" not in rows[1]  # nothing was played
    text = out.getvalue()
    assert "you [1]: hello there" in text and "omni: w0.0 w0.1 w0.2" in text and "you [2]: and then?" in text


def test_the_live_terminal_view_keeps_finished_turns_in_the_scrollback(tmp_path: Path) -> None:
    out = io.StringIO()
    view = ChatView(Console(file=out, force_terminal=True, width=100, color_system=None), live=True)
    session = ChatSession(FakePipeline(tokens=3), view, SessionRecorder(tmp_path / "s"), player=FakePlayer())
    view.start()
    lines = iter(["first question", "second question", None])
    session.run_text(lambda: next(lines))
    view.error("speaker gone")
    view.stop()
    text = out.getvalue()
    for expected in ("you [1]: first question", "omni: w0.0 w0.1 w0.2", "you [2]: second question", "omni: w1.0 w1.1 w1.2", "omni: speaker gone"):
        assert expected in text, expected
    assert "first audio" in text  # the turn summary with its latency


def test_history_is_trimmed_by_the_pipeline_budget_not_here(tmp_path: Path) -> None:
    """Within a budget that holds them all, the session keeps every finished turn; the pipeline picks within its own."""
    pipeline = FakePipeline(tokens=1)
    session, _ = make_session(tmp_path, pipeline, mic=None, player=None)
    lines = iter([f"q{i}" for i in range(5)] + [None])
    session.run_text(lambda: next(lines))
    assert [len(history) for _, history in pipeline.calls] == [0, 1, 2, 3, 4]


def test_turns_older_than_a_whole_context_budget_are_not_kept(tmp_path: Path) -> None:
    """Each typed turn here costs (2 + 6) // 3 + 16 = 18 positions: a budget of 40 can only ever hold the newest 2."""
    pipeline = FakePipeline(tokens=1)
    pipeline.context_budget = 40
    session, _ = make_session(tmp_path, pipeline, mic=None, player=None)
    lines = iter([f"q{i}" for i in range(5)] + [None])
    session.run_text(lambda: next(lines))
    assert [h.positions() for h in session.history] == [18, 18]
    assert [h.user_text for h in session.history] == ["q3", "q4"]
    assert [[h.user_text for h in history] for _, history in pipeline.calls] == [[], ["q0"], ["q0", "q1"], ["q1", "q2"], ["q2", "q3"]]


@pytest.mark.parametrize("budget", [4096, 40])
def test_memory_reaches_the_real_pipeline_within_its_budget(tiny_loaded, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, budget: int) -> None:
    """Turn 2's prompt holds turn 1 (question and reply) when the budget has room, and not when it has none."""
    import omni_cli.pipeline as pipeline_module
    from omni_cli.config import SamplingConfig, StreamingConfig
    from omni_cli.pipeline import SpeechToSpeech

    prompts: list[list[int]] = []
    real_build = pipeline_module.build_prompt_ids

    def spy(tokenizer, turns, *system):  # noqa: ANN001, ANN002, ANN202 - same signature as build_prompt_ids
        ids = real_build(tokenizer, turns, *system)
        prompts.append(list(ids))
        return ids

    monkeypatch.setattr(pipeline_module, "build_prompt_ids", spy)
    pipeline = SpeechToSpeech(tiny_loaded, None, StreamingConfig(sampling=SamplingConfig(max_new_tokens=8), context_budget=budget))
    session, _ = make_session(tmp_path, pipeline, mic=None, player=None)  # type: ignore[arg-type]
    lines = iter(["what is the capital of France?", "and of Spain?", None])
    session.run_text(lambda: next(lines))
    first_reply = next(r["text"] for r in transcript(tmp_path / "session") if r["type"] == "assistant")
    first, second = (tiny_loaded.tokenizer.decode(p) for p in prompts)
    assert "capital of France" in first and "and of Spain" in second
    assert ("capital of France" in second) == (budget == 4096)
    assert (first_reply.strip() in second) == (budget == 4096)


def test_a_typed_question_too_long_for_the_budget_is_one_line_and_the_session_goes_on(tiny_loaded, tmp_path: Path) -> None:
    from omni_cli.config import SamplingConfig, StreamingConfig
    from omni_cli.pipeline import SpeechToSpeech

    pipeline = SpeechToSpeech(tiny_loaded, None, StreamingConfig(sampling=SamplingConfig(max_new_tokens=8)))
    session, out = make_session(tmp_path, pipeline, mic=None, player=None)  # type: ignore[arg-type]
    lines = iter(["hello " * 8000, "hi", None])
    start = time.monotonic()
    session.run_text(lambda: next(lines))
    assert time.monotonic() - start < 20  # the long prompt's prefill alone takes minutes here
    said = " ".join(out.getvalue().split())  # the view wraps long lines at its width
    # The typed line is stripped: 47,999 characters.
    assert (
        "omni: the question is about 16015 prompt positions long, but 4088 fit beside a 8-token reply in the context budget "
        "of 4096; shorten the question (or its system prompt), ask for a shorter reply, or raise --context-budget." in said
    ), said
    assert "turn failed" not in said
    replies = [r for r in transcript(tmp_path / "session") if r["type"] == "assistant" and r.get("text")]
    assert len(replies) == 1 and [h.user_text for h in session.history] == ["hi"]


def test_a_failing_turn_is_one_line_logged_and_the_session_goes_on(tmp_path: Path) -> None:
    seen_before_turn_2: list[list[dict]] = []

    def on_token(call: int, i: int) -> None:
        if call == 1 and i == 0:
            # Written as it goes: turn 1 (and its failure) are on disk before turn 2 ends.
            seen_before_turn_2.append(transcript(tmp_path / "session"))

    pipeline, player = FakePipeline(tokens=4, on_token=on_token), FakePlayer()
    pipeline.fail_on_call = 0
    session, out = make_session(tmp_path, pipeline, mic=None, player=player)
    lines = iter(["first", "second", None])
    session.run_text(lambda: next(lines))
    assert player.stops == 1  # the failed turn's audio was cut
    session.close("end of input")

    assert "omni: turn failed: CUDA out of memory." in out.getvalue()
    assert "Tried to allocate" not in out.getvalue()  # one line only
    (early,) = seen_before_turn_2
    assert [r["type"] for r in early] == ["user", "error", "assistant", "user"]
    assert early[1]["message"] == "CUDA out of memory." and early[2]["stopped"] == "error"
    rows = transcript(tmp_path / "session")
    assert rows[4]["type"] == "assistant" and rows[4]["stopped"] == "eos" and rows[4]["turn"] == 2
    # The failed turn is not remembered; the good one is.
    assert pipeline.calls[1][1] == [] and [h.user_text for h in session.history] == ["second"]


def test_a_second_session_in_the_same_folder_is_refused(tmp_path: Path) -> None:
    first = SessionRecorder(tmp_path / "s")
    first.event("session")
    first.close()
    with pytest.raises(ConfigError, match="already holds a session"):
        SessionRecorder(tmp_path / "s")


def test_a_session_that_never_started_leaves_nothing_behind(tmp_path: Path) -> None:
    # Stopped before its first line (Ctrl-C while the devices open): no folder, no empty transcript to block it.
    SessionRecorder(tmp_path / "s").close()
    assert not (tmp_path / "s").exists()
    SessionRecorder(tmp_path / "s").close()


# -- barge-in, half-duplex, Ctrl-C, a lost microphone ------------------------------------------------


def test_barge_in_during_generation_stops_player_and_generation(tmp_path: Path, speech: np.ndarray) -> None:
    holder: dict[str, FakeMic] = {}

    def on_token(call: int, i: int) -> None:
        if call == 0 and i == 10:
            holder["mic"].feed(np.concatenate([silence(1200), speech, silence(600)]))  # the user talks over the reply

    pipeline, player = FakePipeline(tokens=200, on_token=on_token), FakePlayer()
    mic = FakeMic(np.concatenate([silence(300), speech, silence(600)]))
    holder["mic"] = mic
    session, out = make_session(tmp_path, pipeline, mic, player, barge_in=True)
    session.run_voice()
    session.close("ctrl-c")

    # Speech start needs min_speech_ms of voice: the stop comes a few tokens after the speech began.
    assert 10 < pipeline.played_tokens[0] < 30, pipeline.played_tokens
    assert player.stops >= 1
    rows = transcript(tmp_path / "session")
    kinds = [r["type"] for r in rows]
    assert kinds == ["listening", "user", "barge_in", "assistant", "user", "assistant", "end"]
    barge, first_reply, second_user = rows[2], rows[3], rows[4]
    assert barge["turn"] == 1 and barge["detected_t"] <= barge["stopped_t"] and barge["stop_ms"] < 50
    assert first_reply["stopped"] == "interrupted" and first_reply["barge_in_t"] == barge["detected_t"]
    # The player says how much was heard (half of what it was given, in this fake): the WAV holds that much.
    heard_s = first_reply["heard_seconds"]
    assert 0 < heard_s <= first_reply["tokens"] // 2 * 160 / 2 / RATE
    reply_audio, _ = sf.read(tmp_path / "session" / first_reply["wav"], dtype="float32")
    assert reply_audio.size == round(heard_s * RATE) and first_reply["audio_seconds"] == pytest.approx(heard_s, abs=1e-3)
    assert first_reply["tokens"] > 0 and 0 <= barge["detect_ms"] < 1000
    # No audio chunk yielded after the barge-in reached the player.
    chunks_before_stop = first_reply["tokens"] // 2
    assert len(player.played) <= chunks_before_stop + pipeline.played_tokens[1] // 2
    # The interruption is the next turn, heard whole: up to BARGE_IN_PRE_ROLL_MS before it (a canceller may have
    # muffled its first words), the speech, the hang-over.
    from omni_cli.conversation.turns import BARGE_IN_PRE_ROLL_MS

    assert second_user["turn"] == 2 and speech.size <= pipeline.calls[1][0].size < speech.size + (BARGE_IN_PRE_ROLL_MS / 1000 + 1) * RATE
    assert len(pipeline.calls[1][1]) == 1  # the cut reply is remembered as far as it went...
    remembered = pipeline.calls[1][1][0].reply  # ... which is as far as it was heard (half of what was played, in this fake)
    assert 0 < len(remembered) < len(first_reply["text"]) and first_reply["text"].startswith(remembered)


def test_barge_in_while_the_reply_is_still_playing(tmp_path: Path, speech: np.ndarray) -> None:
    pipeline = FakePipeline(tokens=4)  # generation ends long before playback
    player = FakePlayer(polls_per_chunk=1000)
    mic = FakeMic(np.concatenate([silence(300), speech, silence(600)]))
    session, _ = make_session(tmp_path, pipeline, mic, player, barge_in=True)
    mic.on_empty = None
    fed = {"done": False}

    def read(timeout: float | None = None, _read=mic.read) -> np.ndarray | None:
        frame = _read(timeout)
        if frame is None and not fed["done"] and len(pipeline.played_tokens) == 1:
            fed["done"] = True
            mic.feed(np.concatenate([silence(1200), speech, silence(600)]))
            return _read(timeout)
        if frame is None and len(pipeline.calls) == 2 and not session.replying:
            session.request_stop()
        return frame

    mic.read = read  # type: ignore[method-assign]
    session.run_voice()
    session.close("ctrl-c")
    rows = transcript(tmp_path / "session")
    first_reply = next(r for r in rows if r["type"] == "assistant")
    assert first_reply["tokens"] == 4 and first_reply["stopped"] == "interrupted"  # generated fully, cut while heard
    assert any(r["type"] == "barge_in" for r in rows) and len(pipeline.calls) == 2


def test_half_duplex_takes_no_question_from_what_ended_while_replying(tmp_path: Path, speech: np.ndarray) -> None:
    holder: dict[str, FakeMic] = {}

    def on_token(call: int, i: int) -> None:
        if call == 0 and i == 3:
            holder["mic"].feed(np.concatenate([speech, silence(600)]))  # e.g. our own voice through the speakers

    pipeline, player = FakePipeline(tokens=40, on_token=on_token), FakePlayer()
    mic = FakeMic(np.concatenate([silence(300), speech, silence(600)]))
    holder["mic"] = mic
    session, _ = make_session(tmp_path, pipeline, mic, player, barge_in=False)
    session.run_voice()
    # Heard (stream time went on) but not taken for a question: it ended while the reply played, so it may be echo.
    assert pipeline.played_tokens == [40] and len(pipeline.calls) == 1
    assert player.stops == 0 and not mic.queue and session.conversation.stream_time > 2 * speech.size / RATE
    listener = session.conversation.listener
    assert listener is not None and not listener.endpointer.in_speech


def test_ctrl_c_during_a_reply_cuts_it_saves_it_and_ends(tmp_path: Path, speech: np.ndarray) -> None:
    def on_token(call: int, i: int) -> None:
        if i == 5:
            os.kill(os.getpid(), signal.SIGINT)  # the real signal path: handler sets the stop flag

    pipeline, player = FakePipeline(tokens=100, on_token=on_token), FakePlayer()
    mic = FakeMic(np.concatenate([silence(300), speech, silence(600), speech, silence(600)]))
    session, _ = make_session(tmp_path, pipeline, mic, player)
    with sigint_ends_session(session):
        session.run_voice()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored
    session.close("ctrl-c")
    assert pipeline.played_tokens == [6] and len(pipeline.calls) == 1  # the second question was never started
    rows = transcript(tmp_path / "session")
    assert [r["type"] for r in rows] == ["listening", "user", "assistant", "end"]
    assert rows[2]["stopped"] == "interrupted" and rows[2]["text"].startswith("w0.0") and player.stops >= 1


def test_ctrl_c_while_waiting_for_typed_input_ends_cleanly(tmp_path: Path) -> None:
    session, _ = make_session(tmp_path, FakePipeline(), mic=None, player=None)

    def read_line() -> str | None:
        os.kill(os.getpid(), signal.SIGINT)
        raise AssertionError("the read should have been interrupted")

    with sigint_ends_session(session):
        session.run_text(read_line)
    assert session.stop_requested and session.turns == 0


def test_a_microphone_that_stops_delivering_is_reported_and_the_transcript_kept(tmp_path: Path, speech: np.ndarray) -> None:
    pipeline, player = FakePipeline(tokens=2), FakePlayer()
    mic = FakeMic(np.concatenate([silence(300), speech, silence(600)]), on_empty=lambda: None)
    session, _ = make_session(tmp_path, pipeline, mic, player)
    with pytest.raises(MicrophoneLost, match="stopped delivering audio"):
        session.run_voice()
    session.close("microphone lost")
    rows = transcript(tmp_path / "session")
    assert [r["type"] for r in rows] == ["listening", "user", "assistant", "end"]
    assert isinstance(MicrophoneLost("x"), AudioInputError)


class FakeEcho:
    """Stands in for the echo canceller: converged or not, and the echo removed."""

    def __init__(self, converged: bool) -> None:
        self.converged = converged
        self.erle_db: float | None = 41.26 if converged else None


def talking_over_the_reply(speech: np.ndarray, at_token: int = 10) -> tuple[dict[str, FakeMic], Callable[[int, int], None]]:
    holder: dict[str, FakeMic] = {}

    def on_token(call: int, i: int) -> None:
        if call == 0 and i == at_token:
            holder["mic"].feed(np.concatenate([silence(1200), speech, silence(600)]))

    return holder, on_token


@pytest.mark.parametrize("echo", [None, FakeEcho(converged=False), FakeEcho(converged=True)])
def test_by_default_barge_in_waits_for_a_converged_echo_canceller(tmp_path: Path, speech: np.ndarray, echo: FakeEcho | None) -> None:
    holder, on_token = talking_over_the_reply(speech)
    pipeline, player = FakePipeline(tokens=200, on_token=on_token), FakePlayer()
    mic = holder["mic"] = FakeMic(np.concatenate([silence(300), speech, silence(600)]))
    session, out = make_session(tmp_path, pipeline, mic, player, barge_in=None, echo=echo)
    session.run_voice()
    session.close("ctrl-c")
    rows = transcript(tmp_path / "session")
    full_duplex = echo is not None and echo.converged
    assert any(r["type"] == "barge_in" for r in rows) == full_duplex
    if full_duplex:
        assert pipeline.played_tokens[0] < 30 and "speak over omni to interrupt it" in out.getvalue()
        assert next(r for r in rows if r["type"] == "full_duplex")["erle_db"] == 41.3
        assert next(r for r in rows if r["type"] == "assistant")["echo_erle_db"] == 41.3
    else:  # half-duplex: what it heard while speaking was dropped, and the reply ran to its end
        assert len(pipeline.calls) == 1 and pipeline.played_tokens == [200]


def test_going_on_with_the_question_right_after_the_turn_ended_withdraws_the_reply(tmp_path: Path, speech: np.ndarray) -> None:
    """A pause longer than the hang-over ended the turn; 0.6 s after the last word the user goes on."""

    def on_token(call: int, i: int) -> None:
        if call == 0 and i == 10:
            holder["mic"].feed(np.concatenate([speech, silence(600)]))  # 300 ms after the end of the turn

    holder: dict[str, FakeMic] = {}
    pipeline, player = FakePipeline(tokens=200, on_token=on_token), FakePlayer()
    mic = holder["mic"] = FakeMic(np.concatenate([silence(300), speech, silence(300)]))
    session, out = make_session(tmp_path, pipeline, mic, player, barge_in=True)
    session.run_voice()
    session.close("ctrl-c")
    rows = transcript(tmp_path / "session")
    kinds = [r["type"] for r in rows]
    assert kinds == ["listening", "user", "barge_in", "assistant", "user", "assistant", "end"]
    barge, withdrawn, again = rows[2], rows[3], rows[4]
    assert barge["goes_on_with_the_question"] is True
    assert withdrawn["withdrawn"] is True and withdrawn["stopped"] == "interrupted" and "withdrawn" in out.getvalue()
    # One question, both parts: the second turn's audio starts with the first's, without repeating its end.
    (first, _), (both, history) = pipeline.calls
    assert again["continues"] == 1 and history == []  # the withdrawn reply answered nothing: not remembered
    np.testing.assert_array_equal(both[: first.size], first)
    assert first.size + speech.size <= both.size <= first.size + speech.size + RATE
    saved, _ = sf.read(tmp_path / "session" / again["wav"], dtype="float32")
    assert saved.size == both.size and [h.user_speech for h in session.history] == [FakeSpeech("embeddings-of-call-1")]


def paused_speech(speech: np.ndarray, pause_ms: int) -> np.ndarray:
    """The question, `pause_ms` of silence, and the question again: one turn with a pause in it."""
    loud = np.flatnonzero(np.abs(speech) > 0.02 * np.abs(speech).max())
    words = speech[loud[0] : loud[-1] + 1]
    return np.concatenate([words, silence(pause_ms), words])


SPECULATING = {"pause_ms": 150, "hangover_ms": 450}


def test_a_reply_started_at_the_pause_where_the_turn_ends_is_the_one_heard(tmp_path: Path, speech: np.ndarray) -> None:
    started: list[float] = []
    pipeline, player = FakePipeline(tokens=6), FakePlayer()
    mic = FakeMic(np.concatenate([silence(300), speech, silence(900)]))
    session, _ = make_session(tmp_path, pipeline, mic, player, endpointing_config=SPECULATING, speculate=True)
    real_respond = pipeline.respond

    def respond(audio, history, should_stop=None):  # noqa: ANN001, ANN202 - FakePipeline.respond's signature
        listener = session.conversation.listener
        assert listener is not None
        started.append(listener.endpointer.time)  # when the reply was started, in stream time
        return real_respond(audio, history, should_stop)

    pipeline.respond = respond  # type: ignore[method-assign]
    session.run_voice()
    session.close("ctrl-c")
    rows = transcript(tmp_path / "session")
    user = next(r for r in rows if r["type"] == "user")
    reply = next(r for r in rows if r["type"] == "assistant")
    assert reply["speculative"] is True and reply["stopped"] == "eos" and reply["tokens"] == 6
    # Started 150 ms into the final silence, 300 ms before the end of the turn was decided.
    assert user["end_of_turn_ms"] >= 450
    heard, _ = sf.read(tmp_path / "session" / user["wav"], dtype="float32")
    np.testing.assert_allclose(heard, pipeline.calls[-1][0], atol=1 / 32768 + 1e-6)  # the WAV is what the model heard
    assert len(player.played) == 3 and played_only(player, np.float32(0.1 * len(pipeline.calls)))
    assert [r["type"] for r in rows].count("speculative_reply_dropped") == len(pipeline.calls) - 1
    assert started[-1] < 0.3 + speech.size / RATE + 0.45


def test_speaking_on_after_a_pause_drops_the_early_reply_and_keeps_one_turn(tmp_path: Path, speech: np.ndarray) -> None:
    question = paused_speech(speech, 250)  # + the soft end of the words: ~350 ms without voice, under the hang-over
    pipeline, player = FakePipeline(tokens=6), FakePlayer()
    mic = FakeMic(np.concatenate([silence(300), question, silence(900)]))
    session, _ = make_session(tmp_path, pipeline, mic, player, endpointing_config=SPECULATING, speculate=True)
    session.run_voice()
    session.close("ctrl-c")
    rows = transcript(tmp_path / "session")
    kinds = [r["type"] for r in rows]
    assert kinds.count("user") == 1 and kinds.count("assistant") == 1  # the pause did not end the turn
    assert kinds.count("speculative_reply_dropped") >= 1 and rows[-1]["speculative_replies_dropped"] == kinds.count("speculative_reply_dropped")
    assert kinds.index("speculative_reply_dropped") < kinds.index("user")
    user = rows[kinds.index("user")]
    assert user["seconds"] >= question.size / RATE  # both halves, as one question
    # Only the last reply was played: the dropped ones never reached the speaker.
    assert player.played and played_only(player, np.float32(0.1 * len(pipeline.calls)))


def test_speech_longer_than_the_models_window_is_one_question(tmp_path: Path, speech: np.ndarray) -> None:
    long = np.concatenate([speech, speech])  # ~4.5 s, windows of 2 s here
    pipeline, player = FakePipeline(tokens=2), FakePlayer()
    mic = FakeMic(np.concatenate([silence(300), long, silence(600)]))
    session, out = make_session(tmp_path, pipeline, mic, player, endpointing_config={"max_utterance_s": 2.0})
    session.run_voice()
    session.close("ctrl-c")
    rows = transcript(tmp_path / "session")
    kinds = [r["type"] for r in rows]
    assert kinds.count("user") == 1 and kinds.count("long_speech") >= 2, kinds
    user = rows[kinds.index("user")]
    assert user["windows"] == kinds.count("long_speech") + 1
    (asked, _), = pipeline.calls
    assert long.size <= asked.size < long.size + RATE and user["seconds"] == pytest.approx(asked.size / RATE, abs=1e-3)
    assert "still listening: your turn passed 2 s" in out.getvalue()


def test_a_window_cut_at_the_end_of_speech_is_answered_after_the_hangover(tmp_path: Path, speech: np.ndarray) -> None:
    pipeline, player = FakePipeline(tokens=2), FakePlayer()
    mic = FakeMic(np.concatenate([silence(300), speech, silence(900)]))
    # The utterance (300 ms pre-roll + the speech) is longer than the window but shorter than two.
    window_s = round((speech.size / RATE + 0.3) / 2 + 0.5, 1)
    session, _ = make_session(tmp_path, pipeline, mic, player, endpointing_config={"max_utterance_s": window_s})
    session.run_voice()
    session.close("ctrl-c")
    kinds = [r["type"] for r in transcript(tmp_path / "session")]
    assert kinds.count("user") == 1 and kinds.count("assistant") == 1
    (asked, _), = pipeline.calls
    assert asked.size >= speech.size


def test_a_second_ctrl_c_keeps_the_tokens_with_the_text(tmp_path: Path) -> None:
    def on_token(call: int, i: int) -> None:
        if i == 4:
            raise KeyboardInterrupt  # the second Ctrl-C's handler raises inside generation

    session, _ = make_session(tmp_path, FakePipeline(tokens=50, on_token=on_token), mic=None, player=FakePlayer())
    session.run_text(lambda: "a question")
    session.close("ctrl-c")
    reply = next(r for r in transcript(tmp_path / "session") if r["type"] == "assistant")
    assert reply["stopped"] == "interrupted" and reply["text"].startswith("w0.0 ") and reply["tokens"] == 5
    assert "heard_seconds" in reply


def test_a_reply_cut_by_a_stuck_speaker_keeps_its_latency_and_what_was_heard(tmp_path: Path) -> None:
    player = FakePlayer(polls_per_chunk=10**6)  # takes the audio, never finishes playing it
    session, out = make_session(tmp_path, FakePipeline(tokens=4), mic=None, player=player, playback_margin_s=0.05)
    lines = iter(["a question", None])
    session.run_text(lambda: next(lines))
    session.close("end of input")
    rows = transcript(tmp_path / "session")
    reply = next(r for r in rows if r["type"] == "assistant")
    assert "speaker stopped taking audio" in out.getvalue() and session.conversation.sink is None
    assert reply["latency_ms"] is not None and reply["latency_ms"] >= 0
    assert reply["heard_seconds"] == pytest.approx(2 * 160 / 2 / RATE)


# -- the commands -------------------------------------------------------------------------------


def test_chat_help_documents_modes_and_ctrl_c() -> None:
    result = CliRunner().invoke(app, ["chat", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    for option in ("--text", "--barge-in", "--half-duplex", "--no-aec", "--speculate-ms", "--hangover-ms", "--answer-after-ms", "--session-dir", "--input-device", "--first-chunk-units", "--context-budget"):
        assert option in result.output
    assert "Ctrl-C ends the session" in result.output and "Examples" in result.output


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        ([], {"barge_in": None, "echo_cancellation": True, "hangover_ms": 500, "answer_after_ms": 200, "speculate_ms": 60}),
        (["--half-duplex"], {"barge_in": False, "echo_cancellation": True}),
        (["--no-aec"], {"barge_in": None, "echo_cancellation": False}),
        (["--barge-in", "--speculate-ms", "0", "--hangover-ms", "700", "--answer-after-ms", "0"], {"barge_in": True, "speculate_ms": 0, "hangover_ms": 700, "answer_after_ms": 0}),
    ],
)
def test_chat_flags_reach_the_session_options(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, flags: list[str], expected: dict) -> None:
    import omni_cli.chat.devices as chat_module
    import omni_cli.chat.preflight as preflight_module
    import omni_cli.cli.talk as cli_module
    import omni_cli.setup.prepare as prepare_module

    seen = []
    monkeypatch.setattr(prepare_module, "check_model_files", lambda *args: None)
    monkeypatch.setattr(preflight_module, "preflight", lambda options: None)
    monkeypatch.setattr(cli_module, "load_pipeline", lambda *args, **kwargs: "pipeline")
    monkeypatch.setattr(chat_module, "run_chat", lambda pipeline, options, view, *rest, **kw: seen.append(options) or 0)
    result = CliRunner().invoke(app, ["chat", "--model", str(tmp_path), "--session-dir", str(tmp_path / "s"), *flags])
    assert result.exit_code == 0, result.output
    (options,) = seen
    assert {key: getattr(options, key) for key in expected} == expected


def test_devices_lists_a_table_or_says_why_not(monkeypatch: pytest.MonkeyPatch) -> None:
    import omni_cli.audio.devices as devices

    listed = [
        DeviceInfo(0, "USB Headset Mic", "ALSA", 1, 0, 44100.0, True, False),
        DeviceInfo(1, "Built-in Speakers", "ALSA", 0, 2, 48000.0, False, True),
    ]
    monkeypatch.setattr(devices, "list_devices", lambda: listed)
    result = CliRunner().invoke(app, ["devices"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    rows = [line for line in result.output.splitlines() if "USB Headset Mic" in line or "Built-in Speakers" in line]
    assert len(rows) == 2
    assert "44100 Hz" in rows[0] and "input" in rows[0] and "48000 Hz" in rows[1] and "output" in rows[1]

    monkeypatch.setattr(devices, "list_devices", lambda: [])
    result = CliRunner().invoke(app, ["devices"])
    assert result.exit_code == 0 and "no audio devices found" in result.output

    def no_portaudio() -> list[DeviceInfo]:
        raise AudioInputError("the PortAudio library is missing (x); install it (Debian/Ubuntu: apt-get install libportaudio2).")

    monkeypatch.setattr(devices, "list_devices", no_portaudio)
    result = CliRunner().invoke(app, ["devices"])
    assert result.exit_code == 1 and result.output.count("\n") == 1 and "libportaudio2" in result.output


def test_the_view_does_not_import_the_audio_code() -> None:
    """chat.view names the `omni devices` row type for type checkers only: importing it loads neither audio/ nor scipy."""
    import subprocess
    import sys

    code = "import sys, omni_cli.chat.view; print(sorted(m for m in sys.modules if m.startswith(('omni_cli.audio', 'scipy'))))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert proc.stdout.strip() == "[]"


def test_chat_text_mode_through_the_cli_with_the_tiny_model(tiny_model, tmp_path: Path) -> None:
    session_dir = tmp_path / "s"
    args = ["chat", "--model", str(tiny_model.model_dir), "--speech-encoder", str(tiny_model.speech_encoder)]
    args += ["--text", "--session-dir", str(session_dir), "--max-new-tokens", "4"]
    result = CliRunner().invoke(app, args, input="hello\nwhat next?\n")
    assert result.exit_code == 0, result.output
    rows = transcript(session_dir)
    assert [r["type"] for r in rows] == ["session", "user", "assistant", "user", "assistant", "end"]
    assert rows[0]["mode"] == "text" and rows[2]["tokens"] == 4 and rows[2]["text"]
    assert rows[-1]["reason"] == "end of input" and rows[-1]["turns"] == 2
    assert "you [2]: what next?" in result.output

    # The same folder again: one line, nothing overwritten.
    again = CliRunner().invoke(app, args, input="hello\n")
    assert again.exit_code == 2 and "already holds a session" in again.output
    assert len(transcript(session_dir)) == len(rows)


def test_chat_without_a_microphone_says_so_before_loading_a_model(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, tiny_model) -> None:
    import omni_cli.audio.devices as devices
    import omni_cli.cli.talk as talk

    monkeypatch.setattr(devices, "list_devices", lambda: [])  # a machine without sound devices
    monkeypatch.setattr(devices, "sound_server_problem", lambda: None)
    monkeypatch.setattr(talk, "load_pipeline", lambda *args, **kwargs: pytest.fail("the model was loaded"))
    args = ["chat", "--model", str(tiny_model.model_dir), "--speech-encoder", str(tiny_model.speech_encoder), "--session-dir", str(tmp_path / "s")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    assert result.output.strip() == (
        "omni: error: no audio input device found; connect one or start a sound server, then run `omni devices`. "
        "To type your questions instead: omni chat --text."
    )
    assert not (tmp_path / "s").exists()


class ScriptedMicrophone:
    """Stands in for omni_cli.audio.mic.Microphone inside run_chat: one question, then the device goes quiet."""

    instances: list[ScriptedMicrophone] = []
    audio: np.ndarray = np.zeros(0, np.float32)

    def __init__(self, device: str | None = None, frame_ms: int = FRAME_MS, sample_rate: int = RATE, clean: object = None) -> None:
        self.frames = deque(frames(self.audio, sample_rate, frame_ms))
        self.frame_end_t: float | None = None
        self.input_latency = 0.0
        self.device_name, self.device_rate = "scripted", sample_rate
        self.overflows, self.dropped_frames = 0, 0
        self.active, self.last_callback = True, None  # a running stream, as the sound watch sees it
        self.closed = False
        ScriptedMicrophone.instances.append(self)

    def start(self) -> ScriptedMicrophone:
        return self

    def read(self, timeout: float | None = None) -> np.ndarray | None:
        return self.frames.popleft() if self.frames else None

    def clear(self) -> int:
        return 0

    def close(self) -> None:
        self.closed = True


class DevicePlayer(FakePlayer):
    """Stands in for omni_cli.audio.player.Player inside run_chat."""

    instances: list[DevicePlayer] = []
    output_latency = 0.02
    active = True  # the output stream runs (what the sound-server watch reads)

    def __init__(self, device: str | None = None, sample_rate: int = RATE, on_render: Callable[[np.ndarray, int], None] | None = None) -> None:
        super().__init__()
        self.on_render = on_render
        self.device_name, self.device_rate, self.underruns, self.xruns = "speaker", sample_rate, 0, 0
        DevicePlayer.instances.append(self)

    def start(self) -> DevicePlayer:
        return self

    def close(self) -> None:
        pass


@pytest.mark.parametrize("echo_loads", [True, False])
def test_run_chat_wires_the_echo_canceller_or_says_why_it_is_half_duplex(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, speech: np.ndarray, echo_loads: bool
) -> None:
    import functools

    import omni_cli.audio.echo as echo
    import omni_cli.audio.mic as mic_module
    import omni_cli.audio.player as player_module
    import omni_cli.chat.devices as chat_module
    from omni_cli.chat.devices import run_chat
    from omni_cli.config import ChatOptions

    made: list[echo.EchoCanceller] = []
    real = echo.EchoCanceller

    def canceller() -> echo.EchoCanceller:
        if not echo_loads:
            raise echo.EchoUnavailable("echo cancellation unavailable: the livekit package is not installed (pip install livekit).")
        made.append(real())
        return made[-1]

    class Mic(ScriptedMicrophone):
        def __init__(self, *args: object, clean: object = None, **kwargs: object) -> None:
            super().__init__(*args, **kwargs)  # type: ignore[arg-type]
            self.cleaned_by = clean
            self.input_latency = 0.03

    ScriptedMicrophone.audio = np.concatenate([silence(300), speech, silence(600)])
    ScriptedMicrophone.instances, DevicePlayer.instances = [], []
    monkeypatch.setattr(echo, "EchoCanceller", canceller)
    monkeypatch.setattr(mic_module, "Microphone", Mic)
    monkeypatch.setattr(player_module, "Player", DevicePlayer)
    monkeypatch.setattr(chat_module, "ConversationSettings", functools.partial(ConversationSettings, mic_timeout_s=0.3, poll_s=0.01))
    monkeypatch.setattr(chat_module, "_stdin_is_terminal", lambda: False)
    pipeline = FakePipeline(tokens=2)
    pipeline.sample_rate = RATE
    view, out = plain_view()
    run_chat(pipeline, ChatOptions(session_dir=tmp_path / "s", hangover_ms=300), view)

    session = transcript(tmp_path / "s")[0]
    (mic,), (player,) = ScriptedMicrophone.instances, DevicePlayer.instances
    if echo_loads:
        (used,) = made
        assert session["echo_cancellation"] is True and session["barge_in"] == "auto" and session["echo_delay_ms"] == 50
        assert mic.cleaned_by == used.process and player.on_render == used.play_reference  # the mic cleaned, the speaker its reference
        assert "half-duplex until the echo canceller has learnt the room" in out.getvalue()
    else:
        assert session["echo_cancellation"] is False and session["barge_in"] is False
        assert mic.cleaned_by is None and player.on_render is None
        said = " ".join(out.getvalue().split())  # the console wraps at 120 columns
        assert said.count("echo cancellation unavailable") == 1
        assert "(pip install livekit). Half-duplex: omni will not hear you while it speaks (with headphones, --barge-in)." in said


@pytest.mark.parametrize("terminal", [False, True])
def test_a_microphone_lost_mid_session_ends_or_falls_back_to_typing(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, speech: np.ndarray, terminal: bool
) -> None:
    import functools

    import omni_cli.audio.mic as mic_module
    import omni_cli.chat.devices as chat_module
    from omni_cli.chat.devices import run_chat
    from omni_cli.config import ChatOptions

    ScriptedMicrophone.audio = np.concatenate([silence(300), speech, silence(600)])
    ScriptedMicrophone.instances = []
    monkeypatch.setattr(mic_module, "Microphone", ScriptedMicrophone)
    monkeypatch.setattr(chat_module, "ConversationSettings", functools.partial(ConversationSettings, mic_timeout_s=0.3, poll_s=0.01))
    monkeypatch.setattr(chat_module, "_stdin_is_terminal", lambda: terminal)
    view, out = plain_view()
    typed = iter(["typed after the mic died", None])
    options = ChatOptions(session_dir=tmp_path / "s", hangover_ms=300)
    code = run_chat(FakePipeline(tokens=2), options, view, read_line=lambda: next(typed))

    rows = [r for r in transcript(tmp_path / "s") if r["type"] != "speculative_reply_dropped"]  # drafts at the question's word gaps
    kinds = [r["type"] for r in rows]
    assert kinds[:5] == ["session", "listening", "user", "assistant", "error"]
    assert "stopped delivering audio" in rows[4]["message"] and "stopped delivering audio" in out.getvalue()
    assert ScriptedMicrophone.instances[0].closed
    if terminal:
        assert code == 0 and kinds[5:] == ["user", "assistant", "end"] and rows[5]["text"] == "typed after the mic died"
    else:
        assert code == 1 and kinds[5:] == ["end"] and rows[5]["reason"] == "microphone lost"
    assert rows[-1]["mic_overflows"] == 0
