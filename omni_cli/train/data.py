"""Training data: read a manifest, validate every record up front, and collate batches.

Manifests are the reference's JSON list (LLaVA style) or JSONL with one such record a line:
`{"id", "speech": path, "conversations": [{"from": "human", "value": "<speech>\\n..."},
{"from": "gpt", "value": reply}], "tgt_units": [...]}`. Turns may also be written in the chat
format most datasets use (`"messages"` or `"conversations"` of `{"role", "content"}`), and a flat
`"response"` field is accepted instead of turns. Units may be a list of ints or a string of
integers separated by spaces or commas.

The prompt is built as the reference builds it: the record's own user turn (`<speech>\\n` +
its instruction) in the Llama-3 chat format with the reference system prompt; a record with
only a `response` gets the instruction inference uses. A record is one spoken question and
its reply: multi-turn records are refused (the reference trains and answers single turns).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import soundfile as sf
import torch
from transformers import PreTrainedTokenizerBase

from omni_cli.audio.io import SAMPLE_RATE, load_audio
from omni_cli.config import parse_json
from omni_cli.errors import OmniError
from omni_cli.model.features import CHUNK_SAMPLES, log_mel_spectrogram
from omni_cli.model.llm import (
    SPEECH_PLACEHOLDER,
    SPEECH_PROMPT,
    SPEECH_TOKEN_INDEX,
    Turn,
    build_prompt_ids,
    speech_turn,
    splice_speech,
)
from omni_cli.model.unit_decoder import IGNORE_INDEX

# Field names the unit targets go by in different releases of the reference data.
UNIT_FIELDS = ("tgt_units", "units", "unit", "speech_units")
TURN_FIELDS = ("conversations", "messages")
# Who speaks a turn, in the reference's ("from") and the chat ("role") spelling.
USER_SPEAKERS = ("human", "user")
RESPONSE_SPEAKERS = ("gpt", "assistant")
REPLY_END_TOKEN = "<|eot_id|>"
# Shown in full up to this many problems; the rest are counted.
MAX_PROBLEMS_SHOWN = 50


class DatasetError(OmniError):
    """The manifest or its records cannot be trained on; the message lists every problem found."""

    def __init__(self, message: str, problems: Sequence[RecordProblem] = ()) -> None:
        super().__init__(message)
        self.problems = list(problems)


@dataclass(frozen=True)
class RecordProblem:
    """One reason one record cannot be used."""

    record_id: str
    problem: str

    def __str__(self) -> str:
        return f"{self.record_id}: {self.problem}"


@dataclass(frozen=True)
class TrainingRecord:
    """One usable example: question speech, the user turn's text, reply text and (for stage 2) unit targets."""

    record_id: str
    speech: Path
    response: str
    units: tuple[int, ...] | None
    instruction: str = SPEECH_PROMPT  # the user turn, with one <speech>

    def prompt_turn(self) -> Turn:
        """The user turn as the chat template renders it, the speech spliced in where `<speech>` stands."""
        return speech_turn(self.instruction)


@dataclass(frozen=True)
class DataLimits:
    """What a record must fit: the model's unit vocabulary and frames, audio and sequence lengths."""

    unit_vocab_size: int
    speech_positions: int  # LLM positions one utterance takes after the adaptor (300 for 30 s)
    max_speech_seconds: float = CHUNK_SAMPLES / SAMPLE_RATE
    max_length: int = 2048  # prompt + speech + reply positions (the reference's model_max_length)
    unit_frames_per_token: int | None = None  # the speech decoder's upsampling; None: not checked


def read_manifest(path: str | Path, *, option: str = "--data", before: str = "training") -> list[dict[str, Any]]:
    """The raw records of a JSON list or JSONL manifest (a record that is not an object stays, to be reported).

    `option` and `before` word the errors for the command reading it: "pass --data ...", "... before training".
    """
    return read_manifest_and_format(path, option=option, before=before)[0]


def read_manifest_and_format(
    path: str | Path, *, option: str = "--data", before: str = "training"
) -> tuple[list[dict[str, Any]], bool]:
    """`read_manifest`'s records, and True when the file is a JSON list (to write it back in its own format)."""
    path = Path(path)
    if path.is_dir():
        raise DatasetError(f"manifest {path} is a directory; pass {option} a JSON or JSONL manifest file.")
    if not path.is_file():
        raise DatasetError(f"manifest {path} not found; pass {option} a JSON or JSONL manifest.")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DatasetError(
            f"manifest {path} is not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start}); save it as UTF-8 JSON or JSONL."
        ) from None
    stripped = text.strip()
    if stripped.startswith("["):
        try:
            data = parse_json(text)
        except ValueError as exc:
            raise DatasetError(f"manifest {path} is not valid JSON ({exc}); fix the file.") from None
        return list(data), True
    if stripped.startswith("{") and "\n" in stripped:
        # One object over several lines is a pretty-printed JSON document, not JSONL.
        try:
            whole = parse_json(text)
        except ValueError:
            whole = None
        if isinstance(whole, dict):
            raise DatasetError(
                f"manifest {path} holds one JSON object, not a list of records; write a JSON list "
                "([{...}, {...}]) or JSONL (one record per line)."
            )
    records: list[dict[str, Any]] = []
    bad_lines: list[RecordProblem] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(parse_json(line))
        except ValueError as exc:
            bad_lines.append(RecordProblem(f"line {number}", f"not valid JSON ({getattr(exc, 'msg', exc)})"))
    if bad_lines:
        raise _summary(path, bad_lines, len(records) + len(bad_lines), before)
    return records, False


def parse_units(value: Any) -> list[int]:
    """A unit sequence from a list of ints or a string of integers separated by spaces or commas.

    ValueError (one message saying what is wrong) for anything else.
    """
    if isinstance(value, str):
        units = []
        for position, item in enumerate((v for v in re.split(r"[\s,]+", value.strip()) if v), start=1):
            if not re.fullmatch(r"[+-]?\d+", item):
                raise ValueError(f"unit targets must be integers, but item {position} is {item[:20]!r}")
            units.append(int(item))
        return units
    if isinstance(value, (list, tuple)):
        for position, item in enumerate(value, start=1):
            if not isinstance(item, int) or isinstance(item, bool):
                raise ValueError(f"unit targets must be integers, but item {position} is {json.dumps(item)[:20]}")
        return list(value)
    raise ValueError("unit targets must be a list of integers or a string of integers separated by spaces or commas")


def merge_repeats(units: Sequence[int]) -> list[int]:
    """Consecutive duplicates merged into one, as `omni units` writes targets (CTC emits each unit once)."""
    return [u for i, u in enumerate(units) if i == 0 or u != units[i - 1]]


@dataclass(frozen=True)
class _Dialogue:
    """What a record says: the user turn's text (None: no turns) and the reply, or why it cannot be used."""

    instruction: str | None
    response: str | None
    problem: str | None = None


def _dialogue(raw: dict[str, Any]) -> _Dialogue:
    turns = next((raw[f] for f in TURN_FIELDS if f in raw), None)
    if turns is None:
        response = raw.get("response")
        return _Dialogue(None, response if isinstance(response, str) else None)
    if not isinstance(turns, list) or not all(isinstance(t, dict) for t in turns):
        return _Dialogue(None, None, "'conversations' must be a list of {\"from\", \"value\"} or {\"role\", \"content\"} turns")
    speakers, texts = [], []
    for turn in turns:
        speaker = turn.get("from", turn.get("role"))
        text = turn.get("value", turn.get("content"))
        if speaker == "system":
            return _Dialogue(None, None, "has a system turn; training uses the reference's system prompt, remove the turn")
        if speaker not in USER_SPEAKERS + RESPONSE_SPEAKERS:
            return _Dialogue(None, None, f"turn speaker {speaker!r} is neither the user (human/user) nor the reply (gpt/assistant)")
        if not isinstance(text, str):
            return _Dialogue(None, None, f"a {speaker} turn has no text ('value' or 'content')")
        speakers.append(speaker in USER_SPEAKERS)
        texts.append(text)
    if len(turns) > 2:
        return _Dialogue(None, None, f"has {len(turns)} turns; only single-turn records (one spoken question, one reply) are supported: split it")
    if speakers != [True, False]:
        return _Dialogue(None, None, "turns must be one user turn (the spoken question) followed by one reply")
    instruction = texts[0]
    count = instruction.count(SPEECH_PLACEHOLDER)
    if count > 1:
        return _Dialogue(None, None, f"the user turn holds {count} {SPEECH_PLACEHOLDER} markers; a record has one spoken question")
    if count == 0:  # the reference puts the speech first, then the instruction
        instruction = f"{SPEECH_PLACEHOLDER}\n{instruction}" if instruction.strip() else SPEECH_PROMPT
    return _Dialogue(instruction, texts[1])


def reply_text(raw: dict[str, Any]) -> str | None:
    """The reply a manifest record trains on (its `gpt`/`assistant` turn, or `response`); None when it has none usable."""
    return _dialogue(raw).response


def _audio_problem(path: Path, limits: DataLimits) -> str | None:
    """Why this audio file cannot be used, from its header (fast; the samples are read at training time)."""
    if path.is_dir():
        return f"audio path {path} is a directory, not an audio file"
    if not path.is_file():
        return f"audio file {path} is missing"
    try:
        info = sf.info(str(path))
    except (sf.LibsndfileError, RuntimeError, TypeError) as exc:
        return f"audio file {path} is not readable audio ({str(exc).splitlines()[0]})"
    if info.frames == 0:
        return f"audio file {path} is empty"
    seconds = info.frames / info.samplerate
    if seconds > limits.max_speech_seconds:
        return f"speech is {seconds:.1f} s, longer than the {limits.max_speech_seconds:.0f} s the encoder sees"
    return None


def reply_ids(tokenizer: PreTrainedTokenizerBase, response: str) -> list[int]:
    """Token ids of the reply as the model must generate them: the text, then `<|eot_id|>`.

    The chat template trims message content, so the reply is trimmed the same way.
    """
    ids = tokenizer(response.strip(), add_special_tokens=False)["input_ids"]
    return list(ids) + [int(tokenizer.convert_tokens_to_ids(REPLY_END_TOKEN))]


def _unit_problems(raw: dict[str, Any], n_reply: int, limits: DataLimits) -> tuple[list[int] | None, list[str]]:
    """Stage 2's targets, repeats merged, and what is wrong with them."""
    value = next((raw[f] for f in UNIT_FIELDS if f in raw), None)
    if value is None:
        return None, [f"no unit targets (one of {', '.join(UNIT_FIELDS)}) for stage 2; make them with `omni units`"]
    try:
        units = merge_repeats(parse_units(value))
    except ValueError as exc:
        return None, [str(exc)]
    if not units:
        return None, ["unit targets are empty"]
    found = []
    bad = [u for u in units if not 0 <= u < limits.unit_vocab_size]
    if bad:
        found.append(f"unit id {bad[0]} out of range 0..{limits.unit_vocab_size - 1} ({len(bad)} such)")
    frames = (limits.unit_frames_per_token or 0) * n_reply
    if limits.unit_frames_per_token and n_reply and len(units) > frames:
        # CTC cannot emit more labels than it has frames: such a record trains on a zero loss.
        found.append(
            f"{len(units)} unit targets (repeats merged) do not fit the {frames} decoder frames of its "
            f"{n_reply}-token reply ({limits.unit_frames_per_token} per token); are these the units of this reply?"
        )
    return units, found


def validate_records(
    raw_records: Sequence[Any],
    base_dir: Path,
    stage: int,
    tokenizer: PreTrainedTokenizerBase,
    limits: DataLimits,
) -> tuple[list[TrainingRecord], list[RecordProblem]]:
    """Check every record; return the usable ones and every problem found (all of them, not the first)."""
    prompt_lengths: dict[str, int] = {}  # per instruction: most records share one
    records: list[TrainingRecord] = []
    problems: list[RecordProblem] = []
    seen: set[str] = set()
    for index, raw in enumerate(raw_records):
        if not isinstance(raw, dict):
            problems.append(RecordProblem(f"#{index}", "record is not a JSON object"))
            continue
        record_id = str(raw.get("id", f"#{index}"))
        found: list[str] = []
        if record_id in seen:
            found.append("duplicate id")
        seen.add(record_id)

        speech_value = raw.get("speech")
        speech: Path | None = None
        if not isinstance(speech_value, str) or not speech_value:
            found.append("no 'speech' audio path")
        else:
            speech = Path(speech_value).expanduser()
            if not speech.is_absolute():
                speech = base_dir / speech
            problem = _audio_problem(speech, limits)
            if problem:
                found.append(problem)

        dialogue = _dialogue(raw)
        response = dialogue.response
        record = TrainingRecord(record_id, speech or Path(), response or "", None)
        if dialogue.instruction is not None:
            record = replace(record, instruction=dialogue.instruction)
        n_reply = 0
        if dialogue.problem is not None:
            found.append(dialogue.problem)
        elif response is None or not response.strip():
            found.append("empty response text")
        else:
            n_reply = len(reply_ids(tokenizer, response))
            if record.instruction not in prompt_lengths:
                prompt_ids = build_prompt_ids(tokenizer, [record.prompt_turn()])
                prompt_lengths[record.instruction] = len(prompt_ids) - 1 + limits.speech_positions
            positions = prompt_lengths[record.instruction] + n_reply
            if positions > limits.max_length:
                found.append(f"too long: {positions} positions (prompt + speech + reply) > max length {limits.max_length}")

        units: list[int] | None = None
        if stage == 2:
            units, unit_problems = _unit_problems(raw, n_reply, limits)
            found += unit_problems
        problems.extend(RecordProblem(record_id, f) for f in found)
        if not found:
            records.append(replace(record, units=tuple(units) if units is not None else None))
    return records, problems


def _summary(source: Path, problems: Sequence[RecordProblem], total: int, before: str = "training") -> DatasetError:
    bad_ids = {p.record_id for p in problems}
    lines = [f"{source}: {len(bad_ids)} of {total} records cannot be used; fix or remove them before {before}:"]
    lines += [f"  {p}" for p in problems[:MAX_PROBLEMS_SHOWN]]
    if len(problems) > MAX_PROBLEMS_SHOWN:
        lines.append(f"  ... and {len(problems) - MAX_PROBLEMS_SHOWN} more problems")
    return DatasetError("\n".join(lines), problems)


def load_manifest(
    path: str | Path, stage: int, tokenizer: PreTrainedTokenizerBase, limits: DataLimits
) -> list[TrainingRecord]:
    """Read and validate a manifest; raise one DatasetError listing every bad record, before any training."""
    path = Path(path)
    raw = read_manifest(path)
    if not raw:
        raise DatasetError(f"manifest {path} holds no records; add some.")
    records, problems = validate_records(raw, path.parent, stage, tokenizer, limits)
    if problems:
        raise _summary(path, problems, len(raw))
    return records


@dataclass
class Sample:
    """One record made ready for the model: log-mel of the question, prompt and reply ids, units."""

    record_id: str
    mel: torch.Tensor  # (n_mels, frames), padded to 30 s as at inference
    prompt_ids: list[int]
    reply_ids: list[int]
    units: list[int] | None


class SpeechReplyDataset(torch.utils.data.Dataset):
    """Validated records → Samples (audio read and turned into log-mel in the data-loader workers)."""

    def __init__(self, records: Sequence[TrainingRecord], tokenizer: PreTrainedTokenizerBase, n_mels: int) -> None:
        self.records = list(records)
        self.tokenizer = tokenizer
        self.n_mels = n_mels
        self._prompts: dict[str, list[int]] = {}  # per instruction: most records share one

    def prompt_ids(self, record: TrainingRecord) -> list[int]:
        """The record's prompt ids (system + its user turn), with one SPEECH_TOKEN_INDEX slot."""
        if record.instruction not in self._prompts:
            self._prompts[record.instruction] = build_prompt_ids(self.tokenizer, [record.prompt_turn()])
        return list(self._prompts[record.instruction])

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> Sample:
        record = self.records[index]
        audio = load_audio(record.speech)
        # Same front end as SpeechToSpeech.encode_speech: one 30 s window, padded.
        mel = log_mel_spectrogram(audio, n_mels=self.n_mels, pad_to=CHUNK_SAMPLES)
        units = list(record.units) if record.units is not None else None
        return Sample(record.record_id, mel, self.prompt_ids(record), reply_ids(self.tokenizer, record.response), units)


@dataclass
class Batch:
    """A collated batch: stacked mels, per-sample token ids, and right-padded unit targets."""

    record_ids: list[str]
    mels: torch.Tensor  # (B, n_mels, frames)
    prompt_ids: list[list[int]]
    reply_ids: list[list[int]]
    units: torch.Tensor | None  # (B, L), padded with IGNORE_INDEX

    def to(self, device: torch.device) -> Batch:
        """The same batch with its tensors on `device`."""
        units = self.units.to(device) if self.units is not None else None
        return Batch(self.record_ids, self.mels.to(device), self.prompt_ids, self.reply_ids, units)


def collate(samples: Sequence[Sample]) -> Batch:
    """Stack samples into a Batch (unit targets right-padded with IGNORE_INDEX)."""
    units = None
    if all(s.units is not None for s in samples):
        longest = max(len(s.units or []) for s in samples)
        units = torch.full((len(samples), longest), IGNORE_INDEX, dtype=torch.long)
        for row, s in enumerate(samples):
            units[row, : len(s.units or [])] = torch.tensor(s.units, dtype=torch.long)
    return Batch(
        [s.record_id for s in samples],
        torch.stack([s.mel for s in samples]),
        [s.prompt_ids for s in samples],
        [s.reply_ids for s in samples],
        units,
    )


def assemble_inputs(
    embed_tokens: torch.nn.Module, batch: Batch, speech: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inputs embeddings (B, T, H), attention mask (B, T) and labels (B, T) of a batch.

    Each row is the inference prompt with its speech spliced in (`splice_speech`), followed by
    the reply ids; rows are right-padded. Labels are the reply ids (ending in `<|eot_id|>`) at
    their positions and IGNORE_INDEX on the prompt, the speech positions and the padding;
    transformers shifts them inside the loss, as in the reference.
    """
    rows: list[torch.Tensor] = []
    labels: list[list[int]] = []
    for b, (prompt, reply) in enumerate(zip(batch.prompt_ids, batch.reply_ids)):
        if prompt.count(SPEECH_TOKEN_INDEX) != 1:
            raise ValueError("each training prompt must hold exactly one <speech> slot")
        embeds = splice_speech(embed_tokens, prompt + reply, [speech[b]])[0]
        rows.append(embeds)
        labels.append([IGNORE_INDEX] * (embeds.shape[0] - len(reply)) + list(reply))
    longest = max(r.shape[0] for r in rows)
    hidden = rows[0].shape[-1]
    inputs = rows[0].new_zeros(len(rows), longest, hidden)
    mask = torch.zeros(len(rows), longest, dtype=torch.long, device=inputs.device)
    label_tensor = torch.full((len(rows), longest), IGNORE_INDEX, dtype=torch.long, device=inputs.device)
    for b, (row, lab) in enumerate(zip(rows, labels)):
        inputs[b, : row.shape[0]] = row
        mask[b, : row.shape[0]] = 1
        label_tensor[b, : len(lab)] = torch.tensor(lab, dtype=torch.long)
    return inputs, mask, label_tensor


def reply_hidden_states(hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The speech decoder's input: per sample, the hidden states that PREDICT each reply token.

    Inference (`llm.generate`) hands the decoder the hidden state that produced each token:
    the last prompt position for the first reply token, and so on up to the one that produced
    `<|eot_id|>`. Training uses that same alignment, i.e. positions t with labels[t + 1] set.
    The reference trains on `hidden[labels != IGNORE]` instead (the hidden state at each reply
    token's own position, one step later than what its inference feeds the decoder); we keep
    training and inference consistent so a trained decoder reproduces its targets when run
    on generated text. Returns right-padded (B, N, H) and the lengths N_b.
    """
    predicts = labels[:, 1:] != IGNORE_INDEX
    picked = [hidden[b, :-1][predicts[b]] for b in range(hidden.shape[0])]
    lengths = torch.tensor([p.shape[0] for p in picked], dtype=torch.long, device=hidden.device)
    padded = torch.nn.utils.rnn.pad_sequence(picked, batch_first=True)
    return padded, lengths
