"""Speech for the data set: espeak-ng always, Piper's VITS voices through the piper-tts package.

The real Piper voice (114 MB) cannot be downloaded here: Piper runs on a tiny voice in the released
format (omni_cli/tiny/piper_voice.py), and the fetch-and-verify path runs against the standard
library's HTTP server on 127.0.0.1 with a voice preset of the same form as the shipped one.
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from omni_cli.audio.io import SAMPLE_RATE
from omni_cli.data.tts import EspeakTts, PiperTts, TtsError, VoicePlan
from omni_cli.data.voices import DEFAULT_PIPER_VOICE, find_voice, piper_model_path, voice_names
from omni_cli.setup.download import ChecksumError
from omni_cli.tiny.piper_voice import make_tiny_piper_voice
from omni_cli.weights import presets

needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng not installed; run .ci/sound-server.sh")


@needs_espeak
def test_espeak_speaks_at_16_khz_in_the_voice_and_speed_asked() -> None:
    tts = EspeakTts()
    normal = tts.speak("The capital of France is Paris.", "en-us", 1.0)
    fast = tts.speak("The capital of France is Paris.", "en-us", 1.5)
    female = tts.speak("The capital of France is Paris.", "en-us+f3", 1.0)
    assert normal.dtype == np.float32 and 1.0 < len(normal) / SAMPLE_RATE < 4.0
    assert np.sqrt(np.mean(normal**2)) > 0.01  # speech, not silence
    assert len(fast) < 0.8 * len(normal)
    assert not np.array_equal(female[: len(normal)], normal[: len(female)])
    with pytest.raises(TtsError, match="espeak-ng failed in voice 'xx-nonsense'"):
        tts.speak("hello", "xx-nonsense", 1.0)


def test_voice_plan_is_the_same_on_every_run_and_uses_every_voice() -> None:
    plan = VoicePlan(("a", "b", "c"), (0.9, 1.1), seed=0)
    picks = [plan.pick(f"item-{i}") for i in range(60)]
    assert picks == [VoicePlan(("a", "b", "c"), (0.9, 1.1), seed=0).pick(f"item-{i}") for i in range(60)]
    assert {v for v, _ in picks} == {"a", "b", "c"} and {s for _, s in picks} == {0.9, 1.1}
    assert picks != [VoicePlan(("a", "b", "c"), (0.9, 1.1), seed=1).pick(f"item-{i}") for i in range(60)]


def test_piper_speaks_a_voice_in_the_released_format(tmp_path: Path) -> None:
    tts = PiperTts(make_tiny_piper_voice(tmp_path))
    assert tts.voices() == ["default"] and tts.rate == 22050
    audio = tts.speak("Hello there. How are you today?", "default", 1.0)
    longer = tts.speak("Hello there. How are you today? I am fine, thank you very much.", "default", 1.0)
    assert audio.dtype == np.float32 and len(audio) > 0.2 * SAMPLE_RATE  # resampled from 22.05 kHz
    assert len(longer) > 1.5 * len(audio)  # the text was phonemized (by piper's espeak-ng), not ignored
    with pytest.raises(TtsError, match="no speaker 'alice'"):
        tts.speak("hi", "alice", 1.0)
    with pytest.raises(TtsError, match="not found"):
        PiperTts(tmp_path / "missing.onnx")


def test_the_shipped_ljspeech_voice_is_pinned() -> None:
    assert DEFAULT_PIPER_VOICE in voice_names()
    preset = find_voice(DEFAULT_PIPER_VOICE)
    assert preset is not None and preset.model == "en_US-ljspeech-high.onnx"
    for remote in preset.files:
        assert remote.url.startswith("https://huggingface.co/rhasspy/piper-voices/resolve/")
        assert remote.size and remote.sha256 and len(remote.sha256) == 64


@pytest.fixture()
def voice_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, Path]]:
    """The tiny voice's files served over HTTP on 127.0.0.1 (allowed for tests as in test_download.py)."""
    files = tmp_path / "served"
    make_tiny_piper_voice(files, "tiny")
    monkeypatch.setattr(presets, "PLAIN_HTTP_HOSTS", frozenset({"127.0.0.1"}))
    monkeypatch.setenv("OMNI_CACHE", str(tmp_path / "cache"))
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(files))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", files
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def _voice_preset(path: Path, base: str, files: Path, corrupt: bool = False) -> Path:
    entries = []
    for name in ("tiny.onnx", "tiny.onnx.json"):
        digest = hashlib.sha256((files / name).read_bytes()).hexdigest()
        if corrupt and name == "tiny.onnx":
            digest = "0" * 64
        entries.append(f'[[files]]\nname = "{name}"\nurl = "{base}/{name}"\nsize = {(files / name).stat().st_size}\nsha256 = "{digest}"\n')
    path.write_text('name = "tiny"\nengine = "piper"\nmodel = "tiny.onnx"\ndescription = "tiny"\nlicence = "test"\n\n' + "\n".join(entries), encoding="utf-8")
    return path


def test_a_voice_is_fetched_once_verified_and_cached(voice_server: tuple[str, Path], tmp_path: Path) -> None:
    base, files = voice_server
    lines: list[str] = []
    model = piper_model_path(str(_voice_preset(tmp_path / "tiny.toml", base, files)), echo=lines.append)
    assert model == tmp_path / "cache" / "voices" / "tiny" / "tiny.onnx"
    assert model.read_bytes() == (files / "tiny.onnx").read_bytes()
    assert any("Fetching the tiny voice" in line for line in lines)
    assert len(PiperTts(model).speak("It works.", "default", 1.0)) > 0
    lines.clear()
    (files / "tiny.onnx").unlink()  # the second time nothing is fetched
    assert piper_model_path(str(tmp_path / "tiny.toml"), echo=lines.append) == model and not lines


def test_a_voice_failing_its_checksum_is_removed(voice_server: tuple[str, Path], tmp_path: Path) -> None:
    base, files = voice_server
    with pytest.raises(ChecksumError, match="tiny.onnx has SHA-256"):
        piper_model_path(str(_voice_preset(tmp_path / "bad.toml", base, files, corrupt=True)), echo=lambda line: None)
    assert not (tmp_path / "cache" / "voices" / "tiny" / "tiny.onnx").exists()
