"""Presets: the shipped files, and resolving a preset to local paths from a fake hub cache, offline."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from fake_hub_cache import FAKE_COMMIT, install_tiny_preset, write_snapshot, write_tree_listing
from typer.testing import CliRunner

from omni_cli.cli import app
from omni_cli.setup.download import DownloadError
from omni_cli.setup.prepare import prepare_model
from omni_cli.errors import ConfigError
from omni_cli.model.loading import load_omni
from omni_cli.model.vocoder_loading import load_vocoder
import omni_cli.setup.fit as fit
from omni_cli.weights.presets import (
    GB,
    PRESET_FOLDER,
    load_preset,
    find_preset,
    get_preset,
    looks_like_preset,
    preset_names,
    resolve_preset,
    vocoder_dir,
)

ROOT = Path(__file__).resolve().parents[1]
PRESET = "llama-omni-8b"


@pytest.fixture()
def caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    """Empty hub and omni caches for this test only (never the user's)."""
    hub, omni = tmp_path / "hub", tmp_path / "omni"
    hub.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("OMNI_CACHE", str(omni))
    return hub, omni


def test_models_folder_holds_the_same_presets_as_the_package() -> None:
    shipped = sorted((ROOT / "omni_cli" / PRESET_FOLDER).glob("*.toml"))
    assert [p.stem for p in shipped] == preset_names() == sorted(p.stem for p in (ROOT / "models").glob("*.toml"))
    for path in shipped:
        assert (ROOT / "models" / path.name).read_bytes() == path.read_bytes(), f"models/{path.name} differs from the package copy"


def test_llama_omni_preset_names_the_released_parts() -> None:
    preset = get_preset(PRESET)
    assert preset.model.repo_id == "ICTNLP/Llama-3.1-8B-Omni"
    assert preset.speech_encoder.repo_id == "openai/whisper-large-v3"
    # The encoder's weights and front end, and what transcribes the speech replies in `omni eval`: the tokenizer
    # (fast and slow files) and the generation config, as openai/whisper-large-v3 ships them.
    assert set(preset.speech_encoder.allow_patterns) == {
        "config.json", "model.safetensors", "preprocessor_config.json", "generation_config.json", "tokenizer.json",
        "tokenizer_config.json", "vocab.json", "merges.txt", "normalizer.json", "added_tokens.json", "special_tokens_map.json",
    }
    assert set(preset.speech_encoder.required_files) == {"config.json", "model.safetensors"}  # chat needs no tokenizer
    names = {f.name for f in preset.vocoder.files}
    assert names == {"g_00500000", "config.json"}
    assert all(f.url.endswith("/mhubert_vp_en_es_fr_it3_400k_layer11_km1000_lj/" + f.name) for f in preset.vocoder.files)
    # Not known offline: left unpinned rather than invented (and said so when downloaded).
    assert all(f.sha256 is None and f.size is None for f in preset.vocoder.files)
    # Whisper is pinned to a commit; the LLaMA-Omni repository's commit could not be confirmed: "main".
    assert preset.speech_encoder.pinned and preset.speech_encoder.revision == "06f233fe06e710322aca913c1bc4249a0d71fce1"
    assert not preset.model.pinned and preset.model.revision == "main"
    # mHuBERT and its k-means for `omni units`, fetched only with --units.
    units = preset.units
    assert units is not None and units.layer == 11
    assert {f.url for f in units.files} == {
        "https://dl.fbaipublicfiles.com/hubert/mhubert_base_vp_en_es_fr_it3.pt",
        "https://dl.fbaipublicfiles.com/hubert/mhubert_base_vp_en_es_fr_it3_L11_km1000.bin",
    }
    assert all(f.sha256 is None for f in units.files) and "units" not in [p.key for p in preset.parts]
    assert preset.chunk_units > 0 and "non-commercial" in preset.licence
    # The README lists every preset.
    readme = (ROOT / "models" / "README.md").read_text()
    assert all(name in readme for name in preset_names())


def test_resolve_finds_every_part_in_a_fake_hub_cache(caches, tiny_model) -> None:
    hub, omni = caches
    preset = get_preset(PRESET)
    install_tiny_preset(tiny_model, preset, hub)
    resolved = resolve_preset(PRESET)
    assert resolved.complete and resolved.missing == ()
    snapshot = f"snapshots/{FAKE_COMMIT}"
    assert resolved.model_dir == hub / "models--ICTNLP--Llama-3.1-8B-Omni" / snapshot
    assert resolved.speech_encoder == hub / "models--openai--whisper-large-v3" / "snapshots" / preset.speech_encoder.revision
    assert resolved.vocoder_dir == omni / "vocoders" / preset.vocoder.name
    assert resolved.chunk_units == preset.chunk_units
    # The resolved paths load through the users' code path (symlinked blobs included).
    model = load_omni(resolved.model_dir, resolved.speech_encoder, precision="fp32", device="cpu")
    assert model.config.hidden_size == json.loads((tiny_model.model_dir / "config.json").read_text())["hidden_size"]
    assert load_vocoder(resolved.vocoder_dir).hop_length > 0


def test_explicit_cache_dir_argument_wins_over_the_environment(caches, tmp_path: Path, tiny_model) -> None:
    other = tmp_path / "other-hub"
    preset = get_preset(PRESET)
    write_snapshot(other, preset.model.repo_id, tiny_model.model_dir)
    assert resolve_preset(PRESET).model_dir is None
    assert resolve_preset(PRESET, cache_dir=other).model_dir == other / "models--ICTNLP--Llama-3.1-8B-Omni" / "snapshots" / FAKE_COMMIT


def test_incomplete_or_unreferenced_snapshots_count_as_missing(caches, tiny_model, tmp_path: Path) -> None:
    hub, _ = caches
    preset = get_preset(PRESET)
    # A shard the index names is absent: an interrupted download.
    partial = tmp_path / "partial"
    shutil.copytree(tiny_model.model_dir, partial)
    next(partial.glob("model-00002-*.safetensors")).unlink()
    write_snapshot(hub, preset.model.repo_id, partial)
    # Whisper cached under another branch only: refs/main does not exist.
    write_snapshot(hub, preset.speech_encoder.repo_id, tiny_model.speech_encoder, ref="other")
    resolved = resolve_preset(PRESET)
    assert resolved.missing == ("model", "speech_encoder", "vocoder")
    assert resolved.model_dir is resolved.speech_encoder is resolved.vocoder_dir is None
    assert resolved.missing_bytes() == sum(p.approx_size_bytes for p in preset.parts)


def test_a_whisper_cached_before_the_preset_listed_its_tokenizer_still_runs(caches, tiny_model, question_wavs, tmp_path: Path) -> None:
    hub, _ = caches
    preset = get_preset(PRESET)
    install_tiny_preset(tiny_model, preset, hub)
    whisper = hub / "models--openai--whisper-large-v3" / "snapshots" / preset.speech_encoder.revision
    # An older download fetched the weights and config only, and huggingface_hub listed the repository's files.
    write_tree_listing(hub, preset.speech_encoder.repo_id, preset.speech_encoder.revision, tiny_model.speech_encoder)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        (whisper / name).unlink()
    resolved = resolve_preset(PRESET)
    assert resolved.complete and resolved.speech_encoder == whisper  # chat and serve need no tokenizer
    manifest = tmp_path / "eval.jsonl"
    manifest.write_text(json.dumps({"id": "q1", "speech": str(question_wavs[0])}) + "\n")
    result = CliRunner().invoke(app, ["eval", str(manifest), "--out", str(tmp_path / "run"), "--model", PRESET, "--device", "cpu"])
    assert result.exit_code == 1 and "has no tokenizer" in result.output
    assert "`omni download llama-omni-8b` fetches what is missing" in result.output and not (tmp_path / "run" / "replies").exists()


def test_local_dir_layout(caches, tiny_model, tmp_path: Path) -> None:
    local = tmp_path / "weights"
    preset = get_preset(PRESET)
    install_tiny_preset(tiny_model, preset, caches[0], local_dir=local)
    resolved = resolve_preset(PRESET, local_dir=local)
    assert resolved.complete
    assert resolved.model_dir == local / "Llama-3.1-8B-Omni"
    assert resolved.speech_encoder == local / "whisper-large-v3"
    assert resolved.vocoder_dir == vocoder_dir(preset, local) == local / "vocoder"
    assert not resolve_preset(PRESET).complete  # the caches were not touched


def test_a_directory_is_used_as_it_is_and_unknown_names_are_one_line_errors(tiny_model, tmp_path: Path) -> None:
    resolved = resolve_preset(tiny_model.model_dir)
    assert resolved.model_dir == tiny_model.model_dir and resolved.preset is None and resolved.complete
    assert not looks_like_preset(tiny_model.model_dir) and looks_like_preset(PRESET)
    assert find_preset("no-such-preset") is None
    with pytest.raises(ConfigError, match="neither a checkpoint directory nor a preset; presets: llama-omni-8b") as info:
        resolve_preset("no-such-preset")
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="no preset named"):
        get_preset(str(tmp_path / "missing"))


def test_missing_parts_need_a_yes(caches, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fit, "cuda_memory", lambda device=None: ("Fake GPU", int(40 * GB), int(48 * GB)))
    # Not a terminal and no --yes: one line naming the command to run.
    with pytest.raises(DownloadError, match=r"run `omni download llama-omni-8b` or add --yes"):
        prepare_model(PRESET, confirm=None)
    asked: list[str] = []
    with pytest.raises(DownloadError, match="nothing downloaded"):
        prepare_model(PRESET, confirm=lambda q: asked.append(q) or False, echo=lambda _: None)
    assert len(asked) == 1 and "Download about 20.2 GB?" in asked[0]
    # With --yes it tries to download; HF_HUB_OFFLINE=1 (tests) makes that a clear error, not a network call.
    with pytest.raises(DownloadError, match="HF_HUB_OFFLINE is set: unset it to download"):
        prepare_model(PRESET, assume_yes=True, echo=lambda _: None)


def test_a_download_that_could_not_run_here_is_refused_before_it_is_offered(caches, monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list[str] = []
    confirm = lambda q: asked.append(q) or True  # noqa: E731 - would say yes
    monkeypatch.setattr(fit, "cuda_memory", lambda device=None: None)  # no CUDA here
    for kwargs, message in (
        ({}, "no CUDA GPU is visible, so llama-omni-8b would run on the CPU in fp32 .*; nothing was downloaded .*--device cpu"),
        ({"device": "cuda"}, "--device cuda was asked for but no CUDA GPU is visible; nothing was downloaded"),
        ({"device": "cpu", "precision": "4bit"}, "--precision 4bit needs a CUDA GPU .*nothing was downloaded"),
    ):
        with pytest.raises(ConfigError, match=message) as info:
            prepare_model(PRESET, confirm=confirm, assume_yes=True, **kwargs)
        assert "\n" not in str(info.value)
    # --device cpu on purpose: offered, with a note on the memory it takes.
    said: list[str] = []
    with pytest.raises(DownloadError, match="HF_HUB_OFFLINE"):
        prepare_model(PRESET, device="cpu", confirm=confirm, echo=said.append)
    assert said[0].startswith("omni: note: llama-omni-8b will run on the CPU in fp32 (~") and len(asked) == 1
    # A GPU too small at this precision: the error names one that fits, before anything is offered.
    monkeypatch.setattr(fit, "cuda_memory", lambda device=None: ("Fake GPU", int(12 * GB), int(16 * GB)))
    with pytest.raises(ConfigError, match="12.0 GB free; try --precision 4bit .*; nothing was downloaded"):
        prepare_model(PRESET, precision="fp16", confirm=confirm)
    assert len(asked) == 1


def test_transcribe_and_reply_accepts_a_preset_name(caches, tiny_model, question_wavs, tmp_path: Path) -> None:
    install_tiny_preset(tiny_model, get_preset(PRESET), caches[0])
    out = tmp_path / "replies"
    result = CliRunner().invoke(
        app,
        ["transcribe-and-reply", str(question_wavs[0]), "--model", PRESET, "--max-new-tokens", "4", "--json", "--out", str(out)],
    )
    assert result.exit_code == 0, result.output
    row = json.loads(result.stdout.splitlines()[0])
    assert row["tokens"] == 4 and Path(row["wav"]).is_file(), "the preset's vocoder should have been used"


def test_cli_without_weights_says_what_to_run(caches, question_wavs, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fit, "cuda_memory", lambda device=None: None)
    result = CliRunner().invoke(app, ["transcribe-and-reply", str(question_wavs[0]), "--model", PRESET, "--device", "cpu"])
    assert result.exit_code == 2
    assert "run `omni download llama-omni-8b` or add --yes" in result.stderr


def test_download_command_lists_presets_and_fails_cleanly_offline(caches) -> None:
    listed = CliRunner().invoke(app, ["download", "--list"])
    assert listed.exit_code == 0 and listed.stdout.startswith("llama-omni-8b  20.2 GB")
    # Tests run with HF_HUB_OFFLINE=1: the licence is shown first, then one error line, no network.
    result = CliRunner().invoke(app, ["download", PRESET])
    assert result.exit_code == 1
    assert "Licence: The LLaMA-Omni weights" in result.stderr and "non-commercial" in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("omni: error:")]
    assert len(errors) == 1 and "HF_HUB_OFFLINE is set" in errors[0]
    unknown = CliRunner().invoke(app, ["download", "nope"])
    assert unknown.exit_code == 1 and "no preset named 'nope'" in unknown.stderr


def _edited_preset(tmp_path: Path, old: str, new: str) -> Path:
    text = (ROOT / "models" / f"{PRESET}.toml").read_text()
    assert old in text, old
    path = tmp_path / "custom.toml"
    path.write_text(text.replace(old, new, 1))
    return path


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ('name = "g_00500000"', 'name = "../../x"', "'../../x' is not a plain file name"),
        ('name = "config.json"', 'name = "/etc/x"', "is not a plain file name"),
        ('name = "mhubert_vp_en_es_fr_it3_400k_layer11_km1000_lj"', 'name = ".."', "'..' is not a plain file name"),
        ('url = "https://dl.fbaipublicfiles.com/fairseq/speech_to_speech/vocoder/code_hifigan/mhubert_vp_en_es_fr_it3_400k_layer11_km1000_lj/config.json"',
         'url = "file:///etc/passwd"', "'file:///etc/passwd' is not an https:// URL"),
        ('url = "https://dl.fbaipublicfiles.com/hubert/mhubert_base_vp_en_es_fr_it3.pt"', 'url = "http://example.com/m.pt"', "is not an https:// URL"),
        ('repo_id = "openai/whisper-large-v3"', 'repo_id = "openai/.."', "is not a hub repository id"),
        ('repo_id = "ICTNLP/Llama-3.1-8B-Omni"', 'repo_id = "../Llama"', "is not a hub repository id"),
        ("speech_adaptor_hidden = 2048", "", "lacks speech_adaptor_hidden"),
        ('sha256 = ""', 'sha256 = "abc"', "is not 64 hex digits"),
    ],
)
def test_a_preset_is_checked_before_anything_uses_it(tmp_path: Path, old: str, new: str, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)) as info:
        load_preset(_edited_preset(tmp_path, old, new))
    assert "\n" not in str(info.value)
