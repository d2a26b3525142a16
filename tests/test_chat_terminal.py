"""What `omni chat` puts on the terminal, and how fast: issue 13's clean screen and fast edges.

- Model text with control characters (ESC, NUL, SI, DLE, CSI) is printed without them, in
  the live view, the plain view and transcribe-and-reply's stdout; --json keeps it, escaped.
- Native libraries writing to file descriptor 2 land in the session's native.log; Python's own
  error lines and tracebacks still reach the terminal.
- The sound system going away is noticed within a second and said once; the session is kept.
- A wrong microphone is one line within 2 s (no torch imported); a real `omni chat` in a
  pseudo-terminal shows something within 1 s and exits within 1 s of "session saved".
- `omni devices` tells PulseAudio devices with the same description apart; torch's thread count.
"""

from __future__ import annotations

import io
import json
import os
import re
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from rich.console import Console
from typer.testing import CliRunner

from omni_cli.audio.devices import DeviceInfo
from omni_cli.audio.watch import SoundWatch
from omni_cli.chat.view import ChatView, devices_table
from omni_cli.terminal import printable
from omni_cli.threads import available_cores, interactive_threads

RATE = 16000
NASTY = "a\x1b[2Jb\x00c\x0fd\x10e\x9b31mf\x07g\rh"  # clear screen, NUL, SI, DLE, 8-bit CSI, BEL, CR
CONTROLS = ("\x1b[2J", "\x00", "\x0f", "\x10", "\x9b", "\x07", "\r")
SERVER_GONE = "the sound server is not running (Connection failure: Connection refused); start it (PulseAudio/PipeWire) and try again."


def transcript(session_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (session_dir / "transcript.jsonl").read_text().splitlines()]


class NastyReplies:
    """A ReplySource whose text holds control characters; `during(i)` runs after token i (e.g. a native write to fd 2).
    Each next token takes `token_s`, so what `during` set off is acted on first, as with a real model."""

    sample_rate: int | None = None
    context_budget = 4096

    def __init__(self, tokens: int = 4, during: Callable[[int], None] | None = None, token_s: float = 0.01) -> None:
        self.tokens, self.during, self.token_s = tokens, during, token_s
        self.produced = 0

    def respond(self, audio: np.ndarray | str, history: object = None, should_stop: Callable[[], bool] | None = None) -> Iterator[object]:
        from omni_cli.pipeline import Done, TextDelta

        self.produced = 0
        for i in range(self.tokens):
            self.produced += 1
            yield TextDelta(NASTY if i == 0 else f" w{i}", 0.0)
            if self.during is not None:
                self.during(i)
            time.sleep(self.token_s)
            if should_stop is not None and should_stop():
                break
        yield Done(NASTY, [], 0.0, self.produced, "eos", None)


# -- control characters ---------------------------------------------------------------------


def test_printable_drops_control_characters_and_keeps_newlines_and_tabs() -> None:
    assert printable(NASTY) == "a[2Jbcde31mfgh"
    assert printable("line one\n\tline two ünïcödé ✓") == "line one\n\tline two ünïcödé ✓"
    assert printable("\x7f\x85\x9f") == ""


@pytest.mark.parametrize("live", [True, False])
def test_chat_prints_model_text_without_control_characters(tmp_path: Path, live: bool) -> None:
    from omni_cli.chat.session import ChatSession
    from omni_cli.chat.transcript import SessionRecorder

    out = io.StringIO()
    view = ChatView(Console(file=out, force_terminal=live, width=100, color_system=None), live=live)
    view.start()
    session = ChatSession(NastyReplies(), view, SessionRecorder(tmp_path / "s"))
    session.ask("type \x1b[31mred\x00")
    view.stop()
    shown = out.getvalue()
    assert "a[2Jbcde31mfgh w1 w2 w3" in shown and "type [31mred" in shown
    for control in CONTROLS[:-1] if live else CONTROLS:  # rich's live display moves the cursor with CR itself
        assert control not in shown
    assert transcript(tmp_path / "s")[-1]["text"] == NASTY  # the transcript keeps what the model said


@pytest.mark.parametrize("terminal", [True, False])
def test_a_typed_question_shows_once(monkeypatch: pytest.MonkeyPatch, terminal: bool) -> None:
    """On a terminal the echoed "you> ..." line (two rows here) is taken away: the turn shows it as "you [1]: ..." (issue 22)."""
    from omni_cli.chat.view import ERASE_LINE_ABOVE

    typed = "what is the tallest mountain in europe and how high is it"  # 63 columns with the prompt: two rows of 40
    monkeypatch.setattr("builtins.input", lambda *args: typed)
    out = io.StringIO()
    view = ChatView(Console(file=out, force_terminal=terminal, width=40, color_system=None), live=False)
    assert view.prompt("you> ") == typed
    erased = out.getvalue().split("you> ", 1)[1]
    assert erased == (ERASE_LINE_ABOVE * 2 if terminal else "")
    view.user_typed(1, typed)
    assert out.getvalue().count(typed[:20]) == 1  # the terminal's echo is not in what omni writes; the turn is


def test_transcribe_stdout_strips_control_characters_and_json_escapes_them(tmp_path: Path) -> None:
    from omni_cli.transcribe import CheckedInput, transcribe_and_reply

    wav = tmp_path / "q.wav"
    sf.write(wav, 0.1 * np.random.default_rng(0).standard_normal(RATE).astype(np.float32), RATE)
    replies = NastyReplies(tokens=1)
    replies.vocoder = None  # type: ignore[attr-defined]
    out = io.StringIO()
    assert transcribe_and_reply(replies, [CheckedInput(wav)], None, as_json=False, out=out, err=io.StringIO()) == 0  # type: ignore[arg-type]
    assert out.getvalue() == "q.wav: a[2Jbcde31mfgh\n"
    out = io.StringIO()
    transcribe_and_reply(replies, [CheckedInput(wav)], None, as_json=True, out=out, err=io.StringIO())  # type: ignore[arg-type]
    line = out.getvalue().strip()
    assert json.loads(line)["text"] == NASTY
    for control in CONTROLS:
        assert control not in line


# -- native stderr ------------------------------------------------------------------------


NATIVE_SCRIPT = r"""
import ctypes, os, sys
from pathlib import Path
from omni_cli.terminal import NativeStderr

libc = ctypes.CDLL(None)
def native(line):  # what ALSA and PortAudio do: write(2, ...) from C
    data = line.encode() + b"\n"
    libc.write(2, data, len(data))

with NativeStderr() as log:
    native("ALSA lib pcm.c:8570:(snd_pcm_recover) underrun occurred")
    print("omni: error: a line of ours", file=sys.stderr)
    log.keep_in(Path(sys.argv[1]))
    native("Expression 'ret' failed in 'src/hostapi/alsa/pa_linux_alsa.c', line: 3665")
    print("captured:", log.captured())
native("after the block: back on the terminal")
raise RuntimeError("a traceback still reaches the terminal")
"""


def test_native_stderr_goes_to_the_log_and_python_errors_to_the_terminal(tmp_path: Path) -> None:
    log = tmp_path / "native.log"
    done = subprocess.run([sys.executable, "-c", NATIVE_SCRIPT, str(log)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert "omni: error: a line of ours" in done.stderr and "RuntimeError: a traceback still reaches the terminal" in done.stderr
    assert "after the block: back on the terminal" in done.stderr
    assert "ALSA lib" not in done.stderr and "Expression" not in done.stderr
    assert log.read_text().splitlines() == [
        "ALSA lib pcm.c:8570:(snd_pcm_recover) underrun occurred",
        "Expression 'ret' failed in 'src/hostapi/alsa/pa_linux_alsa.c', line: 3665",
    ]
    assert "captured: True" in done.stdout


def test_chat_keeps_native_messages_in_the_session_folder(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    import omni_cli.cli as cli
    import omni_cli.cli.talk as talk
    import omni_cli.setup.prepare as prepare

    def underrun(i: int) -> None:
        os.write(2, b"ALSA lib pcm.c:8570:(snd_pcm_recover) underrun occurred\n")  # fd 2, as libasound does

    monkeypatch.setattr(prepare, "check_model_files", lambda *args: None)
    monkeypatch.setattr(talk, "load_pipeline", lambda *args, **kwargs: NastyReplies(tokens=2, during=underrun))
    session_dir = tmp_path / "s"
    args = ["chat", "--model", "tiny", "--text", "--session-dir", str(session_dir)]
    result = CliRunner().invoke(cli.app, args, input="hi\n", env={"COLUMNS": "300"})
    assert result.exit_code == 0, result.output
    assert (session_dir / "native.log").read_text().count("underrun occurred") == 2
    assert "ALSA lib" not in result.output and "ALSA lib" not in capfd.readouterr().err
    assert f"native libraries (ALSA, PortAudio, ...) are in {session_dir / 'native.log'}" in result.output
    for control in CONTROLS:
        assert control not in result.output


# -- the sound system going away ----------------------------------------------------------


class Stream:
    """A microphone or speaker as the sound watch sees it."""

    def __init__(self, name: str) -> None:
        self.device_name, self.active, self.last_callback = name, True, 0.0


def test_the_sound_watch_reads_attributes_until_a_stream_stops_then_asks_the_server_once_a_second() -> None:
    now = [0.0]
    asked: list[float] = []
    answer: list[str | None] = [None]

    def server() -> str | None:
        asked.append(now[0])
        return answer[0]

    mic, speaker = Stream("USB Mic"), Stream("Speakers")
    watch = SoundWatch(mic, speaker, clock=lambda: now[0], server_problem=server)
    for t in (0.1, 0.2, 0.3):
        now[0] = mic.last_callback = t
        assert watch.problem() is None
    assert asked == []  # healthy streams: no subprocess, no syscall
    now[0] = 1.0  # the callbacks stall 0.7 s, the stream still runs and the server answers: a busy machine, not a fault
    assert watch.problem() is None and asked == [1.0]
    now[0] = 1.5
    assert watch.problem() is None and asked == [1.0]  # at most one question per second
    speaker.active = False
    now[0] = 2.0
    assert watch.problem() == "the speaker 'Speakers' stopped (unplugged, or taken by another program?); check it with `omni devices`."
    answer[0] = SERVER_GONE
    mic.active = False
    now[0] = 3.0
    assert watch.problem() == SERVER_GONE


def test_the_sound_server_gone_mid_reply_ends_listening_with_one_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, question_16k) -> None:
    import omni_cli.audio.mic as mic_module
    import omni_cli.audio.watch as watch_module
    import omni_cli.chat.devices as chat_module
    from omni_cli.audio.vad import frames
    from omni_cli.chat.devices import run_chat
    from omni_cli.config import ChatOptions

    class DyingMicrophone:
        """One question, then the server dies (PortAudio stops the stream) during the reply."""

        def __init__(self, device: str | None = None, frame_ms: int = 30, sample_rate: int = RATE, clean: object = None) -> None:
            audio = np.concatenate([np.zeros(RATE // 2, np.float32), question_16k[0], np.zeros(RATE, np.float32)])
            self.frames = list(frames(audio, sample_rate, frame_ms))
            self.frame_end_t: float | None = None
            self.input_latency = 0.0
            self.device_name, self.device_rate, self.overflows, self.dropped_frames = "mic", sample_rate, 0, 0
            self.active, self.last_callback, self.closed = True, None, False
            microphones.append(self)

        def start(self) -> DyingMicrophone:
            return self

        def read(self, timeout: float | None = None) -> np.ndarray | None:
            return self.frames.pop(0) if self.frames else None

        def clear(self) -> int:
            return 0

        def close(self) -> None:
            self.closed = True

    microphones: list[DyingMicrophone] = []
    replies = NastyReplies(tokens=50, during=lambda i: setattr(microphones[0], "active", i < 2), token_s=0.05)
    monkeypatch.setattr(mic_module, "Microphone", DyingMicrophone)
    monkeypatch.setattr(watch_module, "sound_server_problem", lambda timeout=1.0: SERVER_GONE)
    monkeypatch.setattr(chat_module, "_stdin_is_terminal", lambda: False)
    out = io.StringIO()
    view = ChatView(Console(file=out, width=300), live=False)
    # No speculative start: the server must die during the reply, after the turn was heard.
    code = run_chat(replies, ChatOptions(session_dir=tmp_path / "s", hangover_ms=300, speculate_ms=0), view)

    assert code == 1 and microphones[0].closed
    assert replies.produced == 3  # the stream stopped after the 3rd token: no other is made (the 4th would take 50 ms)
    rows = transcript(tmp_path / "s")
    assert [r["type"] for r in rows] == ["session", "listening", "user", "assistant", "error", "end"]
    assert rows[3]["stopped"] == "error" and rows[3]["error"] == SERVER_GONE and rows[4]["message"] == SERVER_GONE
    assert rows[5]["reason"] == "microphone lost"
    assert (tmp_path / "s" / rows[2]["wav"]).exists()
    assert [line for line in out.getvalue().splitlines() if "sound server" in line] == [f"omni: {SERVER_GONE}"]


def test_a_typed_session_drops_a_dead_speaker_and_goes_on_as_text(tmp_path: Path) -> None:
    from omni_cli.chat.session import ChatSession
    from omni_cli.chat.transcript import SessionRecorder

    class DeadSpeaker(Stream):
        first_audio_time = None
        output_latency = 0.0
        playing = True  # its callback never runs again: without the watch this waits out the reply

        def play(self, chunk: np.ndarray) -> None: ...
        def finish(self) -> None: ...
        def stop(self) -> None: ...

    speaker = DeadSpeaker("Speakers")
    speaker.active = False
    out = io.StringIO()
    session = ChatSession(NastyReplies(), ChatView(Console(file=out, width=300), live=False), SessionRecorder(tmp_path / "s"), player=speaker)
    session.conversation.device_problem = SoundWatch(None, speaker, server_problem=lambda: SERVER_GONE).problem
    start = time.monotonic()
    first = session.ask("one")
    second = session.ask("two")
    assert time.monotonic() - start < 1.0
    assert first is not None and second is not None
    assert session.conversation.sink is None and first.error is None and second.text
    assert f"omni: {SERVER_GONE.rstrip('.')}; replies continue as text only." in out.getvalue().splitlines()


# -- devices and threads ------------------------------------------------------------------


def test_devices_table_names_pulseaudio_devices_that_share_a_description() -> None:
    rows = [
        DeviceInfo(0, "default", "ALSA", 32, 32, 44100.0, True, True),
        DeviceInfo(1, "Null Output", "PulseAudio", 0, 2, 48000.0, False, False, pulse_name="omni_out", opens_as=0),
        DeviceInfo(2, "Null Output", "PulseAudio", 0, 2, 48000.0, False, False, pulse_name="omni_mic", opens_as=0),
    ]
    out = io.StringIO()
    Console(file=out, width=150, color_system=None).print(devices_table(rows))
    lines = out.getvalue().splitlines()
    assert any("│ 1 │ Null Output (omni_out)" in line for line in lines)
    assert any("│ 2 │ Null Output (omni_mic)" in line for line in lines)
    assert any("│ 0 │ default " in line for line in lines)


def test_torch_gets_all_cores_but_one_unless_the_user_chose(tmp_path: Path) -> None:
    assert (interactive_threads(cores=2, environ={}).count, interactive_threads(cores=8, environ={}).count) == (1, 7)
    assert interactive_threads(cores=1, environ={}).count == 1
    assert interactive_threads(cores=2, environ={}).description == "1 of 2 cores (one left for audio and the screen)"
    chosen = interactive_threads(cores=8, environ={"OMP_NUM_THREADS": "4,2"})
    assert (chosen.count, chosen.source) == (4, "OMP_NUM_THREADS")
    assert interactive_threads(cores=8, environ={"OMP_NUM_THREADS": "lots"}).count == 7
    assert interactive_threads(3, cores=8, environ={"OMP_NUM_THREADS": "4"}).source == "--threads"
    quota = tmp_path / "cpu.max"
    quota.write_text("150000 100000\n")  # a container allowed 1.5 CPUs
    assert available_cores(quota) == min(2, len(os.sched_getaffinity(0)))
    quota.write_text("max 100000\n")
    assert available_cores(quota) == len(os.sched_getaffinity(0))


def test_loading_applies_the_thread_choice_and_doctor_says_it(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    import omni_cli.cli.shared as cli
    import omni_cli.pipeline as pipeline
    import omni_cli.threads as threads
    import omni_cli.setup.prepare as model_files
    from omni_cli.setup.doctor import WARN, check_threads

    monkeypatch.setattr(model_files, "check_model_files", lambda *args: None)
    monkeypatch.setattr(model_files, "prepare_model_files", lambda *args, **kwargs: type("Files", (), {"model_dir": Path("m")})())
    monkeypatch.setattr(pipeline.SpeechToSpeech, "load", classmethod(lambda cls, *args: "loaded"))
    monkeypatch.setattr(threads, "available_cores", lambda: 4)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    shown: list[str | None] = []
    try:
        assert cli.load_pipeline(Path("m"), None, None, "fp32", "cpu", cli.StreamingConfig(), show=shown.append) == "loaded"
        assert torch.get_num_threads() == 3 and shown == [None, "loading the model from m"]
        cli.load_pipeline(Path("m"), None, None, "fp32", "cpu", cli.StreamingConfig(), threads=1)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    assert "give the model 3 of 4 cores (one left for audio and the screen)" in check_threads().detail
    monkeypatch.setenv("OMP_NUM_THREADS", "4")
    assert check_threads().status == WARN and "--threads 3" in check_threads().detail


# -- real processes: start, failure and exit times -------------------------------------------

ANSI = re.compile(rb"\x1b\[[0-9;?]*[A-Za-z]")


def chat_command(tiny_model, session_dir: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "omni_cli.cli", "chat",
        "--model", str(tiny_model.model_dir), "--speech-encoder", str(tiny_model.speech_encoder),
        "--vocoder", str(tiny_model.vocoder_dir), "--precision", "fp32", "--device", "cpu",
        "--session-dir", str(session_dir), *extra,
    ]  # fmt: skip


class PtyChat:
    """`omni chat` on a pseudo-terminal, as a person runs it: rich's live display, keys typed in."""

    def __init__(self, command: list[str], env: dict[str, str]) -> None:
        import pty

        self.master, slave = pty.openpty()
        env = {**os.environ, **env, "TERM": "xterm", "COLUMNS": "120", "LINES": "40", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
        self.started = time.monotonic()
        self.process = subprocess.Popen(command, stdin=slave, stdout=slave, stderr=slave, env=env, start_new_session=True)
        os.close(slave)
        self.raw = b""
        self.first_output: float | None = None
        self.exited: float | None = None

    def text(self, since: int = 0) -> str:
        return ANSI.sub(b"", self.raw[since:]).decode(errors="replace")

    def _pump(self, timeout: float) -> bool:
        """Read what the terminal shows within `timeout`; True when something came."""
        data = b""
        if select.select([self.master], [], [], timeout)[0]:
            try:
                data = os.read(self.master, 65536)
            except OSError:  # the child closed the terminal
                pass
            if data and self.first_output is None:
                self.first_output = time.monotonic()
            self.raw += data
        if self.exited is None and self.process.poll() is not None:
            self.exited = time.monotonic()
        return bool(data)

    def wait_for(self, needle: str, timeout: float, since: int = 0) -> float:
        """Read until `needle` shows (ANSI codes aside) after byte `since`; when it showed."""
        deadline = time.monotonic() + timeout
        while needle not in self.text(since):
            while not self._pump(0.02):
                if time.monotonic() > deadline or self.exited is not None:
                    pytest.fail(f"no {needle!r} within {timeout} s (exit {self.process.poll()}):\n{self.text()}")
        return time.monotonic()

    def type(self, keys: bytes) -> None:
        os.write(self.master, keys)

    def wait_exit(self, timeout: float) -> int:
        """Wait for the process to end (noting when), then read what it left on the terminal; its exit code."""
        deadline = time.monotonic() + timeout
        while self.exited is None and time.monotonic() < deadline:
            self._pump(0.02)
        if self.exited is None:
            self.process.kill()
            pytest.fail(f"omni chat did not exit within {timeout} s:\n{self.text()}")
        while self._pump(0.0):  # what it wrote last
            pass
        return self.process.returncode

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        os.close(self.master)


def test_a_wrong_microphone_is_one_line_within_2_s_without_loading_torch(tmp_path: Path, tiny_model) -> None:
    """Whatever the machine has (no server here: PULSE_SERVER points nowhere), a wrong name fails before torch loads."""
    env = {**os.environ, "PULSE_SERVER": f"unix:{tmp_path / 'no-server'}"}
    args = ["chat", "--model", str(tiny_model.model_dir), "--speech-encoder", str(tiny_model.speech_encoder), "--input-device", "no-such-microphone", "--session-dir", str(tmp_path / "s")]
    code = f"import sys\nfrom omni_cli.cli import app\ntry:\n    app({args!r})\nexcept SystemExit as exc:\n    print(exc.code, 'torch' in sys.modules)\n"
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    elapsed = time.monotonic() - start
    assert done.stdout.split() == ["2", "False"], done.stderr
    assert len(done.stderr.splitlines()) == 1 and done.stderr.startswith("omni: error: "), done.stderr
    assert "no-such-microphone" in done.stderr or "PortAudio library is missing" in done.stderr
    assert elapsed < 2.0, f"{elapsed:.2f} s"
    assert not (tmp_path / "s").exists()


@pytest.mark.slow  # loads torch and the tiny model in a child process (~5 s on 2 cores)
def test_chat_shows_what_it_loads_within_1_s_and_exits_within_1_s_of_session_saved(tiny_model, tmp_path: Path, capsys) -> None:
    # No sound server: the speaker is missing (one line) and the questions are typed.
    chat = PtyChat(chat_command(tiny_model, tmp_path / "s", "--text", "--max-new-tokens", "4"), {"PULSE_SERVER": f"unix:{tmp_path / 'none'}"})
    try:
        chat.wait_for("you>", timeout=90)
        assert chat.first_output is not None and "checking" in chat.text()
        first_output = chat.first_output - chat.started
        chat.type(b"hello \x1b[31mthere\n")
        chat.wait_for("you>", timeout=30, since=chat.raw.rindex(b"you>") + 4)
        chat.type(b"\x04")  # Ctrl-D: end of input
        saved = chat.wait_for("session saved", timeout=30)
        code = chat.wait_exit(timeout=10)
    finally:
        chat.close()
    exit_after_saved = chat.exited - saved
    with capsys.disabled():
        print(f"\n  first output {first_output * 1000:.0f} ms, exit {exit_after_saved * 1000:.0f} ms after 'session saved'")
    assert code == 0
    assert first_output < 1.0
    assert exit_after_saved < 1.0
    assert "you [1]: hello [31mthere" in chat.text()  # what the view printed, ESC taken out (the tty's own echo shows ^[)
    assert [r["type"] for r in transcript(tmp_path / "s")] == ["session", "user", "assistant", "end"]


@pytest.mark.sound
@pytest.mark.slow  # a private sound server, torch and the tiny model in a child process, one spoken question: ~10 s
@pytest.mark.parametrize("how", ["SIGKILL", "SIGSTOP"])  # the sound server dies, or hangs
def test_killing_the_sound_server_mid_reply_is_one_line_and_the_session_is_kept(tiny_model, question_wavs, tmp_path: Path, capsys, how: str) -> None:
    from sound_server import start_sound_server

    server, reason = start_sound_server()  # its own: the shared one must outlive this test
    if server is None:
        pytest.skip(f"no sound server: {reason}")
    session_dir = tmp_path / "s"
    command = chat_command(tiny_model, session_dir, "--max-new-tokens", "400", "--first-chunk-units", "5", "--chunk-units", "20", "--hangover-ms", "450")
    chat = PtyChat(command, server.env)
    try:
        chat.wait_for("listening", timeout=90)
        first_output = chat.first_output - chat.started
        server.play_into_mic(question_wavs[0])
        chat.wait_for("● speaking", timeout=30)  # the status (a note also says "omni speaking")
        time.sleep(0.3)
        server.process.send_signal(getattr(signal, how))
        killed, at_kill = time.monotonic(), len(chat.raw)
        said = chat.wait_for("sound server", timeout=5, since=at_kill)
        at_said = chat.raw.index(b"sound server", at_kill)
        moved_on = chat.wait_for("typing", timeout=5, since=at_kill)  # the status after the fault: typed questions
        after_kill = chat.text(at_kill)
        chat.type(b"\x04")
        saved = chat.wait_for("session saved", timeout=10, since=at_kill)
        code = chat.wait_exit(timeout=10)
    finally:
        chat.close()
        server.stop()
    with capsys.disabled():
        print(f"\n  first output {first_output * 1000:.0f} ms, server death said {(said - killed) * 1000:.0f} ms after, exit {(chat.exited - saved) * 1000:.0f} ms after 'session saved'")
    assert code == 0
    assert said - killed < 2.0 and first_output < 1.0 and chat.exited - saved < 1.0
    assert len([line for line in after_kill.splitlines() if "sound server" in line]) == 1
    # Typed questions once the devices let go: at once when the server died, after their 2 s timeout when it hangs.
    assert moved_on - killed < (2.0 if how == "SIGKILL" else 4.0) and re.findall(r"● (\w+)", after_kill)[-1] == "typing"
    # "● speaking" went with the error line, not when the devices had let go (2 s later on a hung server).
    assert "speaking" not in re.findall(r"● (\w+)", chat.text(at_said))

    rows = [r for r in transcript(session_dir) if r["type"] not in ("speculative_reply_dropped", "full_duplex")]
    assert [r["type"] for r in rows] == ["session", "listening", "user", "assistant", "error", "end"]
    assert "sound server" in rows[3]["error"] and rows[3]["text"]
    for row in rows[2:4]:
        audio, _ = sf.read(session_dir / row["wav"], dtype="float32")
        assert audio.size > 0
    # The reply's WAV holds what was heard of it, as long as its heard_seconds says (issue 22: all 4.5 s of it).
    reply, _ = sf.read(session_dir / rows[3]["wav"], dtype="float32")
    assert 0 < rows[3]["heard_seconds"] < 3.0 and reply.size == pytest.approx(rows[3]["heard_seconds"] * 16000, abs=2)
    native = (session_dir / "native.log").read_text(errors="replace")
    terminal = chat.text()
    for marker in ("ALSA lib", "Expression '", "pa_linux_alsa", "PaAlsa"):
        assert marker not in terminal
    assert all(line not in terminal for line in native.splitlines() if line.strip())
