"""The latency a user hears in `omni chat`, measured on a private PulseAudio server with the tiny model.

Spoken questions are played into the virtual microphone one after another (each once the
previous reply has been played); what the microphone heard and what the speaker played are
recorded. Per run, one JSON line:
- heard_latency_ms: from the true end of each question (found in the microphone's recording)
  to the first reply sample on the speaker (median, max, each turn);
- transcript_latency_ms: what the transcript's `latency_ms` says for the same turns, and
  transcript_error_ms: transcript minus heard (≤ 60 ms wanted);
- end_of_turn_ms: the session's end-of-turn delay after the true end (the transcript's
  `end_of_turn_ms` where written; else the user line's `end_t` minus the true end), and
  where_the_time_goes_ms after it: input_ms (the deciding frame heard → acted on: device
  blocks, queue, VAD), reply_ready_ms (→ the first audio handed to the speaker: the draft's
  readiness and the jitter buffer's first fill), output_ms (→ heard: callback wait and output latency);
- longest_gap_ms / gaps_over_50ms: silences inside replies after their first sound;
  speaker_underruns, mic_overflows (from the transcript's "end" line);
- with `--pause-ms MS` (`--paused`: 400), each question is split at an inner word gap with
  exactly MS of silence: answered_in_halves (questions with a reply to a part of them that was
  not withdrawn), false_starts (replies that began in a pause and were withdrawn when the user
  went on), reply_heard_in_pauses_ms (per question, the reply sound on the speaker between the
  end of its first half and its true end: what a false start cost), cut_offs (user turns beyond
  one per question) and speculative_replies_dropped (drafts started at a pause, thrown away).

Runs: this tree with its defaults ("after"), `--base REV` (a commit exported with `git
archive`, run with its defaults: "before"), and `--variant NAME="ARGS"` (this tree with extra
chat options). They alternate, `--rounds` times, in one process on one sound server.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

sys.path.insert(0, str(ROOT / "tests" / "audio"))

import numpy as np  # noqa: E402
import soundfile as sf  # noqa: E402
from signals import RATE, split_at_inner_gap, true_bounds, with_pause  # noqa: E402
from sound_server import MIC_SINK, start_sound_server  # noqa: E402
from sound_session import LOUD, WINDOW_S, ChatProcess, Recording, heard_turns, utterances  # noqa: E402

from omni_cli.audio.io import load_audio  # noqa: E402


QUESTION_GAP_S = 1.2


def export_revision(revision: str, folder: Path) -> Path:
    """The source tree at `revision`, written to `folder` (no git worktree is created)."""
    folder.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", revision], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
    return folder


def run_session(
    server,
    tiny,
    questions: list[Path],
    workdir: Path,
    name: str,
    extra: list[str],
    source: Path | None,
    threads: int | None,
    pauses: list[tuple[float, float]] | None = None,
) -> dict:
    """One chat session answering every question; the figures of what was heard."""
    session = workdir / name
    mic = Recording(server, workdir / f"{name}-mic.wav", sink=MIC_SINK)
    speaker = Recording(server, workdir / f"{name}-speaker.wav")
    chat = ChatProcess(server, tiny, session, *extra, source=source, threads=threads)
    try:
        chat.wait_listening()
        for k, question in enumerate(questions, start=1):
            player = server.play_into_mic(question)
            player.wait(30)
            answered = lambda rows, k=k: sum(r["type"] == "assistant" and not r.get("withdrawn") for r in rows) >= k  # noqa: E731
            chat.wait_for(f"reply {k}", answered, timeout=60)
            time.sleep(1.0)
        chat.interrupt()
    finally:
        chat.kill()
        mic.stop()
        speaker.stop()
    rows = chat.rows()
    pairs = list(zip((r for r in rows if r["type"] == "user"), (r for r in rows if r["type"] == "assistant"), strict=False))
    # A reply withdrawn because the user went on with the question answered nothing: its turn is part of the next.
    false_starts = sum(bool(reply.get("withdrawn")) for _, reply in pairs)
    pairs = [(user, reply) for user, reply in pairs if not reply.get("withdrawn")]
    end = next((r for r in rows if r["type"] == "end"), {})
    # Questions are parted by a reply and a second or more; a question's own pause is under a second.
    heard = heard_turns(mic, speaker, QUESTION_GAP_S)
    turns = []
    for turn, (user, reply) in zip(heard, pairs, strict=False):
        end_of_turn = user.get("end_of_turn_ms")
        if end_of_turn is None:  # before issue 13: the decision's wall time is all there is
            end_of_turn = (user["end_t"] - turn.speech_end) * 1000
        turns.append(
            {
                "heard_ms": None if turn.latency_ms is None else round(turn.latency_ms, 1),
                "transcript_ms": reply.get("latency_ms"),
                "end_of_turn_ms": round(end_of_turn, 1),
                # Where transcript and recording disagree: the end of speech, or the first sound.
                "speech_end_error_ms": _error_ms(user.get("speech_end_t"), turn.speech_end),
                "first_sound_error_ms": _error_ms(reply.get("first_audio_t"), turn.first_sound),
                "longest_gap_ms": round(turn.longest_gap_s * 1000, 1),
                "gaps_over_50ms": turn.gaps_over_50ms,
                # Where the time after the end of speech went (the transcript's clocks; older versions lack some).
                "input_ms": _between(user.get("end_t"), user.get("decided_t")),
                "reply_ready_ms": _between(user.get("decided_t"), reply.get("playback_t")),
                "output_ms": _between(reply.get("playback_t"), reply.get("first_audio_t")),
            }
        )
    heard_ms = [t["heard_ms"] for t in turns if t["heard_ms"] is not None]
    errors = [t["transcript_ms"] - t["heard_ms"] for t in turns if t["heard_ms"] is not None and t["transcript_ms"] is not None]
    paused = {}
    if pauses is not None:  # the paused questions: one reply each, none to a half, and what the pauses cost
        in_pauses, halves = [], 0
        for (start, end_t), (half_end, _) in zip(utterances(mic, QUESTION_GAP_S), pauses, strict=False):
            # The reply sound from the end of the first half to the true end of the question.
            in_pauses.append(round(float(np.sum(speaker.window(start + half_end, end_t) > LOUD)) * WINDOW_S * 1000))
            # A part of it answered (not withdrawn): that reply's turn ended before the question did.
            halves += any(start < user["speech_end_t"] < end_t - 0.1 for user, _ in pairs)
        paused = {"answered_in_halves": halves, "reply_heard_in_pauses_ms": in_pauses}
    return {
        "run": name,
        "options": " ".join(extra),
        "questions": len(questions),
        "turns": len(turns),
        **paused,
        "false_starts": false_starts,
        "cut_offs": len(pairs) - len(questions),
        "speculative_replies_dropped": end.get("speculative_replies_dropped"),
        "heard_latency_ms": {"median": _median(heard_ms), "max": max(heard_ms, default=None)},
        "transcript_error_ms": {"median": _median(errors), "max_abs": max((abs(e) for e in errors), default=None)},
        "end_of_turn_ms": {"median": _median([t["end_of_turn_ms"] for t in turns])},
        # Medians: the end-of-turn decision's last frame → acted on; → the reply's first audio handed to the
        # speaker (the draft's readiness and the jitter buffer's first fill); → heard (callback wait + output latency).
        "where_the_time_goes_ms": {key: _median([t[key] for t in turns if t[key] is not None]) for key in ("input_ms", "reply_ready_ms", "output_ms")},
        "longest_gap_ms": max((t["longest_gap_ms"] for t in turns), default=None),
        "gaps_over_50ms": sum(t["gaps_over_50ms"] for t in turns),
        "speaker_underruns": end.get("speaker_underruns"),
        "mic_overflows": end.get("mic_overflows"),
        "each_turn": turns,
    }


def paused_questions(questions: list[Path], folder: Path, pause_s: float = 0.4) -> tuple[list[Path], list[tuple[float, float]]]:
    """Each question with its middle word gap replaced by exactly `pause_s` of silence (half a second of lead and tail),
    and where its pause lies: (end of the first half, start of the second) in seconds from the question's own start."""
    folder.mkdir(parents=True, exist_ok=True)
    paused, pauses = [], []
    for question in questions:
        audio, first_end, second_start = with_pause(*split_at_inner_gap(load_audio(question)), pause_s=pause_s)
        path = folder / question.name
        sf.write(path, np.concatenate([np.zeros(RATE // 2), audio, np.zeros(RATE // 2)]), RATE, subtype="FLOAT")
        onset = true_bounds(audio)[0]
        paused.append(path)
        pauses.append((first_end - onset, second_start - onset))
    return paused, pauses


def _loadavg() -> float | None:
    """The machine's 1-minute load average when the session ended (other work inflates every figure)."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def _between(start: float | None, end: float | None) -> float | None:
    return None if start is None or end is None else round((end - start) * 1000, 1)


@contextmanager
def sound_server_and_tiny_model(keep: Path | None, prefix: str) -> Iterator[tuple[Any, Path, Any]]:
    """A private PulseAudio server, a work folder (`keep`, else a temporary one) and the tiny model in it,
    for a benchmark's sessions; exits with one line when no sound server can start."""
    from omni_cli.tiny.omni import make_tiny_model

    server, reason = start_sound_server()
    if server is None:
        sys.exit(f"no sound server: {reason}")
    try:
        with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
            workdir = Path(tmp) if keep is None else keep
            workdir.mkdir(parents=True, exist_ok=True)
            yield server, workdir, make_tiny_model(workdir / "tiny", seed=0)
    finally:
        server.stop()


def _error_ms(claimed: float | None, measured: float | None) -> float | None:
    return None if claimed is None or measured is None else round((claimed - measured) * 1000, 1)


def _median(values: list[float]) -> float | None:
    return round(statistics.median(values), 1) if values else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", type=Path, default=ROOT / "tests" / "data", help="folder of question WAVs")
    parser.add_argument("--base", help="also run this git revision with its defaults (e.g. 657b631)")
    parser.add_argument("--variant", action="append", default=[], metavar='NAME="ARGS"', help="this tree with extra chat options")
    parser.add_argument("--max-new-tokens", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=1, help="run every configuration this many times, alternating")
    parser.add_argument("--keep", type=Path, help="keep the sessions and recordings in this folder")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS for chat (0: torch's default)")
    parser.add_argument("--load", type=int, default=0, help="busy processes running beside chat (a loaded machine)")
    parser.add_argument("--paused", action="store_true", help="put a 400 ms pause in the middle of every question")
    parser.add_argument("--pause-ms", type=int, help="put a pause this long in the middle of every question (implies --paused)")
    args = parser.parse_args()

    questions = sorted(args.questions.glob("*.wav"))
    with sound_server_and_tiny_model(args.keep, "omni-heard-") as (server, workdir, tiny):
        pauses = None
        if args.paused or args.pause_ms:
            questions, pauses = paused_questions(questions, workdir / "paused", (args.pause_ms or 400) / 1000)
        common = ["--max-new-tokens", str(args.max_new_tokens)]
        runs: list[tuple[str, list[str], Path | None]] = []
        if args.base:
            runs.append((f"before-{args.base}", common, export_revision(args.base, workdir / "base")))
        runs.append(("after", common, None))
        for variant in args.variant:
            name, _, options = variant.partition("=")
            runs.append((name, common + shlex.split(options), None))
        busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.load)]
        try:
            for round_ in range(args.rounds):
                for name, extra, source in runs:
                    threads = args.threads or None
                    figures = run_session(server, tiny, questions, workdir, f"{name}-{round_}", extra, source, threads, pauses)
                    pause = {} if pauses is None else {"pause_ms": args.pause_ms or 400}
                    print(json.dumps({**figures, **pause, "threads": threads, "load": args.load, "loadavg": _loadavg()}), flush=True)
        finally:
            for process in busy:
                process.kill()
                process.wait()


if __name__ == "__main__":
    main()
