"""`omni transcribe-and-reply` as a user runs it: through Typer's CliRunner on real question WAVs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from typer.testing import CliRunner

from omni_cli.cli import app


@pytest.fixture()
def runner() -> CliRunner:
    return CliRunner()


def _args(tiny_model, *extra: str, vocoder: bool = True) -> list[str]:
    args = ["--model", str(tiny_model.model_dir), "--speech-encoder", str(tiny_model.speech_encoder), "--max-new-tokens", "12"]
    if vocoder:
        args += ["--vocoder", str(tiny_model.vocoder_dir)]
    return args + list(extra)


def test_help_shows_an_example(runner: CliRunner) -> None:
    result = runner.invoke(app, ["transcribe-and-reply", "--help"])
    assert result.exit_code == 0
    assert "--speech-encoder" in result.output and "Example" in result.output


def test_text_reply_is_printed_per_file(runner: CliRunner, tiny_model, question_wavs) -> None:
    result = runner.invoke(app, ["transcribe-and-reply", str(question_wavs[0]), *_args(tiny_model, vocoder=False)])
    assert result.exit_code == 0, result.output
    line = result.stdout.splitlines()[0]
    assert line.startswith(f"{question_wavs[0].name}: ")
    assert len(line) > len(question_wavs[0].name) + 2, "a reply should follow the file name"
    assert "12 tokens" in result.stderr


def test_json_out_writes_wav_units_and_timings(runner: CliRunner, tiny_model, question_wavs, tmp_path: Path) -> None:
    out = tmp_path / "replies"
    result = runner.invoke(app, ["transcribe-and-reply", *map(str, question_wavs[:2]), *_args(tiny_model, "--out", str(out), "--json", "--chunk-units", "10")])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [Path(r["file"]).name for r in rows] == [q.name for q in question_wavs[:2]]
    for row, q in zip(rows, question_wavs):
        assert row["text"] and row["tokens"] == 12
        assert row["units"] and all(0 <= u < 1000 for u in row["units"])
        assert row["first_audio_ms"] <= row["total_ms"]
        wav = Path(row["wav"])
        assert wav == out / f"{q.stem}.wav"
        audio, rate = sf.read(wav)
        assert rate == 16000
        assert abs(len(audio) / rate - row["audio_seconds"]) < 1e-3
        assert np.abs(audio).max() > 0


def test_bad_inputs_each_get_one_line_and_others_are_answered(runner: CliRunner, tiny_model, question_wavs, tmp_path: Path) -> None:
    missing = tmp_path / "missing.wav"
    junk = tmp_path / "junk.wav"
    junk.write_text("this is not audio")
    empty = tmp_path / "empty.wav"
    sf.write(empty, np.zeros(0, dtype=np.float32), 16000)
    silent = tmp_path / "silent.wav"
    sf.write(silent, np.zeros(16000, dtype=np.float32), 16000)
    good = question_wavs[0]
    files = [missing, junk, good, empty, silent]
    result = runner.invoke(app, ["transcribe-and-reply", *map(str, files), *_args(tiny_model, "--json", vocoder=False)])
    assert result.exit_code == 1
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    by_file = {Path(r["file"]).name: r for r in rows}
    assert "no such file" in by_file["missing.wav"]["error"]
    assert "not a readable audio file" in by_file["junk.wav"]["error"]
    assert "empty" in by_file["empty.wav"]["error"]
    assert "silence" in by_file["silent.wav"]["error"]
    assert by_file[good.name]["text"]
    errors = [line for line in result.stderr.splitlines() if line.startswith("omni: error:")]
    assert len(errors) == 4


def test_long_audio_is_encoded_in_windows_and_said(runner: CliRunner, tiny_model, question_wavs, tmp_path: Path) -> None:
    speech, rate = sf.read(question_wavs[0], dtype="float32")
    long = tmp_path / "long.wav"
    sf.write(long, np.tile(speech, int(31 * rate // len(speech)) + 1), rate)
    result = runner.invoke(app, ["transcribe-and-reply", str(long), *_args(tiny_model, "--json", vocoder=False)])
    assert result.exit_code == 0, result.output
    row = json.loads(result.stdout)
    assert "encoded in 2 windows of 30 s" in row["note"]


def test_a_question_longer_than_the_context_budget_is_one_line_and_the_option_lets_it_through(
    runner: CliRunner, tiny_model, question_wavs, tmp_path: Path
) -> None:
    speech, rate = sf.read(question_wavs[0], dtype="float32")
    long = tmp_path / "long.wav"
    sf.write(long, np.tile(speech, int(31 * rate // len(speech)) + 1), rate)  # two 30 s windows: 632 positions
    refused = runner.invoke(app, ["transcribe-and-reply", str(long), *_args(tiny_model, "--json", "--context-budget", "600", vocoder=False)])
    assert refused.exit_code == 1
    assert "about 632 prompt positions long" in refused.stderr and "--context-budget" in refused.stderr
    answered = runner.invoke(app, ["transcribe-and-reply", str(long), *_args(tiny_model, "--json", "--context-budget", "700", vocoder=False)])
    assert answered.exit_code == 0, answered.output
    assert json.loads(answered.stdout)["tokens"] > 0


def test_not_a_model_directory(runner: CliRunner, tiny_model, question_wavs, tmp_path: Path) -> None:
    fake = tmp_path / "fake"
    shutil.copytree(tiny_model.model_dir, fake)
    cfg = json.loads((fake / "config.json").read_text())
    cfg["model_type"] = "bert"
    (fake / "config.json").write_text(json.dumps(cfg))
    result = runner.invoke(app, ["transcribe-and-reply", str(question_wavs[0]), "--model", str(fake)])
    assert result.exit_code == 2
    assert result.stderr.strip().count("\n") == 0
    assert "omni: error:" in result.stderr and "LLaMA-Omni checkpoint" in result.stderr


def test_out_without_vocoder_is_refused(runner: CliRunner, tiny_model, question_wavs, tmp_path: Path) -> None:
    result = runner.invoke(app, ["transcribe-and-reply", str(question_wavs[0]), *_args(tiny_model, "--out", str(tmp_path), vocoder=False)])
    assert result.exit_code == 2
    assert "needs --vocoder" in result.stderr


def test_reply_with_zero_units_writes_no_wav(runner: CliRunner, tiny_model, question_wavs, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    # A speech decoder that always predicts blank: the reply has text but no units.
    model = tmp_path / "blank-model"
    shutil.copytree(tiny_model.model_dir, model)
    for shard in model.glob("*.safetensors"):
        tensors = load_file(str(shard))
        if "speech_generator.output_proj.bias" in tensors:
            bias = tensors["speech_generator.output_proj.bias"]
            bias[-1] = 1e6
            save_file(tensors, str(shard), metadata={"format": "pt"})
    out = tmp_path / "replies"
    args = ["--model", str(model), "--speech-encoder", str(tiny_model.speech_encoder), "--vocoder", str(tiny_model.vocoder_dir)]
    result = runner.invoke(app, ["transcribe-and-reply", str(question_wavs[0]), *args, "--max-new-tokens", "6", "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    row = json.loads(result.stdout)
    assert row["text"] and row["units"] == []
    assert "no units" in row["note"] and "no WAV written" in row["note"]
    assert "wav" not in row
    assert not out.exists() or not any(out.iterdir())


def test_a_file_that_is_not_a_vocoder_is_one_line(runner: CliRunner, tiny_model, question_wavs, tmp_path: Path) -> None:
    bogus = tmp_path / "vocoder"
    bogus.mkdir()
    (bogus / "config.json").write_text(json.dumps({"hello": 1}))
    (bogus / "g_00500000").write_bytes(b"\x00not a checkpoint" * 10)
    result = runner.invoke(app, ["transcribe-and-reply", str(question_wavs[0]), "--model", str(tiny_model.model_dir),
                                 "--speech-encoder", str(tiny_model.speech_encoder), "--vocoder", str(bogus)])
    assert result.exit_code == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("omni: error:")]
    assert len(errors) == 1 and "vocoder" in errors[0]
    assert "Traceback" not in result.stderr


def test_a_failure_mid_reply_keeps_what_was_produced(tiny_model, question_wavs, tmp_path: Path) -> None:
    import io

    from omni_cli.config import SamplingConfig, StreamingConfig
    from omni_cli.model.loading import load_omni
    from omni_cli.model.vocoder_loading import load_vocoder
    from omni_cli.pipeline import AudioChunk, SpeechToSpeech
    from omni_cli.transcribe import check_inputs, transcribe_and_reply

    model = load_omni(tiny_model.model_dir, tiny_model.speech_encoder, precision="fp32", device="cpu")
    real = SpeechToSpeech(model, load_vocoder(tiny_model.vocoder_dir),
                          StreamingConfig(chunk_units=5, sampling=SamplingConfig(max_new_tokens=30, ignore_stop=True)))

    class DiesAfterTwoChunks:
        vocoder = real.vocoder

        def respond(self, audio, should_stop=None):
            chunks = 0
            for event in real.respond(audio, should_stop=should_stop):
                yield event
                chunks += isinstance(event, AudioChunk)
                if chunks == 2:
                    raise RuntimeError("CUDA out of memory (simulated)")

    out, err = io.StringIO(), io.StringIO()
    inputs = check_inputs([question_wavs[0], question_wavs[1]], err)
    assert transcribe_and_reply(DiesAfterTwoChunks(), inputs, tmp_path, True, out, err) == 1
    rows = [json.loads(line) for line in out.getvalue().splitlines()]
    for row, q in zip(rows, question_wavs):
        assert "the model failed on this file (CUDA out of memory (simulated))" in row["error"]
        assert row["text"], "the text generated before the failure is kept"
        assert "cut short" in row["note"]
        audio, rate = sf.read(row["wav"])
        assert rate == 16000 and len(audio) > 0
        # Cut short, so never saved under the name of a complete reply.
        assert Path(row["wav"]).name == f"{q.stem}.partial.wav"
    assert not list(tmp_path.glob("*.part")) and not list(tmp_path.glob(".*"))


def test_decode_step_modes_give_the_same_reply(runner: CliRunner, tiny_model, question_wavs, monkeypatch) -> None:
    def reply(*extra: str) -> tuple[dict, str]:
        result = runner.invoke(app, ["transcribe-and-reply", str(question_wavs[0]), *_args(tiny_model, "--json", *extra)])
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout.splitlines()[0]), result.stderr

    eager, _ = reply()
    static, _ = reply("--decode-steps", "static")
    assert (static["text"], static["units"]) == (eager["text"], eager["units"])

    # A compiler that fails (no C compiler, unsupported quantization) costs a warning, not the reply.
    import torch

    def broken_compile(fn, **kwargs):
        def run(*args, **kw):
            raise RuntimeError("no compiler here")
        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    compiled, stderr = reply("--decode-steps", "compiled")
    assert "warning: compiling the decoding steps failed (RuntimeError: no compiler here); running them uncompiled." in stderr
    assert (compiled["text"], compiled["units"]) == (eager["text"], eager["units"])

    # torch.compile itself refusing (e.g. Dynamo on an unsupported Python) is the same warning.
    def refusing_compile(fn, **kwargs):
        raise RuntimeError("Dynamo is not supported on this Python")

    monkeypatch.setattr(torch, "compile", refusing_compile)
    compiled, stderr = reply("--decode-steps", "compiled")
    assert "compiling the decoding steps failed (RuntimeError: Dynamo is not supported on this Python)" in stderr
    assert (compiled["text"], compiled["units"]) == (eager["text"], eager["units"])

    bad = runner.invoke(app, ["transcribe-and-reply", str(question_wavs[0]), *_args(tiny_model, "--decode-steps", "fast")])
    assert bad.exit_code == 2
    assert bad.stderr.strip() == (  # refused while parsing, before the model loads
        "omni: error: Invalid value for '--decode-steps': 'fast' is not one of 'eager', 'static', 'compiled'; "
        "see `omni transcribe-and-reply --help`."
    )
