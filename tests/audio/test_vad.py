"""Endpointer: the state machine with a fake classifier, then webrtcvad on real and synthetic speech."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from signals import NOISES, at_dbfs, split_at_inner_gap, true_bounds, with_pause

from omni_cli.audio.io import load_audio
from omni_cli.audio.speech_model import SpeechModel
from omni_cli.audio.vad import (
    Endpointer,
    EndpointerConfig,
    Event,
    FrameSplitter,
    SpeechEnd,
    SpeechPause,
    SpeechStart,
    frames,
    to_float32,
    to_pcm16,
    webrtc_classifier,
)
from omni_cli.errors import ConfigError

RATE = 16000

# -- the pure state machine, with a classifier that reads the frame's level ------------------

# 10 ms frames: 3 frames pre-roll, 5 frames to confirm, 3 unvoiced frames drop an onset,
# 10 unvoiced frames end speech, 100 frames at most.
SMALL = EndpointerConfig(
    frame_ms=10, pre_roll_ms=30, min_speech_ms=50, start_gap_ms=30, hangover_ms=100, max_utterance_s=1.0, speech_model=False
)


def loud_is_speech(pcm: bytes, rate: int) -> bool:
    """Fake classifier: a frame is speech when its first sample is above 0.25."""
    return np.frombuffer(pcm, dtype="<i2")[0] > 0.25 * 32768


def labelled_frames(labels: str, frame_samples: int) -> list[np.ndarray]:
    """One constant frame per label, 'v' loud (speech) and '.' quiet, each with a unique value."""
    return [
        np.full(frame_samples, (0.5 if label == "v" else 0.0) + (i + 1) * 1e-4, dtype=np.float32)
        for i, label in enumerate(labels)
    ]


def run(labels: str, config: EndpointerConfig = SMALL) -> tuple[list[tuple[int, Event]], list[np.ndarray]]:
    """Push labelled frames; return (frame index, event) pairs and the frames."""
    endpointer = Endpointer(config, is_speech=loud_is_speech)
    source = labelled_frames(labels, config.frame_samples)
    events = [(i, event) for i, frame in enumerate(source) for event in endpointer.push(frame)]
    return events, source


def test_onset_pre_roll_and_hangover_are_exact() -> None:
    events, source = run("." * 20 + "v" * 10 + "." * 15)
    (i_start, start), (i_end, end) = events
    assert isinstance(start, SpeechStart) and isinstance(end, SpeechEnd)
    assert i_start == 24 and start.t == pytest.approx(0.20)  # confirmed at the 5th voiced frame, dated at the 1st
    assert i_end == 39 and end.t == pytest.approx(0.40)  # 10 unvoiced frames after the last voiced one (29)
    assert not end.forced
    assert end.audio_start_t == pytest.approx(0.17)  # 3 frames of pre-roll
    np.testing.assert_array_equal(end.audio, np.concatenate(source[17:40]))


def test_pause_shorter_than_hangover_keeps_one_utterance() -> None:
    events, source = run("v" * 10 + "." * 9 + "v" * 5 + "." * 12)
    assert [type(e) for _, e in events] == [SpeechStart, SpeechEnd]
    assert events[1][0] == 33
    np.testing.assert_array_equal(events[1][1].audio, np.concatenate(source[:34]))


def test_burst_shorter_than_min_speech_is_ignored() -> None:
    events, _ = run("." * 5 + "v" * 4 + "." * 30)
    assert events == []
    events, _ = run("." * 5 + "v" * 5 + "." * 30)
    assert [type(e) for _, e in events] == [SpeechStart, SpeechEnd]


def test_short_gaps_inside_an_onset_do_not_drop_it() -> None:
    events, _ = run("vv.vv.v" + "." * 12)  # 5 voiced frames with 1-frame gaps (< start_gap 3)
    assert events[0] == (6, SpeechStart(t=0.0))


def test_dropped_onset_returns_to_pre_roll() -> None:
    config = EndpointerConfig(
        frame_ms=10, pre_roll_ms=60, min_speech_ms=50, start_gap_ms=30, hangover_ms=100, max_utterance_s=1.0, speech_model=False
    )
    # Onset at frame 3 dropped at frame 8; speech from frame 9: the pre-roll holds frames 3..8.
    events, source = run("..." + "vvv" + "..." + "v" * 6 + "." * 10, config)
    start, end = events[0][1], events[1][1]
    assert start.t == pytest.approx(0.09)
    assert end.audio_start_t == pytest.approx(0.03)
    np.testing.assert_array_equal(end.audio[: config.frame_samples], source[3])


def test_max_utterance_forces_an_end_and_speech_goes_on() -> None:
    events, source = run("." * 10 + "v" * 250)
    kinds = [(i, type(e)) for i, e in events]
    assert kinds[:3] == [(14, SpeechStart), (106, SpeechEnd), (111, SpeechStart)]
    end = events[1][1]
    assert end.forced and end.t == pytest.approx(1.07)
    assert end.audio.size == 100 * SMALL.frame_samples  # max_utterance_s exactly
    np.testing.assert_array_equal(end.audio, np.concatenate(source[7:107]))


def test_quiet_tail_counts_as_silence_for_the_hangover() -> None:
    """webrtcvad keeps saying speech after speech stops; frames 45 dB under the peak end it anyway."""
    n = SMALL.frame_samples
    loud = [np.full(n, 0.5, np.float32)] * 20
    quiet = [np.full(n, 0.5 * 10 ** (-45 / 20), np.float32)] * 30

    def anything_is_speech(pcm: bytes, rate: int) -> bool:
        return bool(np.any(np.frombuffer(pcm, dtype="<i2")))

    def end_frame(config: EndpointerConfig) -> int | None:
        endpointer = Endpointer(config, is_speech=anything_is_speech)
        for i, frame in enumerate(loud + quiet):
            if any(isinstance(e, SpeechEnd) for e in endpointer.push(frame)):
                return i
        return None

    assert end_frame(SMALL) == 29  # 10 quiet frames after the last loud one
    assert end_frame(EndpointerConfig(**{**SMALL.__dict__, "tail_floor_db": 0.0})) is None


def test_flush_closes_an_open_utterance() -> None:
    endpointer = Endpointer(SMALL, is_speech=loud_is_speech)
    for frame in labelled_frames("v" * 8, SMALL.frame_samples):
        endpointer.push(frame)
    assert endpointer.in_speech
    (end,) = endpointer.flush()
    assert isinstance(end, SpeechEnd) and end.forced and end.audio.size == 8 * SMALL.frame_samples
    assert not endpointer.in_speech and endpointer.flush() == []


def test_feed_any_chunking_and_int16_bytes_give_the_same_events() -> None:
    source = np.concatenate(labelled_frames("." * 10 + "v" * 30 + "." * 15, SMALL.frame_samples))
    by_frame = Endpointer(SMALL, is_speech=loud_is_speech)
    expected = [e for f in frames(source, RATE, SMALL.frame_ms) for e in by_frame.push(f)]
    by_chunk = Endpointer(SMALL, is_speech=loud_is_speech)
    rng = np.random.default_rng(0)
    cuts = np.cumsum(rng.integers(1, 500, size=200))
    got = [e for chunk in np.split(source, cuts[cuts < source.size]) for e in by_chunk.feed(chunk)]
    by_bytes = Endpointer(SMALL, is_speech=loud_is_speech)
    as_pcm = [e for f in frames(source, RATE, SMALL.frame_ms) for e in by_bytes.push(to_pcm16(f))]
    assert len(expected) == 2
    for other in (got, as_pcm):
        assert [(type(e), e.t) for e in other] == [(type(e), e.t) for e in expected]
        np.testing.assert_allclose(other[1].audio, expected[1].audio, atol=1 / 32768)


def test_frame_splitter_keeps_the_remainder() -> None:
    splitter = FrameSplitter(4)
    assert splitter.push(np.arange(6, dtype=np.float32)) == [pytest.approx(np.arange(4))]
    assert splitter.pending == 2
    (frame,) = splitter.push(np.arange(6, 8, dtype=np.float32))
    np.testing.assert_array_equal(frame, [4, 5, 6, 7])


def test_pcm16_round_trip_is_exact() -> None:
    pcm = np.array([-32768, -1, 0, 1, 32767], dtype="<i2").tobytes()
    assert to_pcm16(to_float32(pcm)) == pcm


def test_wrong_frame_length_and_bad_settings_are_rejected() -> None:
    endpointer = Endpointer(SMALL, is_speech=loud_is_speech)
    with pytest.raises(ValueError, match="expected 160"):
        endpointer.push(np.zeros(480, np.float32))
    for bad in ({"sample_rate": 22050}, {"frame_ms": 25}, {"aggressiveness": 4}, {"hangover_ms": -1}):
        with pytest.raises(ConfigError):
            EndpointerConfig(**bad)


# -- webrtcvad on real speech ---------------------------------------------------------------

LEAD_S, TAIL_S = 1.0, 1.5  # silence padded before and after each clip


def assert_one_utterance(padded: np.ndarray, onset: float, offset: float, config: EndpointerConfig, end_within_s: float = 0.002) -> None:
    endpointer = Endpointer(config)
    events = endpointer.feed(padded) + endpointer.flush()
    assert [type(e) for e in events] == [SpeechStart, SpeechEnd], events
    start, end = events
    hangover = config.hangover_ms / 1000
    assert abs(start.t - onset) <= 0.1, (start.t, onset)
    assert hangover - 0.1 <= end.t - offset <= hangover + 0.1, (end.t, offset)
    # voiced_end_t is the true end of speech (measured +13 ms median, 25 ms at most), the decision a hangover later.
    assert abs(end.voiced_end_t - offset) <= 0.06, (end.voiced_end_t, offset)
    assert end.t - end.voiced_end_t == pytest.approx(config.frames_for(config.hangover_ms) * config.frame_ms / 1000)
    # speech_end_t finds it to the sample (the last one above 2 % of the peak, as true_bounds does; in noise, above
    # the noise too): latency counts from it.
    assert abs(end.speech_end_t - offset) <= end_within_s, (end.speech_end_t, offset)
    assert not end.forced
    # The utterance holds all the speech and is the stream's own samples.
    first = round(end.audio_start_t * RATE)
    assert end.audio_start_t <= onset and first + end.audio.size >= offset * RATE
    np.testing.assert_allclose(end.audio, padded[first : first + end.audio.size], atol=1e-7)


@pytest.mark.parametrize("noise_rms", [0.0, 1e-3])
@pytest.mark.parametrize("clip", [0, 1, 2])
def test_real_questions_are_endpointed(question_16k: list[np.ndarray], clip: int, noise_rms: float) -> None:
    speech = question_16k[clip]
    onset, offset = true_bounds(speech)
    padded = np.concatenate([np.zeros(int(LEAD_S * RATE)), speech, np.zeros(int(TAIL_S * RATE))]).astype(np.float32)
    padded += np.random.default_rng(clip).normal(0, noise_rms, padded.size).astype(np.float32)
    assert_one_utterance(padded, LEAD_S + onset, LEAD_S + offset, EndpointerConfig(), end_within_s=0.002 if noise_rms == 0 else 0.015)


def test_espeak_sentence_padded_by_sox_is_endpointed(espeak_wav: Path, tmp_path: Path) -> None:
    if shutil.which("sox") is None:
        pytest.skip("sox not installed; run .ci/sound-server.sh")
    padded_path = tmp_path / "padded.wav"
    subprocess.run(["sox", str(espeak_wav), str(padded_path), "pad", str(LEAD_S), str(TAIL_S)], check=True)
    speech, padded = load_audio(espeak_wav), load_audio(padded_path)
    assert padded.size == pytest.approx(speech.size + (LEAD_S + TAIL_S) * RATE, abs=2)
    onset, offset = true_bounds(speech)
    assert_one_utterance(padded, LEAD_S + onset, LEAD_S + offset, EndpointerConfig())


@pytest.mark.parametrize("noise_rms", [0.0, 0.003, 0.01])
def test_silence_and_low_noise_give_no_utterance(noise_rms: float) -> None:
    audio = np.random.default_rng(1).normal(0, noise_rms, 5 * RATE).astype(np.float32)
    endpointer = Endpointer()
    assert endpointer.feed(audio) + endpointer.flush() == []


def test_a_click_is_not_speech() -> None:
    audio = np.zeros(3 * RATE, np.float32)
    audio[RATE : RATE + RATE // 50] = np.random.default_rng(2).normal(0, 0.25, RATE // 50)  # 20 ms burst
    config = EndpointerConfig()
    vad = webrtc_classifier(config.aggressiveness)
    # webrtcvad alone calls the click speech; min_speech_ms is what rejects it.
    assert any(vad(to_pcm16(f), RATE) for f in frames(audio, RATE, config.frame_ms))
    endpointer = Endpointer(config)
    assert endpointer.feed(audio) + endpointer.flush() == []


def test_long_speech_is_cut_at_max_utterance(question_16k: list[np.ndarray]) -> None:
    config = EndpointerConfig(max_utterance_s=1.5)
    speech = np.concatenate([np.zeros(RATE // 2, np.float32), *question_16k])
    endpointer = Endpointer(config)
    events = endpointer.feed(speech) + endpointer.flush()
    ends = [e for e in events if isinstance(e, SpeechEnd)]
    assert ends[0].forced
    assert ends[0].audio.size == int(1.5 * 1000 / config.frame_ms) * config.frame_samples
    assert ends[0].t == pytest.approx(ends[0].audio_start_t + 1.5)
    assert all(e.audio.size <= ends[0].audio.size for e in ends)
    assert len(ends) >= speech.size / RATE / 1.5 - 1  # it keeps cutting, it does not stop listening


# -- the second stage: Silero ignores noise and music, hears quiet speech -----------------------


@pytest.mark.parametrize("level", [-30.0, -20.0])
@pytest.mark.parametrize("noise", sorted(NOISES))
def test_steady_noise_and_music_start_no_turn(noise: str, level: float) -> None:
    audio = at_dbfs(NOISES[noise](10.0), level)
    confirmed = Endpointer()
    assert confirmed.model_problem is None
    assert [e for e in confirmed.feed(audio) + confirmed.flush() if isinstance(e, SpeechStart)] == []
    if level == -20.0:  # webrtcvad alone takes every one of them for speech (as before this change)
        alone = Endpointer(EndpointerConfig(speech_model=False))
        assert any(isinstance(e, SpeechStart) for e in alone.feed(audio) + alone.flush())


def test_quiet_speech_still_starts_a_turn(question_16k: list[np.ndarray], espeak_wav: Path) -> None:
    for speech in [*question_16k, load_audio(espeak_wav)]:
        audio = np.concatenate([np.zeros(RATE, np.float32), at_dbfs(speech, -30.0), np.zeros(RATE, np.float32)])
        endpointer = Endpointer()
        events = endpointer.feed(audio) + endpointer.flush()
        assert [type(e) for e in events] == [SpeechStart, SpeechEnd], events


def test_speech_over_steady_noise_starts_and_ends_a_turn(question_16k: list[np.ndarray]) -> None:
    """In a noisy room the turn must still end: webrtcvad alone would hear the noise as speech forever."""
    speech = at_dbfs(question_16k[0], -20.0)
    _, offset = true_bounds(speech)
    audio = np.concatenate([np.zeros(RATE, np.float32), speech, np.zeros(3 * RATE, np.float32)])
    audio += at_dbfs(NOISES["pink"](audio.size / RATE), -28.0)
    events = Endpointer().feed(audio)
    assert [type(e) for e in events] == [SpeechStart, SpeechEnd], events
    # The hangover, plus up to UNDECIDED_WAIT_MS while webrtcvad still calls the noise speech.
    assert events[1].t - (1.0 + offset) <= 0.5 + 0.2 + 0.06
    alone = Endpointer(EndpointerConfig(speech_model=False)).feed(audio)
    assert not any(isinstance(e, SpeechEnd) for e in alone)


def test_a_400ms_mid_sentence_pause_does_not_end_the_turn(question_16k: list[np.ndarray]) -> None:
    for speech in question_16k:
        audio, _, resume = with_pause(*split_at_inner_gap(speech), pause_s=0.4)
        padded = np.concatenate([audio, np.zeros(RATE, np.float32)])  # no lead: the model starts cold, the hardest case
        ends = [e for e in Endpointer().feed(padded) if isinstance(e, SpeechEnd)]
        assert len(ends) == 1 and ends[0].voiced_end_t > resume, [(e.t, e.voiced_end_t) for e in ends]


def test_speech_pause_comes_before_the_end_and_again_after_more_speech() -> None:
    config = EndpointerConfig(**{**SMALL.__dict__, "pause_ms": 40})
    events, source = run("." * 5 + "v" * 10 + "." * 5 + "v" * 5 + "." * 12, config)
    kinds = [(i, type(e)) for i, e in events]
    # Pauses 4 frames after each last voiced frame (14, 24); the end 10 frames after the last.
    assert kinds == [(9, SpeechStart), (18, SpeechPause), (28, SpeechPause), (34, SpeechEnd)]
    first_pause, end = events[1][1], events[3][1]
    assert first_pause.voiced_end_t == pytest.approx(0.15) and first_pause.t == pytest.approx(0.19)
    np.testing.assert_array_equal(first_pause.audio, np.concatenate(source[2:19]))
    assert end.voiced_end_t == pytest.approx(0.25) and end.audio_start_t == first_pause.audio_start_t


def test_without_the_model_webrtcvad_decides_and_the_reason_is_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "silero_vad" else find_spec(name, *a))
    endpointer = Endpointer()
    assert endpointer.speech_model is None
    assert endpointer.model_problem == "speech confirmation unavailable: the silero-vad package is not installed (pip install silero-vad)."
    noise = at_dbfs(NOISES["white"](3.0), -20.0)
    assert any(isinstance(e, SpeechStart) for e in endpointer.feed(noise))


def test_speech_model_gives_the_same_probabilities_however_the_audio_is_cut(question_16k: list[np.ndarray]) -> None:
    audio = question_16k[0][: 2 * RATE]
    whole, pieces = SpeechModel(), SpeechModel()
    by_chunk = [whole.push(audio[i : i + 512]) for i in range(0, audio.size - 511, 512)]
    cuts = np.cumsum(np.random.default_rng(0).integers(1, 900, size=100))
    seen = []
    for piece in np.split(audio, cuts[cuts < audio.size]):
        before = pieces._pending.size + piece.size
        p = pieces.push(piece)
        if before >= 512:
            seen.append(p)
    assert max(by_chunk) > 0.9 and min(by_chunk) < 0.1  # speech and the pauses around it
    assert seen[-1] == pytest.approx(by_chunk[-1], abs=1e-6)
    assert set(np.round(seen, 5)) <= set(np.round(by_chunk, 5))


def test_the_audio_package_never_imports_torch() -> None:
    code = (
        "import sys, numpy as np\n"
        "from omni_cli.audio import devices, echo, io, mic, speech_model, vad\n"
        "e = vad.Endpointer(); e.feed(np.zeros(16000, np.float32))\n"
        "echo.EchoCanceller().process(np.zeros(480, np.float32))\n"
        "assert e.speech_model is not None\n"
        "print('torch' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


class ScriptedModel:
    """Stands in for SpeechModel: returns the next scripted probability per pushed frame."""

    def __init__(self, probabilities: list[float]) -> None:
        self.probabilities = list(probabilities)
        self.pushed = 0

    def reset(self) -> None:
        pass

    def push(self, audio: np.ndarray) -> float:
        self.pushed += 1
        return self.probabilities.pop(0) if self.probabilities else 0.0


def test_the_end_waits_for_the_model_on_what_webrtcvad_hears() -> None:
    """10 ms frames, hangover 10: speech, 9 silent frames, then webrtcvad hears speech the model confirms late."""
    config = EndpointerConfig(**{**SMALL.__dict__, "speech_model": True})
    labels = "v" * 10 + "." * 9 + "v" * 8 + "." * 40
    late = [1.0] * 10 + [0.0] * 9 + [0.1] * 5 + [0.9] * 3 + [0.0] * 40  # confirmed 5 frames after it resumed
    endpointer = Endpointer(config, is_speech=loud_is_speech, speech_model=ScriptedModel(late))
    events = [(i, e) for i, f in enumerate(labelled_frames(labels, config.frame_samples)) for e in endpointer.push(f)]
    assert [(i, type(e)) for i, e in events] == [(4, SpeechStart), (36, SpeechEnd)]  # one turn: not cut at frame 19
    assert events[1][1].voiced_end_t == pytest.approx(0.27)
    # Never confirmed (noise): the end comes UNDECIDED_WAIT_MS (20 frames) after the hangover was due.
    never = [1.0] * 10 + [0.0] * 60
    endpointer = Endpointer(config, is_speech=loud_is_speech, speech_model=ScriptedModel(never))
    events = [(i, e) for i, f in enumerate(labelled_frames("v" * 10 + "." * 9 + "v" * 50, config.frame_samples)) for e in endpointer.push(f)]
    assert [(i, type(e)) for i, e in events] == [(4, SpeechStart), (38, SpeechEnd)]
    assert events[1][1].voiced_end_t == pytest.approx(0.10)
