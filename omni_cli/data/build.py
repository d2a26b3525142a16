"""`omni data build`: text instructions → spoken instructions, spoken replies, unit targets, a training manifest.

Per item: the instruction rewritten for speech (LLM, optional), the reply taken from the data or
written by the LLM, both spoken (TTS), the reply's units (HuBERT + k-means through `omni units`'
extractor, optional), and one manifest record in the format `omni finetune --stage 1/2` reads.

Everything finished is kept. OUT/items.jsonl is the journal: a record is appended (and flushed to
disk) the moment its item is done, and a rerun skips what it holds for the same input (an item whose
instruction or reply changed in the input, or that another input gives under the same id, is built
again, into new audio files: an existing file is never replaced); LLM answers are cached in
OUT/llm-cache.jsonl, so a rerun pays for none twice. The manifest OUT/train.jsonl is rewritten
from the journal atomically (a temporary file renamed over it) at the end, at Ctrl-C and every
MANIFEST_EVERY items, so it is never half-written. The first Ctrl-C stops after the current item,
a second at once (the half-done item is done again on the rerun).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from omni_cli.audio.io import SAMPLE_RATE, save_wav
from omni_cli.data.sources import SkippedRecord, TextItem, read_text_items
from omni_cli.data.spoken_style import SpokenStyleWriter
from omni_cli.data.tts import Synthesizer, TtsError, VoicePlan, seconds
from omni_cli.errors import OmniError
from omni_cli.jsonl_files import append_row, read_rows, write_rows_atomically
from omni_cli.llm_endpoint import EndpointError, RejectedAnswer
from omni_cli.stop_request import StopRequest

JOURNAL_NAME = "items.jsonl"
MANIFEST_NAME = "train.jsonl"
LLM_CACHE_NAME = "llm-cache.jsonl"
FAILURES_NAME = "failed.jsonl"
INSTRUCTION_AUDIO = "audio/instructions"
RESPONSE_AUDIO = "audio/responses"
MANIFEST_EVERY = 50
ANSWER_KEPT = 2000  # characters of a rejected LLM answer kept in failed.jsonl
# The user turn every record trains on: what `omni chat` and the reference always send with the speech.
SPEECH_TURN = "<speech>\nPlease directly answer the questions in the user's speech."


class UnitLabeller(Protocol):
    """What turns reply speech into unit targets (`train.units.UnitExtractor`)."""

    def units(self, audio: np.ndarray, merge: bool = True) -> list[int]: ...


@dataclass(frozen=True)
class Speaker:
    """One side's TTS engine and the voices and speeds it uses."""

    engine: Synthesizer
    plan: VoicePlan

    def speak(self, item_id: str, text: str) -> tuple[np.ndarray, str, float]:
        """The item's text spoken in its voice: audio, "engine:voice", speed."""
        voice, speed = self.plan.pick(item_id)
        return self.engine.speak(text, voice, speed), f"{self.engine.name}:{voice}", speed


@dataclass
class BuildPlan:
    """What a build does: where, which LLM steps, which voices, whether units are made."""

    source: Path
    out: Path
    instructions: Speaker
    responses: Speaker
    writer: SpokenStyleWriter | None = None  # None: no LLM steps
    rewrite: bool = True  # with a writer: rewrite every instruction for speech
    write_all_responses: bool = False  # with a writer: write every reply (the paper), not only missing ones
    units: UnitLabeller | None = None
    limit: int | None = None


@dataclass
class Failure:
    """An item that could not be built this run, and why (with the LLM's last answer when it was rejected)."""

    id: str
    reason: str
    answer: str | None = None


@dataclass
class BuildSummary:
    """What a build (or the part of it before Ctrl-C) produced."""

    manifest: Path
    total: int = 0  # items the input offers (after --limit)
    records: int = 0  # items in the manifest
    built: int = 0  # of which made in this run
    changed: int = 0  # of which built again because their input changed since an earlier run
    failures: list[Failure] = field(default_factory=list)
    skipped: list[SkippedRecord] = field(default_factory=list)
    instruction_seconds: float = 0.0
    response_seconds: float = 0.0
    with_units: int = 0
    interrupted: bool = False

    def lines(self) -> list[str]:
        """The summary for people, one fact a line."""
        out = [
            f"{self.records} of {self.total} items in {self.manifest} ({self.built} made in this run"
            + (f", {self.changed} of them again because the input changed" if self.changed else "") + ")",
            f"speech: {_hours(self.instruction_seconds)} of instructions, {_hours(self.response_seconds)} of replies",
            f"unit targets: {self.with_units} of {self.records} items"
            + ("" if self.with_units == self.records else " (stage 2 needs them: rerun with --hubert and --kmeans)"),
        ]
        for f in self.failures[:20]:
            out.append(f"failed: {f.id}: {f.reason}")
        if len(self.failures) > 20:
            out.append(f"failed: ... and {len(self.failures) - 20} more (all in {self.manifest.parent / FAILURES_NAME})")
        for s in self.skipped[:10]:
            out.append(f"skipped input {s.where}: {s.reason}")
        if len(self.skipped) > 10:
            out.append(f"skipped: ... and {len(self.skipped) - 10} more input records")
        return out


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:.3f} h ({seconds:.0f} s)"


def make_record(item: TextItem, spoken_instruction: str, response: str) -> dict[str, Any]:
    """The manifest record of an item, before its audio and units are added."""
    record: dict[str, Any] = {
        "id": item.id,
        "speech": f"{INSTRUCTION_AUDIO}/{item.id}.wav",
        "tgt_speech": f"{RESPONSE_AUDIO}/{item.id}.wav",
        "conversations": [{"from": "human", "value": SPEECH_TURN}, {"from": "gpt", "value": response}],
        "instruction": spoken_instruction,  # what the speech says, for `omni eval`'s judge
    }
    if spoken_instruction != item.instruction:
        record["source_instruction"] = item.instruction
    if item.source_id is not None:
        record["source_id"] = item.source_id
    return record


def made_from(record: dict[str, Any], item: TextItem, write_all_responses: bool) -> bool:
    """Whether a journal record was built from this input item: its instruction and, when the reply
    comes from the input (not written by the LLM), its reply. A record that was not is built again."""
    from omni_cli.train.data import reply_text

    if record.get("source_instruction", record.get("instruction")) != item.instruction:
        return False
    reply_from_input = item.response is not None and not write_all_responses
    return not reply_from_input or reply_text(record) == item.response


class DataBuild:
    """Runs a BuildPlan item by item, keeping each finished item on disk."""

    def __init__(self, plan: BuildPlan, on_item: Callable[[str, int, int], None] | None = None) -> None:
        self.plan = plan
        self.on_item = on_item or (lambda item_id, done, total: None)
        self.out = Path(plan.out)
        self.journal = self.out / JOURNAL_NAME
        self.manifest = self.out / MANIFEST_NAME

    def spoken_texts(self, item: TextItem) -> tuple[str, str]:
        """The instruction as it will be spoken, and the reply (RejectedAnswer or OmniError when there is none)."""
        writer = self.plan.writer
        instruction = writer.rewrite(item.instruction) if writer is not None and self.plan.rewrite else item.instruction
        if item.response is not None and not (writer is not None and self.plan.write_all_responses):
            return instruction, item.response
        if writer is None:
            raise OmniError("the input gives no reply and there is no --llm-url to write one")
        return instruction, writer.respond(instruction)

    def build_item(self, item: TextItem) -> dict[str, Any]:
        """Make one item's speech (and units) and return its manifest record."""
        instruction, response = self.spoken_texts(item)
        record = make_record(item, instruction, response)
        question, record["instruction_voice"], record["instruction_speed"] = self.plan.instructions.speak(item.id, instruction)
        reply, record["response_voice"], _ = self.plan.responses.speak(item.id, response)
        # Never over an existing file (an earlier version of this item, or a file of the user's): the next free name.
        for key, audio in (("speech", question), ("tgt_speech", reply)):
            record[key] = save_wav(self.out / record[key], audio, SAMPLE_RATE, overwrite=False).relative_to(self.out).as_posix()
        record["speech_seconds"] = round(seconds(question), 3)
        record["response_seconds"] = round(seconds(reply), 3)
        if self.plan.units is not None:
            record["tgt_units"] = self.plan.units.units(reply)
        return record

    def add_units(self, record: dict[str, Any]) -> dict[str, Any]:
        """A record from an earlier run without units, labelled now that a HuBERT is given."""
        from omni_cli.audio.io import load_audio

        assert self.plan.units is not None
        return {**record, "tgt_units": self.plan.units.units(load_audio(self.out / record["tgt_speech"]))}

    def run(self) -> BuildSummary:
        """Build every item not finished yet; the summary says what the manifest holds (also after Ctrl-C)."""
        items, skipped = read_text_items(self.plan.source)
        if self.plan.limit is not None:
            items = items[: self.plan.limit]
        self.out.mkdir(parents=True, exist_ok=True)
        done = read_rows(self.journal)
        summary = BuildSummary(self.manifest, total=len(items), skipped=skipped)
        failures_path = self.out / FAILURES_NAME
        failures_path.unlink(missing_ok=True)
        appended = 0
        try:
            with StopRequest(announce="\nomni: stopping after this item (Ctrl-C again to stop at once)\n") as ctrl_c:
                for index, item in enumerate(items):
                    if ctrl_c.requested:
                        summary.interrupted = True
                        break
                    record = done.get(item.id)
                    changed = record is not None and not made_from(record, item, self.plan.write_all_responses)
                    try:
                        if record is None or changed:
                            record = self.build_item(item)
                            summary.built += 1
                            summary.changed += changed
                        elif self.plan.units is not None and "tgt_units" not in record:
                            record = self.add_units(record)
                        else:
                            record = None  # finished in an earlier run
                    except EndpointError:
                        raise  # the LLM server is gone or refuses: every next item would fail alike
                    except (RejectedAnswer, TtsError, OmniError) as exc:
                        self._fail(summary, failures_path, Failure(item.id, str(exc), getattr(exc, "answer", None)))
                    if record is not None:
                        append_row(self.journal, record)
                        done[item.id] = record
                        appended += 1
                        if appended % MANIFEST_EVERY == 0:
                            self._write_manifest(items, done, summary)
                    self.on_item(item.id, index + 1, len(items))
        except KeyboardInterrupt:
            summary.interrupted = True
        except OSError as exc:  # a full disk or a folder made read-only: nothing more can be kept
            raise OmniError(f"cannot write to {self.out} ({exc.strerror or exc}); free some space and run the same command again.") from exc
        finally:
            try:
                self._write_manifest(items, done, summary)
            except OSError:  # the disk is full: the previous manifest stays whole, the journal has every item
                (self.manifest.parent / f".{self.manifest.name}.part").unlink(missing_ok=True)
        return summary

    def _fail(self, summary: BuildSummary, path: Path, failure: Failure) -> None:
        summary.failures.append(failure)
        row = {"id": failure.id, "reason": failure.reason}
        if failure.answer is not None:
            row["last_answer"] = failure.answer[:ANSWER_KEPT]
        append_row(path, row)

    def _write_manifest(self, items: Sequence[TextItem], done: dict[str, dict[str, Any]], summary: BuildSummary) -> None:
        """The manifest: every finished item, in input order, with its audio still on disk."""
        rows = [
            done[item.id] for item in items
            if item.id in done and (self.out / done[item.id]["speech"]).is_file() and (self.out / done[item.id]["tgt_speech"]).is_file()
        ]
        write_rows_atomically(self.manifest, rows)
        summary.records = len(rows)
        summary.instruction_seconds = sum(float(r.get("speech_seconds", 0.0)) for r in rows)
        summary.response_seconds = sum(float(r.get("response_seconds", 0.0)) for r in rows)
        summary.with_units = sum(1 for r in rows if "tgt_units" in r)
