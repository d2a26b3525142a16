"""The latency a Realtime client sees from `omni serve`, next to the latency `omni chat`'s user hears, in one run.

Served: `omni serve` on the tiny model; the official `openai` SDK connects to `/v1/realtime`
(server VAD, the defaults) and streams each spoken question as a microphone would (PCM16 24 kHz
in 40 ms blocks, in real time, half a second of silence before it and the microphone left open
after it). Per question: from when the client sent the block holding the question's last voiced
sample (the true end of speech in the file: the last sample above 2% of its peak) to when the
first `response.output_audio.delta` of the reply arrived. The next question is sent once the
reply is done (`response.done`, when it has had time to play) and a second has passed.

Chat: `benchmarks/heard_latency.py`'s session on a private PulseAudio server with the same
questions, model and options: from the true end of each question in the microphone's recording
to the reply's first sample on the speaker's.

One JSON line per round: both runs' figures (median and max over the questions, each turn), the
served median minus chat's, and the machine's load average before and after. They alternate
(chat first in even rounds, serve first in odd ones), on one tiny model.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests" / "serve"))
sys.path.insert(0, str(ROOT / "tests"))

import numpy as np  # noqa: E402
from heard_latency import run_session, sound_server_and_tiny_model  # noqa: E402
from realtime_client import RealtimeClient  # noqa: E402
from servers import omni_serve  # noqa: E402
from sound_session import SPEECH_FLOOR  # noqa: E402

from omni_cli.audio.io import SAMPLE_RATE, load_audio  # noqa: E402

LEAD_S, TAIL_S = 0.5, 1.0


def served_turns(base_url: str, questions: list[Path]) -> list[dict]:
    """Each question streamed over one Realtime session; its figures as the client saw them."""
    turns = []
    with RealtimeClient(base_url) as client:
        client.wait_for("session.created")
        for path in questions:
            question = load_audio(path)
            loud = np.flatnonzero(np.abs(question) > SPEECH_FLOOR * np.abs(question).max())
            client.stream(np.zeros(int(LEAD_S * SAMPLE_RATE), np.float32))
            mark, start = client.mark(), client.sent[-1][0]
            client.stream(np.concatenate([question, np.zeros(int(TAIL_S * SAMPLE_RATE), np.float32)]))
            # The question's answer: the reply no speech cut (a pause longer than the hang-over may have
            # ended the turn early; going on within a second withdraws that reply and asks both parts as one).
            done = client.wait_for("response.done", where=lambda e: e.response.status != "cancelled", since=mark, timeout=60)
            answer = done.response.id
            # The microphone stays open while the reply plays: silence, as a quiet room sends.
            client.stream(np.zeros(SAMPLE_RATE, np.float32))
            first = client.wait_for("response.output_audio.delta", where=lambda e, r=answer: e.response_id == r, since=mark)
            created = client.wait_for("response.created", where=lambda e, r=answer: e.response.id == r, since=mark)
            stopped = [e for e in client.of("input_audio_buffer.speech_stopped", since=mark) if client.index(e) < client.index(created)][-1]
            committed = [e for e in client.of("input_audio_buffer.committed", since=mark) if e.item_id == stopped.item_id][0]
            speech_end = client.sent_time_of(start + int(loud[-1]))
            true_end_ms = (start + int(loud[-1]) + 1) * 1000 / SAMPLE_RATE  # in the session's audio, as audio_end_ms counts
            turns.append(
                {
                    "served_ms": round((client.arrival(first) - speech_end) * 1000, 1),
                    "end_of_turn_ms": round((client.arrival(committed) - speech_end) * 1000, 1),
                    "speech_end_error_ms": round(stopped.audio_end_ms - true_end_ms, 1),
                    "status": done.response.status,
                    "cut_offs": len([e for e in client.of("response.done", since=mark) if e.response.status == "cancelled"]),
                }
            )
    return turns


def run_served(tiny, questions: list[Path], max_new_tokens: int, threads: int) -> dict:
    with omni_serve(tiny, "--max-new-tokens", str(max_new_tokens), "--threads", str(threads)) as server:
        turns = served_turns(server.base_url, questions)
    served = [t["served_ms"] for t in turns]
    return {
        "run": "serve",
        "questions": len(questions),
        "served_latency_ms": {"median": _median(served), "max": max(served)},
        "end_of_turn_ms": {"median": _median([t["end_of_turn_ms"] for t in turns])},
        "cut_offs": sum(t["cut_offs"] for t in turns),
        "each_turn": turns,
    }


def _median(values: list[float]) -> float | None:
    return round(statistics.median(values), 1) if values else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", type=Path, default=ROOT / "tests" / "data", help="folder of question WAVs")
    parser.add_argument("--max-new-tokens", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS for chat and serve")
    parser.add_argument("--keep", type=Path, help="keep chat's sessions and recordings in this folder")
    args = parser.parse_args()

    questions = sorted(args.questions.glob("*.wav"))
    common = ["--max-new-tokens", str(args.max_new_tokens)]
    with sound_server_and_tiny_model(args.keep, "omni-served-") as (server, workdir, tiny):
        for round_ in range(args.rounds):
            load_before = os.getloadavg()
            runs = {}
            for name in ["chat", "serve"] if round_ % 2 == 0 else ["serve", "chat"]:
                if name == "chat":
                    runs["chat"] = run_session(server, tiny, questions, workdir, f"chat-{round_}", common, None, args.threads)
                else:
                    runs["serve"] = run_served(tiny, questions, args.max_new_tokens, args.threads)
            served, heard = runs["serve"]["served_latency_ms"]["median"], runs["chat"]["heard_latency_ms"]["median"]
            row = {
                "round": round_,
                "served_latency_ms": runs["serve"]["served_latency_ms"],
                "chat_heard_latency_ms": runs["chat"]["heard_latency_ms"],
                "served_minus_heard_ms": None if served is None or heard is None else round(served - heard, 1),
                "load_average": {"before": [round(x, 2) for x in load_before], "after": [round(x, 2) for x in os.getloadavg()]},
                "cpus": os.cpu_count(),
                "threads": args.threads,
                "max_new_tokens": args.max_new_tokens,
            }
            print(json.dumps({**row, "serve": runs["serve"], "chat": runs["chat"]}), flush=True)

if __name__ == "__main__":
    main()
