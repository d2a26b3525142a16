"""Echo cancellation (WebRTC AEC3 from the livekit wheel) on a simulated room, as audio/echo.py runs it.

The far end (what the speaker plays) echoes into the microphone `--delays` ms later through a
room with two reflections, at 0 and -6 dB; both streams go through EchoCanceller in 30 ms steps,
far end first, as the audio callbacks would. One JSON line per (signal, delay, echo level):
- erle_db_by_time: echo return loss enhancement over 0-2 s, 2-5 s and from 5 s on (AEC3 adapts
  over the first seconds of a reply; a session keeps one canceller, so later replies start converged);
- converged_after_s: the first second from which every 1 s window is above 30 dB;
- for speech, when more than one question WAV is given: the user's level kept during double talk (dB, 0 = untouched);
- cpu_ms_per_10ms: both calls into the module (reference + microphone) per 10 ms, this machine.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "audio"))

from signals import RATE, level_db, room_echo  # noqa: E402

from omni_cli.audio.echo import EchoCanceller, EchoSettings  # noqa: E402
from omni_cli.audio.io import load_audio  # noqa: E402

STEP = 480  # the microphone's 30 ms frames


def run(far: np.ndarray, mic: np.ndarray, delay_ms: int) -> tuple[np.ndarray, float]:
    canceller = EchoCanceller(EchoSettings(delay_ms=delay_ms))
    out = np.zeros_like(mic)
    spent = 0.0
    for k in range(mic.size // STEP):
        part = slice(k * STEP, (k + 1) * STEP)
        started = time.perf_counter()
        canceller.play_reference(far[part])
        out[part] = canceller.process(mic[part])
        spent += time.perf_counter() - started
    return out, spent / (mic.size // 160) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", type=Path, default=ROOT / "tests" / "data", help="folder of spoken question WAVs")
    parser.add_argument("--delays", type=int, nargs="+", default=[30, 80, 150])
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--echo-db", type=float, nargs="+", default=[0.0, -6.0], help="echo levels relative to the played signal")
    args = parser.parse_args()
    speech = [load_audio(p) for p in sorted(args.questions.glob("*.wav"))]
    n = int(args.seconds * RATE)
    reply = np.resize(np.concatenate(speech), n).astype(np.float32)
    signals = {"white_noise": np.random.default_rng(0).normal(0, 0.1, n).astype(np.float32), "speech": reply}
    for name, far in signals.items():
        for delay in args.delays:
            for echo_db in args.echo_db:
                echo = room_echo(far, delay, echo_db)
                noise = np.random.default_rng(delay).normal(0, 3e-4, n).astype(np.float32)
                out, cpu = run(far, echo + noise, delay)
                per_s = [level_db(echo[i : i + RATE]) - level_db(out[i : i + RATE]) for i in range(0, n - RATE + 1, RATE)]
                converged = next((i for i in range(len(per_s)) if min(per_s[i:]) >= 30.0), None)
                spans = {"0-2s": slice(0, 2 * RATE), "2-5s": slice(2 * RATE, 5 * RATE), "5s-": slice(5 * RATE, n)}
                row = {
                    "signal": name,
                    "delay_ms": delay,
                    "echo_db": echo_db,
                    "erle_db_by_time": {k: round(level_db(echo[span]) - level_db(out[span]), 1) for k, span in spans.items()},
                    "converged_after_s": converged,
                    "cpu_ms_per_10ms": round(cpu, 3),
                }
                if name == "speech" and len(speech) > 1:
                    # The user (another question) speaks over the reply from the middle on.
                    user, onset = speech[0], n // 2
                    near = np.zeros(n, np.float32)
                    near[onset : onset + user.size] = user[: n - onset] * 10 ** (echo_db / 20)
                    talk = slice(onset, onset + min(user.size, n - onset))
                    mixed, _ = run(far, echo + near + noise, delay)
                    row["double_talk_user_level_db"] = round(level_db(mixed[talk]) - level_db(near[talk]), 1)
                print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
