"""What the GPU suite (tests/gpu) is made of: the device, the models it answers with, the `omni` runs.

By default the suite runs on CUDA and is skipped, with the reason, where no CUDA GPU is
visible. `OMNI_TEST_DEVICE=cpu` rehearses it on the CPU: the same commands and checks, with
what a CPU cannot do left out (bf16 training becomes fp32, NCCL becomes gloo, memory ordering
is only checked on CUDA) and quantization let through by omni_probe.py. Each case writes its figures as one JSON line to $OUT/gpu_suite.jsonl when
OUT is set, so a device run brings them back.

Commands run as real subprocesses (tests/gpu/omni_probe.py = `omni` plus its peak memory), so
every case pays the start of a Python process with torch: the suite is sized for one device
call of a few minutes (see benchmarks/README.md).
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import torch
from process_group import run_to_end

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
QUESTION = ROOT / "tests" / "data" / "helpful_base_1.wav"
DEVICE = os.environ.get("OMNI_TEST_DEVICE", "cuda")
CUDA = DEVICE == "cuda"
NO_CUDA_REASON = "no CUDA GPU visible; OMNI_TEST_DEVICE=cpu rehearses this suite on the CPU"
# A reply long enough to give units and several vocoder chunks, short enough for the budget.
REPLY_TOKENS = 24

# The mid-size random model: the released layout at widths where CUDA kernels and bitsandbytes
# do real work (an LLM of ~0.4 B parameters, a Whisper-large-wide encoder), written in seconds.
# The rehearsal keeps every part but shrinks it to what 2 CPU cores answer with in seconds.
MID_SIZES = {
    "cuda": {"hidden": 2048, "layers": 8, "heads": 16, "kv_heads": 8, "ffn": 5632, "encoder": 1280,
             "encoder_layers": 4, "encoder_heads": 20, "adaptor": 2048, "released_vocoder": True},
    "cpu": {"hidden": 256, "layers": 2, "heads": 4, "kv_heads": 2, "ffn": 704, "encoder": 128,
            "encoder_layers": 2, "encoder_heads": 4, "adaptor": 256, "released_vocoder": False},
}


@dataclass
class Ran:
    """One finished command: exit status, output, and the probe's figures (wall time, peak memory)."""

    argv: list[str]
    returncode: int
    stdout: str
    stderr: str
    figures: dict[str, Any]

    def json_lines(self) -> list[dict[str, Any]]:
        """The objects `--json` printed, one a line."""
        return [json.loads(line) for line in self.stdout.splitlines() if line.startswith("{")]

    def explain(self) -> str:
        """What to show when the run failed."""
        return f"{' '.join(self.argv)} → exit {self.returncode}\n{self.stderr[-3000:]}"


@dataclass
class Rig:
    """Where the suite runs and where its figures go."""

    device: str
    workdir: Path
    out: Path | None

    @property
    def device_name(self) -> str:
        """The GPU's name, or the CPU's when rehearsing."""
        if self.device == "cuda":
            return torch.cuda.get_device_name()
        return platform.processor() or platform.machine() or "cpu"

    def env(self, **extra: str) -> dict[str, str]:
        """The environment of a subprocess: offline, the repository importable, rehearsal switches."""
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", **extra)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
        if self.device == "cpu":
            env["OMNI_PROBE_CPU_QUANT"] = "1"
            env.setdefault("OMP_NUM_THREADS", "2")
        return env

    def run(self, argv: list[str], timeout: float = 400) -> Ran:
        """Run a command here and wait for it; the probe's figures if it wrote them, else the wall time."""
        figures_file = self.workdir / f"probe-{time.monotonic_ns()}.json"
        start = time.perf_counter()
        done = run_to_end(argv, timeout, cwd=ROOT, env=self.env(OMNI_PROBE_OUT=str(figures_file)))
        wall = {"wall_s": round(time.perf_counter() - start, 2)}
        figures = json.loads(figures_file.read_text()) if figures_file.is_file() else wall
        return Ran(argv, done.returncode, done.stdout, done.stderr, figures)

    def omni(self, *args: str | Path, timeout: float = 400) -> Ran:
        """Run `omni ARGS` (through omni_probe.py) and wait for it."""
        return self.run([sys.executable, str(HERE / "omni_probe.py"), *map(str, args)], timeout)

    def record(self, case: str, **figures: Any) -> None:
        """Append one case's figures to $OUT/gpu_suite.jsonl when OUT is set."""
        row = {"case": case, "device": self.device_name, **figures}
        if self.out is not None:
            with (self.out / "gpu_suite.jsonl").open("a") as f:
                f.write(json.dumps(row) + "\n")


@dataclass(frozen=True)
class RandomModel:
    """A random model in the released layout: pass as --model, --speech-encoder, --vocoder."""

    model_dir: Path
    speech_encoder: Path
    vocoder_dir: Path
    # Greedy replies unless the weights need sampling to say more than one unit.
    temperature: float = 0.0

    def options(self) -> list[str]:
        """The command-line options that name it."""
        return ["--model", str(self.model_dir), "--speech-encoder", str(self.speech_encoder), "--vocoder", str(self.vocoder_dir)]


def write_mid_model(root: Path, sizes: dict[str, Any]) -> RandomModel:
    """The mid-size model, written by benchmarks/memory.py's full-size writer at the sizes given."""
    spec_file = ROOT / "benchmarks" / "memory.py"
    spec = importlib.util.spec_from_file_location("omni_memory_benchmark", spec_file)
    assert spec is not None and spec.loader is not None
    memory = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = memory  # its dataclasses look their module up
    spec.loader.exec_module(memory)
    from omni_cli.weights.presets import get_preset

    s = sizes
    omni = {"hidden_size": s["hidden"], "num_hidden_layers": s["layers"], "num_attention_heads": s["heads"],
            "num_key_value_heads": s["kv_heads"], "intermediate_size": s["ffn"], "speech_encoder_hidden_size": s["encoder"],
            "ctc_decoder_config": f"(2,{s['hidden']},{s['heads']},{s['ffn']})"}
    whisper = {"num_mel_bins": 128, "d_model": s["encoder"], "encoder_layers": s["encoder_layers"],
               "encoder_attention_heads": s["encoder_heads"], "encoder_ffn_dim": 4 * s["encoder"], "max_source_positions": 1500}
    vocoder = dict(get_preset(memory.FULL_PRESET).vocoder.config) if s["released_vocoder"] else {}
    paths = memory.write_full_model(memory.FullSpec(omni, s["adaptor"], whisper, vocoder), root, seed=0)
    # memory.py's N(0, 0.02) weights make greedy decoding repeat one token, whose frames collapse into one unit.
    return RandomModel(paths.model_dir, paths.speech_encoder, paths.vocoder_dir, temperature=1.0)


class RandomModels:
    """"tiny" (omni_cli/tiny, the CI model) and "mid" (see MID_SIZES, written on first use)."""

    def __init__(self, rig: Rig, tiny: RandomModel, root: Path) -> None:
        self.rig = rig
        self.root = root
        self._models = {"tiny": tiny}

    def __getitem__(self, name: str) -> RandomModel:
        if name == "mid" and name not in self._models:
            start = time.perf_counter()
            sizes = MID_SIZES[self.rig.device]
            mid = write_mid_model(self.root, sizes)
            checkpoint = sum(f.stat().st_size for f in mid.model_dir.glob("*.safetensors"))
            self.rig.record("mid_model_written", write_s=round(time.perf_counter() - start, 1),
                            checkpoint_gb=gigabytes(checkpoint), **sizes)
            self._models[name] = mid
        return self._models[name]


@dataclass
class Reply:
    """One answered question: the command's run and its one JSON object."""

    ran: Ran
    answer: dict[str, Any]
    out_dir: Path

    def check_spoken(self) -> None:
        """One reply with text tokens, units, and a WAV of finite, audible samples as long as reported."""
        answer = self.answer
        assert answer["tokens"] >= 1 and answer["units"], answer
        assert "omni: warning" not in self.ran.stderr and "omni: error" not in self.ran.stderr, self.ran.stderr
        audio, rate = sf.read(answer["wav"], dtype="float32")
        assert Path(answer["wav"]).parent == self.out_dir and rate == 16000
        assert np.isfinite(audio).all() and np.abs(audio).max() > 0
        assert abs(len(audio) / rate - answer["audio_seconds"]) <= 1e-3, (len(audio) / rate, answer["audio_seconds"])

    def figures(self) -> dict[str, Any]:
        """Timings, sizes and peak memory of this reply, for the figures file."""
        a, f = self.answer, self.ran.figures
        return {"tokens": a.get("tokens"), "units": len(a.get("units") or []), "audio_s": a.get("audio_seconds"),
                "first_text_ms": a.get("first_text_ms"), "first_audio_ms": a.get("first_audio_ms"),
                "reply_ms": a.get("total_ms"), "command_wall_s": f.get("wall_s"),
                "cuda_peak_allocated_gb": gigabytes(f.get("cuda_peak_allocated_bytes")),
                "cuda_peak_reserved_gb": gigabytes(f.get("cuda_peak_reserved_bytes")), "peak_rss_gb": gigabytes(f.get("peak_rss_bytes"))}


def gigabytes(value: int | None) -> float | None:
    """Bytes as decimal GB, rounded for the figures file."""
    return None if value is None else round(value / 1e9, 3)


class Replies:
    """`omni transcribe-and-reply --json --out` per (model, precision, decode steps), each run once per session."""

    def __init__(self, rig: Rig, models: RandomModels) -> None:
        self.rig = rig
        self.models = models
        self._done: dict[tuple[str, str, str], tuple[Ran, Path]] = {}

    def get(self, model: str, precision: str, steps: str = "eager") -> Reply:
        """The reply (REPLY_TOKENS at most) of `model` at `precision` with `--decode-steps steps`.

        A failed command fails every test that needs it, with its error, without running again.
        """
        key = (model, precision, steps)
        if key not in self._done:
            out_dir = self.rig.workdir / f"reply-{model}-{precision}-{steps}"
            ran = self.rig.omni("transcribe-and-reply", QUESTION, *self.models[model].options(), "--json", "--out", out_dir,
                                "--precision", precision, "--device", self.rig.device, "--decode-steps", steps,
                                "--max-new-tokens", str(REPLY_TOKENS), "--chunk-units", "10",
                                "--temperature", str(self.models[model].temperature))
            self._done[key] = (ran, out_dir)
        ran, out_dir = self._done[key]
        assert ran.returncode == 0, ran.explain()
        answers = ran.json_lines()
        assert len(answers) == 1 and "error" not in answers[0], ran.stdout
        return Reply(ran, answers[0], out_dir)
