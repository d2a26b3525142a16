"""SpokenQuestion: the audio of a question that spans 30 s windows or a reply the user talked over."""

from __future__ import annotations

import numpy as np

from omni_cli.audio.io import SAMPLE_RATE
from omni_cli.conversation.turns import ContinuedQuestion, SpokenQuestion


def ramp(start_s: float, seconds: float) -> np.ndarray:
    """Samples whose values are their own times, so any join can be read back."""
    return (start_s + np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE).astype(np.float32)


def test_windows_are_joined_in_order_and_taken_once() -> None:
    spoken = SpokenQuestion()
    spoken.keep_window(ramp(0, 2), end_stream_t=2.0)
    spoken.keep_window(ramp(2, 2), end_stream_t=4.0)
    assert spoken.seconds == 4.0 and spoken.window_end_stream_t == 4.0
    question = spoken.audio(ramp(4, 1), tail_start_t=4.0)
    np.testing.assert_array_equal(question, ramp(0, 5))
    assert spoken.take() is None
    assert spoken.windows == [] and spoken.seconds == 0.0
    np.testing.assert_array_equal(spoken.audio(ramp(9, 1)), ramp(9, 1))


def test_a_continued_question_heads_the_next_without_repeating_its_end() -> None:
    spoken = SpokenQuestion()
    # The first question ended at 3.0 s; the speech that went on with it starts at 3.8 s,
    # its pre-roll (0.3 s) begins at 2.7 s and repeats 0.3 s of the first question.
    spoken.go_on_with(ContinuedQuestion(ramp(1, 2), audio_end_stream_t=3.0, turn=4, onset_stream_t=3.8))
    spoken.speech_started(3.8)  # the speech that went on with it: kept
    question = spoken.audio(ramp(2.7, 1.3), tail_start_t=2.7)
    np.testing.assert_allclose(question, ramp(1, 3), atol=1e-6)
    assert spoken.take() == 4
    assert spoken.continued is None


def test_speech_other_than_the_one_that_went_on_drops_the_continued_question() -> None:
    spoken = SpokenQuestion()
    spoken.go_on_with(ContinuedQuestion(ramp(0, 1), audio_end_stream_t=1.0, turn=2, onset_stream_t=1.5))
    spoken.speech_started(6.0)  # the interruption was not speech; this is a new question
    assert spoken.continued is None
    np.testing.assert_array_equal(spoken.audio(ramp(6, 1), tail_start_t=6.0), ramp(6, 1))
    assert spoken.take() is None


class EchoedMic:
    """Frames of voice (loud) or silence, each with how much the echo canceller took out of it."""

    def __init__(self, frames: list[tuple[bool, float | None]]) -> None:
        self.frames = list(frames)
        self.frame_end_t: float | None = None
        self.frame_echo_db: float | None = None

    def read(self, timeout: float | None = None) -> np.ndarray | None:
        if not self.frames:
            return None
        loud, self.frame_echo_db = self.frames.pop(0)
        return np.full(480, 0.3 if loud else 0.0, np.float32)

    def clear(self) -> int:
        n, self.frames = len(self.frames), []
        return n


def barge_in_after(frames: list[tuple[bool, float | None]], echo_left: bool = True, going_on: bool = False) -> float | None:
    """Seconds of frames heard until a barge-in (None: none)."""
    from omni_cli.audio.vad import Endpointer, EndpointerConfig
    from omni_cli.conversation.turns import ConversationSettings, Listener

    mic = EchoedMic(frames)
    endpointer = Endpointer(EndpointerConfig(speech_model=False), is_speech=lambda pcm, rate: max(pcm) > 0)
    listener = Listener(mic, endpointer, ConversationSettings(barge_in_ms=60), lambda: 0.0, None)  # 2 frames
    start = None
    while mic.frames and start is None:  # a few frames at a time, as a reply's loop hears them
        start = listener.speech_start(timeout=0.0, echo_left=echo_left, going_on=going_on)
    return None if start is None else round(endpointer.time, 3)


def test_barge_in_hears_the_users_voice_not_the_echo_the_canceller_left() -> None:
    """Issue 22, full duplex from the first word: residual echo (the canceller took 10-60 dB out) is voice to the VAD
    but never stops the reply; the user's voice (a few dB taken out, or no canceller) does, after 60 ms of it."""
    silence = [(False, 0.0)] * 5
    assert barge_in_after(silence + [(True, 25.0)] * 30) is None  # 0.9 s of echo's residue
    assert barge_in_after(silence + [(True, 2.0)] * 5) == 0.21  # the user: 2 frames of voice
    assert barge_in_after(silence + [(True, None)] * 5) == 0.21  # no canceller (a client's audio)
    # Echo, then the user over it (the endpointer already in speech from the echo): 60 ms of their voice.
    assert barge_in_after(silence + [(True, 25.0)] * 10 + [(True, 1.0)] * 3) == 0.51
    # The user's voice, ducked in one frame of three by the canceller: heard, a frame later.
    assert barge_in_after(silence + [(True, 3.0), (True, 20.0), (True, 3.0), (True, 4.0)]) == 0.27
    # As much echo as voice: no barge-in.
    assert barge_in_after(silence + [(True, 1.0), (True, 25.0)] * 6 + [(False, 0.0)] * 10) is None


def test_voice_that_goes_on_with_the_question_stops_the_reply_after_one_frame() -> None:
    """A reply begun in the user's pause is heard until the barge-in: when voice would go on with the question
    (within rejoin_ms of its last word) and the canceller has converged, one frame it left whole is enough."""
    silence = [(False, 0.0)] * 5
    assert barge_in_after(silence + [(True, 2.0)] * 5, echo_left=False, going_on=True) == 0.18  # one frame
    assert barge_in_after(silence + [(True, None)] * 5, echo_left=False, going_on=True) == 0.18  # no canceller
    assert barge_in_after(silence + [(True, 2.0)] * 5, echo_left=False) == 0.21  # a new turn: barge_in_ms
    assert barge_in_after(silence + [(True, 2.0)] * 5, echo_left=True, going_on=True) == 0.21  # not converged yet
    # Residual echo (a frame the canceller took 25 dB out of) is not the user going on: barge_in_ms as ever.
    assert barge_in_after(silence + [(True, 25.0)] + [(False, 0.0)] * 10, echo_left=False, going_on=True) is None
