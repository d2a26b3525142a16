"""Turn-taking on real and synthetic audio: webrtcvad alone (before issue 13) against webrtcvad + Silero.

Prints one JSON line per configuration:
- false_starts: turns started by 10 s of steady white/pink noise, a 440 Hz tone and music-like
  notes at -30, -25 and -20 dBFS (each should be 0), and noise_sent_s: seconds of it that
  would have gone to the model as questions;
- quiet_missed: spoken questions at -30 dBFS (active speech level) that started no turn;
- end_delay_ms: from the true end of speech (found in the clean recording) to the end-of-turn
  decision, median and max; voiced_end_error_ms: SpeechEnd.voiced_end_t minus the true end;
- pause_cutoffs: questions with a 400 ms mid-sentence pause ended at the pause (of paused_cases:
  each question at -30, -20 and -12 dBFS after 0, 0.3 and 1 s of silence).

Speech: the questions under tests/data (or --questions DIR) and espeak-ng sentences when installed.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "audio"))

from signals import NOISES, RATE, at_dbfs, split_at_inner_gap, true_bounds, with_pause  # noqa: E402

from omni_cli.audio.io import load_audio  # noqa: E402
from omni_cli.audio.vad import Endpointer, EndpointerConfig, SpeechEnd, SpeechStart  # noqa: E402

SENTENCES = [
    ("What is the tallest", "mountain in Europe?"),
    ("Can you tell me how to", "make a good cup of coffee?"),
    ("I would like to know why the", "sky looks blue during the day."),
    ("How many people live in", "the city of Tokyo?"),
    ("Please explain the difference between", "a virus and a bacterium."),
]


def espeak(text: str, folder: Path) -> np.ndarray:
    path = folder / f"{abs(hash(text))}.wav"
    subprocess.run(["espeak-ng", "-w", str(path), text], check=True, capture_output=True)
    return load_audio(path)


def events_for(config: EndpointerConfig, audio: np.ndarray) -> list:
    endpointer = Endpointer(config)
    return endpointer.feed(audio) + endpointer.flush()


def padded(speech: np.ndarray, lead: float = 1.0, tail: float = 1.5) -> np.ndarray:
    return np.concatenate([np.zeros(int(lead * RATE)), speech, np.zeros(int(tail * RATE))]).astype(np.float32)


def measure(
    config: EndpointerConfig,
    questions: list[np.ndarray],
    paused: list[tuple[np.ndarray, float, float]],
    levels: tuple[float, ...] = (-30.0, -20.0, -12.0),
    leads: tuple[float, ...] = (0.0, 0.3, 1.0),
) -> dict:
    started = time.perf_counter()
    false_starts, noise_sent_s = {}, 0.0
    for name, make in NOISES.items():
        for level in (-30, -25, -20):
            events = events_for(config, at_dbfs(make(10.0), level))
            false_starts[f"{name}_{level}"] = sum(isinstance(e, SpeechStart) for e in events)
            noise_sent_s += sum(e.audio.size / RATE for e in events if isinstance(e, SpeechEnd))
    missed = sum(
        not any(isinstance(e, SpeechStart) for e in events_for(config, padded(at_dbfs(q, -30.0)))) for q in questions
    )
    delays, errors = [], []
    for q in questions:
        _, end = true_bounds(q)
        ends = [e for e in events_for(config, padded(at_dbfs(q, -20.0))) if isinstance(e, SpeechEnd)]
        if ends:
            delays.append((ends[-1].t - 1.0 - end) * 1000)
            errors.append((ends[-1].voiced_end_t - 1.0 - end) * 1000)
    cutoffs = cases = 0
    for audio, _, pause_end in paused:
        # Each at three levels, after 0, 0.3 and 1 s of silence (the model starting cold or warm).
        for level in levels:
            for lead in leads:
                ends = [e for e in events_for(config, padded(at_dbfs(audio, level), lead)) if isinstance(e, SpeechEnd)]
                cutoffs += any(e.voiced_end_t - lead < pause_end for e in ends)  # a turn ended at the pause
                cases += 1
    return {
        "speech_model": config.speech_model,
        "hangover_ms": config.hangover_ms,
        "false_starts": false_starts,
        "false_starts_total": sum(false_starts.values()),
        "noise_sent_s": round(noise_sent_s, 1),
        "quiet_missed": missed,
        "questions": len(questions),
        "end_delay_ms_median": round(float(np.median(delays)), 1),
        "end_delay_ms_max": round(float(np.max(delays)), 1),
        "voiced_end_error_ms_median": round(float(np.median(errors)), 1),
        "voiced_end_error_ms_max_abs": round(float(np.max(np.abs(errors))), 1),
        "pause_cutoffs": cutoffs,
        "paused_cases": cases,
        "seconds": round(time.perf_counter() - started, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", type=Path, default=ROOT / "tests" / "data", help="folder of spoken question WAVs")
    parser.add_argument("--hangover-ms", type=int, nargs="+", default=[600, 500, 450, 400])
    parser.add_argument("--quick", action="store_true", help="paused questions at -20 dBFS after 0 s of silence only (a smoke test)")
    args = parser.parse_args()
    questions = [load_audio(p) for p in sorted(args.questions.glob("*.wav"))]
    paused = [with_pause(*split_at_inner_gap(q)) for q in questions]
    if shutil.which("espeak-ng"):
        with tempfile.TemporaryDirectory() as folder:
            for first, second in SENTENCES:
                questions.append(espeak(f"{first} {second}", Path(folder)))
                paused.append(with_pause(espeak(first, Path(folder)), espeak(second, Path(folder))))
    configs = [EndpointerConfig(speech_model=False, hangover_ms=600)]  # before issue 13: webrtcvad alone, 600 ms
    configs += [EndpointerConfig(hangover_ms=h) for h in args.hangover_ms]
    for config in configs:
        variants = {"levels": (-20.0,), "leads": (0.0,)} if args.quick else {}
        print(json.dumps(measure(config, questions, paused, **variants)), flush=True)


if __name__ == "__main__":
    main()
