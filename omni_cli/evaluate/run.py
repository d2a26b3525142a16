"""`omni eval MANIFEST`: each spoken instruction answered, its speech reply transcribed and scored.

Per item (one JSON line in OUT/eval.jsonl): the text reply and the speech reply (OUT/replies/, never
replacing a file), first-audio latency and decoding time (from the pipeline's events, as
`transcribe-and-reply` measures them), the Whisper transcript of the speech reply, ASR-WER and
ASR-CER against the text reply, UTMOS where it runs, and with a judge the content and style scores of
the text reply (S2TIF) and of the transcript (S2SIF). When the manifest holds the reply it trains on
(`omni data build`'s do), the text reply's WER against that reply too: not one of the paper's scores,
but on the items a model was fine-tuned on it says whether the training took.

The work runs in phases so only one big model is in memory at a time: replies (the omni model), then
transcripts (Whisper), then UTMOS, then the judge. OUT/eval.jsonl is rewritten atomically after
every item, so Ctrl-C or a crash keeps everything finished and the same command continues where it
stopped (an item whose reply failed is tried again). OUT/eval-run.json records what made the rows (the
manifest, the model's, encoder's, vocoder's and Whisper's weight files, the sampling, the judge): a
run with other ones is refused rather than mixing its rows with theirs, and a row whose manifest item
changed (its speech, instruction or reply) is made again.
"""

from __future__ import annotations

import gc
import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omni_cli.audio.io import load_audio
from omni_cli.errors import OmniError, one_line
from omni_cli.evaluate.metrics import error_counts
from omni_cli.jsonl_files import read_rows, write_json_atomically, write_rows_atomically
from omni_cli.llm_endpoint import EndpointError, RejectedAnswer

RESULTS_NAME = "eval.jsonl"
RUN_NAME = "eval-run.json"  # what made the rows of eval.jsonl (see RunIdentity)
REPLIES_DIR = "replies"
INSTRUCTION_FIELDS = ("instruction", "text", "question", "prompt")
Row = dict[str, Any]


class EvalError(OmniError):
    """The manifest cannot be evaluated (no records, no speech paths)."""


class OtherRun(EvalError):
    """--out holds the results of a run with another model, vocoder, Whisper, judge or manifest."""


# What must be the same for a rerun to continue a run's rows, and how a difference is named.
IDENTITY_PARTS = {
    "manifest": "manifest", "model": "model", "speech_encoder": "speech encoder", "vocoder": "vocoder",
    "asr": "Whisper for transcripts", "sampling": "sampling", "judge": "judge",
}


def path_identity(path: Path | None) -> dict[str, Any] | None:
    """Where a checkpoint is and the size and modification time of each of its files: a copy trained
    again or replaced in place differs, while reading the same files again does not."""
    if path is None:
        return None
    path = Path(path).expanduser().resolve()
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")) if path.is_dir() else []
    stats = {}
    for file in files:
        st = file.stat()
        stats[file.name] = [st.st_size, st.st_mtime_ns]
    return {"path": str(path), "files": stats}


def describe_identity_part(part: str, old: Any, new: Any) -> str:
    """One difference for people: "model: was runs/s1/final, now runs/s2/final"."""
    name = IDENTITY_PARTS.get(part, part)
    if isinstance(old, dict) and isinstance(new, dict) and "path" in old and old.get("path") == new.get("path"):
        return f"{name}: {new['path']} has changed since"
    if part == "judge" and isinstance(old, dict) and isinstance(new, dict) and old.get("model") == new.get("model"):
        return f"{name}: its prompts have changed"

    def shown(value: Any) -> str:
        if value is None:
            return "none"
        if isinstance(value, dict) and "path" in value:
            return str(value["path"])
        if isinstance(value, dict) and "model" in value:
            return str(value["model"])
        if isinstance(value, dict):
            return " ".join(f"{k}={v}" for k, v in sorted(value.items()))
        return str(value)

    return f"{name}: was {shown(old)}, now {shown(new)}"


def check_same_run(out: Path, identity: dict[str, Any]) -> dict[str, Any]:
    """Refuse (OtherRun, one line) when OUT's rows were made by another model, vocoder, Whisper,
    sampling, judge or manifest; returns what OUT/eval-run.json should now hold.

    A judge may be added to a run that had none (its rows get scores) and left out of a rerun (its
    scores stay); two different judges never mix.
    """
    out = Path(out)
    saved_path = out / RUN_NAME
    if not saved_path.is_file():
        if read_rows(out / RESULTS_NAME):
            # Rows from an omni that did not record what made them: they cannot be told apart from another model's.
            raise OtherRun(
                f"--out {out} holds results that do not say which model made them; give a new --out, or remove {out} to start over."
            )
        return identity
    try:
        saved = json.loads(saved_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        saved = None
    if not isinstance(saved, dict):
        raise OtherRun(f"{saved_path} is not readable; give a new --out, or remove {out} to start over.")
    differ = []
    for part in IDENTITY_PARTS:
        old, new = saved.get(part), identity.get(part)
        if part == "judge" and (old is None or new is None):
            continue
        if old != new:
            differ.append(describe_identity_part(part, old, new))
    if differ:
        raise OtherRun(
            f"--out {out} holds results of another run ({'; '.join(differ)}); "
            f"give a new --out for this run, or remove {out} to start over."
        )
    return {**identity, "judge": identity.get("judge") or saved.get("judge")}


def item_key(item: EvalItem) -> str:
    """What a row was made from: the speech path, the instruction and the reply the manifest gives."""
    text = json.dumps([str(item.speech), item.instruction, item.reference], ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


@dataclass(frozen=True)
class EvalItem:
    """One spoken instruction to answer: its id, its audio, its text and its reply when the manifest gives them."""

    id: str
    speech: Path
    instruction: str | None
    reference: str | None = None


def read_eval_items(manifest: Path) -> list[EvalItem]:
    """The spoken instructions of a manifest (`omni data build`'s, or any with `id` and `speech`)."""
    from omni_cli.train.data import read_manifest, reply_text

    items: list[EvalItem] = []
    seen: set[str] = set()
    for index, raw in enumerate(read_manifest(manifest, option="MANIFEST", before="evaluating")):
        if not isinstance(raw, dict) or not isinstance(raw.get("speech"), str):
            raise EvalError(f"{manifest}: record {index + 1} names no 'speech' audio; each record needs id and speech.")
        item_id = str(raw.get("id", f"#{index + 1}"))
        if item_id in seen:
            raise EvalError(f"{manifest}: id {item_id!r} appears twice; ids name the results, so each must be unique.")
        seen.add(item_id)
        speech = Path(raw["speech"]).expanduser()
        text = next((raw[f] for f in INSTRUCTION_FIELDS if isinstance(raw.get(f), str) and raw[f].strip()), None)
        items.append(EvalItem(item_id, speech if speech.is_absolute() else manifest.parent / speech, text, reply_text(raw)))
    if not items:
        raise EvalError(f"{manifest} holds no records; nothing to evaluate.")
    return items


@dataclass
class EvalPlan:
    """What an evaluation runs, each heavy part made only when it has work to do."""

    manifest: Path
    out: Path
    load_pipeline: Callable[[], Any]  # → SpeechToSpeech
    load_asr: Callable[[], Any] | None  # → WhisperAsr; None: text replies only, nothing to transcribe
    load_mos: Callable[[], Any] | None = None  # → UtmosScorer (MosUnavailable: left out, with a note)
    judge: Any = None  # Judge, or None
    limit: int | None = None
    notes: list[str] = field(default_factory=list)
    identity: dict[str, Any] | None = None  # what makes the rows (check_same_run); None: not checked


class Evaluation:
    """Runs an EvalPlan phase by phase over the rows in OUT/eval.jsonl."""

    def __init__(self, plan: EvalPlan, on_item: Callable[[str, int, int], None] | None = None) -> None:
        self.plan = plan
        self.on_item = on_item or (lambda item_id, done, total: None)
        self.path = Path(plan.out) / RESULTS_NAME
        self.items = read_eval_items(plan.manifest)[: plan.limit]
        self.identity = check_same_run(Path(plan.out), plan.identity) if plan.identity is not None else None
        kept = read_rows(self.path)
        self.rows: dict[str, Row] = {}
        for item in self.items:
            row, key = kept.get(item.id), item_key(item)
            # A row made from another version of its item (speech, instruction or reply edited) is made again.
            if row is None or row.get("item") != key:
                row = {"id": item.id, "item": key}
            self.rows[item.id] = row

    def save(self) -> None:
        """Rewrite OUT/eval.jsonl with every row, in manifest order (atomically)."""
        write_rows_atomically(self.path, [self.rows[item.id] for item in self.items])

    def _phase(self, todo: Sequence[EvalItem], work: Callable[[EvalItem, Row], None]) -> None:
        for n, item in enumerate(todo, start=1):
            work(item, self.rows[item.id])
            self.save()
            self.on_item(item.id, n, len(todo))

    def run(self) -> list[Row]:
        """Every phase with work left; returns the rows (also on disk)."""
        Path(self.plan.out).mkdir(parents=True, exist_ok=True)
        if self.identity is not None:  # before any row: rows never exist without what made them
            write_json_atomically(Path(self.plan.out) / RUN_NAME, self.identity)
        self.save()
        todo = [i for i in self.items if "text" not in self.rows[i.id]]
        if todo:
            pipeline = self.plan.load_pipeline()
            self._phase(todo, lambda item, row: self.answer(pipeline, item, row))
            del pipeline
            gc.collect()
            _free_gpu_memory()
        self._transcribe()
        self._score_mos()
        if self.plan.judge is not None:
            self._phase([i for i in self.items if self._needs_judging(self.rows[i.id])], self.judge)
        return [self.rows[item.id] for item in self.items]

    def answer(self, pipeline: Any, item: EvalItem, row: Row) -> None:
        """The model's reply to one spoken instruction, its speech saved, its timings kept."""
        from omni_cli.transcribe import CheckedInput, FileReply, answer_file

        reply = FileReply(file=str(item.speech))
        row.pop("error", None)
        try:
            answer_file(pipeline, CheckedInput(item.speech), Path(self.plan.out) / REPLIES_DIR, None, reply)
        except (OmniError, RuntimeError) as exc:
            row["error"] = one_line(exc)
            return
        row.update(
            text=reply.text, wav=reply.wav, audio_seconds=reply.audio_seconds, tokens=reply.tokens,
            stopped=reply.stopped, first_text_ms=reply.first_text_ms, first_audio_ms=reply.first_audio_ms,
            decoding_ms=reply.total_ms, units=len(reply.units) if reply.units is not None else None,
        )
        if item.instruction is not None:
            row["instruction"], row["instruction_from"] = item.instruction, "manifest"
        if item.reference is not None:
            row["reference"] = item.reference
            counts = error_counts(item.reference, reply.text)
            if counts is not None:
                row.update(ref_wer=round(counts.wer, 2), ref_word_errors=counts.word_errors, ref_words=counts.words)

    def _transcribe(self) -> None:
        todo = [
            i for i in self.items
            if ("wav" in self.rows[i.id] and self.rows[i.id].get("wav") and "transcript" not in self.rows[i.id])
            or ("text" in self.rows[i.id] and "instruction" not in self.rows[i.id])
        ]
        if not todo:
            return
        if self.plan.load_asr is None:
            self.plan.notes.append("no speech replies to transcribe (no vocoder): ASR-WER/CER left out")
            return
        asr = self.plan.load_asr()

        def work(item: EvalItem, row: Row) -> None:
            if "instruction" not in row:  # the manifest gives no text: the judge reads what Whisper hears
                row["instruction"], row["instruction_from"] = asr.transcribe(load_audio(item.speech)), "asr"
            if row.get("wav") and "transcript" not in row:
                row["transcript"] = asr.transcribe(load_audio(row["wav"]))
                counts = error_counts(row["text"], row["transcript"])
                if counts is not None:
                    row.update(
                        wer=round(counts.wer, 2), cer=round(counts.cer, 2), word_errors=counts.word_errors,
                        words=counts.words, char_errors=counts.char_errors, chars=counts.chars,
                    )

        self._phase(todo, work)
        del asr
        gc.collect()
        _free_gpu_memory()

    def _score_mos(self) -> None:
        todo = [i for i in self.items if self.rows[i.id].get("wav") and "utmos" not in self.rows[i.id]]
        if not todo or self.plan.load_mos is None:
            return
        from omni_cli.evaluate.mos import MosUnavailable

        try:
            scorer = self.plan.load_mos()
        except MosUnavailable as exc:
            self.plan.notes.append(str(exc))
            return
        self._phase(todo, lambda item, row: row.update(utmos=scorer.score(load_audio(row["wav"]))))

    @staticmethod
    def _needs_judging(row: Row) -> bool:
        if "text" not in row or "instruction" not in row:
            return False
        wanted = ["content_text", "style_text"] + (["content_speech", "style_speech"] if "transcript" in row else [])
        return any(k not in row for k in wanted)

    def judge(self, item: EvalItem, row: Row) -> None:
        """Content and style of the text reply (S2TIF) and of the speech reply's transcript (S2SIF)."""
        sides = [("text", row["text"])] + ([("speech", row["transcript"])] if "transcript" in row else [])
        for side, response in sides:
            try:
                for criterion, score in self.plan.judge.scores(row["instruction"], response).items():
                    row[f"{criterion}_{side}"] = score
            except EndpointError:
                raise  # the judge is unreachable: stop, keeping every row so far
            except RejectedAnswer as exc:
                row[f"judge_error_{side}"] = str(exc)


def _free_gpu_memory() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
