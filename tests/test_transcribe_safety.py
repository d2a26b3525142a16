"""`omni transcribe-and-reply` never loses a user's file: a table of bad inputs and bad outputs run
through the real CLI, each checked for its exit status, one stderr line per failing file, no
traceback, and the files on disk afterwards (inputs untouched, nothing half-written left
behind, earlier replies intact, the other files of the batch answered). Ctrl-C is a real SIGINT
to a real process."""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from typer.testing import CliRunner

from omni_cli.cli import app

ROOT = Path(__file__).resolve().parents[1]


def _permissions_bind() -> bool:
    """False where file modes do not stop this process (root with CAP_DAC_OVERRIDE)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        locked = Path(tmp) / "locked"
        locked.mkdir(mode=0o555)
        try:
            (locked / "probe").touch()
        except PermissionError:
            return True
        finally:
            locked.chmod(0o755)
        return False


PERMISSIONS_BIND = _permissions_bind()


@dataclass
class Case:
    """What one run is given and what it must leave behind."""

    files: list[Path]
    out: Path | None
    exit_code: int
    errors: list[str] = field(default_factory=list)  # one `omni: error:` line each, containing this
    warnings: list[str] = field(default_factory=list)  # one `omni: warning:` line each, containing this
    out_files: set[str] | None = None  # exactly the files in `out` afterwards
    answered: int = 0  # JSON rows with a reply text
    model: str | None = None  # replaces --model (a path that does not exist proves nothing loaded)
    wrap: Callable[[list[str]], list[str]] | None = None  # run as a subprocess under this command
    limit_file_bytes: int | None = None  # RLIMIT_FSIZE for the subprocess: writes past it fail as on a full disk


def _copy(src: Path, dst: Path) -> Path:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)
    return dst


def _as(src: Path, dst: Path) -> Path:
    """`src` re-encoded in the format `dst`'s suffix names."""
    audio, rate = sf.read(src, dtype="float32")
    dst.parent.mkdir(parents=True, exist_ok=True)
    sf.write(dst, audio, rate)
    return dst


def _can_mount_read_only() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs -o ro tmpfs /mnt"], capture_output=True)
    return probe.returncode == 0


def _read_only_mount(mountpoint: Path) -> Callable[[list[str]], list[str]]:
    """Run the command in a private mount namespace with a read-only file system at `mountpoint`."""
    def wrap(cmd: list[str]) -> list[str]:
        return ["unshare", "-m", "sh", "-c", 'mount -t tmpfs -o ro tmpfs "$0" && exec "$@"', str(mountpoint), *cmd]
    return wrap


# Each builder makes its files under tmp and returns the case; q is a real spoken question.
def out_holds_the_input(tmp: Path, q: Path) -> Case:
    question = _copy(q, tmp / "in" / "q.wav")
    return Case([question], tmp / "in", 0, out_files={"q.wav", "q-2.wav"}, answered=1)


def same_stem_in_two_dirs(tmp: Path, q: Path) -> Case:
    files = [_copy(q, tmp / "a" / "q.wav"), _copy(q, tmp / "b" / "q.wav")]
    return Case(files, tmp / "out", 0, out_files={"q.wav", "q-2.wav"}, answered=2)


def same_stem_three_formats(tmp: Path, q: Path) -> Case:
    suffixes = [".flac", ".ogg"] + ([".mp3"] if "MP3" in sf.available_formats() else [])
    files = [_as(q, tmp / "in" / f"q{suffix}") for suffix in suffixes]
    names = {"q.wav"} | {f"q-{n}.wav" for n in range(2, len(files) + 1)}
    return Case(files, tmp / "out", 0, out_files=names, answered=len(files))


def earlier_reply_is_kept(tmp: Path, q: Path) -> Case:
    _copy(q, tmp / "out" / "q.wav")  # from an earlier run, or the user's own file
    return Case([_copy(q, tmp / "in" / "q.wav")], tmp / "out", 0, out_files={"q.wav", "q-2.wav"}, answered=1)


def out_is_a_file(tmp: Path, q: Path) -> Case:
    target = tmp / "notes.txt"
    target.write_text("the user's notes")
    return Case([_copy(q, tmp / "in" / "q.wav")], target, 2, errors=["is a file, not a directory"])


def out_not_writable(tmp: Path, q: Path) -> Case:
    out = tmp / "locked"
    out.mkdir()
    out.chmod(0o555)
    return Case([_copy(q, tmp / "in" / "q.wav")], out, 2, errors=["is not writable (Permission denied)"], out_files=set())


def out_on_a_read_only_file_system(tmp: Path, q: Path) -> Case:
    mount = tmp / "ro"
    mount.mkdir()
    return Case([_copy(q, tmp / "in" / "q.wav")], mount / "replies", 2,
                errors=["cannot create the directory (Read-only file system)"], wrap=_read_only_mount(mount))


def disk_full(tmp: Path, q: Path) -> Case:
    files = [_copy(q, tmp / "in" / "q1.wav"), _copy(q, tmp / "in" / "q2.wav")]
    return Case(files, tmp / "out", 1, errors=["could not save the spoken reply", "could not save the spoken reply"],
                out_files=set(), answered=2, limit_file_bytes=2048)


def bad_inputs_are_named_before_the_model_loads(tmp: Path, q: Path) -> Case:
    junk = tmp / "junk.wav"
    junk.write_text("this is not audio")
    (tmp / "folder.wav").mkdir()
    files = [tmp / "missing.wav", tmp / "folder.wav", junk, _copy(q, tmp / "in" / "q.wav")]
    # The model does not exist: its error comes after the three input errors, so they were checked first.
    return Case(files, tmp / "out", 2, errors=["missing.wav: no such file", "is a directory", "not a readable audio file", "neither a checkpoint directory nor a preset"],
                model=str(tmp / "no-model"))


def only_bad_inputs_never_load_the_model(tmp: Path, q: Path) -> Case:
    return Case([tmp / "missing.wav"], None, 1, errors=["no such file"], model=str(tmp / "no-model"))


def unreadable_input(tmp: Path, q: Path) -> Case:
    locked = _copy(q, tmp / "in" / "locked.wav")
    locked.chmod(0)
    return Case([locked, _copy(q, tmp / "in" / "q.wav")], None, 1, errors=["permission denied"], answered=1)


def truncated_wav(tmp: Path, q: Path) -> Case:
    cut = tmp / "in" / "cut.wav"
    cut.parent.mkdir(parents=True)
    cut.write_bytes(q.read_bytes()[:20_000])  # 20 kB of 190 kB: the header still promises the whole recording
    return Case([cut], tmp / "out", 0, warnings=["the file is cut short: its header promises 2.16 s but it holds 0.23 s"],
                out_files={"cut.wav"}, answered=1)


def one_hertz_sample_rate(tmp: Path, q: Path) -> Case:
    odd = tmp / "in" / "odd.wav"
    odd.parent.mkdir(parents=True)
    sf.write(odd, np.random.default_rng(0).uniform(-0.5, 0.5, 12).astype(np.float32), 1)
    return Case([odd], None, 0, warnings=["a sample rate of 1 Hz is implausible for speech", "read as 12.0 s"], answered=1)


def one_sample(tmp: Path, q: Path) -> Case:
    tiny = tmp / "in" / "tiny.wav"
    tiny.parent.mkdir(parents=True)
    sf.write(tiny, np.array([0.5], dtype=np.float32), 16000)
    return Case([tiny], None, 0, warnings=["0.1 ms of audio (1 at 16000 Hz) is shorter than 0.1 s"], answered=1)


CASES = [
    out_holds_the_input,
    same_stem_in_two_dirs,
    same_stem_three_formats,
    earlier_reply_is_kept,
    out_is_a_file,
    pytest.param(out_not_writable, marks=pytest.mark.skipif(not PERMISSIONS_BIND, reason="file modes do not bind root")),
    pytest.param(out_on_a_read_only_file_system,
                 marks=pytest.mark.skipif(not _can_mount_read_only(), reason="cannot mount a read-only tmpfs here (needs unshare -m as root)")),
    disk_full,
    bad_inputs_are_named_before_the_model_loads,
    only_bad_inputs_never_load_the_model,
    pytest.param(unreadable_input, marks=pytest.mark.skipif(not PERMISSIONS_BIND, reason="file modes do not bind root")),
    truncated_wav,
    one_hertz_sample_rate,
    one_sample,
]


def _snapshot(root: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in root.rglob("*") if p.is_file() and os.access(p, os.R_OK)}


def _run(case: Case, args: list[str]) -> tuple[int, str, str]:
    if case.wrap is None and case.limit_file_bytes is None:
        result = CliRunner().invoke(app, args)
        assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit), result.exception
        return result.exit_code, result.stdout, result.stderr
    cmd = [sys.executable, "-m", "omni_cli.cli", *args]
    if case.wrap is not None:
        cmd = case.wrap(cmd)

    def limit() -> None:
        if case.limit_file_bytes is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (case.limit_file_bytes, case.limit_file_bytes))

    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, preexec_fn=limit, timeout=300)
    return proc.returncode, proc.stdout, proc.stderr


@pytest.mark.parametrize("build", CASES)
def test_no_file_is_lost(build: Callable[[Path, Path], Case], tiny_model, question_wavs, tmp_path: Path) -> None:
    case = build(tmp_path, question_wavs[0])
    before = _snapshot(tmp_path)
    args = ["transcribe-and-reply", *map(str, case.files), "--json", "--max-new-tokens", "4",
            "--model", case.model or str(tiny_model.model_dir), "--speech-encoder", str(tiny_model.speech_encoder),
            "--vocoder", str(tiny_model.vocoder_dir)]
    if case.out is not None:
        args += ["--out", str(case.out)]
    code, stdout, stderr = _run(case, args)

    assert code == case.exit_code, stderr
    assert "Traceback" not in stdout + stderr
    errors = [line for line in stderr.splitlines() if line.startswith("omni: error:")]
    assert len(errors) == len(case.errors), stderr
    for line, expected in zip(errors, case.errors):
        assert expected in line, stderr
    warnings = [line for line in stderr.splitlines() if line.startswith("omni: warning:")]
    for expected in case.warnings:
        assert len(warnings) == 1 and expected in warnings[0], stderr

    # Files on disk: every file that was there is unchanged, nothing half-written is left.
    for path, data in before.items():
        assert path.read_bytes() == data, f"{path} changed"
    leftovers = [p for p in tmp_path.rglob(".*") if p.name.endswith(".part") or p.name.startswith(".omni-write-test")]
    assert not leftovers
    rows = [json.loads(line) for line in stdout.splitlines()]
    assert sum(1 for row in rows if row.get("text")) == case.answered
    wavs = [row["wav"] for row in rows if "wav" in row]
    assert len(wavs) == len(set(wavs)), "two replies under one name"
    if case.out_files is not None:
        assert case.out is not None
        names = {p.name for p in case.out.iterdir()} if case.out.is_dir() else set()
        assert names == case.out_files
        for wav in wavs:
            audio, rate = sf.read(wav)
            assert rate == 16000 and len(audio) > 0


def test_input_checks_do_not_import_torch(tmp_path: Path) -> None:
    # A typo in a file name is reported at once: no torch import, no model load.
    code = (
        "import sys\nfrom omni_cli.cli import app\n"
        f"try:\n    app(['transcribe-and-reply', {str(tmp_path / 'missing.wav')!r}, '--model', {str(tmp_path)!r}])\n"
        "except SystemExit as exc:\n    print(exc.code, 'torch' in sys.modules)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.stdout.split() == ["1", "False"], proc.stderr
    assert proc.stderr.strip() == f"omni: error: {tmp_path / 'missing.wav'}: no such file."


def test_ctrl_c_keeps_the_partial_reply_apart_and_says_how_to_continue(tiny_model, question_wavs, tmp_path: Path) -> None:
    first, second = _copy(question_wavs[0], tmp_path / "in" / "q1.wav"), _copy(question_wavs[1], tmp_path / "in" / "q2.wav")
    out = tmp_path / "out"
    _copy(question_wavs[2], out / "q1.partial.wav")  # an earlier partial reply stays as it is
    earlier = (out / "q1.partial.wav").read_bytes()
    cmd = [sys.executable, "-m", "omni_cli.cli", "transcribe-and-reply", str(first), str(second),
           "--model", str(tiny_model.model_dir), "--speech-encoder", str(tiny_model.speech_encoder),
           "--vocoder", str(tiny_model.vocoder_dir), "--out", str(out),
           # A reply far longer than the test waits for (room for it in the context budget), with audio after every unit.
           "--max-new-tokens", "100000", "--context-budget", "200000", "--chunk-units", "1", "--first-chunk-units", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    seen = b""
    try:
        # The reply text streams to stdout: once several tokens are out, the reply is under way.
        while len(seen) < len("q1.wav: ") + 12:
            chunk = os.read(proc.stdout.fileno(), 256)  # type: ignore[union-attr]
            assert chunk, proc.stderr.read().decode()  # type: ignore[union-attr]
            seen += chunk
        sent = time.monotonic()
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    stopped_after = time.monotonic() - sent
    stderr_text = stderr.decode()
    assert proc.returncode == 130, stderr_text
    assert "Traceback" not in stderr_text
    assert stopped_after < 60, "the first Ctrl-C stops the reply at its next token"
    lines = [line for line in stderr_text.splitlines() if line.startswith("omni:")]
    assert len(lines) == 1, stderr_text
    assert re.fullmatch(
        f"omni: interrupted: q1.wav was cut short; its partial reply is {re.escape(str(out / 'q1.partial-2.wav'))} "
        rf"\(\d+\.\d\d s\); 0 of 2 files answered in full\. To continue, run the same command on: {re.escape(f'{first} {second}')}",
        lines[0],
    ), lines[0]
    assert (seen + stdout).decode(errors="replace").startswith("q1.wav: ")
    # Never under the name of a complete reply; the earlier file untouched; nothing half-written.
    assert sorted(p.name for p in out.iterdir()) == ["q1.partial-2.wav", "q1.partial.wav"]
    assert (out / "q1.partial.wav").read_bytes() == earlier
    audio, rate = sf.read(out / "q1.partial-2.wav")
    assert rate == 16000 and len(audio) > 0
    assert first.read_bytes() == question_wavs[0].read_bytes()


class _PressesCtrlC:
    """A stand-in pipeline (no model) whose reply to the first file presses Ctrl-C `presses` times."""

    vocoder = object()

    def __init__(self, presses: int) -> None:
        self.presses = presses
        self.replies = 0

    def respond(self, audio, should_stop=None):
        from omni_cli.pipeline import AudioChunk, Done, TextDelta

        self.replies += 1
        yield TextDelta("Hello", time.monotonic())
        yield AudioChunk(np.full(1600, 0.1, dtype=np.float32), time.monotonic(), 0, 16000)
        if self.replies == 1:
            for _ in range(self.presses):
                os.kill(os.getpid(), signal.SIGINT)  # the handler runs before os.kill returns
        interrupted = should_stop is not None and should_stop()
        yield Done("Hello", [1, 2], time.monotonic(), 1, "interrupted" if interrupted else "eos")


# One press: the reply stops at its next token (here, its end). Two: the second stops it at once,
# inside the pipeline. Either way it is kept apart as partial and no later file is started.
@pytest.mark.parametrize("presses", [1, 2])
def test_ctrl_c_in_process(presses: int, question_wavs, tmp_path: Path) -> None:
    import io

    from omni_cli.transcribe import check_inputs, transcribe_and_reply

    files = [_copy(question_wavs[0], tmp_path / "in" / f"q{n}.wav") for n in (1, 2, 3)]
    out_dir = tmp_path / "out"
    out, err = io.StringIO(), io.StringIO()
    previous = signal.getsignal(signal.SIGINT)
    code = transcribe_and_reply(_PressesCtrlC(presses), check_inputs(files, err), out_dir, False, out, err)
    assert signal.getsignal(signal.SIGINT) is previous, "the Ctrl-C handler is put back"
    assert code == 130
    assert out.getvalue() == "q1.wav: Hello\n"
    assert err.getvalue() == (
        f"omni: interrupted: q1.wav was cut short; its partial reply is {out_dir / 'q1.partial.wav'} (0.10 s); "
        f"0 of 3 files answered in full. To continue, run the same command on: {files[0]} {files[1]} {files[2]}\n"
    )
    assert sorted(p.name for p in out_dir.iterdir()) == ["q1.partial.wav"]


def test_ctrl_c_between_files_names_the_rest(question_wavs, tmp_path: Path) -> None:
    import io

    from omni_cli.transcribe import check_inputs, transcribe_and_reply

    class PressesAfterItsReply(_PressesCtrlC):
        def respond(self, audio, should_stop=None):
            yield from super().respond(audio)  # no should_stop: the reply ends normally
            if self.replies == 1:
                os.kill(os.getpid(), signal.SIGINT)

    files = [_copy(question_wavs[0], tmp_path / "in" / f"q{n}.wav") for n in (1, 2)]
    out_dir = tmp_path / "out"
    out, err = io.StringIO(), io.StringIO()
    code = transcribe_and_reply(PressesAfterItsReply(0), check_inputs(files, err), out_dir, True, out, err)
    assert code == 130
    assert [json.loads(line)["stopped"] for line in out.getvalue().splitlines()] == ["eos"]
    assert err.getvalue() == (
        f"omni: interrupted: stopped before q2.wav; 1 of 2 files answered in full (in {out_dir}). "
        f"To continue, run the same command on: {files[1]}\n"
    )
    assert sorted(p.name for p in out_dir.iterdir()) == ["q1.wav"]
