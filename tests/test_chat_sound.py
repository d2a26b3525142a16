"""`omni chat` as a user hears it, on a private PulseAudio server (tests/sound_server.py).

- With the tiny model in a real `omni chat` process: spoken questions played into the virtual
  microphone, the microphone and the speaker recorded; the latency heard (true end of speech →
  first reply sample on the speaker) against the transcript's `latency_ms`, and gaps in replies.
- With run_chat in this process and a scripted model whose replies are real speech (espeak-ng):
  the speaker's output looped back into the microphone (module-loopback: an open speaker), where
  omni must never interrupt itself but a question spoken over the echo must; and steady noise
  and music at -20 dBFS, which must start no turn while quiet speech does.

Recordings are mapped onto time.monotonic(), the clock of the transcripts' `*_t` fields.
Skipped with the reason where no sound server can start. Ctrl-C (SIGINT) is how a person ends
a chat, so it is a clean end: exit code 0, transcript closed with an "end" record.
"""

from __future__ import annotations

import io
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import soundfile as sf
from rich.console import Console

from sound_server import MIC_SINK
from sound_session import LOUD, WINDOW_S, ChatProcess, Recording, heard_turns, rows_of

sys.path.insert(0, str(Path(__file__).resolve().parent / "audio"))
from signals import NOISES, at_dbfs, level_db, true_bounds  # noqa: E402

from omni_cli.audio.io import load_audio  # noqa: E402
from omni_cli.pipeline import AudioChunk, Done, History, TextDelta  # noqa: E402

pytestmark = pytest.mark.sound

RATE = 16000


def report(capsys: pytest.CaptureFixture[str], record_property, line: str, **figures: float) -> None:
    for name, value in figures.items():
        record_property(name, value)
    with capsys.disabled():
        print(f"\n  {line}")


# -- omni chat with the tiny model ------------------------------------------------------------------


@pytest.fixture(scope="module")
def spoken_session(sound_server, tiny_model, question_wavs: list[Path], tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """`omni chat` (the tiny model, a user's defaults, Ω = 10) answering the three questions in turn,
    the microphone and the speaker recorded."""
    folder = tmp_path_factory.mktemp("spoken")
    mic = Recording(sound_server, folder / "mic.wav", sink=MIC_SINK)
    speaker = Recording(sound_server, folder / "speaker.wav")
    chat = ChatProcess(sound_server, tiny_model, folder / "session", "--chunk-units", "10", "--max-new-tokens", "60")
    try:
        chat.wait_listening()
        for k, question in enumerate(question_wavs, start=1):
            assert sound_server.play_into_mic(question).wait(15) == 0
            chat.wait_for(f"reply {k}", lambda rows, k=k: sum(r["type"] == "assistant" for r in rows) >= k, timeout=60)
            time.sleep(0.8)
        code = chat.interrupt()
    finally:
        chat.kill()
        mic.stop()
        speaker.stop()
    return SimpleNamespace(code=code, rows=chat.rows(), output=chat.output(), folder=folder / "session", speaker=speaker, heard=heard_turns(mic, speaker))


def test_chat_answers_spoken_questions_aloud(spoken_session: SimpleNamespace) -> None:
    s = spoken_session
    assert s.code == 0, s.output
    rows = [r for r in s.rows if r["type"] in ("session", "listening", "user", "assistant", "end")]
    assert [r["type"] for r in rows] == ["session", "listening"] + ["user", "assistant"] * 3 + ["end"], s.output
    assert rows[0]["mode"] == "voice" and rows[0]["barge_in"] == "auto" and rows[0]["echo_cancellation"] is True
    assert rows[-1]["reason"] == "ctrl-c" and rows[-1]["turns"] == 3
    for user, reply, heard in zip(rows[2:-1:2], rows[3:-1:2], s.heard, strict=True):
        question, _ = sf.read(s.folder / user["wav"], dtype="float32")
        assert 1.5 < question.size / RATE < 4.5  # a question (2-2.5 s) with pre-roll and pause
        assert reply["text"] and reply["units"] > 0 and (s.folder / reply["wav"]).exists()
        assert reply["stopped"] == "eos" or reply["tokens"] == 60
        # Heard on the speaker after the question ended, all of it.
        assert heard.first_sound is not None and heard.first_sound > user["speech_end_t"]
        heard_s = float(np.sum(s.speaker.window(heard.first_sound, heard.reply_end) > LOUD)) * WINDOW_S
        assert heard_s > 0.8 * reply["audio_seconds"] - 0.3, (heard_s, reply["audio_seconds"])


def test_the_latency_heard_is_the_latency_recorded(spoken_session: SimpleNamespace, capsys, record_property) -> None:
    """From the true end of speech (in the microphone's recording) to the first reply sample on the speaker."""
    users = [r for r in spoken_session.rows if r["type"] == "user"]
    replies = [r for r in spoken_session.rows if r["type"] == "assistant"]
    heard = [turn.latency_ms for turn in spoken_session.heard]
    recorded = [reply["latency_ms"] for reply in replies]
    assert len(heard) == len(recorded) == 3 and None not in heard
    errors = [r - h for r, h in zip(recorded, heard, strict=True)]
    end_of_turn = [user["end_of_turn_ms"] for user in users]
    report(
        capsys,
        record_property,
        f"heard latency {statistics.median(heard):.0f} ms median, {max(heard):.0f} max; transcript minus heard "
        f"{', '.join(f'{e:+.0f}' for e in errors)} ms; end of turn {statistics.median(end_of_turn):.0f} ms",
        heard_latency_median_ms=statistics.median(heard),
        heard_latency_max_ms=max(heard),
    )
    assert max(abs(e) for e in errors) <= 20
    # Full duplex from the start (the warm-up hiss): 200 ms of silence, within a frame of the voiced end (the end of
    # speech to the sample lies up to 90 ms past it), and at most the 200 ms wait for Silero on a soft ending.
    assert all(200 - 90 <= ms <= 200 + 30 + 200 for ms in end_of_turn)


def test_replies_play_without_gaps(spoken_session: SimpleNamespace, capsys, record_property) -> None:
    """Ω = 10: after its first sound, no reply falls silent for more than 50 ms."""
    end = next(r for r in spoken_session.rows if r["type"] == "end")
    longest = [turn.longest_gap_s * 1000 for turn in spoken_session.heard]
    report(
        capsys,
        record_property,
        f"longest gap per reply {', '.join(f'{g:.0f}' for g in longest)} ms; player underruns {end['speaker_underruns']}, "
        f"device underflows {end['speaker_xruns']}, mic overflows {end['mic_overflows']}",
        longest_gap_ms=max(longest),
    )
    assert end["speaker_underruns"] == 0
    assert max(longest) <= 50


# -- run_chat in this process with replies of real speech ------------------------------------------


SENTENCES = [
    # 6.5 s: the echo canceller converges within the first reply (half-duplex until then).
    "The tallest mountain in Europe is Mount Elbrus, in the Caucasus, at five thousand six hundred and forty two metres.",
    "It is about four degrees outside.",
    "Paris is the capital of France.",
    "You can boil an egg in ten minutes.",
    "The train leaves at seven.",
    "A kilometre is one thousand metres, and a mile is about one point six kilometres, so ten miles are a little more "
    "than sixteen kilometres.",  # talked over 1.5 s in
    "Yes, of course.",
]
QUESTIONS = ["What is the tallest mountain?", "How cold is it?", "What is the capital?", "How do I boil an egg?", "When does it leave?", "How far is it?"]


def espeak(text: str, folder: Path) -> tuple[Path, np.ndarray]:
    path = folder / f"{abs(hash(text))}.wav"
    subprocess.run(["espeak-ng", "-w", str(path), text], check=True, capture_output=True)
    return path, load_audio(path)


@pytest.fixture(scope="module")
def spoken_lines(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """espeak-ng's replies (16 kHz arrays) and questions (WAV files)."""
    if subprocess.run(["which", "espeak-ng"], capture_output=True).returncode:
        pytest.skip("espeak-ng not installed; run .ci/sound-server.sh")
    folder = tmp_path_factory.mktemp("espeak")
    return SimpleNamespace(replies=[espeak(t, folder)[1] for t in SENTENCES], questions=[espeak(t, folder)[0] for t in QUESTIONS])


class SpokenReplies:
    """A ReplySource whose reply to the n-th turn is the n-th recording, streamed 10x faster than real time."""

    sample_rate = RATE
    context_budget = 4096

    def __init__(self, replies: list[np.ndarray]) -> None:
        self.replies = replies

    def respond(self, audio: np.ndarray | str, history: History, should_stop=None) -> Iterator[object]:  # noqa: ANN001
        reply = self.replies[min(len(history), len(self.replies) - 1)]  # the turn: earlier turns are in the history
        step, n, stopped = RATE // 5, 0, "eos"
        for k, start in enumerate(range(0, reply.size, step)):
            if should_stop is not None and should_stop():
                stopped = "interrupted"
                break
            time.sleep(0.02)
            n += 1
            yield TextDelta(f"w{k} ", time.monotonic(), tokens=n)
            yield AudioChunk(reply[start : start + step], time.monotonic(), k, RATE, tokens=n)
        yield Done(" ".join(f"w{k}" for k in range(n)), [], time.monotonic(), n, stopped, None)


class InProcessChat:
    """run_chat on the sound server in a thread, with a scripted model; `session` once it exists."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, pipeline: object, session_dir: Path) -> None:
        import omni_cli.chat.devices as chat
        from omni_cli.chat.view import ChatView
        from omni_cli.config import ChatOptions

        sessions: list[chat.ChatSession] = []

        class Kept(chat.ChatSession):
            def __init__(self, *args: object, **kwargs: object) -> None:
                super().__init__(*args, **kwargs)
                sessions.append(self)

        monkeypatch.setattr(chat, "ChatSession", Kept)
        self.sessions, self.session_dir, self.out = sessions, session_dir, io.StringIO()
        self.error: BaseException | None = None
        view = ChatView(Console(file=self.out, force_terminal=False, width=120), live=False)

        def run() -> None:
            try:
                chat.run_chat(pipeline, ChatOptions(session_dir=session_dir), view)  # type: ignore[arg-type]
            except BaseException as exc:  # noqa: BLE001 - reported by the test thread
                self.error = exc

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        self.wait_for("listening", lambda rows: any(r["type"] == "listening" for r in rows), 30)

    def rows(self) -> list[dict]:
        return rows_of(self.session_dir)

    def wait_for(self, what: str, found, timeout: float) -> list[dict]:  # noqa: ANN001
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            rows = self.rows()
            if found(rows):
                return rows
            if not self.thread.is_alive():
                raise AssertionError(f"chat ended ({self.error!r}) before {what}:\n{self.out.getvalue()}")
            time.sleep(0.02)
        raise AssertionError(f"no {what} within {timeout} s; transcript {self.rows()}\n{self.out.getvalue()}")

    def stop(self) -> None:
        if self.sessions:
            self.sessions[0].request_stop()
        self.thread.join(15)
        assert not self.thread.is_alive(), "run_chat did not end"
        if self.error is not None:
            raise self.error


def count(rows: list[dict], kind: str) -> int:
    return sum(r["type"] == kind for r in rows)


@contextmanager
def open_speakers(sound_server, delay_ms: int, echo_db: float) -> Iterator[None]:
    """Within the block, the speaker is looped back into the microphone `delay_ms` later at `echo_db`."""
    module = sound_server.pactl("load-module", "module-loopback", "source=omni_out.monitor", f"sink={MIC_SINK}", f"latency_msec={delay_ms}").strip()
    try:
        sound_server.pactl("set-sink-input-volume", sink_input_of(sound_server, module), f"{10 ** (echo_db / 20):.4f}")  # a linear factor
        yield
    finally:
        sound_server.pactl("unload-module", module)


def talk_over_a_reply(sound_server, chat: InProcessChat, question: Path, replies_before: int, after_s: float) -> float:
    """Once the next reply plays, wait `after_s`, then speak `question` into the microphone; when it was started."""
    chat.wait_for("the reply", lambda rows: count(rows, "user") > replies_before and chat.sessions[0].replying, 10)
    time.sleep(after_s)
    spoken_over = time.monotonic()
    assert sound_server.play_into_mic(question).wait(15) == 0
    chat.wait_for("its answer", lambda rows: count(rows, "assistant") >= replies_before + 2, 30)
    return spoken_over


def sink_input_of(sound_server, module: str, timeout: float = 5.0) -> str:
    """The index of the sink input (playback stream) a loaded module owns."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for block in sound_server.pactl("list", "sink-inputs").split("Sink Input #")[1:]:
            if f"Owner Module: {module}\n" in block:
                return block.split("\n", 1)[0].strip()
        time.sleep(0.05)
    raise AssertionError(f"module {module} has no sink input")


@pytest.mark.slow  # ~30 s of real-time conversation per case
@pytest.mark.parametrize(("delay_ms", "echo_db"), [(30, 0.0), (150, -6.0)])
def test_on_open_speakers_omni_hears_you_over_its_own_echo(
    sound_server, spoken_lines, question_wavs: list[Path], monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys, record_property,
    delay_ms: int, echo_db: float,
) -> None:  # fmt: skip
    """The speaker is looped back into the microphone; five replies echo without interrupting
    themselves; a question spoken over the sixth stops it within 400 ms of its onset and is answered."""
    import omni_cli.audio.echo as echo

    heard: list[tuple[float, np.ndarray, np.ndarray]] = []  # (time, raw, cleaned) of every mic frame

    class Tapped(echo.EchoCanceller):
        def process(self, frame: np.ndarray) -> np.ndarray:
            cleaned = super().process(frame)
            heard.append((time.monotonic(), np.array(frame, np.float32), cleaned))
            return cleaned

    monkeypatch.setattr(echo, "EchoCanceller", Tapped)
    with open_speakers(sound_server, delay_ms, echo_db):
        chat = InProcessChat(monkeypatch, SpokenReplies(spoken_lines.replies), tmp_path / "session")
        try:
            for turn, question in enumerate(spoken_lines.questions[:5], start=1):
                assert sound_server.play_into_mic(question).wait(15) == 0
                chat.wait_for(f"reply {turn}", lambda rows, turn=turn: count(rows, "assistant") >= turn, 30)
                time.sleep(0.4)  # the echo's tail
            assert sound_server.play_into_mic(spoken_lines.questions[5]).wait(15) == 0
            spoken_over = talk_over_a_reply(sound_server, chat, question_wavs[0], replies_before=5, after_s=1.5)  # well into it
        finally:
            chat.stop()

    rows = chat.rows()
    replies = [r for r in rows if r["type"] == "assistant"]
    barge_ins = [r for r in rows if r["type"] == "barge_in"]
    full_duplex = next(r for r in rows if r["type"] == "full_duplex")
    # Never interrupted by its own voice: the first five replies played to their end.
    assert [r["stopped"] for r in replies[:5]] == ["eos"] * 5 and all("heard_seconds" not in r for r in replies[:5])
    assert len(barge_ins) == 1 and barge_ins[0]["turn"] == 6 and full_duplex["turn"] <= 2  # replies 2-5 in full duplex
    # The question over the echo stopped the reply: silent on the speaker within 400 ms of its onset.
    onset = spoken_over + true_bounds(load_audio(question_wavs[0]))[0]
    stopped_ms = (barge_ins[0]["stopped_t"] - onset) * 1000
    assert replies[5]["stopped"] == "interrupted" and 0 < replies[5]["heard_seconds"] < spoken_lines.replies[5].size / RATE
    # ... and was answered whole.
    user = [r for r in rows if r["type"] == "user"][6]
    assert user["seconds"] > 1.5 and replies[6]["stopped"] == "eos"
    # The echo removed from the cleaned microphone while the converged replies played (turns 2-5).
    times = np.array([t for t, _, _ in heard])
    spans = [(r["first_audio_t"] + 0.2, r["first_audio_t"] + r["audio_seconds"]) for r in replies[1:5]]
    picked = [k for k, t in enumerate(times) if any(a <= t <= b for a, b in spans)]
    raw = np.concatenate([heard[k][1] for k in picked])
    cleaned = np.concatenate([heard[k][2] for k in picked])
    erle = level_db(raw) - level_db(cleaned)
    end = rows[-1]
    report(
        capsys,
        record_property,
        f"echo {delay_ms} ms at {echo_db:+.0f} dB: ERLE {erle:.1f} dB on the cleaned mic (live {[r.get('echo_erle_db') for r in replies[:5]]}), "
        f"speaker silent {stopped_ms:.0f} ms after the question's onset (detected {barge_ins[0]['detect_ms']:.0f} ms after the "
        f"voiced onset, stop {barge_ins[0]['stop_ms']:.0f} ms), mic overflows {end['mic_overflows']}, device underflows {end['speaker_xruns']}",
        erle_db=round(erle, 1),
        barge_in_silent_ms=round(stopped_ms, 1),
    )
    assert level_db(raw) > -45  # the echo really reached the microphone
    assert erle >= 25.0
    assert 0 < stopped_ms <= 400


@pytest.mark.slow  # ~15 s of real-time conversation per case
@pytest.mark.parametrize(("delay_ms", "echo_db"), [(30, 0.0), (150, -6.0)])
def test_on_open_speakers_a_question_one_second_into_the_first_reply_interrupts_it(
    sound_server, spoken_lines, question_wavs: list[Path], monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys, record_property,
    delay_ms: int, echo_db: float,
) -> None:  # fmt: skip
    """Full duplex from the first word: the warm-up hiss taught the canceller the room before any reply."""
    with open_speakers(sound_server, delay_ms, echo_db):
        chat = InProcessChat(monkeypatch, SpokenReplies(spoken_lines.replies), tmp_path / "session")
        try:
            assert sound_server.play_into_mic(spoken_lines.questions[0]).wait(15) == 0
            spoken_over = talk_over_a_reply(sound_server, chat, question_wavs[0], replies_before=0, after_s=1.0)  # of 6.5 s
        finally:
            chat.stop()
    rows = chat.rows()
    session = rows[0]
    replies = [r for r in rows if r["type"] == "assistant"]
    users = [r for r in rows if r["type"] == "user"]
    (barge_in,) = [r for r in rows if r["type"] == "barge_in"]
    onset = spoken_over + true_bounds(load_audio(question_wavs[0]))[0]
    stopped_ms = (barge_in["stopped_t"] - onset) * 1000
    report(
        capsys,
        record_property,
        f"echo {delay_ms} ms at {echo_db:+.0f} dB: first reply interrupted, speaker silent {stopped_ms:.0f} ms after the question's onset; "
        f"echo returned {session.get('echo_return_db')} dB under the hiss",
        first_reply_barge_in_silent_ms=round(stopped_ms, 1),
    )
    assert session["echo_warm_up"] is True
    assert barge_in["turn"] == 1 and not barge_in["goes_on_with_the_question"]
    assert replies[0]["stopped"] == "interrupted" and 0 < replies[0]["heard_seconds"] < 3.0
    # While the user is still speaking. Slower than once the canceller has heard seconds of speech (≤ 400 ms, above):
    # this early AEC3 ducks the user's voice under the reply for a while (measured 0.21-1.34 s here, median ~0.5 s).
    question_s = float(np.diff(true_bounds(load_audio(question_wavs[0])))[0])
    assert 0 < stopped_ms < question_s * 1000
    # ... and the question is answered whole (2.2 s of speech, pre-roll and the silence after it).
    assert len(users) == 2 and users[1]["seconds"] > 1.5 and replies[1]["stopped"] == "eos"


@pytest.mark.slow  # 30 s of noise in real time
def test_noise_and_music_start_no_turn_but_quiet_speech_does(sound_server, question_wavs: list[Path], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    noises = np.concatenate([at_dbfs(NOISES[name](5.0, seed=1), level) for level in (-20.0, -10.0) for name in ("white", "pink", "music")])
    sf.write(tmp_path / "noise.wav", noises, RATE, subtype="FLOAT")
    sf.write(tmp_path / "quiet.wav", at_dbfs(load_audio(question_wavs[1]), -40.0), RATE, subtype="FLOAT")
    chat = InProcessChat(monkeypatch, SpokenReplies([np.zeros(RATE // 10, np.float32)]), tmp_path / "session")
    try:
        assert sound_server.play_into_mic(tmp_path / "noise.wav").wait(40) == 0
        time.sleep(0.7)  # a hang-over
        # No turn, and noise did not even make omni think (no draft started and dropped).
        assert [r["type"] for r in chat.rows()] == ["session", "listening"], chat.out.getvalue()
        assert sound_server.play_into_mic(tmp_path / "quiet.wav").wait(15) == 0
        rows = chat.wait_for("the quiet question", lambda rows: count(rows, "user") == 1, 10)
    finally:
        chat.stop()
    # (A draft dropped now is the quiet question's own pause: drafts start after 60 ms of silence.)
    user = next(r for r in rows if r["type"] == "user")
    assert 1.5 < user["seconds"] < 4.5


def test_devices_lists_the_sound_servers_devices(sound_server) -> None:
    env = {**os.environ, **sound_server.env, "COLUMNS": "150"}
    done = subprocess.run([sys.executable, "-m", "omni_cli.cli", "devices"], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    default_row = next(line for line in done.stdout.splitlines() if "input, output" in line)
    assert "default" in default_row and " Hz" in default_row
