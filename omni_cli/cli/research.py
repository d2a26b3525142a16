"""`omni data build` and `omni eval`: the paper's research loop — training data from text, and scores for a model."""

from __future__ import annotations

import hashlib
import json
import sys
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from omni_cli.cli.shared import (
    SAMPLING,
    STREAMING,
    ChunkUnitsOpt,
    DecodeSteps,
    DecodeStepsOpt,
    DeviceOpt,
    EncoderOpt,
    MaxNewTokensOpt,
    ModelOpt,
    Precision,
    PrecisionOpt,
    TemperatureOpt,
    ThreadsOpt,
    VocoderOpt,
    YesOpt,
    app,
    echo_err,
    fail,
    load_pipeline,
    streaming_config,
)
from omni_cli.config import StreamingConfig
from omni_cli.errors import OmniError

if TYPE_CHECKING:
    from omni_cli.data.build import BuildPlan
    from omni_cli.evaluate.asr import WhisperAsr
    from omni_cli.evaluate.mos import UtmosScorer
    from omni_cli.evaluate.run import EvalPlan

data_app = typer.Typer(help="Speech instruction data from text (the paper's InstructS2S recipe).", no_args_is_help=True)
app.add_typer(data_app, name="data")

EXIT_INTERRUPTED = 130
MAX_FAILURES_SHOWN = 20  # failed items listed on the terminal; eval.jsonl / failed.jsonl hold them all


class Engine(str, Enum):
    espeak = "espeak"
    piper = "piper"


class Responses(str, Enum):
    keep = "keep"
    write = "write"


def _floats(value: str, option: str) -> tuple[float, ...]:
    try:
        speeds = tuple(float(v) for v in value.split(",") if v.strip())
    except ValueError:
        fail(f"{option} takes numbers separated by commas, e.g. 0.85,1,1.15.")
    if not speeds or any(not 0.25 <= s <= 4 for s in speeds):
        fail(f"{option}: each speed must be between 0.25 and 4.")
    return speeds


def _names(value: str | None) -> tuple[str, ...] | None:
    return tuple(v.strip() for v in value.split(",") if v.strip()) if value else None


def _check_build_out(out: Path) -> None:
    """--out is new, empty, or an earlier build's folder (continued): never a folder of other files,
    and somewhere a folder can be made and written (not under a file, not /proc)."""
    from omni_cli.data.build import JOURNAL_NAME, MANIFEST_NAME
    from omni_cli.destinations import check_writable_folder

    try:
        check_writable_folder(out, "--out", "the data set (created if missing)")
    except OmniError as exc:
        fail(str(exc))
    if out.is_dir() and any(out.iterdir()) and not ((out / JOURNAL_NAME).is_file() or (out / MANIFEST_NAME).is_file()):
        fail(f"--out {out} holds other files; give a new or empty folder, or the folder of an earlier build to continue it.")


@data_app.command("build")
def data_build_cmd(
    source: Annotated[Path, typer.Argument(help="Text instructions: JSONL of {instruction, response?}, Alpaca JSON, ShareGPT or UltraChat (first turn).", metavar="INPUT")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the data set: train.jsonl, audio/, the journal and caches. Run again to continue.")],
    llm_url: Annotated[Optional[str], typer.Option("--llm-url", help="OpenAI-compatible base URL (ollama, vLLM, llama.cpp, omni serve, a hosted API), e.g. http://127.0.0.1:11434/v1. Key: $OMNI_LLM_API_KEY or $OPENAI_API_KEY.")] = None,
    llm_model: Annotated[Optional[str], typer.Option("--llm-model", help="The model name the endpoint serves.")] = None,
    rewrite: Annotated[bool, typer.Option("--rewrite/--no-rewrite", help="With --llm-url: rewrite each instruction as a user would say it.")] = True,
    responses: Annotated[Responses, typer.Option("--responses", help="keep: the input's replies, the LLM writes only missing ones; write: the LLM writes every reply for speech (the paper).")] = Responses.keep,
    prompts: Annotated[Optional[Path], typer.Option("--prompts", help="Folder whose system.txt / rewrite_instruction.txt / write_response.txt replace the built-in prompts.", file_okay=False)] = None,
    attempts: Annotated[int, typer.Option("--attempts", min=1, max=10, help="Answers asked for per LLM step before the item fails (each retry says what was wrong).")] = 3,
    llm_timeout: Annotated[float, typer.Option("--llm-timeout", min=1, help="Seconds to wait for one LLM answer (a slow local model needs more).")] = 120.0,
    tts: Annotated[Engine, typer.Option("--tts", help="Engine for the replies (one voice): espeak (offline) or piper (VITS; --piper-voice).")] = Engine.espeak,
    instruction_tts: Annotated[Engine, typer.Option("--instruction-tts", help="Engine for the instructions (several voices and speeds).")] = Engine.espeak,
    piper_voice: Annotated[str, typer.Option("--piper-voice", help="A Piper voice: a preset name (fetched and verified once), a preset .toml, or a .onnx file.")] = "en_US-ljspeech-high",
    instruction_voices: Annotated[Optional[str], typer.Option("--instruction-voices", help="Comma-separated voices for the instructions (espeak-ng names such as en-us+f3; Piper speaker names). Default: six espeak-ng English voices / every Piper speaker.")] = None,
    response_voice: Annotated[Optional[str], typer.Option("--response-voice", help="The replies' voice. Default: en-us (espeak) / the Piper voice's first speaker.")] = None,
    speeds: Annotated[str, typer.Option("--speeds", help="Speed factors for the instructions, comma-separated.")] = "0.85,1,1.15",
    hubert: Annotated[Optional[Path], typer.Option("--hubert", help="HuBERT directory for unit targets (stage 2), as for `omni units`.")] = None,
    kmeans: Annotated[Optional[Path], typer.Option("--kmeans", help="k-means centres for unit targets, as for `omni units`.")] = None,
    layer: Annotated[int, typer.Option("--layer", min=1, help="HuBERT layer whose features are clustered (reference: 11).")] = 11,
    device: DeviceOpt = None,
    limit: Annotated[Optional[int], typer.Option("--limit", min=1, help="Only the first N items of the input.")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Picks each item's voice and speed (the same on every run).")] = 0,
) -> None:
    """Make a speech instruction data set from text: spoken instructions, spoken replies, unit targets, train.jsonl.

    Each finished item is kept at once; Ctrl-C stops after the current item (twice: at once) and the
    same command continues. LLM answers are cached, so a rerun pays for none twice.

    Examples:\n
      omni data build questions.jsonl --out data/\n
      omni data build alpaca_data.json --out data/ --llm-url http://127.0.0.1:11434/v1 --llm-model llama3.1 --responses write --tts piper --limit 1000\n
      omni data build questions.jsonl --out data/ --hubert ./mhubert-hf --kmeans km1000.safetensors
    """
    if (llm_url is None) != (llm_model is None):
        fail("--llm-url and --llm-model go together: the endpoint and the model it serves.")
    if (hubert is None) != (kmeans is None):
        fail("--hubert and --kmeans go together (unit targets need both); `omni download llama-omni-8b --units` prints them.")
    if llm_url is None and responses is Responses.write:
        fail("--responses write needs --llm-url and --llm-model: the LLM writes the replies.")
    instruction_speeds = _floats(speeds, "--speeds")
    _check_build_out(out)
    from omni_cli.data.progress import ItemProgress

    try:
        plan = _build_plan(
            source, out, llm_url, llm_model, rewrite, responses is Responses.write, prompts, attempts, llm_timeout, tts.value,
            instruction_tts.value, piper_voice, _names(instruction_voices), response_voice, instruction_speeds,
            hubert, kmeans, layer, device, limit, seed,
        )
        from omni_cli.data.build import DataBuild

        with ItemProgress("building") as progress:
            summary = DataBuild(plan, on_item=progress.advance).run()
    except OmniError as exc:
        fail(str(exc), code=1)
    for line in summary.lines():
        typer.echo(line, err=True)
    if summary.interrupted:
        typer.echo("omni: interrupted; every finished item is kept. Run the same command again to continue.", err=True)
        raise typer.Exit(EXIT_INTERRUPTED)
    if summary.records:
        then = ", then --stage 2 from its final/" if summary.with_units == summary.records else ""
        typer.echo(f"wrote {summary.manifest}: train with `omni finetune --stage 1 --data {summary.manifest} ...`{then}")
    else:
        typer.echo("omni: no item could be built; the reasons are above" + (f" and in {out / 'failed.jsonl'}." if summary.failures else "."), err=True)
    raise typer.Exit(1 if summary.failures else 0)


def _build_plan(
    source: Path, out: Path, llm_url: str | None, llm_model: str | None, rewrite: bool, write_all: bool,
    prompts: Path | None, attempts: int, llm_timeout: float, tts: str, instruction_tts: str, piper_voice: str,
    instruction_voices: tuple[str, ...] | None, response_voice: str | None, speeds: tuple[float, ...],
    hubert: Path | None, kmeans: Path | None, layer: int, device: str | None, limit: int | None, seed: int,
) -> BuildPlan:
    """Options → a BuildPlan: the TTS engines (each voice tried once, so a wrong name fails now), the LLM writer, the units."""
    from omni_cli.data.build import LLM_CACHE_NAME, BuildPlan, Speaker
    from omni_cli.data.spoken_style import SpokenStyleWriter
    from omni_cli.data.tts import ESPEAK_INSTRUCTION_VOICES, ESPEAK_RESPONSE_VOICE, EspeakTts, PiperTts, Synthesizer, VoicePlan
    from omni_cli.llm_endpoint import AnswerCache, ChatEndpoint

    engines: dict[str, Synthesizer] = {}
    piper: PiperTts | None = None
    if "espeak" in (tts, instruction_tts):
        engines["espeak"] = EspeakTts()
    if "piper" in (tts, instruction_tts):
        from omni_cli.data.voices import piper_model_path

        engines["piper"] = piper = PiperTts(piper_model_path(piper_voice, echo=echo_err))

    def voices_of(engine: str, response: bool) -> tuple[str, ...]:
        if engine == "espeak":
            return (ESPEAK_RESPONSE_VOICE,) if response else ESPEAK_INSTRUCTION_VOICES
        assert piper is not None
        names = tuple(piper.voices())
        return names[:1] if response else names

    instruction_plan = VoicePlan(instruction_voices or voices_of(instruction_tts, False), speeds, seed)
    response_plan = VoicePlan((response_voice,) if response_voice else voices_of(tts, True), (1.0,), seed)
    for engine, plan in ((instruction_tts, instruction_plan), (tts, response_plan)):
        for voice in plan.voices:  # a mistyped voice is one line now, not a failure on every item
            engines[engine].speak("ok", voice, 1.0)
    writer = None
    if llm_url is not None and llm_model is not None:
        # Sampled, with the build's seed: the same input and seed ask the same questions (and hit the cache).
        endpoint = ChatEndpoint(llm_url, llm_model, AnswerCache(out / LLM_CACHE_NAME), temperature=0.7, seed=seed, timeout_s=llm_timeout)
        writer = SpokenStyleWriter(endpoint.complete, prompts, attempts)
    units = None
    if hubert is not None and kmeans is not None:
        from omni_cli.train.units import UnitExtractor, load_kmeans_centres

        units = UnitExtractor(hubert, load_kmeans_centres(kmeans), layer=layer, device=device)
    return BuildPlan(
        source=source, out=out,
        instructions=Speaker(engines[instruction_tts], instruction_plan),
        responses=Speaker(engines[tts], response_plan),
        writer=writer, rewrite=rewrite, write_all_responses=write_all, units=units, limit=limit,
    )


@app.command("eval")
def eval_cmd(
    manifest: Annotated[Optional[Path], typer.Argument(help="Spoken instructions: a manifest with id and speech per record (`omni data build` writes one).", metavar="MANIFEST")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Folder for eval.jsonl (one line per item) and replies/ (the speech replies). Run again to continue.")] = None,
    model: Annotated[Optional[Path], typer.Option("--model", "-m", help="LLaMA-Omni checkpoint directory or preset, as for transcribe-and-reply.")] = None,
    speech_encoder: EncoderOpt = None,
    vocoder: VocoderOpt = None,
    asr: Annotated[Optional[Path], typer.Option("--asr", help="Whisper (transformers directory) that transcribes the speech replies. Default: the model's speech encoder, when it holds the decoder and tokenizer.")] = None,
    judge_url: Annotated[Optional[str], typer.Option("--judge-url", help="OpenAI-compatible base URL of the judge LLM (key: $OMNI_LLM_API_KEY or $OPENAI_API_KEY).")] = None,
    judge_model: Annotated[Optional[str], typer.Option("--judge-model", help="The judge model's name (the paper: GPT-4o).")] = None,
    judge_prompts: Annotated[Optional[Path], typer.Option("--judge-prompts", help="Folder whose judge_system.txt / judge_content.txt / judge_style.txt replace the built-in prompts.", file_okay=False)] = None,
    judge_timeout: Annotated[float, typer.Option("--judge-timeout", min=1, help="Seconds to wait for one judge answer.")] = 120.0,
    mos: Annotated[bool, typer.Option("--mos/--no-mos", help="UTMOS of the speech replies, when utmos-pytorch and its weights are available.")] = True,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary (or the comparison) as one JSON object.")] = False,
    compare: Annotated[Optional[tuple[Path, Path]], typer.Option("--compare", help="Show two runs' eval.jsonl side by side (before and after a fine-tune), with the items that changed most.", metavar="A.jsonl B.jsonl")] = None,
    limit: Annotated[Optional[int], typer.Option("--limit", min=1, help="Only the first N items.")] = None,
    precision: PrecisionOpt = Precision.auto,
    device: DeviceOpt = None,
    max_new_tokens: MaxNewTokensOpt = SAMPLING.max_new_tokens,
    temperature: TemperatureOpt = SAMPLING.temperature,
    chunk_units: ChunkUnitsOpt = STREAMING.chunk_units,
    first_chunk_units: Annotated[Optional[int], typer.Option(min=1, help="Smaller first chunk for earlier first sound.")] = STREAMING.first_chunk_units,
    decode_steps: DecodeStepsOpt = DecodeSteps(STREAMING.decode_steps),
    threads: ThreadsOpt = None,
    yes: YesOpt = False,
) -> None:
    """Score a model as the paper did: reply text and speech, ASR-WER/CER of the speech against the text, latency, judge scores.

    Each item's results go to OUT/eval.jsonl as they come; Ctrl-C keeps them and the same command continues.

    Examples:\n
      omni eval data/train.jsonl --out eval/base --model llama-omni-8b\n
      omni eval data/train.jsonl --out eval/tuned --model runs/s2/final --speech-encoder ./whisper-large-v3 --vocoder ./vocoder --judge-url http://127.0.0.1:11434/v1 --judge-model llama3.1\n
      omni eval --compare eval/base/eval.jsonl eval/tuned/eval.jsonl
    """
    from rich.console import Console

    from omni_cli.evaluate import report

    if compare is not None:
        if manifest is not None:
            fail("--compare takes two eval.jsonl files and no MANIFEST.")
        try:
            result = report.compare(report.load_results(compare[0]), report.load_results(compare[1]))
        except OmniError as exc:
            fail(str(exc))
        if as_json:
            typer.echo(report.as_json(result))
        else:
            report.print_comparison(result, str(compare[0]), str(compare[1]), Console())
        return
    if manifest is None or out is None or model is None:
        fail("give MANIFEST, --out and --model (or --compare A.jsonl B.jsonl).")
    if (judge_url is None) != (judge_model is None):
        fail("--judge-url and --judge-model go together: the endpoint and the model it serves.")
    from omni_cli.destinations import check_writable_folder

    try:  # before the model loads: a file, a path under a file or /proc is one line, not a traceback later
        check_writable_folder(out, "--out", "the results (created if missing)")
    except OmniError as exc:
        fail(str(exc))
    from omni_cli.evaluate.run import OtherRun

    try:
        plan = _eval_plan(
            manifest, out, model, speech_encoder, vocoder, asr, judge_url, judge_model, judge_prompts, judge_timeout, mos, limit,
            streaming_config(max_new_tokens, temperature, chunk_units, first_chunk_units, decode_steps.value),
            precision.value, device, yes, threads,
        )
        from transformers.utils import logging as transformers_logging

        from omni_cli.data.progress import ItemProgress
        from omni_cli.evaluate.run import Evaluation

        transformers_logging.disable_progress_bar()  # its loading bars would tear through ours

        evaluation = Evaluation(plan)
        with ItemProgress("evaluating") as progress:
            evaluation.on_item = progress.advance
            rows = evaluation.run()
    except OtherRun as exc:
        fail(str(exc))
    except OmniError as exc:
        fail(str(exc), code=1)
    except KeyboardInterrupt:
        echo_err(f"omni: interrupted; every finished result is kept in {out}. Run the same command again to continue.")
        raise typer.Exit(EXIT_INTERRUPTED) from None
    for note in plan.notes:
        echo_err(f"omni: note: {note}")
    summary = report.summarize(rows)
    if as_json:
        typer.echo(report.as_json(summary))
    else:
        Console().print(report.summary_table(summary, f"omni eval: {manifest} → {out}"))
        echo_err(f"per item: {evaluation.path}; WER/CER normaliser: {summary['normaliser']}")
    # Which items failed and why, on the terminal (as `data build` says it), not only in eval.jsonl.
    failed = [row for row in rows if "error" in row]
    for row in failed[:MAX_FAILURES_SHOWN]:
        echo_err(f"failed: {row['id']}: {row['error']}")
    if len(failed) > MAX_FAILURES_SHOWN:
        echo_err(f"failed: ... and {len(failed) - MAX_FAILURES_SHOWN} more (all in {evaluation.path})")
    raise typer.Exit(1 if summary["failed"] else 0)


def _eval_plan(
    manifest: Path, out: Path, model: Path, speech_encoder: Path | None, vocoder: Path | None, asr: Path | None,
    judge_url: str | None, judge_model: str | None, judge_prompts: Path | None, judge_timeout: float, mos: bool, limit: int | None,
    streaming: StreamingConfig, precision: str, device: str | None, yes: bool, threads: int | None,
) -> EvalPlan:
    """Options → an EvalPlan whose model, Whisper and UTMOS load only when their phase has work."""
    from omni_cli.evaluate.run import EvalPlan, path_identity
    from omni_cli.llm_endpoint import AnswerCache, ChatEndpoint
    from omni_cli.setup.prepare import prepare_model_files

    confirm = (lambda question: typer.confirm(question, default=False)) if sys.stdin.isatty() else None
    files = prepare_model_files(model, speech_encoder, vocoder, precision, device, assume_yes=yes, confirm=confirm, echo=echo_err)
    asr_dir = None
    if files.vocoder_dir is not None:
        from omni_cli.evaluate.asr import choose_asr

        asr_dir = choose_asr(files.speech_encoder, asr)  # checked before any reply is made

    def load_asr() -> WhisperAsr:
        from omni_cli.evaluate.asr import WhisperAsr

        assert asr_dir is not None
        return WhisperAsr(asr_dir, device)

    def load_mos() -> UtmosScorer:
        from omni_cli.evaluate.mos import UtmosScorer

        return UtmosScorer(device)

    judge = None
    if judge_url is not None and judge_model is not None:
        from omni_cli.evaluate.judge import Judge

        endpoint = ChatEndpoint(
            judge_url, judge_model, AnswerCache(out / "judge-cache.jsonl"), temperature=0.0, max_tokens=16, timeout_s=judge_timeout, options="--judge"
        )
        judge = Judge(endpoint.complete, judge_prompts)
    prompts = json.dumps([judge.system, judge.templates], sort_keys=True) if judge is not None else ""
    # What makes the rows: a rerun with other weights, sampling, judge or manifest must not continue them.
    identity = {
        "manifest": str(manifest.expanduser().resolve()),
        "model": path_identity(files.model_dir),
        "speech_encoder": path_identity(files.speech_encoder),
        "vocoder": path_identity(files.vocoder_dir),
        "asr": path_identity(asr_dir),
        "sampling": {"max_new_tokens": streaming.sampling.max_new_tokens, "temperature": streaming.sampling.temperature},
        # The judge is its model and prompts, not its address (as for the answer cache): a moved server is the same judge.
        "judge": None if judge is None else {"model": judge_model, "prompts": hashlib.sha256(prompts.encode("utf-8")).hexdigest()[:16]},
    }
    return EvalPlan(
        manifest=manifest, out=out,
        load_pipeline=lambda: load_pipeline(model, speech_encoder, vocoder, precision, device, streaming, assume_yes=yes, threads=threads),
        load_asr=load_asr if asr_dir is not None else None, load_mos=load_mos if mos else None, judge=judge, limit=limit,
        identity=identity,
    )
