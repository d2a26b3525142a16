"""Device choice on PulseAudio/PipeWire desktops, and fast failure when devices or the sound server are missing.

Fake PortAudio and a fake `pactl` list for the choosing rules; the private PulseAudio server
(tests/sound_server.py) for real sources and sinks, a dead server and a hung one.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import omni_cli.audio.devices as devices
from omni_cli.audio.devices import (
    PulseDevice,
    SoundSystemHung,
    choose_device,
    find_device,
    list_devices,
    list_pulse_devices,
    within_deadline,
)
from omni_cli.audio.mic import Microphone
from omni_cli.errors import AudioInputError

ROOT = Path(__file__).resolve().parents[2]
GATEWAY = [
    {"name": "HDA Intel PCH: ALC257 Analog (hw:0,0)", "max_input_channels": 2, "max_output_channels": 2, "default_samplerate": 48000.0},
    {"name": "pulse", "max_input_channels": 32, "max_output_channels": 32, "default_samplerate": 44100.0},
    {"name": "default", "max_input_channels": 32, "max_output_channels": 32, "default_samplerate": 44100.0},
]
PULSE = [
    PulseDevice("alsa_input.usb-Jabra_Link-00.mono-fallback", "Jabra Link 380 Mono", "input", 1, 16000, False),
    PulseDevice("alsa_input.pci-0000_00_1f.3.analog-stereo", "Built-in Audio Analog Stereo", "input", 2, 48000, True),
    PulseDevice("alsa_output.usb-Jabra_Link-00.analog-stereo", "Jabra Link 380 Analog Stereo", "output", 2, 48000, False),
]


@pytest.fixture
def no_pulse_routing(monkeypatch: pytest.MonkeyPatch) -> None:
    """PULSE_SOURCE/PULSE_SINK unset during the test and afterwards, whatever the test chose."""
    for name in ("PULSE_SOURCE", "PULSE_SINK"):
        monkeypatch.setenv(name, "")  # records the original state, so the undo removes what choose_device sets
        monkeypatch.delenv(name)


@pytest.fixture
def desktop(fake_sounddevice, monkeypatch: pytest.MonkeyPatch, no_pulse_routing):
    """A PulseAudio desktop: PortAudio sees the card, `pulse` and `default`; pactl lists the rest."""
    fake = fake_sounddevice(devices_list=GATEWAY, default=(2, 2), rates=(16000, 44100, 48000))
    monkeypatch.setattr(devices, "list_pulse_devices", lambda: PULSE)
    return fake


def test_pulse_devices_are_listed_after_portaudios_with_their_own_numbers(desktop) -> None:
    listed = list_devices()
    assert [(d.index, d.name, d.pulse_name is not None) for d in listed[3:]] == [
        (3, "Jabra Link 380 Mono", True),
        (4, "Built-in Audio Analog Stereo", True),
        (5, "Jabra Link 380 Analog Stereo", True),
    ]
    assert all(d.portaudio_index == 1 for d in listed[3:])  # they open through PortAudio's `pulse`
    assert listed[4].is_default_input and listed[2].is_default_input  # the server's default; PortAudio's
    assert listed[3].max_input_channels == 1 and listed[3].max_output_channels == 0


def test_a_pulse_source_is_chosen_by_part_of_its_description_its_name_or_its_number(desktop) -> None:
    assert find_device("jabra", "input") == 1 and os.environ["PULSE_SOURCE"] == "alsa_input.usb-Jabra_Link-00.mono-fallback"
    assert "PULSE_SINK" not in os.environ
    assert find_device("built-in audio", "input") == 1 and os.environ["PULSE_SOURCE"].startswith("alsa_input.pci")
    assert find_device("alsa_output.usb-Jabra_Link-00.analog-stereo", "output") == 1
    assert os.environ["PULSE_SINK"] == "alsa_output.usb-Jabra_Link-00.analog-stereo"
    chosen = choose_device("3", "input")
    assert chosen is not None and chosen.name == "Jabra Link 380 Mono"


def test_a_number_int_cannot_read_is_a_name_not_a_traceback(desktop) -> None:
    # "²" is a digit to str.isdigit(), but not a number int() reads: no device has that name.
    with pytest.raises(AudioInputError, match="no input device named '²'"):
        choose_device("²", "input")


def test_portaudio_names_keep_their_meaning_and_errors_name_pulse_devices(desktop) -> None:
    # "alc257" and "pulse" are PortAudio's: unchanged, and no PulseAudio routing is set.
    assert find_device("alc257", "input") == 0 and find_device("pulse", "output") == 1
    assert "PULSE_SOURCE" not in os.environ and "PULSE_SINK" not in os.environ
    # "analog" is in PortAudio's card name, so PortAudio's device wins over the PulseAudio ones.
    assert find_device("analog", "input") == 0
    assert find_device("link 3", "input") == 1  # one input has it; the output with it does not count
    with pytest.raises(AudioInputError, match=r"'alsa_' matches several input devices \(3: Jabra Link 380 Mono \(alsa_input"):
        find_device("alsa_", "input")
    with pytest.raises(AudioInputError, match="Did you mean: alsa_input.usb-Jabra_Link-00.mono-fallback") as info:
        find_device("jabra link 380 mno", "input")
    assert "4: Built-in Audio Analog Stereo (alsa_input.pci-0000_00_1f.3.analog-stereo)" in str(info.value)
    assert "\n" not in str(info.value)


def test_microphone_on_a_pulse_source_is_named_by_its_description(desktop) -> None:
    with Microphone(device="jabra") as mic:
        assert mic.device_name == "Jabra Link 380 Mono"
        assert desktop.streams[0].settings["device"] == 1


def test_speaker_on_a_pulse_sink_is_named_by_its_description(desktop) -> None:
    from omni_cli.audio.player import Player

    with Player(device="jabra", sample_rate=16000) as player:
        assert player.device_name == "Jabra Link 380 Analog Stereo"  # in errors and the transcript, not "pulse"
        assert desktop.streams[0].settings["device"] == 1
        assert os.environ["PULSE_SINK"] == "alsa_output.usb-Jabra_Link-00.analog-stereo"


def test_pactl_text_is_parsed_into_sources_and_sinks() -> None:
    text = (
        "Source #52\n\tState: SUSPENDED\n\tName: alsa_input.usb-Jabra_Link-00.mono-fallback\n"
        "\tDescription: Jabra Link 380 Mono\n\tDriver: module-alsa-card.c\n\tSample Specification: s16le 1ch 16000Hz\n"
        "\tProperties:\n\t\tdevice.description = \"Jabra\"\n\t\tName: not-a-field\n"
        "Source #53\n\tName: alsa_output.pci.monitor\n\tDescription: Monitor of Built-in Audio\n"
        "\tSample Specification: s32le 2ch 48000Hz\n"
    )
    parsed = devices._parse_pactl_list(text, "input", default="alsa_output.pci.monitor")
    assert parsed == [
        PulseDevice("alsa_input.usb-Jabra_Link-00.mono-fallback", "Jabra Link 380 Mono", "input", 1, 16000, False),
        PulseDevice("alsa_output.pci.monitor", "Monitor of Built-in Audio", "input", 2, 48000, True),
    ]


# -- deadlines -------------------------------------------------------------------------------


@pytest.fixture
def release(monkeypatch: pytest.MonkeyPatch):
    """An event blocking calls until the test ends; the 'sound system hung' state is undone afterwards."""
    event = threading.Event()
    monkeypatch.setattr(devices, "_hung", None)
    yield event
    event.set()


def test_a_hanging_call_becomes_one_line_and_later_calls_fail_at_once(release: threading.Event) -> None:
    started = time.monotonic()
    with pytest.raises(SoundSystemHung, match=r"did not answer within 0.2 s while listing; .* seems hung") as info:
        within_deadline(release.wait, "listing", seconds=0.2)
    assert time.monotonic() - started < 0.5 and "\n" not in str(info.value)
    started = time.monotonic()
    with pytest.raises(SoundSystemHung):
        within_deadline(lambda: 1, "anything else")
    assert time.monotonic() - started < 0.05
    # Results and exceptions come back from the worker thread as they are.
    devices._hung = None
    assert within_deadline(lambda: 42, "answering") == 42
    with pytest.raises(ZeroDivisionError):
        within_deadline(lambda: 1 / 0, "failing")


def test_portaudio_hanging_on_a_hung_server_is_reported_within_the_deadline(desktop, release: threading.Event, monkeypatch) -> None:
    monkeypatch.setattr(desktop, "query_devices", lambda *a, **k: release.wait())
    started = time.monotonic()
    with pytest.raises(SoundSystemHung, match="while listing audio devices"):
        find_device("jabra", "input")
    assert time.monotonic() - started < devices.SOUND_TIMEOUT_S + 0.3


# -- a real PulseAudio server ------------------------------------------------------------------


@pytest.fixture
def headset(sound_server, no_pulse_routing):
    """An extra sink 'USB-Headset' (its monitor: source 'Monitor of USB-Headset') on the test server."""
    module = sound_server.pactl(
        "load-module", "module-null-sink", "sink_name=omni_headset", "rate=48000", "sink_properties=device.description=USB-Headset"
    ).strip()
    yield sound_server
    sound_server.pactl("unload-module", module)


@pytest.mark.sound
def test_a_pulse_source_chosen_by_description_is_what_the_microphone_records(headset, question_wavs, question_16k) -> None:
    names = {d.pulse_name: d.name for d in list_devices() if d.pulse_name}
    assert names["omni_headset.monitor"] == "Monitor of USB-Headset" and names["omni_headset"] == "USB-Headset"
    assert {p.name for p in list_pulse_devices() if p.is_default} == {"omni_out", "omni_mic.monitor"}
    with Microphone(device="monitor of usb-head") as mic:
        assert mic.device_name == "Monitor of USB-Headset"
        assert mic.read(timeout=2.0) is not None
        recording = [d for d in headset.pactl("list", "source-outputs").split("Source Output #") if "omni" in d.lower() or "python" in d.lower()]
        assert recording
        # Played into the headset sink, the question reaches us (the default mic, omni_mic, stays silent).
        player = subprocess.Popen(["paplay", "--device=omni_headset", str(question_wavs[0])], env={**os.environ, **headset.env})
        heard = [mic.read(timeout=1.0) for _ in range(int(question_16k[0].size / 480) + 20)]
        assert player.wait(5) == 0
    audio = np.concatenate([f for f in heard if f is not None])
    assert np.sqrt(np.mean(audio**2)) > 0.01


@pytest.mark.sound
def test_a_pulse_sink_chosen_by_name_is_where_the_player_plays(headset) -> None:
    from omni_cli.audio.player import Player

    sinks = {line.split("\t")[1]: line.split("\t")[0] for line in headset.pactl("list", "short", "sinks").splitlines()}
    with Player(device="usb-headset") as player:
        player.play(np.zeros(16000, np.float32))
        inputs = [line.split("\t") for line in headset.pactl("list", "short", "sink-inputs").splitlines()]
        assert sinks["omni_headset"] in [fields[1] for fields in inputs]
        player.stop()


CHECK = """
import sys, time
started = time.monotonic()
from omni_cli.audio.devices import find_device
from omni_cli.errors import OmniError
try:
    find_device(sys.argv[1] or None, "input")
    print("ok")
except OmniError as exc:
    print(exc)
print(f"{time.monotonic() - started:.2f}", "torch" in sys.modules)
"""

SPEAKER = """
import sys, time
started = time.monotonic()
from omni_cli.audio.player import Player
from omni_cli.errors import OmniError
try:
    Player(sample_rate=16000).start().close()
    print("ok")
except OmniError as exc:
    print(exc)
print(f"{time.monotonic() - started:.2f}")
"""

PROBLEM = """
import os, signal, sys, time
from omni_cli.audio.mic import Microphone
from omni_cli.audio.watch import SoundWatch
with Microphone() as mic:
    assert mic.read(timeout=2.0) is not None
    watch = SoundWatch(mic, None, stall_s=0.3)
    os.kill(int(sys.argv[1]), getattr(signal, sys.argv[2]))
    started = time.monotonic()
    while (problem := watch.problem() if mic.read(timeout=0.1) is None else None) is None:
        assert time.monotonic() - started < 10, "no problem reported"
    print(problem)
    print(f"{time.monotonic() - started:.2f}")
    closing = time.monotonic()
print(f"{time.monotonic() - closing:.2f}")
"""


def _run_against(server, code: str, *args: str) -> list[str]:
    done = subprocess.run([sys.executable, "-c", code, *args], env={**os.environ, **server.env}, cwd=ROOT,
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip().splitlines()


@pytest.fixture
def private_server():
    """A server of the test's own, to kill or freeze (the session's serves the other tests)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from sound_server import start_sound_server

    server, reason = start_sound_server()
    if server is None:
        pytest.skip(f"no sound server: {reason}")
    yield server
    os.kill(server.process.pid, signal.SIGCONT)
    server.stop()


@pytest.mark.sound
def test_a_wrong_device_name_is_one_line_within_2s(private_server) -> None:
    message, timing = _run_against(private_server, CHECK, "usb mikrophone")
    assert message.startswith("no input device named 'usb mikrophone'.")
    seconds, torch_imported = timing.split()
    assert float(seconds) < 2.0 and torch_imported == "False"


@pytest.mark.sound
@pytest.mark.parametrize(("how", "said"), [("SIGKILL", "the sound server is not running"), ("SIGSTOP", "seems hung")])
def test_a_dead_or_hung_sound_server_is_one_line_within_2s(private_server, how: str, said: str) -> None:
    os.kill(private_server.process.pid, getattr(signal, how))
    message, timing = _run_against(private_server, CHECK, "")
    assert said in message
    seconds, torch_imported = timing.split()
    assert float(seconds) < 2.0 and torch_imported == "False"


@pytest.mark.sound
def test_omni_devices_on_a_hung_server_says_so_in_one_line(private_server) -> None:
    # PortAudio's start points descriptor 2 at /dev/null until it returns, which on a hung server it never does.
    os.kill(private_server.process.pid, signal.SIGSTOP)
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "omni_cli.cli", "devices"], env={**os.environ, **private_server.env}, cwd=ROOT,
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 1 and done.stdout == ""
    (line,) = done.stderr.splitlines()
    assert line.startswith("omni: error: the sound system did not answer within 1.5 s") and "seems hung" in line
    assert time.monotonic() - started < 4.0  # start-up, the 1.5 s deadline, the exit


@pytest.mark.sound
@pytest.mark.parametrize(("how", "said"), [("SIGKILL", "the sound server is not running"), ("SIGSTOP", "the sound server is not answering")])
def test_the_microphone_says_the_server_went_away_within_2s(private_server, how: str, said: str) -> None:
    problem, detected, closed = _run_against(private_server, PROBLEM, str(private_server.process.pid), how)
    assert said in problem
    assert float(detected) < 2.0 and float(closed) < 2.5


@pytest.mark.sound
def test_a_speaker_opened_first_on_a_hung_server_is_one_line_within_2s(private_server) -> None:
    """`omni chat --text` opens the speaker before anything else has loaded PortAudio."""
    os.kill(private_server.process.pid, signal.SIGSTOP)
    message, seconds = _run_against(private_server, SPEAKER)
    assert "seems hung" in message
    assert float(seconds) < 2.0
