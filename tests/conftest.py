"""Shared test set-up: never touch the network, keep torch small on 2 cores."""

from __future__ import annotations

import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import pytest  # noqa: E402

# Three of the real questions from ../shared/data/questions are copied here so a clean
# clone can test on real speech without the shared folder.
QUESTIONS_DIR = Path(__file__).resolve().parent / "data"


@pytest.fixture(scope="session")
def question_wavs() -> list[Path]:
    """The real spoken questions shipped beside the repository (22.05 kHz float WAVs)."""
    wavs = sorted(QUESTIONS_DIR.glob("helpful_base_*.wav"))
    assert wavs, f"question WAVs missing under {QUESTIONS_DIR}"
    return wavs


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory):
    """A tiny random LLaMA-Omni written once per run in the released layout (see omni_cli/tiny)."""
    from omni_cli.tiny.omni import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny"), seed=0)


@pytest.fixture(scope="session")
def tiny_loaded(tiny_model):
    """The tiny model loaded through the users' code path, on CPU in fp32."""
    from omni_cli.model.loading import load_omni

    return load_omni(tiny_model.model_dir, tiny_model.speech_encoder, precision="fp32", device="cpu")


@pytest.fixture
def tokenizer_with_clean_up(tiny_model, tmp_path: Path):
    """Make the tiny checkpoint's tokenizer, as load_tokenizer reads it, with tokenizer_config.json's
    clean_up_tokenization_spaces set (Llama-3.1's is true; the tiny model's false)."""
    import json
    import shutil

    from omni_cli.model.loading import load_tokenizer

    def make(clean_up: bool):
        copy = tmp_path / f"tokenizer-clean-up-{clean_up}"
        copy.mkdir()
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(tiny_model.model_dir / name, copy / name)
        config = json.loads((copy / "tokenizer_config.json").read_text())
        config["clean_up_tokenization_spaces"] = clean_up
        (copy / "tokenizer_config.json").write_text(json.dumps(config))
        return load_tokenizer(copy)

    return make


# -- sound: a private PulseAudio server and test speech (shared by tests/audio and tests/test_chat_sound.py) --

import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from collections.abc import Iterator  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/, for sound_server

from sound_server import SoundServer, start_sound_server  # noqa: E402


@pytest.fixture(scope="session")
def sound_server() -> Iterator[SoundServer]:
    """A PulseAudio server with virtual mic `omni_mic` and speaker `omni_out`, made PortAudio's default.

    Skips with the reason where no server can start (PulseAudio or PortAudio not installed).
    """
    from omni_cli.audio.devices import load_sounddevice, rescan_devices
    from omni_cli.errors import AudioInputError

    try:
        load_sounddevice()
    except AudioInputError as exc:
        pytest.skip(f"no PortAudio: {exc}")
    server, reason = start_sound_server()
    if server is None:
        pytest.skip(f"no sound server: {reason}")
    try:
        with server.as_default():
            # PortAudio scanned devices at import, maybe before the server existed.
            rescan_devices()
            yield server
    finally:
        server.stop()
        rescan_devices()


@pytest.fixture(scope="session")
def espeak_wav(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A sentence spoken by espeak-ng (22.05 kHz WAV); skips where espeak-ng is not installed."""
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng not installed; run .ci/sound-server.sh")
    path = tmp_path_factory.mktemp("espeak") / "sentence.wav"
    subprocess.run(["espeak-ng", "-w", str(path), "What is the tallest mountain in Europe?"], check=True, capture_output=True)
    return path


@pytest.fixture(scope="session")
def question_16k(question_wavs: list[Path]) -> list[np.ndarray]:
    """The real spoken questions at 16 kHz mono float32."""
    from omni_cli.audio.io import load_audio

    return [load_audio(path) for path in question_wavs]


# -- omni serve: a real server on the tiny model (tests/serve, and the research loop's LLM steps in tests/research) --

sys.path.insert(0, str(Path(__file__).resolve().parent / "serve"))  # for servers


@pytest.fixture(scope="session")
def tiny_server(tiny_model):
    """A real `omni serve` (tiny model, CPU, no key) in its own process group, killed at the end of the run."""
    from servers import omni_serve

    with omni_serve(tiny_model) as server:
        yield server


@pytest.fixture(scope="session")
def tiny_pipeline(tiny_model):
    """The tiny model loaded as `omni serve` loads it (fp32, CPU, the serve defaults), for expected replies.
    Its random weights never say they are done: every reply runs to its token limit."""
    from servers import load_as_served

    return load_as_served(tiny_model)
