"""`omni finetune`, `omni units`, `omni convert-hubert` and `omni convert-kmeans`: training on your own data."""

from __future__ import annotations

import math
import os
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from omni_cli.cli.shared import (
    DeviceOpt,
    EncoderOpt,
    TrainPrecision,
    app,
    fail,
)
from omni_cli.config import REPORT_TO, FinetuneConfig
from omni_cli.errors import OmniError


def _positive_epochs(value: float) -> float:
    if not (value > 0 and math.isfinite(value)):
        raise typer.BadParameter("must be a number more than 0 (a fraction such as 0.5 trains on part of the data)")
    return value


def _positive_lr(value: Optional[float]) -> Optional[float]:
    if value is not None and not (value > 0 and math.isfinite(value)):
        raise typer.BadParameter("must be a number more than 0 (e.g. 2e-5)")
    return value


def _ratio(value: float) -> float:
    if not 0 <= value <= 1:  # also refuses nan, which passes a range check
        raise typer.BadParameter("must be between 0 and 1")
    return value


ReportTo = Enum("ReportTo", {r: r for r in REPORT_TO}, type=str)  # type: ignore[misc]


@app.command("finetune")
def finetune_cmd(
    ctx: typer.Context,
    stage: Annotated[Optional[int], typer.Option("--stage", min=1, max=2, help="1: speech → text (adaptor + LLM). 2: text hidden states → speech units (speech decoder only). Required unless --resume.")] = None,
    data: Annotated[Optional[Path], typer.Option("--data", help="Training manifest: the reference JSON list or JSONL (id, speech, conversations or messages, tgt_units). Required unless --resume.")] = None,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Directory for the resume points checkpoint-N/, the loss log train_log.jsonl and the fine-tuned model OUTPUT/final. Required unless --resume.")] = None,
    model: Annotated[Optional[Path], typer.Option("--model", "-m", help="LLaMA-Omni checkpoint directory to start from (with --resume: only to name a base model that moved).")] = None,
    speech_encoder: EncoderOpt = None,
    epochs: Annotated[float, typer.Option(callback=_positive_epochs, help="Passes over the data (paper: 3); more than 0.")] = FinetuneConfig.epochs,
    max_steps: Annotated[Optional[int], typer.Option("--max-steps", min=1, help="Stop after this many optimizer steps (overrides --epochs).")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="The global batch: samples per optimizer step over all processes together (paper: 32).")] = FinetuneConfig.batch_size,
    micro_batch_size: Annotated[int, typer.Option("--micro-batch-size", min=1, help="At most this many samples per process in one forward pass; the rest of the batch is gradient accumulation. Memory only: the update is the same (lower it if memory runs out; may change on --resume).")] = FinetuneConfig.micro_batch_size,
    lr: Annotated[Optional[float], typer.Option("--lr", callback=_positive_lr, help="Peak learning rate (default: paper's 2e-5 stage 1, 2e-4 stage 2).")] = None,
    warmup_ratio: Annotated[float, typer.Option("--warmup-ratio", callback=_ratio, help="Linear warm-up share of the steps (0 to 1), then cosine decay.")] = FinetuneConfig.warmup_ratio,
    save_every: Annotated[int, typer.Option("--save-every", min=0, help="Write a resume point every N steps (0: only at Ctrl-C).")] = FinetuneConfig.save_every,
    keep_checkpoints: Annotated[int, typer.Option("--keep-checkpoints", min=0, help="Resume points kept in OUTPUT, the newest (0: all).")] = FinetuneConfig.keep_checkpoints,
    seed: Annotated[int, typer.Option(help="Random seed (data order).")] = FinetuneConfig.seed,
    precision: Annotated[TrainPrecision, typer.Option("--precision", help="auto = bf16 (fp16 without bf16 support) mixed precision on CUDA, fp32 on CPU.")] = TrainPrecision(FinetuneConfig.precision),
    device: DeviceOpt = None,
    resume: Annotated[Optional[Path], typer.Option("--resume", help="Continue a run from a checkpoint-N directory (or the --output of an earlier run: its newest), with the run's own settings.")] = None,
    export_only: Annotated[bool, typer.Option("--export-only", help="With --resume: write OUTPUT/final, the model of that checkpoint, and train nothing (to try an intermediate checkpoint).")] = False,
    lora: Annotated[bool, typer.Option("--lora", help="Stage 1: train LoRA adapters on the LLM instead of all its weights (needs peft).")] = False,
    qlora: Annotated[bool, typer.Option("--qlora", help="Stage 1: LoRA (implies --lora) with the LLM kept in 4 bit (bitsandbytes, CUDA).")] = False,
    lora_rank: Annotated[int, typer.Option("--lora-rank", min=1, help="Rank of each LoRA adapter (alpha = 2 × rank).")] = FinetuneConfig.lora_rank,
    fsdp: Annotated[bool, typer.Option("--fsdp", help="Stage 1 full fine-tuning sharded over the torchrun processes (FSDP2) instead of DDP.")] = False,
    num_workers: Annotated[int, typer.Option("--num-workers", min=0, help="Data-loader worker processes.")] = FinetuneConfig.num_workers,
    report_to: Annotated[ReportTo, typer.Option("--report-to", help="Also write the loss log as TensorBoard events to OUTPUT/tensorboard (needs the tensorboard package).")] = ReportTo(FinetuneConfig.report_to),
    log_every: Annotated[int, typer.Option("--log-every", min=1, help="When stderr is not a terminal (a log file): a plain progress line every N steps.")] = 10,
) -> None:
    """Fine-tune on your own data: stage 1 (speech → text) or stage 2 (speech decoder).

    Every record is validated before the first step. Each step's loss, learning rate, gradient norm and speed go to OUTPUT/train_log.jsonl. Ctrl-C stops after the current step with a resume point (twice: at once, unsaved); --resume continues the run with its own settings. Several GPUs: torchrun --nproc_per_node N -m omni_cli.cli finetune ...\n
    Examples:\n
      omni finetune --stage 1 --data train.jsonl --model ./Llama-3.1-8B-Omni --speech-encoder ./whisper-large-v3 --output runs/s1\n
      omni finetune --resume runs/s1
    """
    from omni_cli.train.options import TrainingFailed, check_run
    from omni_cli.train.run_settings import run_config

    quiet = int(os.environ.get("RANK", "0")) != 0
    values = dict(
        stage=stage, data=data, output=output, model=model, speech_encoder=speech_encoder, epochs=epochs,
        max_steps=max_steps, batch_size=batch_size, micro_batch_size=micro_batch_size, lr=lr,
        warmup_ratio=warmup_ratio, save_every=save_every, keep_checkpoints=keep_checkpoints, seed=seed, precision=precision.value,
        device=device, resume=resume, export_only=export_only, lora=lora, qlora=qlora, lora_rank=lora_rank,
        lora_alpha=2 * lora_rank, fsdp=fsdp, num_workers=num_workers, report_to=report_to.value,
    )
    # What the command line said, apart from the defaults: a resume refuses only those that contradict its run.
    # (typer vendors click: its ParameterSource is matched by name.)
    given = {name for name in values if name in ctx.params and getattr(ctx.get_parameter_source(name), "name", "DEFAULT") != "DEFAULT"}
    try:
        cfg, saved = run_config(values, given)  # a resume's settings, read without torch
        check_run(cfg, saved)
    except OmniError as exc:
        fail(str(exc))
    from omni_cli.train.progress import TrainProgress
    from omni_cli.train.trainer import finetune

    try:
        with TrainProgress(cfg.stage, quiet, every=log_every) as progress:
            plan_line = (lambda plan: f"omni: exporting the model of step {plan.start_step}") if cfg.export_only else (lambda plan: f"omni: {plan.describe()}")
            result = finetune(cfg, on_log=progress.show, on_start=lambda plan: progress.note(plan_line(plan)))
    except TrainingFailed as exc:
        fail(str(exc), code=1)
    except OmniError as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        fail("interrupted before training started; nothing was written.", code=130)
    if quiet:
        raise typer.Exit(130 if result.interrupted else 0)
    resume_hint = f"resume with --resume {result.last_checkpoint}" if result.last_checkpoint else "nothing to resume from: start again"
    if result.unsaved:
        last = f"the last checkpoint is {result.last_checkpoint}: {resume_hint}" if result.last_checkpoint else resume_hint
        fail(f"stopped at once by a second Ctrl-C: {result.unsaved} was not saved; {last}.", code=130)
    if result.interrupted:
        typer.echo(f"interrupted at step {result.steps}; {resume_hint}", err=True)
        raise typer.Exit(130)
    typer.echo(f"fine-tuned model: {result.output_dir} (load it with --model {result.output_dir})")


@app.command("units")
def units_cmd(
    source: Annotated[Path, typer.Argument(help="A directory of response WAVs, or a manifest whose records name their response speech (tgt_speech).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Where to write the labelled JSONL (or JSON, for a JSON manifest).")],
    hubert: Annotated[Path, typer.Option("--hubert", help="mHuBERT as a transformers directory (config.json + safetensors): `omni convert-hubert` or `omni download --units` makes it.")],
    kmeans: Annotated[Path, typer.Option("--kmeans", help="k-means centres as safetensors or .npy (convert the released pickle once with `omni convert-kmeans`).")],
    layer: Annotated[int, typer.Option("--layer", min=1, help="HuBERT layer whose features are clustered (reference: 11).")] = 11,
    device: DeviceOpt = None,
    force: Annotated[bool, typer.Option("--force", help="Replace --out if it exists (even when it is the manifest itself).")] = False,
) -> None:
    """Make stage-2 unit targets from response speech: HuBERT layer features → nearest k-means centre, repeats merged."""
    from omni_cli.destinations import check_new_file

    try:
        # Before torch: a missing source or a bad --out is one line at once, and never costs a file.
        if not source.exists():
            fail(f"{source} not found; give a folder of response WAVs or a manifest naming them (tgt_speech).")
        check_new_file(out, f"--out {out}", sources=[source], force=force)
        from omni_cli.train.units import UnitExtractor, label_units, load_kmeans_centres

        extractor = UnitExtractor(hubert, load_kmeans_centres(kmeans), layer=layer, device=device)
        count = label_units(source, out, extractor, on_item=lambda i, n, path: typer.echo(f"[{i}/{n}] {path}", err=True))
    except OmniError as exc:
        fail(str(exc))
    typer.echo(f"wrote units for {count} items to {out}")


@app.command("convert-kmeans")
def convert_kmeans_cmd(
    src: Annotated[Path, typer.Argument(help="The released k-means file (scikit-learn MiniBatchKMeans saved by joblib or pickle, e.g. mhubert_base_vp_en_es_fr_it3_L11_km1000.bin).")],
    dst: Annotated[Path, typer.Argument(help="Where to write the centres (safetensors); a new file, unless --force.")],
    force: Annotated[bool, typer.Option("--force", help="Replace DST if it exists.")] = False,
) -> None:
    """Convert the released k-means file ONCE into safetensors holding only its centres.

    The file is read by a restricted unpickler that builds nothing but numpy arrays and a stand-in for scikit-learn's MiniBatchKMeans (no scikit-learn needed); a file naming any other class or function is refused, so it cannot run code.

    Example:\n
      omni convert-kmeans mhubert_base_vp_en_es_fr_it3_L11_km1000.bin km1000.safetensors
    """
    from omni_cli.destinations import check_input_file, check_new_file

    try:
        # Before torch: a missing source or a destination that would replace a file is one line at once.
        check_input_file(src, "k-means file", "download it (`omni download llama-omni-8b --units`)")
        check_new_file(dst, f"the destination {dst}", sources=[src], force=force)
        from omni_cli.train.units import convert_kmeans

        convert_kmeans(src, dst)
    except OmniError as exc:
        fail(str(exc))
    typer.echo(f"wrote {dst}; pass it as --kmeans")


@app.command("convert-hubert")
def convert_hubert_cmd(
    src: Annotated[Path, typer.Argument(help="The fairseq HuBERT checkpoint, e.g. mhubert_base_vp_en_es_fr_it3.pt.")],
    dst: Annotated[Path, typer.Argument(help="A new (or empty) directory for the transformers HubertModel (config.json + model.safetensors).")],
) -> None:
    """Convert a fairseq HuBERT checkpoint ONCE into a transformers HubertModel directory for `omni units --hubert`.

    Read with torch.load(weights_only=True); the config objects such checkpoints hold (argparse.Namespace, omegaconf and fairseq config classes) are read as inert data, anything else is refused. No fairseq needed.

    Example:\n
      omni convert-hubert mhubert_base_vp_en_es_fr_it3.pt ./mhubert-hf
    """
    from omni_cli.destinations import check_input_file, check_new_folder

    try:
        # Before torch: a missing source or an unusable destination is one line at once.
        check_input_file(src, "HuBERT checkpoint", "download it (`omni download llama-omni-8b --units`)")
        check_new_folder(dst, f"the destination {dst}")
        from omni_cli.train.hubert import convert_hubert

        convert_hubert(src, dst)
    except OmniError as exc:
        fail(str(exc))
    typer.echo(f"wrote {dst}; pass it as --hubert")


