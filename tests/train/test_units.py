"""Unit targets: tiny random HuBERT + random centres, hand-checked nearest centre, strict HuBERT loading, safe k-means conversion."""

from __future__ import annotations

import json
import pickle
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from safetensors.torch import load_file, save_file
from transformers import HubertConfig, HubertModel
from typer.testing import CliRunner

from release_files import write_kmeans

from omni_cli.cli import app
from omni_cli.errors import CheckpointError
from omni_cli.train.data import DatasetError
from omni_cli.train.units import (
    CENTRES_KEY,
    UnitExtractor,
    convert_kmeans,
    label_units,
    load_kmeans_centres,
    merge_repeats,
    nearest_centre,
)

LAYERS = 3


@pytest.fixture(scope="module")
def hubert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random HuBERT with the real 20 ms frame (conv strides 5·2·2·2·2·2·2 = 320) and tiny widths."""
    config = HubertConfig(
        hidden_size=16, num_hidden_layers=LAYERS, num_attention_heads=2, intermediate_size=32,
        conv_dim=(8,) * 7, num_conv_pos_embeddings=8, num_conv_pos_embedding_groups=2,
    )
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("hubert")
    HubertModel(config).eval().save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def centres_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("km") / "km.safetensors"
    save_file({CENTRES_KEY: torch.randn(12, 16)}, str(path))
    return path


def _speech(path: Path, seconds: float, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    t = np.arange(int(16000 * seconds)) / 16000
    wave = 0.3 * np.sin(2 * np.pi * 200 * (1 + t) * t) + 0.05 * rng.standard_normal(t.size)
    sf.write(path, wave.astype(np.float32), 16000)
    return path


def test_units_are_nearest_centres_of_the_layer_at_50_hz(hubert_dir: Path, centres_file: Path, tmp_path: Path) -> None:
    centres = load_kmeans_centres(centres_file)
    extractor = UnitExtractor(hubert_dir, centres, layer=2)
    audio = sf.read(_speech(tmp_path / "a.wav", 1.0, 0), dtype="float32")[0]
    feats = extractor.features(audio)
    assert feats.shape == (49, 16)  # 1 s → 49 frames of 20 ms (the conv stack's valid length)
    with torch.no_grad():
        hidden = HubertModel.from_pretrained(str(hubert_dir))(torch.tensor(audio)[None], output_hidden_states=True).hidden_states
    torch.testing.assert_close(feats, hidden[2][0])
    by_hand = [int(((centres - f) ** 2).sum(-1).argmin()) for f in feats]
    assert nearest_centre(feats, centres).tolist() == by_hand
    assert extractor.units(audio, merge=False) == by_hand
    assert extractor.units(audio) == merge_repeats(by_hand)
    assert merge_repeats([3, 3, 1, 3, 3, 3, 2]) == [3, 1, 3, 2]


def test_units_cli_labels_a_directory_and_the_output_trains(hubert_dir: Path, centres_file: Path, tmp_path: Path) -> None:
    wavs = tmp_path / "wavs"
    wavs.mkdir()
    for i in range(2):
        _speech(wavs / f"r{i}.wav", 0.5 + 0.25 * i, i)
    out = tmp_path / "units.jsonl"
    result = CliRunner().invoke(app, ["units", str(wavs), "--out", str(out), "--hubert", str(hubert_dir), "--kmeans", str(centres_file), "--layer", "3"])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["r0", "r1"]
    extractor = UnitExtractor(hubert_dir, load_kmeans_centres(centres_file), layer=3)
    for row in rows:
        assert row["units"] == extractor.units(sf.read(row["audio"], dtype="float32")[0])
        assert row["units"] and all(0 <= u < 12 for u in row["units"])


@pytest.mark.parametrize("bom", ["", "\ufeff"], ids=["utf-8", "utf-8 with a byte-order mark"])
def test_manifest_records_get_tgt_units_from_their_response_speech(hubert_dir: Path, centres_file: Path, tmp_path: Path, bom: str) -> None:
    _speech(tmp_path / "ans.wav", 0.5, 3)
    manifest = tmp_path / "m.json"
    manifest.write_text(bom + json.dumps([{"id": "x", "speech": "q.wav", "response": "Hi.", "tgt_speech": "ans.wav"}]), encoding="utf-8")
    extractor = UnitExtractor(hubert_dir, load_kmeans_centres(centres_file), layer=LAYERS)
    assert label_units(manifest, tmp_path / "out.json", extractor) == 1
    rows = json.loads((tmp_path / "out.json").read_text())
    assert rows[0]["id"] == "x" and rows[0]["tgt_units"] == extractor.units(sf.read(tmp_path / "ans.wav", dtype="float32")[0])


@pytest.mark.parametrize("how", ["joblib", "pickle-2", "pickle-5"])
def test_the_release_format_converts_to_its_centres(tmp_path: Path, how: str) -> None:
    centres = np.random.default_rng(0).standard_normal((7, 5)).astype(np.float32)
    src = write_kmeans(tmp_path / "km.bin", centres, how)
    assert "sklearn" not in sys.modules  # read without scikit-learn
    dst = convert_kmeans(src, tmp_path / "new" / "km.safetensors")
    np.testing.assert_array_equal(load_kmeans_centres(dst).numpy(), centres)
    # Only the centres are kept, and a pickle is never accepted as centres.
    with pytest.raises(CheckpointError, match="convert"):
        load_kmeans_centres(src)


class _RunsCode:
    """Unpickling this calls os.system: a hostile k-means file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        import os

        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("where", ["top level", "inside the estimator"])
def test_a_kmeans_file_that_would_run_code_is_refused(tmp_path: Path, where: str) -> None:
    marker = tmp_path / "pwned"
    src = tmp_path / "km.bin"
    if where == "top level":
        src.write_bytes(pickle.dumps(_RunsCode(marker), protocol=2))
    else:
        write_kmeans(src, np.ones((2, 3), dtype=np.float32), "pickle-2", _hook=_RunsCode(marker))
    result = CliRunner().invoke(app, ["convert-kmeans", str(src), str(tmp_path / "km.safetensors")])
    assert result.exit_code == 2 and "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("omni: error:") and "names posix.system" in lines[0]
    assert not marker.exists() and not (tmp_path / "km.safetensors").exists()


def test_other_objects_and_damaged_files_are_one_line_errors(tmp_path: Path) -> None:
    plain = tmp_path / "plain.bin"
    plain.write_bytes(pickle.dumps(types.SimpleNamespace(cluster_centers_=np.ones((2, 2)))))  # not the release's class
    with pytest.raises(CheckpointError, match="names types.SimpleNamespace"):
        convert_kmeans(plain, tmp_path / "a.safetensors")
    full = write_kmeans(tmp_path / "km.bin", np.ones((4, 3), dtype=np.float32), "pickle-5")
    (tmp_path / "cut.bin").write_bytes(full.read_bytes()[:-40])
    with pytest.raises(CheckpointError, match="not a readable k-means file"):
        convert_kmeans(tmp_path / "cut.bin", tmp_path / "b.safetensors")
    (tmp_path / "junk.bin").write_bytes(b"junk")
    with pytest.raises(CheckpointError, match="not an uncompressed pickle"):
        convert_kmeans(tmp_path / "junk.bin", tmp_path / "c.safetensors")
    assert not any(tmp_path.glob("*.safetensors"))


def test_convert_kmeans_cli_writes_centres(tmp_path: Path) -> None:
    centres = np.arange(6, dtype=np.float32).reshape(3, 2)
    src = write_kmeans(tmp_path / "km.bin", centres, "pickle-2")
    result = CliRunner().invoke(app, ["convert-kmeans", str(src), str(tmp_path / "km.safetensors")])
    assert result.exit_code == 0, result.output
    assert "--kmeans" in result.stdout and result.stderr == ""
    np.testing.assert_array_equal(load_kmeans_centres(tmp_path / "km.safetensors").numpy(), centres)


def test_a_directory_that_is_not_a_complete_hubert_is_refused(hubert_dir: Path, centres_file: Path, tmp_path: Path, tiny_model) -> None:
    # A Whisper directory (what a user might pass by mistake): refused, nothing labelled with random weights.
    wavs = tmp_path / "wavs"
    wavs.mkdir()
    _speech(wavs / "r.wav", 0.5, 0)
    out = tmp_path / "units.jsonl"
    result = CliRunner().invoke(app, ["units", str(wavs), "--out", str(out), "--hubert", str(tiny_model.speech_encoder), "--kmeans", str(centres_file)])
    assert result.exit_code == 2 and "holds a 'whisper' model, not HuBERT" in result.stderr
    assert not out.exists()
    # A HuBERT config whose weights lack a layer: the missing key is named.
    partial = tmp_path / "partial"
    shutil.copytree(hubert_dir, partial)
    weights = load_file(str(partial / "model.safetensors"))
    save_file({k: v for k, v in weights.items() if "layers.2.attention.q_proj" not in k}, str(partial / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"weight 'encoder\.layers\.2\.attention\.q_proj\.bias' is missing \(and 1 more\)"):
        UnitExtractor(partial, load_kmeans_centres(centres_file))


class _CountingExtractor:
    """Stands in for UnitExtractor: one unit per 1000 samples; fails on request to simulate a crash midway."""

    min_samples = 400  # mHuBERT's receptive field

    def __init__(self, fail_at: int | None = None) -> None:
        self.calls = 0
        self.fail_at = fail_at

    def units(self, audio: np.ndarray) -> list[int]:
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError("simulated crash")
        return [len(audio) // 1000]


def test_every_unreadable_audio_file_is_reported_before_any_labelling(tmp_path: Path) -> None:
    wavs = tmp_path / "wavs"
    wavs.mkdir()
    _speech(wavs / "a.wav", 0.5, 0)
    (wavs / "b.wav").write_bytes(b"not audio")
    (wavs / "c.flac").write_bytes(b"")
    extractor = _CountingExtractor()
    with pytest.raises(DatasetError, match="2 audio file") as info:
        label_units(wavs, tmp_path / "out.jsonl", extractor)  # type: ignore[arg-type]
    assert "b.wav" in str(info.value) and "c.flac" in str(info.value) and "a.wav" not in str(info.value)
    assert extractor.calls == 0 and not (tmp_path / "out.jsonl").exists()
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"id": "x", "tgt_speech": "gone.wav"}) + "\n")
    with pytest.raises(DatasetError, match="gone.wav"):
        label_units(manifest, tmp_path / "out.jsonl", extractor)  # type: ignore[arg-type]


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_labelled_rows_reach_the_part_file_as_they_are_done(tmp_path: Path, suffix: str) -> None:
    for i in range(3):
        _speech(tmp_path / f"r{i}.wav", 0.25 * (i + 1), i)
    rows = [{"id": f"r{i}", "tgt_speech": f"r{i}.wav"} for i in range(3)]
    manifest = tmp_path / f"m{suffix}"
    manifest.write_text(json.dumps(rows) if suffix == ".json" else "".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / f"out{suffix}"
    with pytest.raises(RuntimeError, match="simulated"):
        label_units(manifest, out, _CountingExtractor(fail_at=3))  # type: ignore[arg-type]
    part = out.with_name(f".{out.name}.part")
    assert not out.exists() and part.read_text(encoding="utf-8").count('"tgt_units"') == 2
    assert label_units(manifest, out, _CountingExtractor()) == 3  # a full run renames into place
    done = json.loads(out.read_text()) if suffix == ".json" else [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["tgt_units"] for r in done] == [[4], [8], [12]] and not part.exists()


def test_units_cli_defaults_to_cuda_when_available(centres_file: Path, tmp_path: Path, monkeypatch) -> None:
    from omni_cli.errors import ConfigError
    from omni_cli.train import units

    devices: list[str] = []

    def fake_extractor(hubert, centres, layer, device):  # records the device, stops before loading
        devices.append(device)
        raise ConfigError("stop here")

    monkeypatch.setattr(units, "UnitExtractor", fake_extractor)
    args = ["units", str(tmp_path), "--out", str(tmp_path / "o.jsonl"), "--hubert", str(tmp_path), "--kmeans", str(centres_file)]
    assert CliRunner().invoke(app, args).exit_code == 2 and devices[-1] is None  # the extractor picks
    for available, expected in ((True, "cuda"), (False, "cpu")):
        monkeypatch.setattr(torch.cuda, "is_available", lambda available=available: available)
        assert units.pick_device(None) == expected
    assert CliRunner().invoke(app, [*args, "--device", "cpu"]).exit_code == 2 and devices[-1] == "cpu"
