"""Bad input to the weights commands, through the real command line: exit code, one `omni: error:` line,
no traceback, and the filesystem afterwards (nothing downloaded, no `.part` left, nothing outside the target)."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from fake_hub_cache import install_tiny_preset
from typer.testing import CliRunner

import omni_cli.setup.fit as fit
from omni_cli.cli import app
from omni_cli.weights.presets import get_preset

ROOT = Path(__file__).resolve().parents[1]
PRESET_TEXT = (ROOT / "models" / "llama-omni-8b.toml").read_text()
VOCODER_URL = "https://dl.fbaipublicfiles.com/fairseq/speech_to_speech/vocoder/code_hifigan/mhubert_vp_en_es_fr_it3_400k_layer11_km1000_lj"


@dataclass
class Case:
    """One bad command line: `setup(tmp_path)` returns its arguments; `after(tmp_path)` checks the files."""

    args: Callable[[Path], list[str]]
    code: int
    message: str
    after: Callable[[Path], None] = lambda tmp: None


def _custom(tmp: Path, old: str, new: str) -> str:
    assert old in PRESET_TEXT, old
    path = tmp / "custom.toml"
    path.write_text(PRESET_TEXT.replace(old, new, 1))
    return str(path)


def _nothing_downloaded(tmp: Path) -> None:
    assert not (tmp / "omni").exists() and not any((tmp / "hub").iterdir())


def _no_part_files(tmp: Path) -> None:
    assert not list(tmp.rglob("*.part")) and not list(tmp.rglob("*.part.json"))


def _evil_kmeans(tmp: Path) -> list[str]:
    class RunsCode:
        def __reduce__(self) -> tuple:
            return (os.system, (f"touch {tmp / 'pwned'}",))

    (tmp / "km.bin").write_bytes(pickle.dumps(RunsCode(), protocol=2))
    return ["convert-kmeans", str(tmp / "km.bin"), str(tmp / "km.safetensors")]


def _untouched_by_kmeans(tmp: Path) -> None:
    assert not (tmp / "pwned").exists() and not (tmp / "km.safetensors").exists()


def _whisper_as_hubert(tmp: Path, tiny_model) -> list[str]:
    (tmp / "wavs").mkdir()
    (tmp / "wavs" / "r.wav").write_bytes((ROOT / "tests" / "data" / next(p.name for p in (ROOT / "tests" / "data").glob("*.wav"))).read_bytes())
    np.save(tmp / "c.npy", np.zeros((4, 16), dtype=np.float32))
    return ["units", str(tmp / "wavs"), "--out", str(tmp / "u.jsonl"), "--hubert", str(tiny_model.speech_encoder), "--kmeans", str(tmp / "c.npy")]


CASES = {
    "device tpu": Case(lambda tmp: ["transcribe-and-reply", "q.wav", "-m", "llama-omni-8b", "--device", "tpu"], 2,
                       "Invalid value for '--device': 'tpu' is not a device omni runs on; use cpu, cuda or cuda:N"),
    "device cuda:x": Case(lambda tmp: ["units", "d", "-o", "o", "--hubert", "h", "--kmeans", "k", "--device", "cuda:x"], 2,
                          "'cuda:x' is not a device omni runs on"),
    "no CUDA, no --device": Case(lambda tmp: ["transcribe-and-reply", str(tmp / "q.wav"), "-m", "llama-omni-8b", "--yes"], 2,
                                 "no CUDA GPU is visible, so llama-omni-8b would run on the CPU", _nothing_downloaded),
    "4bit on the CPU": Case(lambda tmp: ["chat", "-m", "llama-omni-8b", "--text", "--device", "cpu", "--precision", "4bit", "--yes"], 2,
                            "--precision 4bit needs a CUDA GPU (bitsandbytes)", _nothing_downloaded),
    "cuda without CUDA": Case(lambda tmp: ["chat", "-m", "llama-omni-8b", "--text", "--device", "cuda:1", "--yes"], 2,
                              "--device cuda:1 was asked for but no CUDA GPU is visible; nothing was downloaded", _nothing_downloaded),
    "name escaping the folder": Case(lambda tmp: ["download", _custom(tmp, 'name = "g_00500000"', 'name = "../../escaped"')], 1,
                                     "'../../escaped' is not a plain file name", lambda tmp: _nothing_downloaded(tmp) or _no_escape(tmp)),
    "file:// URL": Case(lambda tmp: ["download", _custom(tmp, f'url = "{VOCODER_URL}/config.json"', 'url = "file:///etc/passwd"')], 1,
                        "'file:///etc/passwd' is not an https:// URL", _nothing_downloaded),
    "http:// URL": Case(lambda tmp: ["download", _custom(tmp, f'url = "{VOCODER_URL}/g_00500000"', 'url = "http://example.com/g"')], 1,
                        "'http://example.com/g' is not an https:// URL", _nothing_downloaded),
    "offline vocoder host": Case(lambda tmp: ["download", _custom(tmp, f'url = "{VOCODER_URL}/g_00500000"', 'url = "https://127.0.0.1:9/g_00500000"')], 1,
                                 "cannot reach 127.0.0.1", _no_part_files),
    "malformed preset as --model": Case(lambda tmp: ["transcribe-and-reply", str(tmp / "q.wav"), "-m", _custom(tmp, 'name = "config.json"', 'name = "../c"'), "--out", str(tmp / "r")], 2,
                                        "'../c' is not a plain file name", lambda tmp: _nothing_downloaded(tmp) or _no_escape(tmp)),
    "hostile k-means": Case(_evil_kmeans, 2, "names posix.system, which a k-means file does not hold", _untouched_by_kmeans),
}


def _no_escape(tmp: Path) -> None:
    assert not (tmp.parent / "escaped").exists() and not (tmp.parent.parent / "escaped").exists()


@pytest.fixture()
def machine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Empty caches, no CUDA GPU (whatever this machine has)."""
    (tmp_path / "hub").mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("OMNI_CACHE", str(tmp_path / "omni"))
    monkeypatch.setattr(fit, "cuda_memory", lambda device=None: None)
    (tmp_path / "q.wav").write_bytes((ROOT / "tests" / "data" / next(p.name for p in (ROOT / "tests" / "data").glob("*.wav"))).read_bytes())
    return tmp_path


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_line_and_leaves_the_files_right(machine: Path, name: str, tiny_model) -> None:
    case = CASES[name]
    if name == "offline vocoder host":  # the hub parts are there (offline), only the vocoder is to fetch
        install_tiny_preset(tiny_model, get_preset("llama-omni-8b"), machine / "hub")
        for voc in (machine / "omni" / "vocoders").iterdir():
            for f in voc.iterdir():
                f.unlink()
            voc.rmdir()
    result = CliRunner().invoke(app, case.args(machine))
    assert result.exit_code == case.code, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    errors = [line for line in result.stderr.splitlines() if line.startswith("omni: error:")]
    assert len(errors) == 1 and case.message in errors[0], result.stderr
    assert "Traceback" not in result.output
    case.after(machine)


def test_units_with_a_whisper_directory_is_refused_before_labelling(machine: Path, tiny_model) -> None:
    result = CliRunner().invoke(app, _whisper_as_hubert(machine, tiny_model))
    assert result.exit_code == 2 and "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "holds a 'whisper' model, not HuBERT; convert mHuBERT with `omni convert-hubert`" in lines[0]
    assert not (machine / "u.jsonl").exists() and not list(machine.glob(".u.jsonl*"))


def test_a_bad_device_is_refused_while_parsing_without_torch(tmp_path: Path) -> None:
    # A torch that cannot be imported: the --device error must come before anything imports it.
    (tmp_path / "torch").mkdir()
    (tmp_path / "torch" / "__init__.py").write_text("raise RuntimeError('torch was imported')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}
    command = [sys.executable, "-c", "from omni_cli.cli import app; app(prog_name='omni')"]
    done = subprocess.run([*command, "chat", "-m", "llama-omni-8b", "--device", "tpu"], capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.strip().splitlines() == [
        "omni: error: Invalid value for '--device': 'tpu' is not a device omni runs on; use cpu, cuda or cuda:N (e.g. cuda:1); see `omni chat --help`."
    ]


def test_an_empty_centres_file_is_one_line(machine: Path) -> None:
    (machine / "c.npy").write_bytes(b"")
    result = CliRunner().invoke(app, ["units", str(machine), "-o", str(machine / "u.jsonl"), "--hubert", str(machine), "--kmeans", str(machine / "c.npy")])
    assert result.exit_code == 2 and "is not a plain array" in result.stderr and "Aborted" not in result.output
