"""Ctrl-C landing at any point of an optimizer step: the checkpoint holds exactly the step it is named after,
and resuming from it ends bit-identical to training straight through."""

from __future__ import annotations

import json
import shutil
import signal
import sys
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np
import pytest
import soundfile as sf
import torch

from omni_cli.train.trainer_state import load_trainer_state
from omni_cli.train.trainer import FinetuneConfig, Run, finetune
from saved_tensors import saved_tensors

# The code a step runs through, between one step counter increment and the next.
STEP_CODE = {f.__code__ for f in (Run.train, Run._optimizer_step, Run._report, Run._agreed_to_stop, Run.save_resume_point)}
RESUMED_KEYS = ("step", "optimizer", "scheduler", "scaler", "rng")


class SignalAtLine:
    """Traces the step code (`sys.settrace`) from the progress report of step `step` until its next step's
    counter increment, recording each line run, and sends SIGINT (as Ctrl-C does) right before the `at`-th.

    Tracing starts at the report, not before, and stops once the signal is sent: tracing slows
    every Python call, and the window is what matters.
    """

    def __init__(self, step: int, at: int | None = None) -> None:
        self.step, self.at = step, at
        self.lines: list[tuple[str, int]] = []

    def on_log(self, log: Any) -> None:
        if log.step != self.step:
            return
        frame = sys._getframe(1)
        while frame is not None:  # the frames already running: the report, the step loop
            if frame.f_code in STEP_CODE:
                frame.f_trace = self._line
            frame = frame.f_back
        sys.settrace(self._call)

    def _call(self, frame: FrameType, event: str, arg: Any) -> Any:
        return self._line if event == "call" and frame.f_code in STEP_CODE else None

    def _line(self, frame: FrameType, event: str, arg: Any) -> Any:
        if event != "line" or frame.f_locals["self"].step != self.step:
            return self._line
        if len(self.lines) == self.at:
            sys.settrace(None)
            signal.raise_signal(signal.SIGINT)
            return None
        self.lines.append((frame.f_code.co_name, frame.f_lineno))
        return self._line


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


@pytest.mark.slow  # ~30 tiny training runs, one per line a step runs through: ~15-30 s on 2 cores
def test_an_interrupt_at_every_point_of_a_step_resumes_bit_identically(tiny_model, tmp_path: Path) -> None:
    t = np.arange(8000) / 16000
    records = []
    for i, freq in enumerate((220, 330, 440)):
        sf.write(tmp_path / f"q{i}.wav", (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32), 16000)
        records.append({"id": f"q{i}", "speech": f"q{i}.wav", "response": "Hello!", "tgt_units": [i + 1, 7, 9]})
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in records))

    def cfg(out: str, **kw: Any) -> FinetuneConfig:
        # Two micro-batches a step, so the interrupt also lands between accumulation steps.
        return FinetuneConfig(stage=2, data=manifest, output=tmp_path / out, model=tiny_model.model_dir,
                              speech_encoder=tiny_model.speech_encoder, max_steps=2, batch_size=2, micro_batch_size=1,
                              lr=1e-2, seed=3, warmup_ratio=0.0, **kw)

    def traced(config: FinetuneConfig, hook: SignalAtLine):
        try:
            return finetune(config, on_log=hook.on_log)
        finally:
            sys.settrace(None)

    # Straight through, with the resume point of step 1 to compare against (step 2's: the first cut run's).
    straight = finetune(cfg("straight", save_every=1))
    point = tmp_path / "straight" / "checkpoint-1"
    reference = {1: (load_trainer_state(point), saved_tensors(point))}
    # Every line run from step 1's progress report to step 2's counter increment: save check, stop
    # check, data loading, each micro-step's forward and backward, clipping, optimizer, schedule, counter.
    recorder = SignalAtLine(step=1)
    traced(cfg("record", save_every=0), recorder)
    assert {name for name, _ in recorder.lines} == {"train", "_agreed_to_stop", "_optimizer_step"}
    assert len(recorder.lines) > 20

    resumed_from: dict[int, Path] = {}
    for at in range(len(recorder.lines)):
        out = f"cut-{at}"
        result = traced(cfg(out, save_every=0), SignalAtLine(step=1, at=at))
        where = recorder.lines[at]
        assert result.interrupted and result.unsaved is None, where
        # Stopped at the next step boundary: step 1 or 2, never a mix of the two.
        assert result.last_checkpoint == tmp_path / out / f"checkpoint-{result.steps}" and result.steps in (1, 2), where
        state, trained = load_trainer_state(result.last_checkpoint), saved_tensors(result.last_checkpoint)
        ref_state, ref_trained = reference.setdefault(result.steps, (state, trained))
        assert all(_same(state[k], ref_state[k]) for k in RESUMED_KEYS), where
        assert _same(trained, ref_trained), where
        if result.steps in resumed_from:
            shutil.rmtree(tmp_path / out)
        else:
            resumed_from[result.steps] = result.last_checkpoint
    assert sorted(resumed_from) == [1, 2]  # the interrupt landed on both sides of the step boundary

    final = saved_tensors(straight.output_dir)
    for point in resumed_from.values():  # step 1's resumes one step; step 2's (the last) only exports
        resumed = finetune(cfg(point.parent.name, resume=point))
        assert resumed.steps == 2
        assert _same(saved_tensors(resumed.output_dir), final), point
