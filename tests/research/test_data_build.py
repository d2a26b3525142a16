"""`omni data build` end to end with espeak-ng: a manifest `omni finetune` takes, resumable after Ctrl-C or a crash."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from transformers import HubertConfig, HubertModel
from typer.testing import CliRunner

from omni_cli.cli import app
from omni_cli.data.build import BuildPlan, DataBuild, Speaker
from omni_cli.data.tts import EspeakTts, VoicePlan
from omni_cli.model.adaptor import SpeechAdaptor
from omni_cli.model.features import CHUNK_SAMPLES, HOP_LENGTH
from omni_cli.model.loading import load_tokenizer
from omni_cli.train.data import DataLimits, load_manifest
from omni_cli.train.units import CENTRES_KEY

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from process_group import kill_group  # noqa: E402

pytestmark = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng not installed; run .ci/sound-server.sh")

QUESTIONS = [
    {"id": "paris", "instruction": "What is the capital of France?", "response": "The capital of France is Paris."},
    {"id": "colour", "instruction": "Name a primary colour.", "response": "Red is a primary colour."},
    {"id": "water", "instruction": "At what temperature does water boil?", "response": "Water boils at one hundred degrees."},
]


def _input(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def units_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A random HuBERT with the real 20 ms frame and tiny widths, and 12 k-means centres (what `omni units` reads)."""
    config = HubertConfig(
        hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        conv_dim=(8,) * 7, num_conv_pos_embeddings=8, num_conv_pos_embedding_groups=2,
    )
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("units")
    HubertModel(config).eval().save_pretrained(folder / "hubert")
    save_file({CENTRES_KEY: torch.randn(12, 16)}, str(folder / "km.safetensors"))
    return folder / "hubert", folder / "km.safetensors"


def _limits(tiny_model) -> DataLimits:
    config = json.loads((tiny_model.model_dir / "config.json").read_text())
    return DataLimits(
        unit_vocab_size=config["unit_vocab_size"],
        speech_positions=SpeechAdaptor.output_length(CHUNK_SAMPLES // HOP_LENGTH, config["speech_encoder_ds_rate"]),
        unit_frames_per_token=config["ctc_upsample_factor"],
    )


def test_build_writes_a_manifest_that_both_training_stages_accept(tmp_path: Path, units_files, tiny_model) -> None:
    source = _input(tmp_path / "in.jsonl", QUESTIONS + [{"id": "joke", "instruction": "Tell me a joke."}])
    out = tmp_path / "data"
    hubert, kmeans = units_files
    result = CliRunner().invoke(app, ["data", "build", str(source), "--out", str(out), "--hubert", str(hubert), "--kmeans", str(kmeans), "--layer", "2"])
    assert result.exit_code == 1, result.output  # one item had no reply and no LLM to write it
    assert "3 of 4 items" in result.output and "failed: joke: the input gives no reply and there is no --llm-url" in result.output
    records = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
    assert [r["id"] for r in records] == ["paris", "colour", "water"]
    for record, question in zip(records, QUESTIONS):
        assert record["conversations"][1] == {"from": "gpt", "value": question["response"]}
        assert record["instruction"] == question["instruction"]
        assert record["instruction_voice"].startswith("espeak:en") and record["response_voice"] == "espeak:en-us"
        assert (out / record["speech"]).is_file() and (out / record["tgt_speech"]).is_file()
        assert 0.5 < record["response_seconds"] < 5 and record["tgt_units"]
        assert all(0 <= u < 12 for u in record["tgt_units"])
    tokenizer = load_tokenizer(tiny_model.model_dir)
    for stage in (1, 2):
        trained = load_manifest(out / "train.jsonl", stage, tokenizer, _limits(tiny_model))
        assert [r.record_id for r in trained] == ["paris", "colour", "water"]
    assert trained[0].units == tuple(records[0]["tgt_units"])


class CountingSpeaker(EspeakTts):
    """espeak-ng, counting its calls; raises KeyboardInterrupt (a Ctrl-C at that moment) on call `interrupt_at`."""

    def __init__(self, interrupt_at: int | None = None) -> None:
        super().__init__()
        self.calls = 0
        self.interrupt_at = interrupt_at

    def speak(self, text: str, voice: str, speed: float) -> np.ndarray:
        self.calls += 1
        if self.calls == self.interrupt_at:
            raise KeyboardInterrupt
        return super().speak(text, voice, speed)


def _plan(source: Path, out: Path, engine: CountingSpeaker) -> BuildPlan:
    return BuildPlan(source, out, Speaker(engine, VoicePlan(("en-us", "en-gb"), (1.0, 1.2))), Speaker(engine, VoicePlan(("en-us",))))


def test_an_interrupted_build_keeps_every_finished_item_and_the_rerun_does_only_the_rest(tmp_path: Path) -> None:
    rows = [{"id": f"q{i}", "instruction": f"Question number {i}?", "response": f"Answer number {i}."} for i in range(5)]
    source, out = _input(tmp_path / "in.jsonl", rows), tmp_path / "data"
    stopped = CountingSpeaker(interrupt_at=6)  # two calls an item: Ctrl-C while the third item's reply is spoken
    summary = DataBuild(_plan(source, out, stopped)).run()
    assert summary.interrupted and summary.records == 2
    kept = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
    assert [r["id"] for r in kept] == ["q0", "q1"]  # the manifest is whole, with the finished items only
    assert not list(out.glob(".*.part"))
    again = CountingSpeaker()
    summary = DataBuild(_plan(source, out, again)).run()
    assert not summary.interrupted and summary.records == 5 and summary.built == 3
    assert again.calls == 6  # q2, q3, q4 only
    assert [json.loads(line)["id"] for line in (out / "items.jsonl").read_text().splitlines()] == ["q0", "q1", "q2", "q3", "q4"]
    assert [json.loads(line)["id"] for line in (out / "train.jsonl").read_text().splitlines()] == [f"q{i}" for i in range(5)]


def test_a_crash_mid_write_of_the_journal_loses_only_that_item(tmp_path: Path) -> None:
    rows = [{"id": f"q{i}", "instruction": f"Question {i}?", "response": f"Answer {i}."} for i in range(3)]
    source, out = _input(tmp_path / "in.jsonl", rows), tmp_path / "data"
    DataBuild(_plan(source, out, CountingSpeaker())).run()
    lines = (out / "items.jsonl").read_text().splitlines()
    (out / "items.jsonl").write_text("\n".join(lines[:2]) + "\n" + lines[2][:40], encoding="utf-8")  # torn last line
    again = CountingSpeaker()
    summary = DataBuild(_plan(source, out, again)).run()
    assert again.calls == 2 and summary.built == 1 and summary.records == 3


@pytest.mark.slow  # a real process and a real SIGINT: about 10 s on 2 cores
def test_ctrl_c_on_the_command_stops_after_the_item_and_the_same_command_continues(tmp_path: Path) -> None:
    rows = [{"id": f"q{i:02d}", "instruction": f"Please tell me about the number {i}.", "response": f"The number {i} is a fine number."} for i in range(60)]
    source, out = _input(tmp_path / "in.jsonl", rows), tmp_path / "data"
    cmd = [sys.executable, "-m", "omni_cli.cli", "data", "build", str(source), "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and (not (out / "items.jsonl").is_file() or len((out / "items.jsonl").read_text().splitlines()) < 2):
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGINT)
        _, stderr = proc.communicate(timeout=30)
    finally:
        kill_group(proc)
    assert proc.returncode == 130, stderr
    assert "stopping after this item" in stderr and "Run the same command again to continue" in stderr
    kept = [json.loads(line)["id"] for line in (out / "train.jsonl").read_text().splitlines()]
    assert 2 <= len(kept) < 60 and kept == [f"q{i:02d}" for i in range(len(kept))]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert f"{60 - len(kept)} made in this run" in done.stderr
    assert len((out / "train.jsonl").read_text().splitlines()) == 60


def test_refusals_before_any_work(tmp_path: Path) -> None:
    source = _input(tmp_path / "in.jsonl", QUESTIONS)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "thesis.tex").write_text("mine")
    runner = CliRunner()
    cases = [
        (["--out", str(busy)], "holds other files"),
        (["--out", str(tmp_path / "o"), "--llm-url", "http://127.0.0.1:1/v1"], "--llm-url and --llm-model go together"),
        (["--out", str(tmp_path / "o"), "--responses", "write"], "--responses write needs --llm-url"),
        (["--out", str(tmp_path / "o"), "--hubert", str(tmp_path)], "--hubert and --kmeans go together"),
        (["--out", str(tmp_path / "o"), "--instruction-voices", "en-us,xx-nonsense"], "espeak-ng failed in voice 'xx-nonsense'"),
        (["--out", str(tmp_path / "o"), "--speeds", "fast"], "--speeds takes numbers"),
    ]
    for args, message in cases:
        result = runner.invoke(app, ["data", "build", str(source), *args])
        assert result.exit_code in (1, 2) and message in result.output, (args, result.output)
    assert sorted(p.name for p in busy.iterdir()) == ["thesis.tex"]


def test_an_item_whose_input_changed_is_built_again_into_new_files(tmp_path: Path) -> None:
    source, out = _input(tmp_path / "in.jsonl", QUESTIONS[:2]), tmp_path / "data"
    runner = CliRunner()
    first = runner.invoke(app, ["data", "build", str(source), "--out", str(out)])
    assert first.exit_code == 0, first.output
    old = {r["id"]: r for r in map(json.loads, (out / "train.jsonl").read_text().splitlines())}
    old_reply = (out / old["paris"]["tgt_speech"]).read_bytes()

    edited = [{**QUESTIONS[0], "response": "Paris, the city of light."}, QUESTIONS[1]]
    again = runner.invoke(app, ["data", "build", str(_input(source, edited)), "--out", str(out)])
    assert again.exit_code == 0, again.output
    assert "1 made in this run, 1 of them again because the input changed" in again.output
    rows = {r["id"]: r for r in map(json.loads, (out / "train.jsonl").read_text().splitlines())}
    assert rows["paris"]["conversations"][1]["value"] == "Paris, the city of light."
    assert rows["paris"]["tgt_speech"] != old["paris"]["tgt_speech"]  # new files: the earlier ones are never replaced
    assert (out / old["paris"]["tgt_speech"]).read_bytes() == old_reply
    assert rows["colour"] == old["colour"]  # unchanged items are kept, as after Ctrl-C

    other = _input(tmp_path / "other.jsonl", [{"id": "colour", "instruction": "Name a warm colour.", "response": "Orange is warm."}])
    replaced = runner.invoke(app, ["data", "build", str(other), "--out", str(out)])
    assert replaced.exit_code == 0 and "1 made in this run" in replaced.output, replaced.output
    rows = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
    assert [(r["id"], r["instruction"]) for r in rows] == [("colour", "Name a warm colour.")]
    unchanged = runner.invoke(app, ["data", "build", str(other), "--out", str(out)])
    assert "(0 made in this run)" in unchanged.output, unchanged.output


@pytest.mark.parametrize("where, message", [("under-a-file", "cannot be created: "), ("proc", "is not writable (")])
def test_an_out_that_cannot_be_a_folder_is_one_line(tmp_path: Path, where: str, message: str) -> None:
    source = _input(tmp_path / "in.jsonl", QUESTIONS[:1])
    out = source / "sub" if where == "under-a-file" else Path("/proc/omni-test")
    result = CliRunner().invoke(app, ["data", "build", str(source), "--out", str(out)])
    assert result.exit_code == 2 and message in result.output and "choose" in result.output, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)  # no traceback
    assert len(result.output.strip().splitlines()) == 1
