"""Bad input, as a careful user and an attacker give it: one `omni: error:` line, the exit status
(2 for a usage mistake, 1 for a failure), no traceback, and every file of the user's as it was
(each file hashed before and after; nothing new appears either).

`fast` cases need neither torch nor the model: each runs as a real process whose `import torch`
raises, and must be refused within 1 s (they took 4-9 s when torch and the model loaded first).
The 1 s is the process's CPU time, user and system, which is what the refusal costs: its wall
time is that on an idle machine, and 2-3x more on this 2-core one with other test runs beside it.
The others go through Typer's CliRunner, one per traceback path found by the bad-input sweep.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from typer.testing import CliRunner

from omni_cli.cli import app

ROOT = Path(__file__).resolve().parents[1]
PRESET_TEXT = (ROOT / "models" / "llama-omni-8b.toml").read_text(encoding="utf-8")
FAST_S = 1.0  # the bound for a refusal that needs no model


@dataclass(frozen=True)
class Assets:
    """What the cases refer to, made once: the tiny model, a tiny HuBERT and k-means, a spoken question."""

    model: Path
    encoder: Path
    hubert: Path
    centres: Path
    kmeans_pickle: Path
    question: Path


@dataclass(frozen=True)
class Case:
    """`args(tmp, assets)` makes the case's files under tmp (the user's files) and returns the command line."""

    args: Callable[[Path, Assets], list[str]]
    code: int
    message: str
    fast: bool = False  # a real process without torch, refused within FAST_S
    read_only: str | None = None  # a folder under tmp mounted read-only for the run (real process)


def _preset(tmp: Path, old: str, new: str) -> str:
    assert old in PRESET_TEXT, old
    (tmp / "mine.toml").write_text(PRESET_TEXT.replace(old, new, 1), encoding="utf-8")
    return "mine.toml"


def _latin_1_preset(tmp: Path) -> str:
    (tmp / "mine.toml").write_bytes(PRESET_TEXT.encode().replace(b"Apache-2.0", b"Apache-2.0 \xe9", 1))  # é as Latin-1 writes it
    return "mine.toml"


def _pinned_size(value: str) -> Callable[[Path, Assets], list[str]]:
    return lambda tmp, a: ["chat", "--model", _preset(tmp, 'name = "config.json"\n', f'name = "config.json"\nsize = {value}\n'), "--text"]


def _model_folder(tmp: Path, config: str | None) -> str:
    (tmp / "m").mkdir()
    if config is not None:
        (tmp / "m" / "config.json").write_text(config)
    return "m"


def _manifest(tmp: Path, text: str, name: str = "m.json") -> str:
    (tmp / name).write_text(text)
    return name


def _units(tmp: Path, a: Assets, manifest: str, kmeans: str | None = None) -> list[str]:
    shutil.copy(a.question, tmp / "r.wav")
    return ["units", manifest, "--out", "u.jsonl", "--hubert", str(a.hubert), "--kmeans", kmeans or str(a.centres), "--layer", "2"]


def _one_sample(tmp: Path) -> str:
    sf.write(tmp / "one.wav", np.array([0.5], dtype=np.float32), 16000)
    return json.dumps([{"id": "a", "tgt_speech": "one.wav"}])


def _centres(tmp: Path, a: Assets, centres: np.ndarray) -> list[str]:
    np.save(tmp / "c.npy", centres)
    return _units(tmp, a, _manifest(tmp, json.dumps([{"id": "a", "tgt_speech": "r.wav"}])), kmeans="c.npy")


def _used_session(tmp: Path, a: Assets) -> list[str]:
    (tmp / "s").mkdir()
    shutil.copy(a.question, tmp / "s" / "turn-001-reply.wav")  # an earlier session's reply, its transcript gone
    return ["chat", "--model", str(a.model), "--speech-encoder", str(a.encoder), "--text", "--session-dir", "s"]


def _zip_behind_a_pickle(tmp: Path, a: Assets) -> list[str]:
    # zipfile lists a harmless checkpoint; torch.load, going by the first bytes, reads the pickle in front.
    import torch

    torch.save({"model": {"w": torch.zeros(2)}}, tmp / "inner.pt")
    (tmp / "odd.pt").write_bytes(b"\x80\x02csys\nexit\nq\x00." + (tmp / "inner.pt").read_bytes())
    return ["convert-hubert", "odd.pt", "hf"]


def _copy_question(tmp: Path, a: Assets, name: str) -> str:
    shutil.copy(a.question, tmp / name)
    return name


def _copy_kmeans(tmp: Path, a: Assets) -> str:
    shutil.copy(a.kmeans_pickle, tmp / "km.bin")
    return "km.bin"


def _file(tmp: Path, name: str) -> str:
    (tmp / name).write_text("the user's own file")
    return name


def _folder(tmp: Path, name: str) -> str:
    (tmp / name).mkdir()
    return name


CASES = {
    # --model, before torch: a typo, a folder that is no checkpoint, a config that is not JSON.
    "chat: --model missing": Case(lambda tmp, a: ["chat", "--model", "nope", "--text"], 2, "--model nope is neither a checkpoint directory nor a preset", fast=True),
    "chat: no config.json": Case(lambda tmp, a: ["chat", "--model", _model_folder(tmp, None), "--text"], 2, "m/config.json not found", fast=True),
    "chat: config.json not JSON": Case(lambda tmp, a: ["chat", "--model", _model_folder(tmp, "{"), "--text"], 2, "m/config.json is not valid JSON", fast=True),
    "chat: config.json nested too deep": Case(lambda tmp, a: ["chat", "--model", _model_folder(tmp, "[" * 100_000 + "]" * 100_000), "--text"], 2,
                                             "m/config.json is not valid JSON (nested too deeply to read)", fast=True),
    "transcribe: --model missing": Case(lambda tmp, a: ["transcribe-and-reply", _copy_question(tmp, a, "q.wav"), "--model", "nope"], 2,
                                        "--model nope is neither a checkpoint directory nor a preset", fast=True),
    "transcribe: config.json not JSON": Case(lambda tmp, a: ["transcribe-and-reply", _copy_question(tmp, a, "q.wav"), "--model", _model_folder(tmp, "{")], 2,
                                             "m/config.json is not valid JSON", fast=True),
    # The session folder and chat's flags.
    "finetune: --model missing": Case(lambda tmp, a: ["finetune", "--stage", "1", "--data", _manifest(tmp, "[]"), "--output", "run", "--model", "nope"], 2,
                                      "model directory nope does not exist", fast=True),
    "finetune: config.json not JSON": Case(lambda tmp, a: ["finetune", "--stage", "1", "--data", _manifest(tmp, "[]"), "--output", "run",
                                                           "--model", _model_folder(tmp, "{")], 2, "m/config.json is not valid JSON", fast=True),
    "chat: --session-dir a file": Case(lambda tmp, a: ["chat", "--model", str(a.model), "--text", "--session-dir", _file(tmp, "notes")], 2,
                                       "--session-dir notes is a file", fast=True),
    "chat: --session-dir read-only": Case(lambda tmp, a: ["chat", "--model", str(a.model), "--text", "--session-dir", "ro/s"], 2,
                                          "cannot write the session to ro/s: ", fast=True, read_only="ro"),
    "chat: --session-dir holds a turn WAV": Case(_used_session, 2, "s already holds turn-001-reply.wav, which a session writes", fast=True),
    "chat: --barge-in --half-duplex": Case(lambda tmp, a: ["chat", "--model", str(a.model), "--barge-in", "--half-duplex"], 2,
                                           "--barge-in (interrupt omni by speaking) and --half-duplex (never) contradict each other", fast=True),
    # Presets: values that are not what they say, and a file that is not UTF-8.
    "preset: size = \"big\"": Case(_pinned_size('"big"'), 2, "'size' should be a whole number of at least 1, found 'big'", fast=True),
    "preset: size = inf": Case(_pinned_size("inf"), 2, "'size' should be a whole number of at least 1, found inf", fast=True),
    "preset: approx_size_gb = nan": Case(lambda tmp, a: ["download", _preset(tmp, "approx_size_gb = 17.0", "approx_size_gb = nan")], 1,
                                         "'approx_size_gb' should be a size in GB, found nan", fast=True),
    "preset: not UTF-8": Case(lambda tmp, a: ["download", _latin_1_preset(tmp)], 1,
                              "mine.toml is not UTF-8 text (byte 0xe9", fast=True),
    # convert-kmeans / convert-hubert: a missing source, and no destination that would replace a file.
    "convert-kmeans: source missing": Case(lambda tmp, a: ["convert-kmeans", "nope", "km.safetensors"], 2, "k-means file nope not found", fast=True),
    "convert-hubert: source missing": Case(lambda tmp, a: ["convert-hubert", "nope", "hf"], 2, "HuBERT checkpoint nope not found", fast=True),
    "convert-kmeans: onto its source": Case(lambda tmp, a: ["convert-kmeans", _copy_kmeans(tmp, a), "km.bin"], 2,
                                            "the destination km.bin is the file being read; write to another file, or add --force", fast=True),
    "convert-kmeans: onto an existing file": Case(lambda tmp, a: ["convert-kmeans", _copy_kmeans(tmp, a), _file(tmp, "km.safetensors")], 2,
                                                  "the destination km.safetensors already exists", fast=True),
    "convert-kmeans: into a folder": Case(lambda tmp, a: ["convert-kmeans", _copy_kmeans(tmp, a), _folder(tmp, "out")], 2,
                                          "the destination out is a folder", fast=True),
    "convert-kmeans: read-only": Case(lambda tmp, a: ["convert-kmeans", _copy_kmeans(tmp, a), "ro/km.safetensors"], 2,
                                      "cannot write the destination ro/km.safetensors: ", fast=True, read_only="ro"),
    "convert-hubert: onto a file": Case(lambda tmp, a: ["convert-hubert", _copy_question(tmp, a, "x.pt"), _copy_question(tmp, a, "q.wav")], 2,
                                        "the destination q.wav is a file", fast=True),
    "convert-hubert: read-only": Case(lambda tmp, a: ["convert-hubert", _copy_question(tmp, a, "x.pt"), "ro/hf"], 2,
                                      "cannot write the destination ro/hf: ", fast=True, read_only="ro"),
    # omni units: where it writes, and what its manifest, audio and centres hold.
    "units: --out is the manifest": Case(lambda tmp, a: ["units", _manifest(tmp, "[]"), "--out", "m.json", "--hubert", "h", "--kmeans", "k"], 2,
                                         "--out m.json is the file being read", fast=True),
    "units: --out a folder": Case(lambda tmp, a: ["units", _manifest(tmp, "[]"), "--out", _folder(tmp, "o"), "--hubert", "h", "--kmeans", "k"], 2,
                                  "--out o is a folder", fast=True),
    "units: --out read-only": Case(lambda tmp, a: ["units", _manifest(tmp, "[]"), "--out", "ro/u.jsonl", "--hubert", "h", "--kmeans", "k"], 2,
                                   "cannot write --out ro/u.jsonl: ", fast=True, read_only="ro"),
    "units: a 1-sample WAV": Case(lambda tmp, a: _units(tmp, a, _manifest(tmp, _one_sample(tmp))), 2,
                                  "one.wav (0.1 ms: shorter than the 25 ms of one HuBERT frame)"),
    "units: tgt_speech a number": Case(lambda tmp, a: _units(tmp, a, _manifest(tmp, '[{"id": "a", "tgt_speech": 123}]')), 2,
                                       "the response speech of records a (123) is not a file name"),
    "units: tgt_speech a list": Case(lambda tmp, a: _units(tmp, a, _manifest(tmp, '[{"id": "a", "tgt_speech": ["r.wav"]}]')), 2,
                                     'the response speech of records a (["r.wav"]) is not a file name'),
    "units: no centres": Case(lambda tmp, a: _centres(tmp, a, np.zeros((0, 16), np.float32)), 2, "c.npy holds no centres (shape (0, 16))"),
    "units: NaN centres": Case(lambda tmp, a: _centres(tmp, a, np.full((4, 16), np.nan, np.float32)), 2, "c.npy holds NaN or infinite centres"),
    "units: a 5000-digit number": Case(lambda tmp, a: _units(tmp, a, _manifest(tmp, '[{"id": 1' + "0" * 5000 + ', "tgt_speech": "r.wav"}]')), 2,
                                       "m.json is not valid JSON (a number too long to read (more than 4300 digits))"),
    "units: JSON 100 000 deep": Case(lambda tmp, a: _units(tmp, a, _manifest(tmp, "[" * 100_000 + "]" * 100_000)), 2,
                                     "m.json is not valid JSON (nested too deeply to read)"),
    "units: JSONL 100 000 deep": Case(lambda tmp, a: _units(tmp, a, _manifest(tmp, '{"a": ' + "[" * 100_000 + "]" * 100_000 + "}\n", "m.jsonl")), 2,
                                      "m.jsonl: 1 of 1 records cannot be used"),
    # convert-hubert never passes on torch's advice to load with weights_only=False.
    "convert-hubert: zip behind a pickle": Case(_zip_behind_a_pickle, 2, "odd.pt is not a torch checkpoint: its zip archive does not match its start"),
}


@pytest.fixture(scope="module")
def assets(tiny_model, question_wavs: list[Path], tmp_path_factory: pytest.TempPathFactory) -> Assets:
    from release_files import fairseq_weights, write_checkpoint, write_kmeans

    from omni_cli.train.hubert import convert_hubert

    folder = tmp_path_factory.mktemp("assets")
    hubert = convert_hubert(write_checkpoint(folder / "m.pt", "dictconfig", fairseq_weights()), folder / "hubert")
    centres = np.random.default_rng(0).standard_normal((4, 16)).astype(np.float32)
    np.save(folder / "centres.npy", centres)
    return Assets(tiny_model.model_dir, tiny_model.speech_encoder, hubert, folder / "centres.npy",
                  write_kmeans(folder / "km.bin", centres, "pickle-2"), question_wavs[0])


def _snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "folder" for p in sorted(root.rglob("*"))}


def _without_torch(tmp: Path) -> dict[str, str]:
    """The environment of a process whose `import torch` fails: a refusal that needs torch is a traceback."""
    poison = tmp.parent / f"{tmp.name}-no-torch"
    (poison / "torch").mkdir(parents=True)
    (poison / "torch" / "__init__.py").write_text("raise RuntimeError('torch was imported')\n")
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(poison), str(ROOT)])}


def _run_fast(case: Case, args: list[str], tmp: Path) -> tuple[int, str, str, float, float]:
    """Exit status, stdout, stderr, CPU seconds (the process and what it started) and wall seconds."""
    command = [sys.executable, "-m", "omni_cli.cli", *args]
    if case.read_only is not None:
        (tmp / case.read_only).mkdir()
        command = ["unshare", "-m", "sh", "-c", 'mount -t tmpfs -o ro tmpfs "$0" && exec "$@"', str(tmp / case.read_only), *command]
    before, started = resource.getrusage(resource.RUSAGE_CHILDREN), time.monotonic()
    done = subprocess.run(command, cwd=tmp, env=_without_torch(tmp), capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    wall, after = time.monotonic() - started, resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    return done.returncode, done.stdout, done.stderr, cpu, wall


def _can_mount_read_only() -> bool:
    if shutil.which("unshare") is None:
        return False
    return subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs -o ro tmpfs /mnt"], capture_output=True).returncode == 0


READ_ONLY = _can_mount_read_only()


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_line_and_no_file_changes(name: str, assets: Assets, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    case = CASES[name]
    if case.read_only is not None and not READ_ONLY:
        pytest.skip("cannot mount a read-only tmpfs here (needs unshare -m as root)")
    monkeypatch.chdir(tmp_path)
    args = case.args(tmp_path, assets)
    before = _snapshot(tmp_path)
    if case.fast:
        code, stdout, stderr, seconds, wall = _run_fast(case, args, tmp_path)
    else:
        result = CliRunner().invoke(app, args)
        assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
        code, stdout, stderr, seconds, wall = result.exit_code, result.stdout, result.stderr, 0.0, 0.0
    assert "Traceback" not in stdout + stderr, stderr
    # transformers' "Loading weights" bar (omni units loading HuBERT) is progress, not a message.
    lines = [line for line in stderr.splitlines() if line.strip() and "it/s]" not in line]
    assert lines and lines[0].startswith("omni: error: ") and case.message in lines[0], stderr
    assert len(lines) == 1 or lines[1].startswith("  "), stderr  # one line (a manifest may list its records below it)
    assert code == case.code, stderr
    assert "weights_only" not in stderr
    if case.read_only is not None:
        (tmp_path / case.read_only).rmdir()  # the mount point the run needed, empty: not a file of the user's
    assert _snapshot(tmp_path) == before, "a file of the user's changed or appeared"
    assert seconds < FAST_S, f"{seconds:.2f} s of CPU, {wall:.2f} s of wall time (a refusal that needs no model comes within {FAST_S:g} s)"
