"""Fetch a preset's weights: hub parts through huggingface_hub, the vocoder by plain HTTP.

Hub parts use huggingface_hub's cache (resumable, its own progress bars, offline once
cached). Vocoder files are fetched with `urllib` into `NAME.part`, resumed with a Range
request after an interruption, hashed with SHA-256 while streaming, and renamed into place
only when complete and verified; a wrong checksum deletes the file. The released vocoder
pickle is then converted once (weights-only) to safetensors so later loads never unpickle.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

from omni_cli.errors import CheckpointError, OmniError, one_line
from omni_cli.weights.layout import VOCODER_SAFETENSORS_NAME
from omni_cli.weights.presets import (
    GB,
    HubPart,
    Preset,
    RemoteFile,
    ResolvedModel,
    VocoderPart,
    hub_cache_dir,
    hub_offline,
    missing_hub_files,
    resolve_preset,
    vocoder_dir,
)

PART_SUFFIX = ".part"
CHUNK_BYTES = 1 << 16
USER_AGENT = "omni-cli"
_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)")
_CONTENT_RANGE_UNSATISFIED = re.compile(r"bytes\s+\*/(\d+)")

Echo = Callable[[str], None]


class DownloadError(OmniError):
    """A file could not be fetched (network, HTTP status, interrupted past the retries)."""


class ChecksumError(DownloadError):
    """A downloaded file's size or SHA-256 differs from the preset's; the file was removed."""


class _RangeNotSatisfiable(Exception):
    """The server answered 416 to a resume: the `.part` is at or past the end of its file (`size`, when it says)."""

    def __init__(self, size: int | None) -> None:
        super().__init__(size)
        self.size = size


def _worth_retrying(exc: DownloadError) -> bool:
    """Network failures and 5xx answers may pass; a 4xx (not found, forbidden) will not."""
    cause = exc.__cause__
    return not (isinstance(cause, urllib.error.HTTPError) and cause.code < 500)


def _stderr_console() -> Console:
    return Console(stderr=True)


def sha256_of(path: str | Path) -> str:
    """Hex SHA-256 of a file, read in blocks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _verify(path: Path, digest: str, size: int, expected: RemoteFile | None, label: str) -> None:
    """Raise ChecksumError (after deleting `path`) when size or SHA-256 differ from the pinned ones."""
    if expected is None:
        return
    problem = None
    if expected.size is not None and size != expected.size:
        problem = f"is {size} bytes, expected {expected.size}"
    elif expected.sha256 is not None and digest != expected.sha256:
        problem = f"has SHA-256 {digest}, expected {expected.sha256}"
    if problem:
        path.unlink(missing_ok=True)
        raise ChecksumError(f"{label} {problem}; the file was removed — run the download again (or check the URL).")


def _open(url: str, offset: int, timeout: float) -> http.client.HTTPResponse:
    """GET `url` from byte `offset`; raises _RangeNotSatisfiable when the range starts at or past the end (416)."""
    headers = {"User-Agent": USER_AGENT}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)  # noqa: S310
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and offset:
            match = _CONTENT_RANGE_UNSATISFIED.match(exc.headers.get("Content-Range", "") if exc.headers else "")
            raise _RangeNotSatisfiable(int(match.group(1)) if match else None) from exc
        raise DownloadError(f"{url} answered HTTP {exc.code} {exc.reason}; check the URL in the preset.") from exc
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise DownloadError(
            f"cannot reach {url} ({reason}); check the network, or copy the file there by hand."
        ) from exc


def download_url(
    url: str,
    dest: str | Path,
    expected: RemoteFile | None = None,
    *,
    retries: int = 2,
    timeout: float = 30.0,
    backoff_s: float = 0.5,
    console: Console | None = None,
) -> str:
    """Download `url` to `dest`, resuming `dest.part` if present; returns the file's SHA-256.

    Size and SHA-256 are checked when `expected` pins them (a mismatch deletes the file and
    raises ChecksumError); otherwise the computed SHA-256 is returned for pinning. A dropped
    connection, or a failed (re)connection, is retried with a Range request up to `retries`
    times, `backoff_s` × attempt apart; after that the `.part` file stays, and running again
    resumes it. A `.part` longer than the server's file is discarded and fetched again from zero.
    An existing `dest` is verified, not re-fetched.
    """
    dest = Path(dest)
    label = dest.name
    if dest.is_file():
        digest = sha256_of(dest)
        _verify(dest, digest, dest.stat().st_size, expected, label)
        return digest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + PART_SUFFIX)
    console = console or _stderr_console()
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
    )
    attempt = 0
    digest = None  # SHA-256 of the bytes in `part`, updated as they stream in
    with progress:
        task = progress.add_task(f"{label}", total=None)
        while True:
            offset = part.stat().st_size if part.is_file() else 0
            try:
                response = _open(url, offset, timeout)
            except _RangeNotSatisfiable as exc:
                size = exc.size if exc.size is not None else (expected.size if expected is not None else None)
                if size is not None and offset > size:
                    part.unlink()  # longer than the file: not a prefix of it, start over
                    continue
                digest = None  # the .part already holds the whole file (verified below)
                break
            except DownloadError as exc:
                attempt += 1
                if attempt > retries or not _worth_retrying(exc):
                    raise
                time.sleep(backoff_s * attempt)
                continue
            with response:
                if offset and response.status != 206:
                    offset = 0  # the server ignored Range: start over
                digest = _hash_prefix(part, offset)
                total = _total_size(response, offset)
                progress.update(task, total=total, completed=offset)
                received = offset
                try:
                    with part.open("ab" if offset else "wb") as handle:
                        while True:
                            block = response.read(CHUNK_BYTES)
                            if not block:
                                break
                            handle.write(block)
                            digest.update(block)
                            received += len(block)
                            progress.update(task, completed=received)
                except (OSError, http.client.HTTPException) as exc:
                    interrupted: Exception | None = exc
                else:
                    interrupted = None
                    if total is not None and received < total:
                        interrupted = ConnectionError(f"connection closed after {received} of {total} bytes")
            if interrupted is None:
                break
            attempt += 1
            if attempt > retries:
                raise DownloadError(
                    f"download of {label} was interrupted ({interrupted}); run the same command again to resume "
                    f"from {part.stat().st_size if part.is_file() else 0} bytes."
                ) from interrupted
            time.sleep(backoff_s * attempt)
    hexdigest = digest.hexdigest() if digest is not None else sha256_of(part)
    _verify(part, hexdigest, part.stat().st_size, expected, label)
    os.replace(part, dest)
    return hexdigest


def _hash_prefix(path: Path, length: int) -> hashlib._Hash:
    """A SHA-256 fed with the first `length` bytes already in `path` (the part kept from an earlier run)."""
    digest = hashlib.sha256()
    if length:
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(min(1 << 20, length - handle.tell())), b""):
                digest.update(block)
    return digest


def _total_size(response: http.client.HTTPResponse, offset: int) -> int | None:
    """Full file size from Content-Range (206) or Content-Length (200), None if the server hides it."""
    content_range = response.headers.get("Content-Range")
    if content_range:
        match = _CONTENT_RANGE.match(content_range)
        if match and match.group(3) != "*":
            return int(match.group(3))
    length = response.headers.get("Content-Length")
    return offset + int(length) if length and length.isdigit() else None


# ---------------------------------------------------------------------------------------------
# Preset parts


def fetch_hub_part(part: HubPart, local_dir: Path | None = None, cache_dir: Path | None = None) -> Path:
    """Download (or find in the cache) a hub part; returns its folder. Honours HF_HUB_OFFLINE."""
    from huggingface_hub import snapshot_download

    target = Path(local_dir) / part.dirname if local_dir is not None else None
    try:
        folder = Path(
            snapshot_download(
                part.repo_id,
                revision=part.revision,
                allow_patterns=list(part.allow_patterns),
                cache_dir=str(cache_dir or hub_cache_dir()),
                local_dir=str(target) if target is not None else None,
            )
        )
    except Exception as exc:  # huggingface_hub raises many types: network, offline, gated, not found
        offline = " (HF_HUB_OFFLINE is set: unset it to download)" if hub_offline() else ""
        raise DownloadError(f"cannot download {part.repo_id}{offline}: {one_line(exc)}") from exc
    missing = missing_hub_files(folder, part)
    if missing:
        raise DownloadError(f"{part.repo_id} was fetched but lacks {', '.join(missing)}; check the preset's allow_patterns.")
    return folder


def fetch_vocoder(part: VocoderPart, dest_dir: Path, *, console: Console | None = None, echo: Echo = print) -> Path:
    """Download the vocoder files into `dest_dir`, then convert the pickle once to vocoder.safetensors."""
    from omni_cli.model.vocoder_loading import convert_vocoder_checkpoint

    dest_dir = Path(dest_dir)
    for remote in part.files:
        digest = download_url(remote.url, dest_dir / remote.name, remote, console=console)
        if remote.sha256 is None:
            echo(f"{remote.name}: sha256 {digest} (not pinned in the preset; pin it to verify later downloads)")
    if not (dest_dir / VOCODER_SAFETENSORS_NAME).is_file():
        try:
            convert_vocoder_checkpoint(dest_dir / part.checkpoint, dest_dir)
        except OmniError as exc:
            raise CheckpointError(f"the downloaded vocoder does not load ({exc}); delete {dest_dir} and download again.") from exc
    return dest_dir


def format_gb(n_bytes: float) -> str:
    """Sizes for people: '17.0 GB', '60 MB'."""
    return f"{n_bytes / GB:.1f} GB" if n_bytes >= 0.1 * GB else f"{n_bytes / 1e6:.0f} MB"


def download_preset(
    preset: Preset,
    local_dir: Path | None = None,
    cache_dir: Path | None = None,
    *,
    echo: Echo = print,
    console: Console | None = None,
    show_licence: bool = True,
) -> ResolvedModel:
    """Fetch every part of `preset` not on disk yet (showing the licence before the model's first download)."""
    resolved = resolve_preset(preset.source, local_dir, cache_dir)
    for key in resolved.missing:
        part = preset.part(key)
        if key == "model" and preset.licence and show_licence:
            echo(f"Licence: {preset.licence}")
        echo(f"Downloading {key.replace('_', ' ')} ({format_gb(part.approx_size_bytes)}) ...")
        if isinstance(part, HubPart):
            fetch_hub_part(part, local_dir, cache_dir)
        else:
            fetch_vocoder(part, vocoder_dir(preset, local_dir), console=console, echo=echo)
    final = resolve_preset(preset.source, local_dir, cache_dir)
    if final.missing:
        raise DownloadError(f"after downloading, {', '.join(final.missing)} is still incomplete; run `omni doctor`.")
    return final


def prepare_model(
    name_or_path: str | Path,
    *,
    assume_yes: bool = False,
    confirm: Callable[[str], bool] | None = None,
    local_dir: Path | None = None,
    echo: Echo = print,
) -> ResolvedModel:
    """Resolve `--model`; download a preset's missing parts after asking (`confirm`) or with `assume_yes`.

    `confirm` is None when nobody can answer (not a terminal): then a missing part is a
    one-line error naming the command to run.
    """
    resolved = resolve_preset(name_or_path, local_dir)
    if resolved.complete or resolved.preset is None:
        return resolved
    preset = resolved.preset
    what = ", ".join(k.replace("_", " ") for k in resolved.missing)
    size = format_gb(resolved.missing_bytes())
    if not assume_yes:
        command = f"omni download {preset.name}" + (f" --local-dir {local_dir}" if local_dir else "")
        if confirm is None:
            raise DownloadError(f"{preset.name} is not downloaded yet ({what}, about {size}); run `{command}` or add --yes.")
        if preset.licence and "model" in resolved.missing:
            echo(f"Licence: {preset.licence}")
        if not confirm(f"{preset.name}: {what} missing. Download about {size}?"):
            raise DownloadError(f"nothing downloaded; run `{command}` when ready.")
    return download_preset(preset, local_dir, echo=echo, show_licence=assume_yes)


__all__ = [
    "DownloadError",
    "ChecksumError",
    "sha256_of",
    "download_url",
    "fetch_hub_part",
    "fetch_vocoder",
    "download_preset",
    "prepare_model",
    "format_gb",
]
