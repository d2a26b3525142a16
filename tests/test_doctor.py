"""`omni doctor` on a machine without GPU or sound card: says what is missing, exits 0 unless something is broken."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import torch
from fake_hub_cache import install_tiny_preset
from typer.testing import CliRunner

from omni_cli.audio.devices import DeviceInfo
from omni_cli.cli import app
from omni_cli.setup.doctor import FIX, MISSING, OK, WARN, check_audio, check_offline, exit_code, run_checks
from omni_cli.errors import AudioInputError
from omni_cli.weights.presets import get_preset, resolve_preset

ROOT = Path(__file__).resolve().parents[1]
PRESET = "llama-omni-8b"
STATUS_LINE = re.compile(rf"^({OK}|{WARN}|{MISSING}|{FIX}) +\S.* — \S")


@pytest.fixture()
def caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("OMNI_CACHE", str(tmp_path / "omni"))
    return tmp_path / "hub"


def _device(index: int, name: str, inputs: int, outputs: int) -> DeviceInfo:
    return DeviceInfo(index, name, "ALSA", inputs, outputs, 48000.0, inputs > 0, outputs > 0)


def _no_audio() -> list[DeviceInfo]:
    raise AudioInputError("the PortAudio library is missing (test); install it (Debian/Ubuntu: apt-get install libportaudio2).")


def test_doctor_on_this_machine_says_what_is_missing_and_exits_0(caches) -> None:
    result = CliRunner().invoke(app, ["doctor"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert all(STATUS_LINE.match(line) for line in lines), lines
    by_name = {line.split(" — ")[0].split(maxsplit=1)[1]: line for line in lines}
    assert by_name["python"].startswith(OK) and by_name["torch"].startswith(OK)
    if not torch.cuda.is_available():
        gpu = by_name["CUDA GPU"]
        assert gpu.startswith(MISSING) and "only the tiny model runs on CPU" in gpu
        assert re.search(r"needs ~\d+\.\d GB at fp16", gpu), "the memory need is shown even without a GPU"
    for part in ("model", "speech encoder", "vocoder"):
        line = by_name[f"weights: {part}"]
        assert line.startswith(MISSING) and "run `omni download llama-omni-8b`" in line
    assert by_name["weights: units"].startswith(MISSING) and "only `omni units` needs it" in by_name["weights: units"]
    if "bitsandbytes" in by_name and by_name["bitsandbytes"].startswith(MISSING):
        assert "omni-cli[quant]" not in by_name["bitsandbytes"]  # that PyPI name belongs to someone else


def test_precision_changes_the_memory_shown(caches) -> None:
    if torch.cuda.is_available():
        pytest.skip("with a GPU the need is shown on the GPU memory line")
    fp16 = CliRunner().invoke(app, ["doctor", "--precision", "fp16"]).stdout
    q4 = CliRunner().invoke(app, ["doctor", "--precision", "4bit"]).stdout
    need = lambda text, p: float(re.search(rf"needs ~(\d+\.\d) GB at {p}", text).group(1))  # noqa: E731
    assert need(q4, "4bit") < need(fp16, "fp16")
    bad = CliRunner().invoke(app, ["doctor", "--precision", "3bit"])
    assert bad.exit_code == 2 and "'3bit' is not one of" in bad.stderr  # refused while parsing


def test_audio_lines_from_devices_or_their_absence() -> None:
    (missing,) = check_audio(_no_audio)
    assert missing.status == MISSING and "libportaudio2" in missing.detail and "omni chat" in missing.detail
    mic_only = check_audio(lambda: [_device(0, "USB Mic", 1, 0)])
    assert [(c.name, c.status) for c in mic_only] == [("audio input", OK), ("audio output", MISSING)]
    assert "USB Mic" in mic_only[0].detail
    devices = lambda: [_device(0, "USB Mic", 1, 0), _device(1, "Speakers", 0, 2)]  # noqa: E731
    both = check_audio(devices, output_latency=lambda: 0.02)
    assert [(c.name, c.status) for c in both] == [("audio input", OK), ("audio output", OK), ("audio latency", OK)]
    assert both[2].detail.startswith("20 ms from omni's audio to the default speaker")
    (slow,) = [c for c in check_audio(devices, output_latency=lambda: 0.2) if c.name == "audio latency"]
    assert slow.status == WARN and "200 ms" in slow.detail and "every reply is heard that much later" in slow.detail

    def hung() -> float:
        raise AudioInputError("the sound system did not answer within 1.5 s while opening the speaker")

    (unknown,) = [c for c in check_audio(devices, output_latency=hung) if c.name == "audio latency"]
    assert unknown.status == WARN and "did not answer" in unknown.detail


@pytest.mark.sound
def test_the_output_latency_is_what_the_sound_server_gives_omnis_stream(sound_server) -> None:
    from omni_cli.audio.player import output_latency

    assert output_latency() == pytest.approx(0.03, abs=0.005)  # 15 ms blocks: two of them in flight


def test_present_weights_are_ok_and_a_corrupt_shard_fails(caches, tiny_model, monkeypatch: pytest.MonkeyPatch) -> None:
    install_tiny_preset(tiny_model, get_preset(PRESET), caches)
    checks = list(run_checks(PRESET, list_devices=_no_audio))
    weights = {c.name: c for c in checks if c.name.startswith("weights")}
    assert [c.status for c in weights.values()] == [OK, OK, OK, MISSING]  # the optional units part is not there
    assert exit_code(checks) == 0
    # Damage one shard's header (the cache holds it as a blob behind a symlink).
    shard = next(resolve_preset(PRESET).model_dir.glob("model-00001-*.safetensors")).resolve()
    shard.write_bytes(b"\xff" * 64)
    checks = list(run_checks(PRESET, list_devices=_no_audio))
    model = next(c for c in checks if c.name == "weights: model")
    assert model.status == FIX and "damaged" in model.detail and "omni download llama-omni-8b" in model.detail
    assert exit_code(checks) == 1
    result = CliRunner().invoke(app, ["doctor"])
    assert result.exit_code == 1 and "FIX      weights: model" in result.stdout


def test_a_damaged_vocoder_config_is_reported(caches, tiny_model) -> None:
    preset = get_preset(PRESET)
    install_tiny_preset(tiny_model, preset, caches)
    (resolve_preset(PRESET).vocoder_dir / "config.json").write_text("{ not json")
    vocoder = next(c for c in run_checks(PRESET, list_devices=_no_audio) if c.name == "weights: vocoder")
    assert vocoder.status == FIX and "not valid JSON" in vocoder.detail


def test_a_damage_error_without_a_message_still_gives_a_fix_line(caches, tiny_model, monkeypatch: pytest.MonkeyPatch) -> None:
    from omni_cli.setup import doctor

    install_tiny_preset(tiny_model, get_preset(PRESET), caches)

    def empty_error(folder: Path, preset: object) -> None:
        raise ValueError()

    monkeypatch.setattr(doctor, "_validate_vocoder", empty_error)
    vocoder = next(c for c in run_checks(PRESET, list_devices=_no_audio) if c.name == "weights: vocoder")
    assert vocoder.status == FIX and "is damaged (ValueError); delete it" in vocoder.detail


def test_local_dir_is_checked_and_named_in_the_fix(caches, tiny_model, tmp_path: Path) -> None:
    local = tmp_path / "weights"
    install_tiny_preset(tiny_model, get_preset(PRESET), caches, local_dir=local)
    shutil.rmtree(local / "vocoder")
    checks = {c.name: c for c in run_checks(PRESET, local_dir=local, list_devices=_no_audio)}
    assert checks["weights: model"].status == OK and checks["weights: model"].detail == str(local / "Llama-3.1-8B-Omni")
    assert checks["weights: vocoder"].status == MISSING
    assert f"omni download llama-omni-8b --local-dir {local}" in checks["weights: vocoder"].detail


def test_offline_mode_line(caches, tiny_model, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert check_offline(resolve_preset(PRESET)).status == WARN  # nothing downloaded, downloads disabled
    install_tiny_preset(tiny_model, get_preset(PRESET), caches)
    assert check_offline(resolve_preset(PRESET)).status == OK
    monkeypatch.delenv("HF_HUB_OFFLINE")
    assert "can be downloaded" in check_offline(None).detail


def test_unknown_preset_is_a_fix_line(caches) -> None:
    result = CliRunner().invoke(app, ["doctor", "--preset", "nope"])
    assert result.exit_code == 1
    assert any(line.startswith(FIX) and "no preset named 'nope'" in line for line in result.stdout.splitlines())


def test_a_truncated_vocoder_pickle_is_not_ok(caches, tiny_model) -> None:
    preset = get_preset(PRESET)
    install_tiny_preset(tiny_model, preset, caches)
    folder = resolve_preset(PRESET).vocoder_dir
    (folder / "vocoder.safetensors").unlink(missing_ok=True)  # only the released pickle, as a by-hand download leaves it
    pickle_file = next(p for p in folder.iterdir() if p.name != "config.json")
    assert next(c for c in run_checks(PRESET, list_devices=_no_audio) if c.name == "weights: vocoder").status == OK
    pickle_file.write_bytes(pickle_file.read_bytes()[: pickle_file.stat().st_size // 2])
    vocoder = next(c for c in run_checks(PRESET, list_devices=_no_audio) if c.name == "weights: vocoder")
    assert vocoder.status == FIX and "is damaged" in vocoder.detail


def test_a_custom_preset_that_cannot_be_sized_gives_lines_not_tracebacks(caches, tmp_path: Path) -> None:
    text = (ROOT / "models" / f"{PRESET}.toml").read_text()
    no_width = tmp_path / "no-width.toml"
    no_width.write_text(text.replace("speech_adaptor_hidden = 2048", ""))
    result = CliRunner().invoke(app, ["doctor", "--preset", str(no_width)])
    assert result.exit_code == 1 and (result.exception is None or isinstance(result.exception, SystemExit))
    assert "Traceback" not in result.output and all(STATUS_LINE.match(line) for line in result.stdout.splitlines())
    fixes = [line for line in result.stdout.splitlines() if line.startswith(FIX)]
    assert len(fixes) == 1 and "lacks speech_adaptor_hidden" in fixes[0]
    no_hidden = tmp_path / "no-hidden.toml"
    no_hidden.write_text(text.replace("hidden_size = 4096\n", "", 1))
    result = CliRunner().invoke(app, ["doctor", "--preset", str(no_hidden)])
    assert result.exit_code == 0 and "Traceback" not in result.output
    gpu = next(line for line in result.stdout.splitlines() if "GPU memory" in line)
    assert gpu.startswith(WARN) and "cannot estimate" in gpu and "hidden_size" in gpu


def test_the_units_part_is_ok_when_omni_units_could_load_it_and_fix_when_its_weights_are_gone(caches, tiny_model, tmp_path: Path) -> None:
    import numpy as np
    from release_files import fairseq_weights, write_checkpoint, write_kmeans

    from omni_cli.train.hubert import convert_hubert
    from omni_cli.train.units import convert_kmeans
    from omni_cli.weights.presets import HUBERT_DIRNAME, KMEANS_CENTRES_NAME, units_dir

    preset = get_preset(PRESET)
    install_tiny_preset(tiny_model, preset, caches)
    assert preset.units is not None
    folder = units_dir(preset.units)
    convert_hubert(write_checkpoint(tmp_path / "m.pt", "dictconfig", fairseq_weights()), folder / HUBERT_DIRNAME)
    centres = np.random.default_rng(1).standard_normal((10, 16)).astype(np.float32)
    convert_kmeans(write_kmeans(tmp_path / "km.bin", centres, "pickle-4"), folder / KMEANS_CENTRES_NAME)
    units = next(c for c in run_checks(PRESET, list_devices=_no_audio) if c.name == "weights: units")
    assert units.status == OK, units.detail
    for weights in (folder / HUBERT_DIRNAME).glob("*.safetensors"):
        weights.unlink()  # config.json alone: `omni units` could not label anything with it
    units = next(c for c in run_checks(PRESET, list_devices=_no_audio) if c.name == "weights: units")
    assert units.status == FIX, units.detail


@pytest.mark.parametrize("pin", ["size = 1", 'sha256 = "' + "0" * 64 + '"'])
def test_a_vocoder_file_that_differs_from_its_pin_is_fix(caches, tiny_model, tmp_path: Path, pin: str) -> None:
    install_tiny_preset(tiny_model, get_preset(PRESET), caches)
    text = (ROOT / "models" / f"{PRESET}.toml").read_text()
    unpinned = 'url = "https://dl.fbaipublicfiles.com/fairseq/speech_to_speech/vocoder/code_hifigan/mhubert_vp_en_es_fr_it3_400k_layer11_km1000_lj/config.json"\nsha256 = ""'
    assert unpinned in text
    pinned = tmp_path / "pinned.toml"
    pinned.write_text(text.replace(unpinned, unpinned.replace('sha256 = ""', pin)))
    checks = list(run_checks(str(pinned), list_devices=_no_audio))
    vocoder = next(c for c in checks if c.name == "weights: vocoder")
    assert vocoder.status == FIX and "config.json " in vocoder.detail and "pinned by the preset" in vocoder.detail, vocoder.detail
    assert ("is " in vocoder.detail and "bytes, expected 1" in vocoder.detail) if pin.startswith("size") else "expected " + "0" * 64 in vocoder.detail
