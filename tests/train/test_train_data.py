"""Manifest reading, up-front validation of every record, and the training collate."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from omni_cli.model.llm import SPEECH_INSTRUCTION, SPEECH_TOKEN_INDEX, Turn, build_prompt_ids
from omni_cli.model.unit_decoder import IGNORE_INDEX
from omni_cli.train.data import (
    DataLimits,
    DatasetError,
    SpeechReplyDataset,
    assemble_inputs,
    collate,
    load_manifest,
    read_manifest,
    reply_hidden_states,
    reply_ids,
)
from omni_cli.train.trainer import FinetuneConfig, finetune

LIMITS = DataLimits(unit_vocab_size=1000, speech_positions=300, max_length=2048)


def _tone(path: Path, seconds: float = 0.5) -> Path:
    t = np.arange(int(16000 * seconds)) / 16000
    sf.write(path, (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), 16000)
    return path


def _record(rid: str, speech: str, reply: str = "Paris.", units: object = (1, 2, 3)) -> dict:
    rec = {"id": rid, "speech": speech, "conversations": [{"from": "human", "value": "<speech>\nQ"}, {"from": "gpt", "value": reply}]}
    if units is not None:
        rec["tgt_units"] = list(units) if isinstance(units, tuple) else units
    return rec


@pytest.fixture()
def broken_manifest(tmp_path: Path) -> Path:
    _tone(tmp_path / "good.wav")
    (tmp_path / "junk.wav").write_text("not audio at all")
    sf.write(tmp_path / "long.wav", np.zeros(16000 * 31, dtype=np.float32), 16000)
    records = [
        _record("good", "good.wav"),
        _record("missing", "nowhere.wav"),
        _record("junk", "junk.wav"),
        _record("empty-reply", "good.wav", reply="   "),
        _record("no-units", "good.wav", units=None),
        _record("bad-unit", "good.wav", units=(3, 1000, 4)),
        _record("long", "long.wav"),
        _record("too-many-tokens", "good.wav", reply="Paris. " * 1000),
    ]
    path = tmp_path / "broken.json"
    path.write_text(json.dumps(records))
    return path


def test_every_bad_record_is_reported_at_once(broken_manifest: Path, tiny_loaded) -> None:
    with pytest.raises(DatasetError) as info:
        load_manifest(broken_manifest, 2, tiny_loaded.tokenizer, LIMITS)
    by_id = {p.record_id: p.problem for p in info.value.problems}
    assert set(by_id) == {"missing", "junk", "empty-reply", "no-units", "bad-unit", "long", "too-many-tokens"}
    assert "missing" in by_id["missing"] and "not readable" in by_id["junk"]
    assert "empty response" in by_id["empty-reply"] and "no unit targets" in by_id["no-units"]
    assert "1000 out of range" in by_id["bad-unit"] and "31.0 s" in by_id["long"]
    assert "max length 2048" in by_id["too-many-tokens"]
    message = str(info.value)
    assert message.startswith(f"{broken_manifest}: 7 of 8 records cannot be used")
    assert all(f"  {rid}: " in message for rid in by_id)
    # Stage 1 does not need units, so those two records are fine there.
    with pytest.raises(DatasetError) as stage1:
        load_manifest(broken_manifest, 1, tiny_loaded.tokenizer, LIMITS)
    assert {p.record_id for p in stage1.value.problems} == {"missing", "junk", "empty-reply", "long", "too-many-tokens"}


def test_finetune_refuses_a_broken_manifest_before_any_step(broken_manifest: Path, tiny_model, tmp_path: Path) -> None:
    steps: list[object] = []
    cfg = FinetuneConfig(stage=2, data=broken_manifest, output=tmp_path / "out", model=tiny_model.model_dir,
                         speech_encoder=tiny_model.speech_encoder, max_steps=1, batch_size=1)
    with pytest.raises(DatasetError) as info:
        finetune(cfg, on_log=steps.append)
    assert len(info.value.problems) == 7 and not steps
    assert not (tmp_path / "out").exists()


def test_json_and_jsonl_manifests_read_the_same(tmp_path: Path, tiny_loaded) -> None:
    _tone(tmp_path / "a.wav")
    records = [_record("a", "a.wav", units="4 5 6"), {"id": "b", "speech": str(tmp_path / "a.wav"), "response": "Hello!", "units": [7]}]
    (tmp_path / "m.json").write_text(json.dumps(records))
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    assert read_manifest(tmp_path / "m.json") == read_manifest(tmp_path / "m.jsonl") == records
    loaded = load_manifest(tmp_path / "m.jsonl", 2, tiny_loaded.tokenizer, LIMITS)
    assert [(r.record_id, r.response, r.units) for r in loaded] == [("a", "Paris.", (4, 5, 6)), ("b", "Hello!", (7,))]
    assert loaded[0].speech == tmp_path / "a.wav"  # relative paths are relative to the manifest
    (tmp_path / "bad.jsonl").write_text('{"id": 1}\n{not json\n')
    with pytest.raises(DatasetError, match="line 2"):
        read_manifest(tmp_path / "bad.jsonl")


def test_collate_builds_the_inference_prompt_and_masks_prompt_and_speech(tmp_path: Path, tiny_loaded) -> None:
    tok = tiny_loaded.tokenizer
    _tone(tmp_path / "a.wav")
    records = [_record("a", "a.wav", reply="Paris."), _record("b", "a.wav", reply="Eat well, sleep enough.", units=(9,))]
    (tmp_path / "m.json").write_text(json.dumps(records))
    dataset = SpeechReplyDataset(load_manifest(tmp_path / "m.json", 2, tok, LIMITS), tok, n_mels=128)
    batch = collate([dataset[0], dataset[1]])
    assert batch.mels.shape == (2, 128, 3000)
    assert batch.prompt_ids[0] == build_prompt_ids(tok, [Turn("user", "<speech>\nQ", speech=True)])  # the record's own turn
    eot = tok.convert_tokens_to_ids("<|eot_id|>")
    assert batch.reply_ids[0][-1] == eot and tok.decode(batch.reply_ids[0][:-1]) == "Paris."
    assert batch.units.tolist() == [[1, 2, 3], [9, IGNORE_INDEX, IGNORE_INDEX]]

    n_speech = 7
    speech = torch.randn(2, n_speech, tiny_loaded.config.hidden_size)
    embed = tiny_loaded.llm.get_input_embeddings()
    inputs, mask, labels = assemble_inputs(embed, batch, speech)
    prompt = batch.prompt_ids[0]
    slot = prompt.index(SPEECH_TOKEN_INDEX)
    n_prompt = len(prompt) - 1 + n_speech
    for b in range(2):
        reply = batch.reply_ids[b]
        length = n_prompt + len(reply)
        assert mask[b].sum() == length and mask[b, :length].all()
        assert (labels[b, :n_prompt] == IGNORE_INDEX).all() and (labels[b, length:] == IGNORE_INDEX).all()
        assert labels[b, n_prompt:length].tolist() == reply
        torch.testing.assert_close(inputs[b, slot : slot + n_speech], speech[b])
        with torch.no_grad():
            torch.testing.assert_close(inputs[b, :slot], embed(torch.tensor(prompt[:slot])))
            torch.testing.assert_close(inputs[b, n_prompt:length], embed(torch.tensor(reply)))
        assert (inputs[b, length:] == 0).all()

    # The decoder gets the hidden states that PREDICT each reply token (one position earlier).
    hidden = torch.arange(labels.shape[1], dtype=torch.float32)[None, :, None].expand(2, -1, 3)
    picked, lengths = reply_hidden_states(hidden, labels)
    assert lengths.tolist() == [len(r) for r in batch.reply_ids]
    for b in range(2):
        expected = torch.arange(n_prompt - 1, n_prompt - 1 + len(batch.reply_ids[b]), dtype=torch.float32)
        assert picked[b, : lengths[b], 0].tolist() == expected.tolist()


def test_reply_ids_trim_like_the_chat_template(tiny_loaded) -> None:
    tok = tiny_loaded.tokenizer
    assert reply_ids(tok, "  Paris. \n") == reply_ids(tok, "Paris.")


def test_finetune_cli_prints_the_whole_summary_and_exits_2(broken_manifest: Path, tiny_model, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from omni_cli.cli import app

    args = ["finetune", "--stage", "2", "--data", str(broken_manifest), "--output", str(tmp_path / "out"),
            "--model", str(tiny_model.model_dir), "--speech-encoder", str(tiny_model.speech_encoder), "--max-steps", "1"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    assert "omni: error:" in result.stderr and "7 of 8 records cannot be used" in result.stderr
    for rid in ("missing", "junk", "empty-reply", "no-units", "bad-unit", "long", "too-many-tokens"):
        assert f"  {rid}: " in result.stderr
    assert not (tmp_path / "out").exists()


def _prompt(tok, instruction: str) -> list[int]:
    return build_prompt_ids(tok, [Turn("user", instruction, speech=True)])


def test_each_record_trains_on_its_own_instruction_in_either_turn_format(tmp_path: Path, tiny_loaded) -> None:
    tok = tiny_loaded.tokenizer
    _tone(tmp_path / "a.wav")
    records = [
        {"id": "ref", "speech": "a.wav", "conversations": [
            {"from": "human", "value": "<speech>\nTranscribe the speech verbatim."}, {"from": "gpt", "value": "Hello!"}]},
        {"id": "chat", "speech": "a.wav", "messages": [
            {"role": "user", "content": "Answer briefly.\n<speech>"}, {"role": "assistant", "content": "Paris."}]},
        {"id": "no-marker", "speech": "a.wav", "conversations": [
            {"role": "user", "content": "Tell me a joke."}, {"role": "assistant", "content": "Hello!"}]},
        {"id": "flat", "speech": "a.wav", "response": "Paris."},
    ]
    (tmp_path / "m.json").write_text(json.dumps(records))
    loaded = load_manifest(tmp_path / "m.json", 1, tok, LIMITS)
    dataset = SpeechReplyDataset(loaded, tok, n_mels=128)
    prompts = [dataset[i].prompt_ids for i in range(4)]
    assert prompts[0] == _prompt(tok, "<speech>\nTranscribe the speech verbatim.")
    assert prompts[1] == _prompt(tok, "Answer briefly.\n<speech>")  # the speech goes where the record puts it
    assert prompts[2] == _prompt(tok, "<speech>\nTell me a joke.")  # no marker: speech first, as the reference
    assert prompts[3] == _prompt(tok, f"<speech>\n{SPEECH_INSTRUCTION}")  # no turns: the instruction inference uses
    assert len(set(map(tuple, prompts))) == 4
    assert [r.response for r in loaded] == ["Hello!", "Paris.", "Hello!", "Paris."]


def test_multi_turn_and_other_unusable_dialogues_are_refused_by_id(tmp_path: Path, tiny_loaded) -> None:
    _tone(tmp_path / "a.wav")

    def turns(*pairs: tuple[str, str]) -> list[dict]:
        return [{"from": who, "value": text} for who, text in pairs]

    records = [
        {"id": "four-turns", "speech": "a.wav", "conversations": turns(
            ("human", "<speech>\nQ"), ("gpt", "Hello!"), ("human", "And?"), ("gpt", "Paris."))},
        {"id": "system", "speech": "a.wav", "conversations": turns(("system", "Be nice."), ("human", "<speech>"), ("gpt", "Hi"))},
        {"id": "two-speech", "speech": "a.wav", "conversations": turns(("human", "<speech> <speech>"), ("gpt", "Hi"))},
        {"id": "reply-first", "speech": "a.wav", "conversations": turns(("gpt", "Hi"), ("human", "<speech>"))},
        {"id": "stranger", "speech": "a.wav", "messages": [{"role": "tool", "content": "x"}, {"role": "assistant", "content": "Hi"}]},
    ]
    (tmp_path / "m.json").write_text(json.dumps(records))
    with pytest.raises(DatasetError) as info:
        load_manifest(tmp_path / "m.json", 1, tiny_loaded.tokenizer, LIMITS)
    by_id = {p.record_id: p.problem for p in info.value.problems}
    assert len(info.value.problems) == 5
    assert "4 turns" in by_id["four-turns"] and "single-turn" in by_id["four-turns"]
    assert "system turn" in by_id["system"] and "2 <speech> markers" in by_id["two-speech"]
    assert "followed by one reply" in by_id["reply-first"] and "'tool'" in by_id["stranger"]


def test_unit_targets_merge_repeats_and_must_fit_the_reply_frames(tmp_path: Path, tiny_loaded) -> None:
    tok = tiny_loaded.tokenizer
    _tone(tmp_path / "a.wav")
    n_reply = len(reply_ids(tok, "Paris."))
    too_many = [i % 2 for i in range(25 * n_reply + 1)]  # alternating: nothing to merge, one unit over the frames
    records = [
        _record("repeats", "a.wav", units=(5, 5, 5, 7, 7, 8, 5)),
        _record("commas", "a.wav", units="1, 2,3 4"),
        _record("garbage", "a.wav", units="1, x, 3"),
        _record("floats", "a.wav", units=[1, 2.5]),
        _record("too-many", "a.wav", units=too_many),
        _record("fits", "a.wav", units=[i % 2 for i in range(25 * n_reply)]),
    ]
    (tmp_path / "m.json").write_text(json.dumps(records))
    limits = DataLimits(unit_vocab_size=1000, speech_positions=300, unit_frames_per_token=25)
    with pytest.raises(DatasetError) as info:
        load_manifest(tmp_path / "m.json", 2, tok, limits)
    problems = [(p.record_id, p.problem) for p in info.value.problems]
    assert [rid for rid, _ in problems] == ["garbage", "floats", "too-many"]  # one message each
    assert "item 2 is 'x'" in problems[0][1] and "item 2 is 2.5" in problems[1][1]
    assert f"{len(too_many)} unit targets" in problems[2][1] and f"{25 * n_reply} decoder frames" in problems[2][1]
    assert not any("invalid literal" in p or "no unit targets" in p for _, p in problems)
    good = [r for r in records if r["id"] in ("repeats", "commas", "fits")]
    (tmp_path / "good.json").write_text(json.dumps(good))
    loaded = load_manifest(tmp_path / "good.json", 2, tok, limits)
    assert [r.units for r in loaded[:2]] == [(5, 7, 8, 5), (1, 2, 3, 4)]


def test_manifest_files_that_are_not_a_list_of_records_get_one_line(tmp_path: Path, tiny_loaded) -> None:
    _tone(tmp_path / "a.wav")
    (tmp_path / "pretty.json").write_text(json.dumps(_record("a", "a.wav"), indent=2))
    (tmp_path / "latin1.jsonl").write_bytes(json.dumps(_record("a", "a.wav", reply="caf\u00e9"), ensure_ascii=False).encode("latin-1") + b"\n")
    (tmp_path / "adir").mkdir()
    for name, expected in (("pretty.json", "one JSON object, not a list"), ("latin1.jsonl", "not UTF-8 text (byte 0xe9"),
                           ("adir", "is a directory")):
        with pytest.raises(DatasetError) as info:
            read_manifest(tmp_path / name)
        assert expected in str(info.value) and "\n" not in str(info.value)
    # One record on one line is JSONL, and a speech path that is a folder is named as such.
    (tmp_path / "one.jsonl").write_text(json.dumps(_record("a", "adir")) + "\n")
    with pytest.raises(DatasetError, match="audio path .*adir is a directory"):
        load_manifest(tmp_path / "one.jsonl", 1, tiny_loaded.tokenizer, LIMITS)
