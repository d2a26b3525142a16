"""Training data: read a manifest, validate every record up front, and collate batches.

Manifests are the reference's JSON list (LLaVA style) or JSONL with one such record a line:
`{"id", "speech": path, "conversations": [{"from": "human", "value": "<speech>\\n..."},
{"from": "gpt", "value": reply}], "tgt_units": [...]}`. A flat `"response"` field is accepted
instead of `conversations`; units may be a list of ints or a space-separated string.

The prompt is always the one inference builds (`build_prompt_ids(tokenizer, [speech_turn()])`),
whatever the human turn's text says, so the model is trained on exactly what it will see.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import soundfile as sf
import torch
from transformers import PreTrainedTokenizerBase

from omni_cli.audio.io import SAMPLE_RATE, load_audio
from omni_cli.errors import OmniError
from omni_cli.model.features import CHUNK_SAMPLES, log_mel_spectrogram
from omni_cli.model.llm import SPEECH_TOKEN_INDEX, build_prompt_ids, speech_turn, splice_speech
from omni_cli.model.unit_decoder import IGNORE_INDEX

# Field names the unit targets go by in different releases of the reference data.
UNIT_FIELDS = ("tgt_units", "units", "unit", "speech_units")
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
    """One usable example: question speech, reply text and (for stage 2) the reply's unit targets."""

    record_id: str
    speech: Path
    response: str
    units: tuple[int, ...] | None


@dataclass(frozen=True)
class DataLimits:
    """What a record must fit: the model's unit vocabulary, audio and sequence lengths."""

    unit_vocab_size: int
    speech_positions: int  # LLM positions one utterance takes after the adaptor (300 for 30 s)
    max_speech_seconds: float = CHUNK_SAMPLES / SAMPLE_RATE
    max_length: int = 2048  # prompt + speech + reply positions (the reference's model_max_length)


def read_manifest(path: str | Path) -> list[dict[str, Any]]:
    """The raw records of a JSON list or JSONL manifest (a record that is not an object stays, to be reported)."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"manifest {path} not found; pass --data a JSON or JSONL manifest.")
    text = path.read_text(encoding="utf-8")
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DatasetError(f"manifest {path} is not valid JSON ({exc}); fix the file.") from exc
        return list(data)
    records: list[dict[str, Any]] = []
    bad_lines: list[RecordProblem] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            bad_lines.append(RecordProblem(f"line {number}", f"not valid JSON ({exc.msg})"))
    if bad_lines:
        raise _summary(path, bad_lines, len(records) + len(bad_lines))
    return records


def parse_units(value: Any) -> list[int]:
    """A unit sequence from a list of ints or a space-separated string; ValueError if neither."""
    if isinstance(value, str):
        return [int(v) for v in value.split()]
    if isinstance(value, (list, tuple)) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return list(value)
    raise ValueError("units must be a list of integers or a space-separated string of integers")


def _response_text(raw: dict[str, Any]) -> str | None:
    if isinstance(raw.get("response"), str):
        return raw["response"]
    turns = raw.get("conversations")
    if isinstance(turns, list):
        replies = [t.get("value") for t in turns if isinstance(t, dict) and t.get("from") in RESPONSE_SPEAKERS]
        if replies and isinstance(replies[-1], str):
            return replies[-1]
    return None


def _audio_problem(path: Path, limits: DataLimits) -> str | None:
    """Why this audio file cannot be used, from its header (fast; the samples are read at training time)."""
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


def validate_records(
    raw_records: Sequence[Any],
    base_dir: Path,
    stage: int,
    tokenizer: PreTrainedTokenizerBase,
    limits: DataLimits,
) -> tuple[list[TrainingRecord], list[RecordProblem]]:
    """Check every record; return the usable ones and every problem found (all of them, not the first)."""
    prompt_positions = len(build_prompt_ids(tokenizer, [speech_turn()])) - 1 + limits.speech_positions
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

        response = _response_text(raw)
        n_reply = 0
        if response is None or not response.strip():
            found.append("empty response text")
        else:
            n_reply = len(reply_ids(tokenizer, response))
            if prompt_positions + n_reply > limits.max_length:
                found.append(
                    f"too long: {prompt_positions + n_reply} positions (prompt + speech + reply) > max length {limits.max_length}"
                )

        units: list[int] | None = None
        unit_value = next((raw[f] for f in UNIT_FIELDS if f in raw), None)
        if unit_value is not None:
            try:
                units = parse_units(unit_value)
            except ValueError as exc:
                found.append(str(exc))
        if stage == 2:
            if units is None and not any("units must" in f for f in found):
                found.append(f"no unit targets (one of {', '.join(UNIT_FIELDS)}) for stage 2; make them with `omni units`")
            elif units is not None:
                if not units:
                    found.append("unit targets are empty")
                bad = [u for u in units if not 0 <= u < limits.unit_vocab_size]
                if bad:
                    found.append(f"unit id {bad[0]} out of range 0..{limits.unit_vocab_size - 1} ({len(bad)} such)")
        problems.extend(RecordProblem(record_id, f) for f in found)
        if not found and speech is not None and response is not None:
            records.append(TrainingRecord(record_id, speech, response, tuple(units) if units is not None else None))
    return records, problems


def _summary(source: Path, problems: Sequence[RecordProblem], total: int) -> DatasetError:
    bad_ids = {p.record_id for p in problems}
    lines = [f"{source}: {len(bad_ids)} of {total} records cannot be used; fix or remove them before training:"]
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
        self.prompt_ids = build_prompt_ids(tokenizer, [speech_turn()])

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> Sample:
        record = self.records[index]
        audio = load_audio(record.speech)
        # Same front end as SpeechToSpeech.encode_speech: one 30 s window, padded.
        mel = log_mel_spectrogram(audio, n_mels=self.n_mels, pad_to=CHUNK_SAMPLES)
        units = list(record.units) if record.units is not None else None
        return Sample(record.record_id, mel, list(self.prompt_ids), reply_ids(self.tokenizer, record.response), units)


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
