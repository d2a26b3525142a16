"""Fetch a preset's weights: hub parts through huggingface_hub, the vocoder (and mHuBERT) by HTTPS.

Hub parts use huggingface_hub's cache (resumable, its own progress bars, offline once
cached). Files by URL are fetched with `urllib` into `NAME.part`, hashed with SHA-256 while
streaming, and renamed into place only when complete (and verified, where the preset pins a
size or SHA-256). A download resumes an interrupted `.part` only when the server named a
validator for it (ETag or Last-Modified, kept beside it in `NAME.part.json`) and confirms with
`If-Range` that the file did not change; anything else starts over from zero, and a resumed
file whose pinned checksum fails is fetched once more from zero. Only HTTPS is used, redirects
included. The released vocoder pickle is then converted once (weights-only) to safetensors so
later loads never unpickle; mHuBERT and its k-means are converted the same way for `omni units`.
"""

from __future__ import annotations

import errno
import hashlib
import http.client
import json
import os
import re
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

from omni_cli.errors import CheckpointError, ConfigError, OmniError, one_line
from omni_cli.weights.layout import CONFIG_NAME, VOCODER_SAFETENSORS_NAME
from omni_cli.weights.presets import (
    GB,
    HUBERT_DIRNAME,
    KMEANS_CENTRES_NAME,
    HubPart,
    Preset,
    RemoteFile,
    ResolvedModel,
    UnitsPart,
    VocoderPart,
    check_url,
    hub_offline,
    hub_snapshot,
    missing_hub_files,
    plain_name,
    resolve_preset,
    units_dir,
    units_present,
    vocoder_dir,
)

PART_SUFFIX = ".part"
VALIDATOR_SUFFIX = ".json"  # NAME.part.json: the URL and the server's validator of the bytes in NAME.part
CHUNK_BYTES = 1 << 16
USER_AGENT = "omni-cli"
_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)")
_CONTENT_RANGE_UNSATISFIED = re.compile(r"bytes\s+\*/(\d+)")
_OFFLINE_ERRNOS = {errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ECONNREFUSED, errno.ENETDOWN}

Echo = Callable[[str], None]


class DownloadError(OmniError):
    """A file could not be fetched (network, HTTP status, interrupted past the retries)."""


class ChecksumError(DownloadError):
    """A downloaded file's size or SHA-256 differs from the preset's; the file was removed."""


class InsecureRedirectError(DownloadError):
    """The server redirected to a URL that is not HTTPS; not followed, not retried."""


class _RangeNotSatisfiable(Exception):
    """The server answered 416 to a resume: the `.part` is at or past the end of its file (`size`, when it says)."""

    def __init__(self, size: int | None) -> None:
        super().__init__(size)
        self.size = size


class _HttpsOnlyRedirects(urllib.request.HTTPRedirectHandler):
    """Follow redirects only to URLs a preset could name itself (HTTPS)."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # type: ignore[no-untyped-def]
        try:
            check_url(newurl, f"{req.full_url} redirected")
        except ConfigError as exc:
            raise InsecureRedirectError(str(exc)) from None
        return super().redirect_request(req, fp, code, msg, headers, newurl)


_OPENER = urllib.request.build_opener(_HttpsOnlyRedirects)


def _worth_retrying(exc: DownloadError) -> bool:
    """Network failures and 5xx answers may pass; a 4xx (not found, forbidden) or a refused redirect will not."""
    if isinstance(exc, InsecureRedirectError):
        return False
    cause = exc.__cause__
    return not (isinstance(cause, urllib.error.HTTPError) and cause.code < 500)


def looks_offline(exc: BaseException) -> bool:
    """True when an exception (or one it was raised from) is a failed connection: no DNS, no route, refused, timed out."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, (socket.gaierror, socket.timeout, TimeoutError, ConnectionError)):
            return True
        if isinstance(current, OSError) and current.errno in _OFFLINE_ERRNOS:
            return True
        # httpx / requests / huggingface_hub name theirs so (not imported here: optional for us).
        if type(current).__name__ in ("ConnectError", "ConnectTimeout", "ConnectionError", "LocalEntryNotFoundError"):
            return True
        if isinstance(current, urllib.error.URLError) and isinstance(current.reason, BaseException):
            current = current.reason
            continue
        current = current.__cause__ or current.__context__
    return False


def _stderr_console() -> Console:
    return Console(stderr=True)


def sha256_of(path: str | Path) -> str:
    """Hex SHA-256 of a file, read in blocks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def pin_problem(size: int, digest: str | None, expected: RemoteFile) -> str | None:
    """How a file of `size` bytes and SHA-256 `digest` differs from what `expected` pins ("is N bytes,
    expected M"), or None; a `digest` of None is not compared (hash only files whose SHA-256 is pinned)."""
    if expected.size is not None and size != expected.size:
        return f"is {size} bytes, expected {expected.size}"
    if expected.sha256 is not None and digest is not None and digest != expected.sha256:
        return f"has SHA-256 {digest}, expected {expected.sha256}"
    return None


def _verify(path: Path, digest: str, size: int, expected: RemoteFile | None, label: str) -> None:
    """Raise ChecksumError (after deleting `path`) when size or SHA-256 differ from the pinned ones."""
    problem = None if expected is None else pin_problem(size, digest, expected)
    if problem:
        path.unlink(missing_ok=True)
        raise ChecksumError(f"{label} {problem}; the file was removed — run the download again (or check the URL).")


def _open(url: str, offset: int, validator: dict[str, str] | None, timeout: float, folder: Path) -> http.client.HTTPResponse:
    """GET `url` from byte `offset` (If-Range: `validator`); raises _RangeNotSatisfiable when the range starts at or past the end."""
    headers = {"User-Agent": USER_AGENT}
    if offset:
        headers["Range"] = f"bytes={offset}-"
        if validator:
            headers["If-Range"] = validator.get("etag") or validator["last_modified"]
    try:
        return _OPENER.open(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and offset:
            match = _CONTENT_RANGE_UNSATISFIED.match(exc.headers.get("Content-Range", "") if exc.headers else "")
            raise _RangeNotSatisfiable(int(match.group(1)) if match else None) from exc
        raise DownloadError(f"{url} answered HTTP {exc.code} {exc.reason}; check the URL in the preset.") from exc
    except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
        reason = one_line(getattr(exc, "reason", exc)) if isinstance(exc, urllib.error.URLError) else one_line(exc)
        host = urlsplit(url).hostname
        offline = "this machine looks offline (or the host is down)" if looks_offline(exc) else "the connection failed"
        raise DownloadError(
            f"cannot reach {host} ({reason}): {offline}. Fetch {url} by hand on a connected machine and put it in "
            f"{folder}, then run the command again."
        ) from exc


def _validator_of(response: http.client.HTTPResponse, url: str) -> dict[str, str] | None:
    """What identifies these bytes on the server (a strong ETag, else Last-Modified), or None when it names nothing."""
    etag = response.headers.get("ETag")
    last_modified = response.headers.get("Last-Modified")
    if etag and not etag.startswith("W/"):  # If-Range needs a strong validator
        return {"url": url, "etag": etag}
    if last_modified:
        return {"url": url, "last_modified": last_modified}
    return None


def _kept_validator(part: Path, url: str) -> dict[str, str] | None:
    """The validator saved beside a `.part` from `url`; a `.part` without one cannot be trusted and is deleted."""
    sidecar = part.with_name(part.name + VALIDATOR_SUFFIX)
    validator = None
    try:
        saved = json.loads(sidecar.read_text(encoding="utf-8"))
        if isinstance(saved, dict) and saved.get("url") == url and (saved.get("etag") or saved.get("last_modified")):
            validator = {k: str(v) for k, v in saved.items() if k in ("url", "etag", "last_modified")}
    except (OSError, ValueError):
        pass
    if validator is None:
        _discard(part)
    return validator


def _discard(part: Path) -> None:
    """Delete a `.part` and its validator."""
    part.unlink(missing_ok=True)
    part.with_name(part.name + VALIDATOR_SUFFIX).unlink(missing_ok=True)


def _keep_validator(part: Path, validator: dict[str, str] | None) -> None:
    sidecar = part.with_name(part.name + VALIDATOR_SUFFIX)
    if validator is None:
        sidecar.unlink(missing_ok=True)
    else:
        sidecar.write_text(json.dumps(validator), encoding="utf-8")


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
    """Download `url` (HTTPS) to `dest`, resuming a trusted `dest.part`; returns the file's SHA-256.

    Size and SHA-256 are checked when `expected` pins them (a mismatch deletes the file and
    raises ChecksumError); otherwise nothing can be verified and the computed SHA-256 is
    returned for pinning. A dropped connection, or a failed (re)connection, is retried up to
    `retries` times, `backoff_s` × attempt apart; after that the `.part` file stays, and running
    again resumes it if the server gave a validator. A resumed file whose pinned checksum
    fails is fetched once more from zero. An existing `dest` is checked against the pins, not re-fetched.
    """
    check_url(url, "download")
    dest = Path(dest)
    label = dest.name
    if dest.is_file():
        digest = sha256_of(dest)
        _verify(dest, digest, dest.stat().st_size, expected, label)
        return digest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + PART_SUFFIX)
    console = console or _stderr_console()
    resumed = part.is_file() and _kept_validator(part, url) is not None
    hexdigest = _fetch(url, part, expected, retries, timeout, backoff_s, console)
    try:
        _verify(part, hexdigest, part.stat().st_size, expected, label)
    except ChecksumError:
        _discard(part)
        if not resumed:
            raise
        # The bytes kept from an earlier run were not a prefix of this file: fetch it whole, once.
        hexdigest = _fetch(url, part, expected, retries, timeout, backoff_s, console)
        _verify(part, hexdigest, part.stat().st_size, expected, label)
    os.replace(part, dest)
    _keep_validator(part, None)
    return hexdigest


def _fetch(
    url: str, part: Path, expected: RemoteFile | None, retries: int, timeout: float, backoff_s: float, console: Console
) -> str:
    """Bring `part` to the whole file (resuming what a validator vouches for); returns its SHA-256."""
    label = part.name[: -len(PART_SUFFIX)]
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
            validator = _kept_validator(part, url) if part.is_file() else None
            offset = part.stat().st_size if part.is_file() else 0
            try:
                response = _open(url, offset, validator, timeout, part.parent)
            except _RangeNotSatisfiable as exc:
                size = exc.size if exc.size is not None else (expected.size if expected is not None else None)
                if size is not None and offset > size:
                    _discard(part)  # longer than the file: not a prefix of it, start over
                    continue
                digest = None  # the .part already holds the whole file (verified by the caller)
                break
            except DownloadError as exc:
                attempt += 1
                if attempt > retries or not _worth_retrying(exc):
                    raise
                time.sleep(backoff_s * attempt)
                continue
            with response:
                if offset and (response.status != 206 or _range_start(response) != offset):
                    offset = 0  # the file changed (If-Range) or the server ignored Range: start over
                if offset == 0:
                    _keep_validator(part, _validator_of(response, url))
                digest = _hash_prefix(part, offset)
                total = _total_size(response, offset)
                pinned = expected.size if expected is not None else None
                if pinned is not None and total is not None and total != pinned:  # the server says so: fetch nothing
                    _discard(part)
                    raise ChecksumError(f"{label} is {total} bytes on the server, expected {pinned}; nothing was downloaded — check the URL or the preset.")
                progress.update(task, total=total, completed=offset)
                received = offset
                try:
                    with part.open("ab" if offset else "wb") as handle:
                        while True:
                            block = response.read(CHUNK_BYTES)
                            if not block or (pinned is not None and received + len(block) > pinned):  # stop at a pinned size
                                break
                            handle.write(block)
                            digest.update(block)
                            received += len(block)
                            progress.update(task, completed=received)
                except (OSError, http.client.HTTPException) as exc:
                    interrupted: Exception | None = exc
                else:
                    interrupted = None
                    if pinned is not None and block:
                        _discard(part)
                        raise ChecksumError(f"{label} is more than {pinned} bytes, expected {pinned}; the download was stopped there and removed — check the URL or the preset.")
                    if total is not None and received < total:
                        interrupted = ConnectionError(f"connection closed after {received} of {total} bytes")
            if interrupted is None:
                break
            attempt += 1
            if attempt > retries:
                kept = part.stat().st_size if part.is_file() else 0
                resumable = part.with_name(part.name + VALIDATOR_SUFFIX).is_file()
                again = (
                    f"run the same command again to resume from {kept} bytes"
                    if resumable
                    else "run the same command again to start it over (the server names no validator to resume safely)"
                )
                raise DownloadError(f"download of {label} was interrupted ({interrupted}); {again}.") from interrupted
            time.sleep(backoff_s * attempt)
    return digest.hexdigest() if digest is not None else sha256_of(part)


def _range_start(response: http.client.HTTPResponse) -> int | None:
    match = _CONTENT_RANGE.match(response.headers.get("Content-Range", ""))
    return int(match.group(1)) if match else None


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
    target = Path(local_dir) / part.dirname if local_dir is not None else None
    try:
        folder = hub_snapshot(part, cache_dir, local_dir=str(target) if target is not None else None)
    except Exception as exc:  # huggingface_hub raises many types: network, offline, gated, not found
        if hub_offline():
            raise DownloadError(f"cannot download {part.repo_id} (HF_HUB_OFFLINE is set: unset it to download).") from exc
        if looks_offline(exc):
            where = f"{target}" if target is not None else f"DIR/{part.dirname}"
            raise DownloadError(
                f"cannot reach the Hugging Face hub for {part.repo_id} ({one_line(exc)}): this machine looks offline. "
                f"On a connected machine run `hf download {part.repo_id} --revision {part.revision} "
                f"--local-dir {part.dirname}`, copy the folder to {where} and use --local-dir {Path(where).parent}."
            ) from exc
        raise DownloadError(f"cannot download {part.repo_id}: {one_line(exc)}") from exc
    missing = missing_hub_files(folder, part)
    if missing:
        raise DownloadError(f"{part.repo_id} was fetched but lacks {', '.join(missing)}; check the preset's allow_patterns.")
    return folder


def fetch_files(files: tuple[RemoteFile, ...], dest_dir: Path, *, console: Console | None = None, echo: Echo = print) -> None:
    """Download each file into `dest_dir` (names checked to stay inside it) and say which ones could not be verified."""
    dest_dir = Path(dest_dir)
    for remote in files:
        dest = dest_dir / plain_name(remote.name, "download")
        digest = download_url(remote.url, dest, remote, console=console)
        if remote.sha256 is None:
            checked = " (its size matched the pinned one)" if remote.size is not None else ""
            echo(
                f"{remote.name}: NOT verified — the preset pins no SHA-256 for it{checked}; computed sha256 {digest}, "
                f"size {dest.stat().st_size} bytes: add them to the preset to verify later downloads."
            )


def fetch_vocoder(part: VocoderPart, dest_dir: Path, *, console: Console | None = None, echo: Echo = print) -> Path:
    """Download the vocoder files into `dest_dir`, then convert the pickle once to vocoder.safetensors."""
    from omni_cli.model.vocoder_loading import convert_vocoder_checkpoint

    dest_dir = Path(dest_dir)
    fetch_files(part.files, dest_dir, console=console, echo=echo)
    if not (dest_dir / VOCODER_SAFETENSORS_NAME).is_file():
        try:
            convert_vocoder_checkpoint(dest_dir / part.checkpoint, dest_dir)
        except OmniError as exc:
            raise CheckpointError(f"the downloaded vocoder does not load ({exc}); delete {dest_dir} and download again.") from exc
    return dest_dir


def fetch_units(part: UnitsPart, dest_dir: Path, *, console: Console | None = None, echo: Echo = print) -> Path:
    """Download mHuBERT and its k-means into `dest_dir`, then convert both once for `omni units` (no code from the files runs)."""
    from omni_cli.train.hubert import convert_hubert
    from omni_cli.train.units import convert_kmeans

    dest_dir = Path(dest_dir)
    fetch_files(part.files, dest_dir, console=console, echo=echo)
    try:
        if not (dest_dir / HUBERT_DIRNAME / CONFIG_NAME).is_file():  # what units_present looks for
            convert_hubert(dest_dir / part.hubert_checkpoint, dest_dir / HUBERT_DIRNAME)
        if not (dest_dir / KMEANS_CENTRES_NAME).is_file():
            convert_kmeans(dest_dir / part.kmeans, dest_dir / KMEANS_CENTRES_NAME)
    except OmniError as exc:
        raise CheckpointError(f"the downloaded unit files do not convert ({exc}); delete {dest_dir} and download again.") from exc
    return dest_dir


def format_gb(n_bytes: float) -> str:
    """Sizes for people: '17.0 GB', '60 MB'."""
    return f"{n_bytes / GB:.1f} GB" if n_bytes >= 0.1 * GB else f"{n_bytes / 1e6:.0f} MB"


def download_preset(
    preset: Preset,
    local_dir: Path | None = None,
    cache_dir: Path | None = None,
    *,
    units: bool = False,
    model: bool = True,
    echo: Echo = print,
    console: Console | None = None,
    show_licence: bool = True,
) -> ResolvedModel:
    """Fetch every part of `preset` not on disk yet (showing the licence before the model's first download).

    `units`: also the optional mHuBERT + k-means part (for `omni units`), converted after download.
    `model` False: none of the model's parts (LLM, speech encoder, vocoder), only the units part;
    what is returned then says which model parts are missing.
    """
    resolved = resolve_preset(preset.source, local_dir, cache_dir)
    for key in resolved.missing if model else ():
        part = preset.part(key)
        if key == "model" and preset.licence and show_licence:
            echo(f"Licence: {preset.licence}")
        echo(f"Downloading {key.replace('_', ' ')} ({format_gb(part.approx_size_bytes)}) ...")
        if isinstance(part, HubPart):
            fetch_hub_part(part, local_dir, cache_dir)
        else:
            fetch_vocoder(part, vocoder_dir(preset, local_dir), console=console, echo=echo)
    if units:
        if preset.units is None:
            raise ConfigError(f"preset {preset.name} names no [units] part (mHuBERT + k-means); see models/README.md.")
        folder = units_dir(preset.units, local_dir)
        if not units_present(folder):
            echo(f"Downloading units (mHuBERT + k-means, {format_gb(preset.units.approx_size_bytes)}) ...")
            fetch_units(preset.units, folder, console=console, echo=echo)
    final = resolve_preset(preset.source, local_dir, cache_dir)
    if model and final.missing:
        raise DownloadError(f"after downloading, {', '.join(final.missing)} is still incomplete; run `omni doctor`.")
    return final


__all__ = [
    "DownloadError", "ChecksumError", "looks_offline", "sha256_of", "download_url", "fetch_hub_part", "fetch_files",
    "fetch_vocoder", "fetch_units", "download_preset", "format_gb",
]
