"""Echo cancellation: a simulated room (delay + reflections) replays the far end into the mic.

The far end goes in through `play_reference`, the mic through `process`, in 30 ms steps as the
audio callbacks would; what comes out must have lost the echo and kept the near-end speaker.
"""

from __future__ import annotations

import sys
from types import SimpleNamespace

import numpy as np
import pytest
from scipy.signal import resample_poly

from signals import level_db, room_echo

from omni_cli.audio.echo import APM_FRAME, EchoCanceller, EchoSettings, EchoUnavailable, warm_up_sound
from omni_cli.audio.mic import Microphone
from omni_cli.audio.vad import Endpointer, SpeechStart

RATE = 16000
STEP = 480  # the microphone's 30 ms frames


def cancel(far: np.ndarray, mic: np.ndarray, delay_ms: int, far_rate: int = RATE) -> tuple[np.ndarray, EchoCanceller]:
    """Run both streams through one canceller in 30 ms steps, far end first (as it is played first)."""
    canceller = EchoCanceller(EchoSettings(delay_ms=delay_ms))
    far_step = STEP * far_rate // RATE
    out = np.zeros_like(mic)
    for k in range(mic.size // STEP):
        canceller.play_reference(far[k * far_step : (k + 1) * far_step], far_rate)
        out[k * STEP : (k + 1) * STEP] = canceller.process(mic[k * STEP : (k + 1) * STEP])
    return out, canceller


@pytest.mark.parametrize(("delay_ms", "far_rate"), [(30, RATE), (150, RATE), (80, 48000)])
def test_white_noise_echo_is_removed(delay_ms: int, far_rate: int) -> None:
    rng = np.random.default_rng(delay_ms)
    far = rng.normal(0, 0.1, 4 * RATE).astype(np.float32)
    mic = room_echo(far, delay_ms, 0.0) + rng.normal(0, 1e-4, far.size).astype(np.float32)
    played = far if far_rate == RATE else resample_poly(far, far_rate // 1000, RATE // 1000).astype(np.float32)
    out, canceller = cancel(played, mic, delay_ms, far_rate)
    erle = level_db(mic[2 * RATE :]) - level_db(out[2 * RATE :])
    print(f"white noise, {delay_ms} ms, reference at {far_rate} Hz: ERLE {erle:.1f} dB")
    assert erle >= 35.0  # measured 43-47 dB
    # The live estimate tracks the measured figure (it covers the last ~1 s).
    assert canceller.erle_db == pytest.approx(level_db(mic[3 * RATE :]) - level_db(out[3 * RATE :]), abs=3.0)
    assert canceller.far_active_s == pytest.approx(4.0, abs=0.05)


@pytest.mark.parametrize("echo_db", [0.0, -6.0])
def test_double_talk_keeps_the_near_speaker_and_removes_the_echo(question_16k: list[np.ndarray], echo_db: float) -> None:
    """A reply (real speech) echoes for 9 s; from 5 s on the user speaks over it at the echo's level."""
    reply, user = np.concatenate(question_16k[1:] * 2)[: 9 * RATE], question_16k[0]
    onset = 5 * RATE
    near = np.zeros(reply.size, np.float32)
    near[onset : onset + user.size] = user * 10 ** (echo_db / 20)
    mic = room_echo(reply, 100, echo_db) + near + np.random.default_rng(0).normal(0, 3e-4, reply.size).astype(np.float32)
    out, canceller = cancel(reply, mic, 100)
    # Echo alone, once converged (AEC3 needs ~2 s of reply speech): removed.
    echo_only = slice(2 * RATE, onset)
    erle = level_db(mic[echo_only]) - level_db(out[echo_only])
    # Double talk: the user's level, cleaned vs alone; AEC3 ducks where the echo is louder than the user.
    talk = slice(onset, onset + user.size)
    kept = level_db(out[talk]) - level_db(near[talk])
    pieces = [slice(onset + i, onset + i + RATE // 4) for i in range(0, user.size - RATE // 4, RATE // 4)]
    user_louder = [level_db(out[p]) - level_db(near[p]) for p in pieces if level_db(near[p]) >= level_db(mic[p] - near[p])]
    print(f"echo at {echo_db} dB: ERLE {erle:.1f} dB; double talk: user's level {kept:.1f} dB, "
          f"where the user is louder than the echo {np.round(user_louder, 1)} dB")
    assert erle >= 30.0  # measured 43-48 dB
    assert kept >= -6.0  # measured -3 to -4 dB
    assert user_louder and np.median(user_louder) >= -3.0  # measured -0.6 to -2 dB
    # What the user sees: the VAD on the cleaned mic hears only the user once converged, soon
    # enough to barge in (the issue asks for 400 ms); on the raw mic it hears the reply at once.
    user_onset = (onset + np.flatnonzero(np.abs(user) > 0.02 * np.abs(user).max())[0]) / RATE
    heard_at = speech_starts(out)
    after_convergence = [t for t in heard_at if t >= 2.5]
    print(f"user onset {user_onset:.2f} s, speech confirmed at {after_convergence} s")
    assert len(after_convergence) == 1 and 0.0 < after_convergence[0] - user_onset <= 0.4  # measured 0.32 s
    assert speech_starts(mic)[0] < 0.5


def speech_starts(audio: np.ndarray) -> list[float]:
    """Stream times (s) at which the default endpointer confirms speech (SpeechStart is emitted)."""
    endpointer = Endpointer()
    return [(i + 1) * STEP / RATE for i in range(audio.size // STEP) for e in endpointer.push(audio[i * STEP : (i + 1) * STEP]) if isinstance(e, SpeechStart)]


def converged_after(far: np.ndarray, mic: np.ndarray, delay_ms: int = 50) -> float | None:
    """Seconds into the streams when the canceller says it has converged (None: it never did)."""
    canceller = EchoCanceller(EchoSettings(delay_ms=delay_ms))
    for k in range(mic.size // STEP):
        canceller.play_reference(far[k * STEP : (k + 1) * STEP])
        canceller.process(mic[k * STEP : (k + 1) * STEP])
        if canceller.converged:
            return (k + 1) * STEP / RATE
    return None


@pytest.mark.parametrize(("delay_ms", "echo_db"), [(30, 0.0), (150, -6.0)])
def test_the_warm_up_hiss_makes_the_canceller_converge_and_double_talk_does_not(question_16k, delay_ms: int, echo_db: float) -> None:
    """Convergence is measured (the echo left 30 dB under what was played), not assumed after 5 s of reply."""
    hiss = np.concatenate([warm_up_sound(RATE), np.zeros(RATE // 2, np.float32)])
    room_noise = np.random.default_rng(0).normal(0, 3e-4, hiss.size).astype(np.float32)
    assert converged_after(hiss, room_echo(hiss, delay_ms, echo_db) + room_noise, delay_ms) <= 0.8  # within the hiss
    assert converged_after(hiss, room_noise) <= 0.8  # no echo at all (a headset): nothing to wait for
    # The user talking over it (no echo, their voice as loud as the hiss or louder): never taken for converged.
    user = np.resize(question_16k[0], hiss.size) * 0.5
    assert converged_after(hiss, user + room_noise) is None
    # Reply speech alone gets there too, later.
    reply = np.concatenate(question_16k[1:])[: 4 * RATE]
    assert converged_after(reply, room_echo(reply, delay_ms, echo_db), delay_ms) is not None


def test_frames_must_be_whole_10ms_pieces() -> None:
    canceller = EchoCanceller()
    assert canceller.process(np.zeros(3 * APM_FRAME, np.int16)).shape == (3 * APM_FRAME,)
    with pytest.raises(ValueError, match="whole 10 ms frames"):
        canceller.process(np.zeros(100, np.float32))


def test_missing_livekit_is_one_line_saying_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "livekit", None)  # import livekit → ImportError
    monkeypatch.setitem(sys.modules, "livekit.rtc", None)
    with pytest.raises(EchoUnavailable, match=r"^echo cancellation unavailable: the livekit package is not installed \(pip install livekit\)\.$"):
        EchoCanceller()


def test_a_broken_native_module_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    import livekit.rtc

    def refuse(**_: object) -> None:
        raise ImportError("failed to load liblivekit_ffi.so: GLIBC_2.28 not found\nInstall the livekit package with: pip install livekit")

    monkeypatch.setattr(livekit.rtc, "AudioProcessingModule", refuse)
    with pytest.raises(EchoUnavailable) as info:
        EchoCanceller()
    assert str(info.value) == (
        "echo cancellation unavailable: cannot start WebRTC's audio processing (failed to load liblivekit_ffi.so: GLIBC_2.28 not found)."
    )


def test_microphone_cleans_frames_before_queueing_them(fake_sounddevice) -> None:
    fake = fake_sounddevice(rates=(16000,))
    with Microphone(frame_ms=30, clean=lambda frame: frame * 0.5) as mic:
        (stream,) = fake.streams
        stream.callback(np.ones((480, 1), np.float32), 480, None, SimpleNamespace(input_overflow=False))
        np.testing.assert_array_equal(mic.read(timeout=1), np.full(480, 0.5, np.float32))
        assert mic.input_latency == 0.01


@pytest.mark.sound
@pytest.mark.slow  # ~9 s of real-time playback; a timing test: once, with load ~10 on 2 cores, the canceller lost the echo (5 dB)
def test_echo_through_a_real_sound_server_is_removed(sound_server, question_16k: list[np.ndarray]) -> None:
    """The speaker's output loops back into the virtual mic 60 ms later (PulseAudio module-loopback).

    The reference is tapped from the player's output callback and the mic is cleaned in its
    own callback: the real-time path with real latencies and resampling.
    """
    from omni_cli.audio.player import Player

    module = sound_server.pactl("load-module", "module-loopback", "source=omni_out.monitor", "sink=omni_mic", "latency_msec=60").strip()
    try:
        reply = np.concatenate(question_16k * 2)[: 8 * RATE]
        canceller = EchoCanceller()
        raw: list[np.ndarray] = []

        def clean(frame: np.ndarray) -> np.ndarray:
            raw.append(frame.copy())
            return canceller.process(frame)

        player = Player(sample_rate=RATE)
        render = player.render

        def render_and_tell(out: np.ndarray) -> None:  # what the wiring adds to the player's callback
            render(out)
            canceller.play_reference(out, player.device_rate)

        player.render = render_and_tell
        with player, Microphone(clean=clean) as mic:
            canceller.set_delay_ms((player.output_latency + mic.input_latency) * 1000)
            mic.clear()
            raw.clear()
            player.play(reply)
            cleaned = [mic.read(timeout=1.0) for _ in range(reply.size // STEP + 10)]
        assert all(frame is not None for frame in cleaned), "the microphone stopped delivering"
    finally:
        sound_server.pactl("unload-module", module)
    out = np.concatenate(cleaned)
    heard = np.concatenate(raw)[: out.size]
    converged = slice(5 * RATE, 8 * RATE)  # from 5 s on: AEC3 has had seconds of reply speech
    assert level_db(heard[converged]) > -30.0  # the echo really reached the mic
    erle = level_db(heard[converged]) - level_db(out[converged])
    per_s = [level_db(heard[i : i + RATE]) - level_db(out[i : i + RATE]) for i in range(0, out.size - RATE + 1, RATE)]
    print(f"real-time echo through PulseAudio: ERLE {erle:.1f} dB (5-8 s), per second {np.round(per_s, 1)}, live {canceller.erle_db:.1f} dB, "
          f"mic overflows {mic.overflows}, speaker underflows {player.xruns}")
    assert erle >= 30.0  # measured 47-50 dB
    assert canceller.converged


def test_without_an_echo_path_the_user_is_heard_at_once_over_a_reply(question_16k: list[np.ndarray]) -> None:
    """A headset: nothing of the hiss came back, so the canceller steps aside (AEC3 would duck the user's first half-second)."""
    hiss = np.concatenate([warm_up_sound(RATE), np.zeros(RATE // 2, np.float32)])
    reply, user = question_16k[2][: 3 * RATE], question_16k[0]
    far = np.concatenate([hiss, reply])
    start = hiss.size + RATE // 2  # the user speaks half a second into the reply
    noise = np.random.default_rng(0).normal(0, 3e-4, far.size).astype(np.float32)
    mic = noise.copy()
    mic[start:] += user[: far.size - start]
    out, canceller = cancel(far, mic, 50)
    assert canceller.converged and canceller.bypassed and canceller.echo_return_db >= 40
    whole = mic.size // STEP * STEP  # what went through in 30 ms frames
    np.testing.assert_array_equal(out[hiss.size : whole], mic[hiss.size : whole])
    onset = start / RATE + np.flatnonzero(np.abs(user) > 0.02 * np.abs(user).max())[0] / RATE
    assert 0 < speech_starts(out)[0] - onset <= 0.25  # heard as soon as on a silent speaker
    # Loudspeakers into the microphone: the echo comes back, and the canceller stays.
    _, with_echo = cancel(far, room_echo(far, 50, -6.0) + noise, 50)
    assert with_echo.converged and not with_echo.bypassed and with_echo.echo_return_db < 20
