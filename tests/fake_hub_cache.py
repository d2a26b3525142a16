"""Lay out files like huggingface_hub's cache, so preset resolution can be tested offline.

huggingface_hub keeps `models--ORG--NAME/blobs/<hash>` (the bytes), `snapshots/<commit>/<file>`
(symlinks to the blobs) and `refs/main` (the commit the branch points to). The tiny random
model is written into that layout under the preset's repo ids, and its vocoder into omni's cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from omni_cli.weights.presets import Preset, vocoder_dir

FAKE_COMMIT = "0123456789abcdef0123456789abcdef01234567"


def write_snapshot(cache: Path, repo_id: str, source_dir: Path, commit: str = FAKE_COMMIT, ref: str = "main") -> Path:
    """Copy every file of `source_dir` into the cache as blobs + snapshot symlinks; returns the snapshot folder."""
    repo = Path(cache) / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    for src in sorted(Path(source_dir).rglob("*")):
        if not src.is_file():
            continue
        data = src.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snapshot / src.relative_to(source_dir)
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(blob, link.parent), link)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / ref).write_text(commit)  # huggingface_hub writes the hash without a newline
    return snapshot


def write_tree_listing(cache: Path, repo_id: str, commit: str, source_dir: Path) -> None:
    """The listing huggingface_hub (>= 2.x) keeps of what the hub holds at a commit (`trees/<commit>.json`):
    every file of `source_dir`, whether or not the snapshot has it. With it, a snapshot missing a file the
    download's patterns match counts as incomplete (IncompleteSnapshotError) when looked up offline."""
    files = {}
    for src in sorted(Path(source_dir).rglob("*")):
        if src.is_file():
            data = src.read_bytes()
            blob = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()  # git's blob id
            files[src.relative_to(source_dir).as_posix()] = {"size": len(data), "blob_id": blob}
    listing = Path(cache) / ("models--" + repo_id.replace("/", "--")) / "trees" / f"{commit}.json"
    listing.parent.mkdir(parents=True, exist_ok=True)
    listing.write_text(json.dumps({"format_version": 1, "files": files}), encoding="utf-8")


def install_tiny_preset(tiny_model, preset: Preset, hub_cache: Path, local_dir: Path | None = None) -> None:
    """Put the tiny model where `preset` expects its parts: the hub cache (or local_dir) and omni's vocoder cache.

    The caller points $OMNI_CACHE at a temporary folder first when local_dir is None.
    """
    if local_dir is None:
        for part, source in ((preset.model, tiny_model.model_dir), (preset.speech_encoder, tiny_model.speech_encoder)):
            # A part pinned to a commit is cached under that commit, as huggingface_hub would.
            write_snapshot(hub_cache, part.repo_id, source, commit=part.revision if part.pinned else FAKE_COMMIT)
    else:
        shutil.copytree(tiny_model.model_dir, Path(local_dir) / preset.model.dirname)
        shutil.copytree(tiny_model.speech_encoder, Path(local_dir) / preset.speech_encoder.dirname)
    shutil.copytree(tiny_model.vocoder_dir, vocoder_dir(preset, local_dir))
