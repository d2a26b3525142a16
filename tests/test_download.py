"""The vocoder download over real HTTP from 127.0.0.1: progress, checksums, trusted resume, refusals, conversion.

Production downloads are HTTPS only; these tests allow plain HTTP to their own 127.0.0.1 server.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from fake_hub_cache import install_tiny_preset
from rich.console import Console

import omni_cli.weights.presets as presets
from omni_cli.errors import ConfigError
from omni_cli.model.vocoder_loading import load_vocoder
from omni_cli.setup.download import (
    ChecksumError,
    DownloadError,
    InsecureRedirectError,
    download_preset,
    download_url,
    fetch_files,
    fetch_hub_part,
    fetch_vocoder,
    sha256_of,
)
from omni_cli.weights.layout import VOCODER_SAFETENSORS_NAME as SAFETENSORS_NAME
from omni_cli.weights.presets import PRESET_FOLDER, RemoteFile, VocoderPart, get_preset, load_preset, resolve_preset
from omni_cli.tiny.vocoder import TINY_CHECKPOINT_NAME, make_tiny_vocoder

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class FileServer:
    """Serves `files` with Range and If-Range support; `cut_after[path] = K` closes the first response for path after K bytes.

    `unavailable` holds indices (into `requests`) of requests answered 503, as a briefly overloaded server would.
    `etag` is the validator every file is served with (None: none, as some servers); `redirect[path]` answers 302.
    `hide_length`: no Content-Length, the body ends when the connection closes; `sent[path]` counts the bytes written.
    """

    files: dict[str, bytes]
    cut_after: dict[str, int] = field(default_factory=dict)
    honour_range: bool = True
    unavailable: set[int] = field(default_factory=set)
    requests: list[tuple[str, str | None]] = field(default_factory=list)
    if_ranges: list[str | None] = field(default_factory=list)
    etag: str | None = '"v1"'
    redirect: dict[str, str] = field(default_factory=dict)
    hide_length: bool = False
    sent: dict[str, int] = field(default_factory=dict)
    url: str = ""

    def url_of(self, name: str) -> str:
        return f"{self.url}/{name}"


def _handler(server: FileServer) -> type[BaseHTTPRequestHandler]:
    class RangeHandler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            name = self.path.lstrip("/")
            rng = self.headers.get("Range")
            server.requests.append((name, rng))
            server.if_ranges.append(self.headers.get("If-Range"))
            if len(server.requests) - 1 in server.unavailable:
                self.send_error(503)
                return
            if name in server.redirect:
                self.send_response(302)
                self.send_header("Location", server.redirect[name])
                self.end_headers()
                return
            data = server.files.get(name)
            if data is None:
                self.send_error(404)
                return
            start = 0
            if_range = self.headers.get("If-Range")
            if rng and server.honour_range and (if_range is None or if_range == server.etag):
                start = int(re.fullmatch(r"bytes=(\d+)-", rng).group(1))
                if start >= len(data):
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(data)}")
                    self.end_headers()
                    return
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            else:
                self.send_response(200)
            body = data[start:]
            if server.etag:
                self.send_header("ETag", server.etag)
            if server.hide_length:
                self.close_connection = True
                self.end_headers()
                server.sent[name] = 0
                try:
                    for i in range(0, len(body), 1 << 16):
                        self.wfile.write(body[i : i + (1 << 16)])
                        server.sent[name] += len(body[i : i + (1 << 16)])
                except OSError:  # the client hung up
                    pass
                return
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Accept-Ranges", "bytes")
            self.end_headers()
            cut = server.cut_after.pop(name, None)
            if cut is not None:
                self.wfile.write(body[:cut])
                self.wfile.flush()
                self.close_connection = True
                return
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    return RangeHandler


@pytest.fixture(autouse=True)
def plain_http_to_the_test_server(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(presets, "PLAIN_HTTP_HOSTS", frozenset({"127.0.0.1"}))


@pytest.fixture()
def tiny_vocoder_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    src = make_tiny_vocoder(tmp_path_factory.mktemp("voc-src"))
    return {name: (src / name).read_bytes() for name in ("config.json", TINY_CHECKPOINT_NAME)}


@pytest.fixture()
def server(tiny_vocoder_files: dict[str, bytes]) -> Iterator[FileServer]:
    state = FileServer(files=dict(tiny_vocoder_files))
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    state.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    yield state
    httpd.shutdown()
    httpd.server_close()


def _pinned(server: FileServer, name: str, sha256: str | None = "auto", size: int | None = None) -> RemoteFile:
    data = server.files[name]
    digest = hashlib.sha256(data).hexdigest() if sha256 == "auto" else sha256
    return RemoteFile(name, server.url_of(name), size, digest)


def _terminal() -> tuple[Console, io.StringIO]:
    buffer = io.StringIO()
    return Console(file=buffer, force_terminal=True, width=120), buffer


def test_download_shows_progress_and_verifies_the_checksum(server: FileServer, tmp_path: Path) -> None:
    console, shown = _terminal()
    data = server.files[TINY_CHECKPOINT_NAME]
    dest = tmp_path / TINY_CHECKPOINT_NAME
    digest = download_url(server.url_of(TINY_CHECKPOINT_NAME), dest, _pinned(server, TINY_CHECKPOINT_NAME, size=len(data)), console=console)
    assert dest.read_bytes() == data and digest == hashlib.sha256(data).hexdigest()
    assert not dest.with_name(dest.name + ".part").exists()
    text = shown.getvalue()
    assert TINY_CHECKPOINT_NAME in text
    assert re.search(r"\d+(\.\d+)?/\d+(\.\d+)? [kM]?B", text), f"no byte progress in {text!r}"
    # Already there: verified from disk, not fetched again.
    requests = len(server.requests)
    assert download_url(server.url_of(TINY_CHECKPOINT_NAME), dest, _pinned(server, TINY_CHECKPOINT_NAME)) == digest
    assert len(server.requests) == requests


def test_interrupted_download_resumes_with_a_range_request(server: FileServer, tmp_path: Path) -> None:
    data = server.files[TINY_CHECKPOINT_NAME]
    cut = len(data) // 3
    server.cut_after[TINY_CHECKPOINT_NAME] = cut
    dest = tmp_path / TINY_CHECKPOINT_NAME
    part = tmp_path / (TINY_CHECKPOINT_NAME + ".part")
    expected = _pinned(server, TINY_CHECKPOINT_NAME)
    with pytest.raises(DownloadError, match="interrupted.*run the same command again to resume") as info:
        download_url(server.url_of(TINY_CHECKPOINT_NAME), dest, expected, retries=0, console=_terminal()[0])
    assert "\n" not in str(info.value)
    assert not dest.exists() and part.read_bytes() == data[:cut]
    # Second run: continues from the .part file, if the server's file is still the one the bytes came from.
    download_url(server.url_of(TINY_CHECKPOINT_NAME), dest, expected, console=_terminal()[0])
    assert server.requests == [(TINY_CHECKPOINT_NAME, None), (TINY_CHECKPOINT_NAME, f"bytes={cut}-")]
    assert server.if_ranges == [None, '"v1"']
    assert dest.read_bytes() == data and not part.exists() and list(tmp_path.iterdir()) == [dest]


def test_a_dropped_connection_is_retried_within_one_run(server: FileServer, tmp_path: Path) -> None:
    data = server.files[TINY_CHECKPOINT_NAME]
    server.cut_after[TINY_CHECKPOINT_NAME] = 1000
    dest = tmp_path / TINY_CHECKPOINT_NAME
    download_url(server.url_of(TINY_CHECKPOINT_NAME), dest, _pinned(server, TINY_CHECKPOINT_NAME), retries=1, console=_terminal()[0])
    assert [r for _, r in server.requests] == [None, "bytes=1000-"]
    assert dest.read_bytes() == data


def test_a_failed_reconnection_is_retried_after_a_pause(server: FileServer, tmp_path: Path) -> None:
    data = server.files[TINY_CHECKPOINT_NAME]
    server.cut_after[TINY_CHECKPOINT_NAME] = 1000
    server.unavailable = {1}  # the first reconnection is refused
    dest = tmp_path / TINY_CHECKPOINT_NAME
    start = time.monotonic()
    download_url(server.url_of(TINY_CHECKPOINT_NAME), dest, _pinned(server, TINY_CHECKPOINT_NAME), retries=2, backoff_s=0.1, console=_terminal()[0])
    assert time.monotonic() - start >= 0.1 + 0.2  # a pause after each failed attempt, growing
    assert [r for _, r in server.requests] == [None, "bytes=1000-", "bytes=1000-"]
    assert dest.read_bytes() == data
    # Failed connections count against the same retries: with none left, the error is raised.
    server.requests.clear()
    server.cut_after[TINY_CHECKPOINT_NAME] = 1000
    server.unavailable = {1}
    other = tmp_path / "again" / TINY_CHECKPOINT_NAME
    with pytest.raises(DownloadError, match="HTTP 503"):
        download_url(server.url_of(TINY_CHECKPOINT_NAME), other, retries=1, backoff_s=0.0, console=_terminal()[0])
    assert len(server.requests) == 2 and other.with_name(other.name + ".part").stat().st_size == 1000


def _leave_part(dest: Path, data: bytes, server: FileServer, etag: str | None = '"v1"') -> Path:
    """A `.part` as an interrupted run leaves it: the bytes and, if the server named one, its validator."""
    part = dest.with_name(dest.name + ".part")
    part.write_bytes(data)
    if etag is not None:
        part.with_name(part.name + ".json").write_text(json.dumps({"url": server.url_of(dest.name), "etag": etag}))
    return part


def test_a_part_file_without_a_validator_is_not_resumed(server: FileServer, tmp_path: Path) -> None:
    data = server.files[TINY_CHECKPOINT_NAME]
    dest = tmp_path / TINY_CHECKPOINT_NAME
    _leave_part(dest, b"\0garbage" * 100, server, etag=None)  # nothing says where these bytes came from
    digest = download_url(server.url_of(TINY_CHECKPOINT_NAME), dest, console=_terminal()[0])  # nothing pinned
    assert server.requests == [(TINY_CHECKPOINT_NAME, None)]  # fetched whole, the garbage never used
    assert dest.read_bytes() == data and digest == hashlib.sha256(data).hexdigest()


def test_a_resumed_part_failing_its_checksum_is_fetched_again_from_zero(server: FileServer, tmp_path: Path) -> None:
    data = server.files[TINY_CHECKPOINT_NAME]
    dest = tmp_path / TINY_CHECKPOINT_NAME
    _leave_part(dest, b"x" * 1000, server)  # a validator that matches, but bytes that are not the file's
    download_url(server.url_of(TINY_CHECKPOINT_NAME), dest, _pinned(server, TINY_CHECKPOINT_NAME), console=_terminal()[0])
    assert server.requests == [(TINY_CHECKPOINT_NAME, "bytes=1000-"), (TINY_CHECKPOINT_NAME, None)]
    assert dest.read_bytes() == data and list(tmp_path.iterdir()) == [dest]


def test_a_changed_file_on_the_server_restarts_the_download(server: FileServer, tmp_path: Path) -> None:
    data = server.files[TINY_CHECKPOINT_NAME]
    dest = tmp_path / TINY_CHECKPOINT_NAME
    _leave_part(dest, data[:1000], server, etag='"v0"')  # bytes of an older version of the file
    download_url(server.url_of(TINY_CHECKPOINT_NAME), dest, console=_terminal()[0])
    assert server.if_ranges == ['"v0"'] and dest.read_bytes() == data  # If-Range failed: the server sent it whole


def test_without_a_validator_an_interruption_says_the_download_starts_over(server: FileServer, tmp_path: Path) -> None:
    server.etag = None
    server.cut_after[TINY_CHECKPOINT_NAME] = 1000
    dest = tmp_path / TINY_CHECKPOINT_NAME
    with pytest.raises(DownloadError, match="start it over .*no validator"):
        download_url(server.url_of(TINY_CHECKPOINT_NAME), dest, retries=0, console=_terminal()[0])
    download_url(server.url_of(TINY_CHECKPOINT_NAME), dest, console=_terminal()[0])
    assert [r for _, r in server.requests] == [None, None] and dest.read_bytes() == server.files[TINY_CHECKPOINT_NAME]


def test_a_part_file_longer_than_the_file_is_fetched_again(server: FileServer, tmp_path: Path) -> None:
    data = server.files["config.json"]
    dest = tmp_path / "config.json"
    _leave_part(dest, data + b"trailing bytes of something else", server)
    download_url(server.url_of("config.json"), dest, console=_terminal()[0])  # nothing pinned: only the server's 416 tells
    assert server.requests == [("config.json", f"bytes={len(data) + 32}-"), ("config.json", None)]
    assert dest.read_bytes() == data


def test_a_server_ignoring_range_restarts_from_zero(server: FileServer, tmp_path: Path) -> None:
    data = server.files[TINY_CHECKPOINT_NAME]
    dest = tmp_path / TINY_CHECKPOINT_NAME
    _leave_part(dest, b"stale bytes from another file", server)
    server.honour_range = False
    download_url(server.url_of(TINY_CHECKPOINT_NAME), dest, _pinned(server, TINY_CHECKPOINT_NAME), console=_terminal()[0])
    assert server.requests == [(TINY_CHECKPOINT_NAME, "bytes=29-")]
    assert dest.read_bytes() == data


def test_a_complete_part_file_is_finished_without_refetching(server: FileServer, tmp_path: Path) -> None:
    data = server.files["config.json"]
    dest = tmp_path / "config.json"
    _leave_part(dest, data, server)
    download_url(server.url_of("config.json"), dest, _pinned(server, "config.json"), console=_terminal()[0])
    assert server.requests == [("config.json", f"bytes={len(data)}-")]  # answered 416: nothing left to fetch
    assert dest.read_bytes() == data


@pytest.mark.parametrize("url", ["file:///etc/passwd", "http://example.com/g_00500000", "ftp://example.com/x", "https:///x"])
def test_only_https_urls_are_fetched(tmp_path: Path, url: str) -> None:
    with pytest.raises(ConfigError, match="is not an https:// URL") as info:
        download_url(url, tmp_path / "x", console=_terminal()[0])
    assert "\n" not in str(info.value) and list(tmp_path.iterdir()) == []


def test_a_redirect_to_plain_http_is_refused_without_retrying(server: FileServer, tmp_path: Path) -> None:
    server.redirect["moved"] = f"http://localhost:{server.url.rsplit(':', 1)[1]}/config.json"
    with pytest.raises(InsecureRedirectError, match="not an https:// URL"):
        download_url(server.url_of("moved"), tmp_path / "moved", console=_terminal()[0])
    assert server.requests == [("moved", None)] and list(tmp_path.iterdir()) == []


def test_file_names_cannot_leave_the_target_folder(server: FileServer, tmp_path: Path) -> None:
    target = tmp_path / "voc"
    for name in ("../escaped", "a/b", "/etc/x", "..", ".hidden"):
        with pytest.raises(ConfigError, match="not a plain file name"):
            fetch_files((RemoteFile(name, server.url_of("config.json"), None, None),), target, console=_terminal()[0])
    assert server.requests == [] and not (tmp_path / "escaped").exists() and not target.exists()


@pytest.mark.parametrize("bad", ["sha256", "size"])
def test_a_wrong_checksum_or_size_is_refused_and_the_file_removed(server: FileServer, tmp_path: Path, bad: str) -> None:
    data = server.files[TINY_CHECKPOINT_NAME]
    expected = (
        _pinned(server, TINY_CHECKPOINT_NAME, sha256="0" * 64)
        if bad == "sha256"
        else _pinned(server, TINY_CHECKPOINT_NAME, size=len(data) + 1)
    )
    dest = tmp_path / TINY_CHECKPOINT_NAME
    # A size the server announces differs from the pin: refused before the body is read.
    said = "the file was removed" if bad == "sha256" else f"is {len(data)} bytes on the server, expected {len(data) + 1}; nothing was downloaded"
    with pytest.raises(ChecksumError, match=said) as info:
        download_url(server.url_of(TINY_CHECKPOINT_NAME), dest, expected, console=_terminal()[0])
    assert "\n" not in str(info.value)
    if bad == "sha256":
        assert hashlib.sha256(data).hexdigest() in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_a_pinned_size_stops_a_download_whose_server_hides_the_length(server: FileServer, tmp_path: Path) -> None:
    # `size = 100` pinned, a server sending 64 MB without Content-Length: stopped at the pin, not after the body.
    server.hide_length = True
    server.files["big.bin"] = bytes(64 << 20)
    with pytest.raises(ChecksumError, match="big.bin is more than 100 bytes, expected 100; the download was stopped there") as info:
        download_url(server.url_of("big.bin"), tmp_path / "big.bin", RemoteFile("big.bin", server.url_of("big.bin"), 100, None), console=_terminal()[0])
    assert "\n" not in str(info.value)
    assert list(tmp_path.iterdir()) == []
    sent, deadline = -1, time.monotonic() + 10
    while sent != server.sent["big.bin"] and time.monotonic() < deadline:  # until the server has noticed the hang-up
        sent = server.sent["big.bin"]
        time.sleep(0.3)
    assert sent < 16 << 20, sent  # what the socket buffers took, not the 64 MB


def test_a_corrupted_existing_file_is_refused_too(server: FileServer, tmp_path: Path) -> None:
    dest = tmp_path / "config.json"
    dest.write_bytes(b"{}")
    with pytest.raises(ChecksumError):
        download_url(server.url_of("config.json"), dest, _pinned(server, "config.json"))
    assert not dest.exists()


def test_http_errors_and_unreachable_hosts_are_one_line(server: FileServer, tmp_path: Path) -> None:
    with pytest.raises(DownloadError, match="HTTP 404") as info:
        download_url(server.url_of("nope"), tmp_path / "nope", console=_terminal()[0])
    assert "\n" not in str(info.value)
    assert len(server.requests) == 1  # a 404 will not go away: not retried
    with pytest.raises(DownloadError, match=r"cannot reach 127\.0\.0\.1 .*looks offline.*by hand .* put it in") as info:
        download_url("http://127.0.0.1:9/x", tmp_path / "x", timeout=2, backoff_s=0.0, console=_terminal()[0])
    assert "\n" not in str(info.value) and str(tmp_path) in str(info.value)


def test_an_unreachable_hub_says_the_machine_looks_offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import huggingface_hub

    def no_network(*args: object, **kwargs: object) -> None:
        raise huggingface_hub.errors.LocalEntryNotFoundError("cannot find the requested files in the local cache") from OSError(101, "Network is unreachable")

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_network)
    part = get_preset("llama-omni-8b").speech_encoder
    with pytest.raises(DownloadError, match="looks offline.*hf download openai/whisper-large-v3 --revision 06f233f") as info:
        fetch_hub_part(part, tmp_path / "weights")
    assert "\n" not in str(info.value) and f"use --local-dir {tmp_path / 'weights'}" in str(info.value)


def test_fetch_vocoder_converts_once_and_prints_unpinned_checksums(server: FileServer, tmp_path: Path) -> None:
    part = VocoderPart(
        name="tiny",
        checkpoint=TINY_CHECKPOINT_NAME,
        files=(_pinned(server, TINY_CHECKPOINT_NAME), _pinned(server, "config.json", sha256=None)),
        approx_size_bytes=0,
        licence="",
    )
    said: list[str] = []
    out = fetch_vocoder(part, tmp_path / "voc", console=_terminal()[0], echo=said.append)
    assert (out / SAFETENSORS_NAME).is_file()
    digest, size = hashlib.sha256(server.files["config.json"]).hexdigest(), len(server.files["config.json"])
    assert said == [
        f"config.json: NOT verified — the preset pins no SHA-256 for it; computed sha256 {digest}, size {size} bytes: "
        "add them to the preset to verify later downloads."
    ]
    # The converted weights are what loads now, and they equal the pickle's.
    reference = load_vocoder(out / TINY_CHECKPOINT_NAME)
    converted = load_vocoder(out)
    for (k, a), (_, b) in zip(reference.state_dict().items(), converted.state_dict().items()):
        assert a.equal(b), k
    assert sha256_of(out / "config.json") == hashlib.sha256(server.files["config.json"]).hexdigest()


def test_download_preset_fetches_only_the_missing_vocoder(
    server: FileServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_model
) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("OMNI_CACHE", str(tmp_path / "omni"))
    # A preset like the shipped one, with the vocoder URLs pointing at the local server and checksums pinned.
    text = (ROOT / "omni_cli" / PRESET_FOLDER / "llama-omni-8b.toml").read_text()
    base = "https://dl.fbaipublicfiles.com/fairseq/speech_to_speech/vocoder/code_hifigan/mhubert_vp_en_es_fr_it3_400k_layer11_km1000_lj"
    text = text.replace(base, server.url)
    for name in ("g_00500000", "config.json"):
        pinned = f'name = "{name}"\nurl = "{server.url}/{name}"\nsha256 = "{hashlib.sha256(server.files[name]).hexdigest()}"'
        text = text.replace(f'name = "{name}"\nurl = "{server.url}/{name}"\nsha256 = ""', pinned)
    path = tmp_path / "local-vocoder.toml"
    path.write_text(text)
    preset = load_preset(path)
    assert all(f.sha256 for f in preset.vocoder.files)
    # Hub parts already cached (offline); the vocoder is not.
    shipped = get_preset("llama-omni-8b")
    install_tiny_preset(tiny_model, shipped, tmp_path / "hub")
    shutil.rmtree(tmp_path / "omni")
    assert resolve_preset(path).missing == ("vocoder",)
    said: list[str] = []
    resolved = download_preset(preset, echo=said.append, console=_terminal()[0])
    assert resolved.complete and (resolved.vocoder_dir / SAFETENSORS_NAME).is_file()
    assert sorted(name for name, _ in server.requests) == ["config.json", "g_00500000"]
    assert not any("NOT verified" in line for line in said), "pinned files were verified"
    assert not any(line.startswith("Licence") for line in said), "the licence is shown when the model is downloaded"


def test_download_units_only_fetches_no_part_of_the_model(server: FileServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from release_files import fairseq_weights, write_checkpoint, write_kmeans
    from typer.testing import CliRunner

    from omni_cli.cli import app
    from omni_cli.train.units import load_hubert, load_kmeans_centres

    # Nothing of the model is on disk, and the hub is offline (conftest): fetching any of it would fail.
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("OMNI_CACHE", str(tmp_path / "omni"))
    shipped = get_preset("llama-omni-8b")
    centres = np.random.default_rng(2).standard_normal((10, 16)).astype(np.float32)
    server.files[shipped.units.hubert_checkpoint] = write_checkpoint(tmp_path / "m.pt", "dictconfig", fairseq_weights()).read_bytes()
    server.files[shipped.units.kmeans] = write_kmeans(tmp_path / "km.bin", centres, "pickle-4").read_bytes()
    text = (ROOT / "models" / "llama-omni-8b.toml").read_text()
    for remote in shipped.units.files:
        text = text.replace(remote.url, server.url_of(remote.name))
    (tmp_path / "custom.toml").write_text(text)
    result = CliRunner().invoke(app, ["download", str(tmp_path / "custom.toml"), "--units-only"])
    assert result.exit_code == 0, result.output
    assert sorted(name for name, _ in server.requests) == sorted(f.name for f in shipped.units.files)
    folder = tmp_path / "omni" / "units" / shipped.units.name
    assert result.stdout.splitlines() == [f"unit targets: omni units ... --hubert {folder / 'hubert'} --kmeans {folder / 'kmeans.safetensors'} --layer 11"]
    assert "Downloading model" not in result.stderr and "Licence" not in result.stderr and "no CUDA GPU" not in result.stderr
    assert load_hubert(folder / "hubert").config.num_hidden_layers == 11
    np.testing.assert_array_equal(load_kmeans_centres(folder / "kmeans.safetensors").numpy(), centres)
    assert not (tmp_path / "hub").exists() or not any((tmp_path / "hub").iterdir())


def test_download_units_fetches_and_converts_mhubert_and_its_kmeans(
    server: FileServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_model
) -> None:
    from release_files import fairseq_weights, write_checkpoint, write_kmeans
    from typer.testing import CliRunner

    from omni_cli.cli import app
    from omni_cli.train.units import load_hubert, load_kmeans_centres

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("OMNI_CACHE", str(tmp_path / "omni"))
    shipped = get_preset("llama-omni-8b")
    install_tiny_preset(tiny_model, shipped, tmp_path / "hub")  # the model is there; only the units part is fetched
    centres = np.random.default_rng(1).standard_normal((10, 16)).astype(np.float32)
    names = {f.name: f.url for f in shipped.units.files}
    server.files[shipped.units.hubert_checkpoint] = write_checkpoint(tmp_path / "m.pt", "dictconfig", fairseq_weights()).read_bytes()
    server.files[shipped.units.kmeans] = write_kmeans(tmp_path / "km.bin", centres, "pickle-4").read_bytes()
    text = (ROOT / "models" / "llama-omni-8b.toml").read_text()
    for name, url in names.items():
        text = text.replace(url, server.url_of(name))
    (tmp_path / "custom.toml").write_text(text)
    result = CliRunner().invoke(app, ["download", str(tmp_path / "custom.toml"), "--units"])
    assert result.exit_code == 0, result.output
    folder = tmp_path / "omni" / "units" / shipped.units.name
    assert f"--hubert {folder / 'hubert'} --kmeans {folder / 'kmeans.safetensors'} --layer 11" in result.stdout
    assert sum("NOT verified" in line for line in result.stderr.splitlines()) == 2  # neither file is pinned
    assert load_hubert(folder / "hubert").config.num_hidden_layers == 11
    np.testing.assert_array_equal(load_kmeans_centres(folder / "kmeans.safetensors").numpy(), centres)
    # Present now: a second run fetches nothing.
    requests = len(server.requests)
    assert CliRunner().invoke(app, ["download", str(tmp_path / "custom.toml"), "--units"]).exit_code == 0
    assert len(server.requests) == requests
    # A converted folder that is not complete (here: empty) is converted again, not taken as done.
    shutil.rmtree(folder / "hubert")
    (folder / "hubert").mkdir()
    assert CliRunner().invoke(app, ["download", str(tmp_path / "custom.toml"), "--units"]).exit_code == 0
    assert load_hubert(folder / "hubert").config.num_hidden_layers == 11
