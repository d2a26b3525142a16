"""A private PulseAudio server with a virtual microphone and speaker, for audio integration tests.

No sound card, works as root: `pulseaudio` runs in user mode (not --system) as a child of
this process, with its runtime/state in a temporary folder and its socket passed to clients
through PULSE_SERVER, so it never touches a desktop's own server. Two null sinks:

- `omni_out`: the default sink. What PortAudio plays lands here; record it from `omni_out.monitor`.
- `omni_mic`: play a WAV into it; its monitor `omni_mic.monitor` is the default source, so
  PortAudio's default input records exactly that (a virtual microphone).

PortAudio (Debian's libportaudio2 has no PulseAudio backend) reaches the server through ALSA's
pulse plugin (libasound2-plugins, a dependency of the pulseaudio package), whose
/etc/alsa/conf.d/99-pulse.conf makes `default` the pulse device while a server is reachable.

Independent of pytest: `server, reason = start_sound_server()`; `server.stop()`.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

MIC_SINK = "omni_mic"
OUT_SINK = "omni_out"
REQUIRED_TOOLS = ("pulseaudio", "pactl", "paplay", "parecord", "parec")
INSTALL_HINT = "run .ci/sound-server.sh (apt-get install pulseaudio pulseaudio-utils libportaudio2)"


def _die_with_parent(command: list[str]) -> list[str]:
    """Prefix `command` so it gets SIGTERM if the test process dies: no server is ever orphaned.

    util-linux's setpriv sets the parent-death signal and execs the command (no preexec_fn,
    which is unsafe in a process with threads such as PortAudio's).
    """
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "TERM", *command] if setpriv else command


@dataclass
class SoundServer:
    """A running private PulseAudio server; `env` holds what its clients need in their environment."""

    process: subprocess.Popen[bytes]
    runtime_dir: Path
    env: dict[str, str]
    _recorders: list[subprocess.Popen[bytes]] = field(default_factory=list)
    _pacers: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def log_path(self) -> Path:
        """The server's log (useful when a test fails)."""
        return self.runtime_dir / "pulse.log"

    def _client_env(self) -> dict[str, str]:
        return {**os.environ, **self.env}

    def pactl(self, *args: str) -> str:
        """Run `pactl` against this server; return its stdout (raises on failure)."""
        done = subprocess.run(["pactl", *args], env=self._client_env(), capture_output=True, text=True, timeout=10, check=True)
        return done.stdout

    def play_into_mic(self, wav_path: str | Path) -> subprocess.Popen[bytes]:
        """Start playing `wav_path` into the virtual microphone; returns the (running) paplay process."""
        return subprocess.Popen(
            ["paplay", f"--device={MIC_SINK}", str(wav_path)],
            env=self._client_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )

    def record_output(self, path: str | Path, rate: int = 16000, ready_timeout: float = 5.0, sink: str = OUT_SINK) -> subprocess.Popen[bytes]:
        """Record what is played to `sink` (default: the speaker; MIC_SINK: what the microphone hears) into a mono float WAV at `rate`.

        Returns once the recorder is really receiving audio (the file grows), so nothing played
        afterwards is missed. Stop with `stop_recording(process)` so the WAV header is finalised.
        """
        process = subprocess.Popen(
            [
                "parecord",
                f"--device={sink}.monitor",
                f"--rate={rate}",
                "--channels=1",
                "--format=float32le",
                "--file-format=wav",
                "--latency-msec=10",
                str(path),
            ],
            env=self._client_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        self._recorders.append(process)
        # Connecting is asynchronous; wait for ~20 ms of samples past the header.
        path, enough = Path(path), 1024 + rate * 4 // 50
        deadline = time.monotonic() + ready_timeout
        while not (path.exists() and path.stat().st_size >= enough):
            if process.poll() is not None or time.monotonic() > deadline:
                self.stop_recording(process)
                error = process.stderr.read().decode(errors="replace").strip() if process.stderr else ""
                raise RuntimeError(f"parecord did not start recording {path}: {error or 'timed out'}")
            time.sleep(0.01)
        return process

    def stop_recording(self, process: subprocess.Popen[bytes], timeout: float = 5.0) -> None:
        """Stop a recorder cleanly (SIGINT makes parecord close the file properly)."""
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if process in self._recorders:
            self._recorders.remove(process)

    @contextmanager
    def as_default(self) -> Iterator[SoundServer]:
        """Within the block, this process's PortAudio/libpulse clients use this server."""
        saved = {key: os.environ.get(key) for key in self.env}
        os.environ.update(self.env)
        try:
            yield self
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value

    def _pace_sinks(self, timeout: float) -> None:
        """Make both null sinks render in 10 ms steps, in real time, like a sound card.

        Left alone, a null sink renders 2 s ahead in one go whenever no client asks for low
        latency: a recording of its monitor then skips the silence and playback is swallowed
        in bursts, so `stop()` could not be measured. A low-latency reader on each monitor
        sets the sink's latency; suspending and resuming restarts its clock at that latency.
        """
        for sink in (OUT_SINK, MIC_SINK):
            self._pacers.append(
                subprocess.Popen(
                    ["parec", f"--device={sink}.monitor", "--latency-msec=10", "--raw"],
                    env=self._client_env(),
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        deadline = time.monotonic() + timeout
        while len(self.pactl("list", "short", "source-outputs").splitlines()) < len(self._pacers):
            if time.monotonic() > deadline:
                raise TimeoutError("the sink pacers did not connect")
            time.sleep(0.02)
        for sink in (OUT_SINK, MIC_SINK):
            self.pactl("suspend-sink", sink, "1")
            self.pactl("suspend-sink", sink, "0")

    def stop(self) -> None:
        """Stop recorders and the server, and remove its folder."""
        for recorder in list(self._recorders):
            self.stop_recording(recorder)
        for pacer in self._pacers:
            pacer.terminate()
        for pacer in self._pacers:
            try:
                pacer.wait(5)
            except subprocess.TimeoutExpired:
                pacer.kill()
                pacer.wait()
        self._pacers.clear()
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.runtime_dir, ignore_errors=True)


def start_sound_server(timeout: float = 10.0, sink_rate: int = 48000) -> tuple[SoundServer | None, str]:
    """Start a private PulseAudio server with the virtual mic and speaker.

    Returns (server, "") on success, or (None, reason) when it cannot start (tools missing,
    daemon refused) so callers can skip with that reason instead of failing.
    """
    missing = [tool for tool in REQUIRED_TOOLS if shutil.which(tool) is None]
    if missing:
        return None, f"{', '.join(missing)} not installed; {INSTALL_HINT}"
    runtime_dir = Path(tempfile.mkdtemp(prefix="omni-pulse-"))
    socket = runtime_dir / "native"
    client_conf = runtime_dir / "client.conf"
    # No autospawn: a client must never start a second server (e.g. the user's) behind our back.
    client_conf.write_text("autospawn = no\n")
    env = {
        "PULSE_SERVER": f"unix:{socket}",
        "PULSE_CLIENTCONFIG": str(client_conf),
        "PULSE_COOKIE": str(runtime_dir / "cookie"),
    }
    server_env = {**os.environ, **env, "PULSE_RUNTIME_PATH": str(runtime_dir), "PULSE_STATE_PATH": str(runtime_dir)}
    sink_args = f"rate={sink_rate}"
    command = [
        "pulseaudio",
        "--daemonize=no",  # a child we own and can stop by pid
        "-n",  # no default.pa: no hardware detection, only the modules below
        "--exit-idle-time=-1",
        "--use-pid-file=no",
        "--realtime=no",
        "--high-priority=no",
        f"--log-target=file:{runtime_dir / 'pulse.log'}",
        f"--load=module-native-protocol-unix socket={socket} auth-anonymous=1",
        f"--load=module-null-sink sink_name={OUT_SINK} {sink_args}",
        f"--load=module-null-sink sink_name={MIC_SINK} {sink_args}",
    ]
    try:
        with open(runtime_dir / "stderr.txt", "wb") as stderr_file:
            process = subprocess.Popen(
                _die_with_parent(command),
                env=server_env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr_file,  # a file, not a pipe: nobody reads it while the server runs
            )
    except OSError as exc:
        shutil.rmtree(runtime_dir, ignore_errors=True)
        return None, f"cannot run pulseaudio: {exc}"
    server = SoundServer(process=process, runtime_dir=runtime_dir, env=env)
    deadline = time.monotonic() + timeout
    reason = "pulseaudio did not answer within the timeout"
    while time.monotonic() < deadline:
        if process.poll() is not None:
            stderr = (runtime_dir / "stderr.txt").read_text(errors="replace").strip()
            log = server.log_path.read_text(errors="replace").strip() if server.log_path.exists() else ""
            last = (stderr or log).splitlines()[-1:] or ["no message"]
            reason = f"pulseaudio exited with status {process.returncode}: {last[0]}"
            break
        if socket.exists():
            try:
                server.pactl("set-default-sink", OUT_SINK)
                server.pactl("set-default-source", f"{MIC_SINK}.monitor")
                server._pace_sinks(max(0.5, deadline - time.monotonic()))
                return server, ""
            except (subprocess.CalledProcessError, subprocess.TimeoutExpired, TimeoutError) as exc:
                reason = f"pactl cannot talk to the new server: {exc}"
        time.sleep(0.05)
    server.stop()
    return None, reason
