"""`omni finetune` on CUDA: stage 1 with --qlora and stage 2 for a few steps in bf16, each output
answering a question when loaded with `--model OUT/final`; the same under torchrun, and NCCL.

Rehearsed on a CPU, the steps run in fp32 (omni trains in bf16 only on CUDA) and the collective
probe uses gloo.
"""

from __future__ import annotations

import json
import math
import re
import socket
import sys
from pathlib import Path

import pytest
import torch

from gpu_rig import HERE, QUESTION, ROOT, RandomModel, RandomModels, Ran, Reply, Rig, gigabytes
from saved_tensors import saved_tensors

pytestmark = pytest.mark.slow  # each case trains and loads in subprocesses: tens of seconds on a CPU
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def train_precision(rig: Rig) -> str:
    """bf16 on CUDA, as issue 14 asks; omni refuses it on a CPU, where training runs in fp32."""
    return "bf16" if rig.device == "cuda" else "fp32"


def write_manifest(tmp_path: Path, units: bool) -> Path:
    """Three real spoken questions with short replies (and unit targets for stage 2)."""
    wavs = sorted((ROOT / "tests" / "data").glob("helpful_base_*.wav"))
    records = [{"id": w.stem, "speech": str(w), "response": reply} for w, reply in zip(wavs, ("Paris.", "Hello there!", "Eat well."))]
    if units:
        for i, record in enumerate(records):
            record["tgt_units"] = [i + 1, 7, 9, 7, 3]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def changed_weights(before: Path, after: Path) -> set[str]:
    """Names of the tensors training changed; the names themselves must be the released ones."""
    a, b = saved_tensors(before), saved_tensors(after)
    assert a.keys() == b.keys()
    return {k for k in a if not torch.equal(a[k], b[k])}


def answer_with(rig: Rig, model: RandomModel, final: Path, out_dir: Path) -> Reply:
    """The fine-tuned checkpoint loaded the users' way (--model OUT/final, default precision) answering a question."""
    ran = rig.omni("transcribe-and-reply", QUESTION, "--model", final, "--speech-encoder", model.speech_encoder,
                   "--vocoder", model.vocoder_dir, "--json", "--out", out_dir, "--device", rig.device, "--max-new-tokens", "16")
    assert ran.returncode == 0, ran.explain()
    (answer,) = ran.json_lines()
    return Reply(ran, answer, out_dir)


def finished_training(ran: Ran) -> dict[str, object]:
    """Check that a training command finished with a finite loss; what it cost, for the figures file."""
    assert ran.returncode == 0 and "fine-tuned model:" in ran.stdout, ran.explain()
    losses = re.findall(r"loss (\S+)", ran.stderr)  # the progress line's last state
    assert losses and math.isfinite(float(losses[-1])), ran.stderr[-2000:]
    peak = ran.figures.get("cuda_peak_allocated_bytes")
    return {"final_loss": float(losses[-1]), "command_wall_s": ran.figures.get("wall_s"),
            "cuda_peak_allocated_gb": gigabytes(peak)}


def test_qlora_stage1_trains_and_its_output_answers(rig: Rig, models: RandomModels, tmp_path: Path) -> None:
    tiny = models["tiny"]
    ran = rig.omni("finetune", "--stage", "1", "--qlora", "--lora-rank", "4", "--data", write_manifest(tmp_path, units=False),
                   "--output", tmp_path / "out", "--model", tiny.model_dir, "--speech-encoder", tiny.speech_encoder,
                   "--max-steps", "3", "--batch-size", "1", "--lr", "1e-4", "--save-every", "0",
                   "--precision", train_precision(rig), "--device", rig.device)
    figures = finished_training(ran)
    final = tmp_path / "out" / "final"
    changed = changed_weights(tiny.model_dir, final)
    llm = {k for k in changed if not k.startswith("model.speech_projector.")}
    # The adaptor learnt; in the LLM only the LoRA targets moved (adapters merged into the released names).
    assert llm != changed and llm and all(k.split(".")[-2] in LORA_TARGETS for k in llm), changed
    reply = answer_with(rig, tiny, final, tmp_path / "replies")
    reply.check_spoken()
    rig.record("finetune[stage1-qlora]", precision=train_precision(rig), changed_tensors=len(changed), **figures,
               reply=reply.figures())


def test_stage2_trains_and_its_output_answers(rig: Rig, models: RandomModels, tmp_path: Path) -> None:
    tiny = models["tiny"]
    ran = rig.omni("finetune", "--stage", "2", "--data", write_manifest(tmp_path, units=True), "--output", tmp_path / "out",
                   "--model", tiny.model_dir, "--speech-encoder", tiny.speech_encoder, "--max-steps", "3", "--batch-size", "1",
                   "--lr", "1e-3", "--save-every", "0", "--precision", train_precision(rig), "--device", rig.device)
    figures = finished_training(ran)
    final = tmp_path / "out" / "final"
    changed = changed_weights(tiny.model_dir, final)
    assert changed and all(k.startswith("speech_generator.") for k in changed), changed
    reply = answer_with(rig, tiny, final, tmp_path / "replies")
    reply.check_spoken()
    rig.record("finetune[stage2]", precision=train_precision(rig), changed_tensors=len(changed), **figures,
               reply=reply.figures())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(rig: Rig, *args: str | Path, timeout: float = 300) -> Ran:
    """`torchrun --nproc_per_node 1 ARGS` on this machine (python -m torch.distributed.run: the image may lack the script)."""
    return rig.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_addr", "127.0.0.1",
                    "--master_port", str(_free_port()), *map(str, args)], timeout)


def test_torchrun_one_process_finetunes_and_the_collective_backend_sums(rig: Rig, models: RandomModels, tmp_path: Path) -> None:
    """omni under torchrun, one process (it joins no process group at world size 1), then one all-reduce over
    NCCL (gloo when rehearsing) under torchrun: what a several-GPU run starts with."""
    tiny = models["tiny"]
    ran = torchrun(rig, HERE / "omni_probe.py", "finetune", "--stage", "2", "--data", write_manifest(tmp_path, units=True),
                   "--output", tmp_path / "out", "--model", tiny.model_dir, "--speech-encoder", tiny.speech_encoder,
                   "--max-steps", "1", "--batch-size", "1", "--lr", "1e-3",
                   "--precision", train_precision(rig), "--device", rig.device)
    figures = finished_training(ran)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["final", "train_log.jsonl"]

    backend = "nccl" if rig.device == "cuda" else "gloo"
    probe = torchrun(rig, HERE / "collective_probe.py", backend)
    assert probe.returncode == 0, probe.explain()
    (summed,) = probe.json_lines()
    assert (summed["backend"], summed["world_size"], summed["sum"]) == (backend, 1, summed["expected"]), summed
    rig.record("torchrun[nproc=1]", finetune=figures, collective=summed,
               collective_wall_s=probe.figures.get("wall_s"))
