"""Both fine-tuning stages on the tiny model: overfit a few spoken Q/A pairs, freeze what must not move, resume exactly."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from edit_distance import edit_distance
from omni_cli.cli import app
from omni_cli.model.llm import SPEECH_INSTRUCTION
from omni_cli.model.loading import load_omni
from omni_cli.model.vocoder_loading import load_vocoder
from omni_cli.pipeline import Done, SpeechToSpeech
from omni_cli.train.trainer_state import TRAINER_STATE_FILE, load_trainer_state
from omni_cli.train.trainer import FinetuneConfig, finetune
from saved_tensors import saved_tensors

# Short questions and replies made of words the tiny tokenizer knows; unit targets are
# arbitrary (no HuBERT here), repeats merged like real targets, and no longer than the
# frames the decoder has (25 per reply token). The first reply token's 25 frames are
# identical inputs to a causal decoder, so they can carry one unit at most: targets leave room.
PAIRS = [
    ("What is the capital of France?", "Paris.", [5, 17, 300, 2, 999, 42, 8]),
    ("How do I bake bread?", "Eat well.", [70, 100, 200, 300]),
    ("Tell me a joke.", "Hello!", [900, 1, 2, 3, 4, 5]),
]


def _chunk_means(values: list[float], chunks: int) -> list[float]:
    size = len(values) // chunks
    return [sum(values[i * size : (i + 1) * size]) / size for i in range(chunks)]


@pytest.fixture(scope="module")
def workspace(tiny_model, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Spoken questions (espeak-ng) and a manifest."""
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (CI installs it with .ci/sound-server.sh)")
    root = tmp_path_factory.mktemp("finetune")
    records = []
    for i, (question, answer, units) in enumerate(PAIRS):
        wav = root / f"q{i}.wav"
        subprocess.run(["espeak-ng", "-w", str(wav), question], check=True, capture_output=True)
        records.append({
            "id": f"q{i}",
            "speech": wav.name,
            "conversations": [{"from": "human", "value": f"<speech>\n{SPEECH_INSTRUCTION}"}, {"from": "gpt", "value": answer}],
            "tgt_units": units if i != 1 else " ".join(map(str, units)),  # both unit spellings
        })
    manifest = root / "train.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in records))
    return {"root": root, "manifest": manifest, "encoder": tiny_model.speech_encoder, "wavs": [root / f"q{i}.wav" for i in range(len(PAIRS))]}


@pytest.fixture(scope="module")
def stage1(workspace, tiny_model):
    cfg = FinetuneConfig(
        stage=1, data=workspace["manifest"], output=workspace["root"] / "s1", model=tiny_model.model_dir,
        speech_encoder=workspace["encoder"], max_steps=80, batch_size=3, lr=3e-3, save_every=0,
        warmup_ratio=0.0,
    )
    return finetune(cfg)


@pytest.fixture(scope="module")
def stage2(workspace, stage1):
    cfg = FinetuneConfig(
        stage=2, data=workspace["manifest"], output=workspace["root"] / "s2", model=stage1.output_dir,
        speech_encoder=workspace["encoder"], max_steps=150, batch_size=3, lr=3e-3, save_every=0,
        warmup_ratio=0.1,
    )
    return finetune(cfg)


def _pipeline(model_dir: Path, workspace, vocoder=None) -> SpeechToSpeech:
    return SpeechToSpeech(load_omni(model_dir, workspace["encoder"], precision="fp32", device="cpu"), vocoder)


def _reply(pipeline: SpeechToSpeech, wav: Path) -> Done:
    from omni_cli.audio.io import load_audio

    return [e for e in pipeline.respond(load_audio(wav)) if isinstance(e, Done)][0]


def test_stage1_memorises_each_answer_through_the_inference_path(stage1, workspace) -> None:
    pipeline = _pipeline(stage1.output_dir, workspace)
    for wav, (_, answer, _) in zip(workspace["wavs"], PAIRS):
        done = _reply(pipeline, wav)
        assert done.text == answer and done.stopped == "eos"
    means = _chunk_means(stage1.losses, 4)
    assert all(b < a for a, b in zip(means, means[1:])), means
    assert means[-1] < 0.02 * means[0]


def test_stage1_leaves_encoder_and_speech_decoder_untouched(stage1, tiny_model, workspace) -> None:
    trained = stage1.model
    fresh = load_omni(tiny_model.model_dir, workspace["encoder"], precision="fp32", device="cpu")
    for name, tensor in fresh.encoder.state_dict().items():
        assert torch.equal(tensor, trained.encoder.state_dict()[name]), name
    with safe_open(str(next(stage1.output_dir.glob("*.safetensors"))), "pt") as out:
        for name, tensor in fresh.unit_decoder.state_dict().items():
            assert torch.equal(out.get_tensor("speech_generator." + name), tensor), name
    # ...while what stage 1 trains did move.
    assert not torch.equal(fresh.adaptor.linear1.weight, trained.adaptor.linear1.weight)
    assert not torch.equal(fresh.llm.model.layers[0].mlp.up_proj.weight, trained.llm.model.layers[0].mlp.up_proj.weight)


def test_stage2_changes_only_the_speech_decoder(stage1, stage2) -> None:
    before, after = saved_tensors(stage1.output_dir), saved_tensors(stage2.output_dir)
    assert before.keys() == after.keys()
    for name in before:
        if name.startswith("speech_generator."):
            continue
        assert torch.equal(before[name], after[name]), name
    assert not torch.equal(before["speech_generator.output_proj.weight"], after["speech_generator.output_proj.weight"])


def test_stage2_units_of_each_generated_answer_match_targets(stage2, workspace, tiny_model) -> None:
    vocoder = load_vocoder(tiny_model.vocoder_dir)
    pipeline = _pipeline(stage2.output_dir, workspace, vocoder)
    distances = []
    for wav, (_, answer, units) in zip(workspace["wavs"], PAIRS):
        done = _reply(pipeline, wav)
        assert done.text == answer
        distances.append(edit_distance(done.units, units))
    # "Near 0": on this seed all three are exact. On other seeds/CPUs the tiny decoder can stall
    # in a CTC local minimum that drops one unit of one answer; training on the reference's
    # alignment instead (hidden state one step late) gives distances of 4-5 per answer.
    assert max(distances) <= 1 and sum(distances) <= 1, distances
    means = _chunk_means(stage2.losses, 5)
    assert all(b < a for a, b in zip(means[:3], means[1:4])), means
    assert means[-1] < 0.01 * means[0]


def test_finetuned_output_loads_in_transcribe_and_reply(stage2, workspace) -> None:
    # No --speech-encoder: the saved config.json names the encoder the run used.
    args = ["transcribe-and-reply", *map(str, workspace["wavs"]), "--model", str(stage2.output_dir), "--json"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    texts = [json.loads(line)["text"] for line in result.stdout.splitlines()]
    assert texts == [answer for _, answer, _ in PAIRS]


def test_resume_gives_the_same_weights_as_training_straight(workspace, tiny_model) -> None:
    def run(out: Path, **kw) -> object:
        cfg = FinetuneConfig(
            stage=2, data=workspace["manifest"], output=out, model=tiny_model.model_dir,
            speech_encoder=workspace["encoder"], max_steps=6, batch_size=2, micro_batch_size=1, lr=1e-3, seed=7, **kw,
        )
        return finetune(cfg)

    root = workspace["root"]
    straight = run(root / "straight", save_every=0)

    def interrupt_at_3(log) -> None:
        if log.step == 3:
            signal.raise_signal(signal.SIGINT)  # Ctrl-C, right after step 3

    cfg = FinetuneConfig(
        stage=2, data=workspace["manifest"], output=root / "cut", model=tiny_model.model_dir,
        speech_encoder=workspace["encoder"], max_steps=6, batch_size=2, micro_batch_size=1, lr=1e-3, seed=7, save_every=0,
    )
    cut = finetune(cfg, on_log=interrupt_at_3)
    assert cut.interrupted and cut.steps == 3
    assert cut.last_checkpoint == root / "cut" / "checkpoint-3"
    assert load_trainer_state(cut.last_checkpoint)["step"] == 3  # loads with weights_only=True
    resumed = run(root / "cut", save_every=0, resume=root / "cut")
    # The exported model carries no optimizer state: resume points do.
    assert resumed.steps == 6 and not (resumed.output_dir / TRAINER_STATE_FILE).exists()
    a, b = saved_tensors(straight.output_dir), saved_tensors(resumed.output_dir)
    moved = 0
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6, msg=name)
        moved += name.startswith("speech_generator.")
    assert moved and straight.losses[3:] == pytest.approx(resumed.losses, abs=1e-5)
    # No stray temporary directories from the atomic writes.
    assert not [p for p in (root / "cut").iterdir() if p.name.startswith(".")]
