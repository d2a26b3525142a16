"""Voice activity endpointing: a state machine turning fixed audio frames into utterances.

Frames go in one at a time (`Endpointer.push`), events come out: `SpeechStart` once speech is
confirmed, `SpeechEnd` with the whole utterance once the speaker has been quiet for the
hangover (and, on request, `SpeechPause` at a short pause, for replies started speculatively).

A frame is voiced when two stages agree. webrtcvad, fast and sensitive, is the first; it also
calls steady noise, tones and music speech. Silero VAD (a small recurrent network, run through
onnxruntime from the ONNX file the `silero-vad` wheel ships: no torch, no download) confirms;
it runs only while webrtcvad has heard something recently. Both can be injected (a function
and an object with push/reset), so the state machine can be tested with fakes.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import Enum

import numpy as np

from omni_cli.audio.speech_model import SpeechModel, SpeechModelUnavailable
from omni_cli.errors import ConfigError

# What webrtcvad accepts; anything else it rejects with an opaque error.
VAD_SAMPLE_RATES = (8000, 16000, 32000, 48000)
VAD_FRAME_MS = (10, 20, 30)

# How long the end of a turn waits for the model to confirm what webrtcvad hears as speech.
UNDECIDED_WAIT_MS = 200
# The end of speech inside the frames around the last voiced one: the last sample louder than
# this fraction of the utterance's peak (a soft ending's fricative or breath counts) and than the
# noise, looked for
# at most TAIL_SEARCH_MS past the last voiced frame (so room noise cannot drag it on).
SPEECH_END_FLOOR = 0.02
TAIL_SEARCH_MS = 90

SpeechClassifier = Callable[[bytes, int], bool]
"""(16-bit little-endian PCM frame, sample rate) -> is the frame speech."""


@dataclass(frozen=True)
class EndpointerConfig:
    """Endpointing settings; times are in milliseconds of stream time unless named `_s`.

    pre_roll_ms: audio kept before the first voiced frame, so soft onsets are not clipped.
    hangover_ms: unvoiced time after speech that ends the utterance.
    min_speech_ms: voiced time needed before an onset counts as speech (rejects clicks, coughs).
    start_gap_ms: an unvoiced stretch this long before min_speech_ms is reached drops the onset.
    max_utterance_s: an utterance this long (pre-roll included) is ended even while speech goes on.
    tail_floor_db: inside an utterance, a frame quieter than its loudest frame by more than this
        counts as silence. Why: webrtcvad keeps saying "speech" for 60-90 ms after speech stops
        (its built-in overhang), which would add to hangover_ms. 0 disables the check.
    speech_model: confirm webrtcvad's frames with Silero VAD (see the module docstring).
    start_threshold / keep_threshold: Silero's speech probability needed to start speech, and
        to stay in it (lower: a hysteresis, as Silero's own iterator uses).
    pause_ms: when > 0, a `SpeechPause` is emitted after this much unvoiced time in speech
        (the user may be done; a speculative reply can start). 0: no such events.
    """

    sample_rate: int = 16000
    frame_ms: int = 30
    aggressiveness: int = 2
    pre_roll_ms: int = 300
    # 500: the shortest that cut no question at a 400 ms mid-sentence pause (90 cases, 450
    # and 400 cut one each; benchmarks/turn_taking.py). Silence alone cannot go lower safely.
    hangover_ms: int = 500
    min_speech_ms: int = 200
    start_gap_ms: int = 150
    max_utterance_s: float = 30.0
    tail_floor_db: float = 40.0
    speech_model: bool = True
    start_threshold: float = 0.5
    keep_threshold: float = 0.35
    pause_ms: int = 0

    def __post_init__(self) -> None:
        if self.sample_rate not in VAD_SAMPLE_RATES:
            raise ConfigError(f"VAD sample rate {self.sample_rate} Hz is not one of {VAD_SAMPLE_RATES}; pick one of those.")
        if self.frame_ms not in VAD_FRAME_MS:
            raise ConfigError(f"VAD frame length {self.frame_ms} ms is not one of {VAD_FRAME_MS}; pick one of those.")
        if not 0 <= self.aggressiveness <= 3:
            raise ConfigError(f"VAD aggressiveness {self.aggressiveness} is outside 0..3; 0 keeps most audio, 3 drops most.")
        if not 0.0 <= self.keep_threshold <= self.start_threshold <= 1.0:
            raise ConfigError(f"VAD thresholds must satisfy 0 <= keep ({self.keep_threshold}) <= start ({self.start_threshold}) <= 1.")
        for name in ("pre_roll_ms", "hangover_ms", "min_speech_ms", "start_gap_ms", "tail_floor_db", "pause_ms"):
            if getattr(self, name) < 0:
                raise ConfigError(f"VAD {name} is {getattr(self, name)}; it must be 0 or more.")
        if self.hangover_ms < self.frame_ms or self.max_utterance_s * 1000 < self.frame_ms:
            raise ConfigError(f"VAD hangover_ms and max_utterance_s must be at least one frame ({self.frame_ms} ms).")

    @property
    def frame_samples(self) -> int:
        """Samples in one frame."""
        return self.sample_rate * self.frame_ms // 1000

    def frames_for(self, ms: float) -> int:
        """How many whole frames cover `ms` milliseconds (at least one for any positive time)."""
        return int(np.ceil(ms / self.frame_ms)) if ms > 0 else 0


@dataclass(frozen=True)
class SpeechStart:
    """Speech was confirmed; `t` is the stream time (s) where the first voiced frame began.

    The utterance audio delivered later starts up to pre_roll_ms before `t`.
    """

    t: float


@dataclass(frozen=True)
class SpeechPause:
    """pause_ms of silence after speech (only with pause_ms > 0): the user may be done.

    `audio` is the utterance so far (as SpeechEnd's would be now), `voiced_end_t` the stream
    time (s) where the last voiced frame ended. A SpeechEnd follows if the silence lasts
    the hangover; if the user speaks on, the same utterance goes on and may pause again.
    """

    t: float
    audio: np.ndarray
    voiced_end_t: float
    audio_start_t: float = 0.0
    speech_end_t: float | None = None  # the end of speech to the sample (see SpeechEnd)


@dataclass(frozen=True)
class SpeechEnd:
    """The utterance is over; `t` is the stream time (s) of the decision (the endpoint).

    `audio` is the whole utterance as float32: pre-roll, speech, and the trailing hangover.
    `forced` is True when max_utterance_s cut it while speech went on.
    `audio_start_t` is the stream time (s) of audio[0].
    `voiced_end_t` is the stream time (s) where the last voiced frame ended (frame-exact: a
    later utterance is compared with it). `speech_end_t` is the true end of the user's speech,
    to the sample: the last sample above SPEECH_END_FLOOR of the utterance's peak in and just
    after that frame. The latency a user feels is measured from it.
    """

    t: float
    audio: np.ndarray
    forced: bool = False
    audio_start_t: float = 0.0
    voiced_end_t: float = 0.0
    speech_end_t: float | None = None


Event = SpeechStart | SpeechPause | SpeechEnd


def webrtc_classifier(aggressiveness: int) -> SpeechClassifier:
    """webrtcvad's per-frame speech decision at the given aggressiveness (0..3)."""
    import webrtcvad

    return webrtcvad.Vad(aggressiveness).is_speech


def to_float32(frame: bytes | np.ndarray) -> np.ndarray:
    """Mono samples as float32 in [-1, 1]: int16 PCM bytes, int16 arrays and float arrays accepted."""
    if isinstance(frame, (bytes, bytearray, memoryview)):
        return np.frombuffer(frame, dtype="<i2").astype(np.float32) / 32768.0
    arr = np.asarray(frame).reshape(-1)
    if arr.dtype == np.int16:
        return arr.astype(np.float32) / 32768.0
    return arr.astype(np.float32, copy=False)


def to_pcm16(audio: np.ndarray) -> bytes:
    """float32 [-1, 1] → 16-bit little-endian PCM bytes (what webrtcvad reads)."""
    # Scale by 32768 (as to_float32 divides) so int16 -> float -> int16 is exact.
    return np.clip(np.rint(np.asarray(audio, dtype=np.float32) * 32768.0), -32768, 32767).astype("<i2").tobytes()


class FrameSplitter:
    """Cut audio arriving in blocks of any length into frames of exactly `frame_samples`."""

    def __init__(self, frame_samples: int) -> None:
        if frame_samples <= 0:
            raise ValueError(f"frame_samples must be positive, got {frame_samples}")
        self.frame_samples = frame_samples
        self._pending = np.zeros(0, dtype=np.float32)

    def push(self, block: np.ndarray) -> list[np.ndarray]:
        """Add a block; return the complete frames now available (the remainder waits)."""
        data = np.concatenate([self._pending, to_float32(block)])
        n = data.size // self.frame_samples
        frames = [data[i * self.frame_samples : (i + 1) * self.frame_samples].copy() for i in range(n)]
        self._pending = data[n * self.frame_samples :]
        return frames

    @property
    def pending(self) -> int:
        """Samples waiting for the next frame to fill."""
        return int(self._pending.size)

    def reset(self) -> None:
        """Drop the incomplete frame."""
        self._pending = np.zeros(0, dtype=np.float32)


def frames(audio: np.ndarray, rate: int, frame_ms: int) -> Iterator[np.ndarray]:
    """Yield consecutive `frame_ms` frames of `audio` (at `rate`); a trailing partial frame is dropped."""
    size = rate * frame_ms // 1000
    audio = to_float32(audio)
    for i in range(audio.size // size):
        yield audio[i * size : (i + 1) * size]


class _State(Enum):
    SILENCE = "silence"
    ONSET = "onset"  # voiced frames seen, not yet min_speech_ms of them
    SPEECH = "speech"


class Endpointer:
    """Frame-in, event-out endpointer. Not thread-safe; one per audio stream.

    Silence: frames fill the pre-roll ring. A voiced frame opens an onset. The onset becomes
    speech (SpeechStart) once min_speech_ms of voiced frames have been seen, or is dropped
    after start_gap_ms without voice. In speech, hangover_ms without voice, or reaching
    max_utterance_s, ends the utterance (SpeechEnd) and returns to silence.
    """

    def __init__(
        self,
        config: EndpointerConfig | None = None,
        is_speech: SpeechClassifier | None = None,
        speech_model: SpeechModel | None = None,
    ) -> None:
        self.config = config or EndpointerConfig()
        self.is_speech: SpeechClassifier = is_speech or webrtc_classifier(self.config.aggressiveness)
        # The confirming model: given, loaded (config.speech_model), or None. A model that cannot
        # load leaves webrtcvad alone and says why in `model_problem` (one line, for the screen).
        self.model_problem: str | None = None
        if speech_model is None and self.config.speech_model:
            try:
                speech_model = SpeechModel(self.config.sample_rate)
            except SpeechModelUnavailable as exc:
                self.model_problem = str(exc)
        self.speech_model = speech_model
        c = self.config
        self._frame_samples = c.frame_samples
        self._pre_roll_frames = c.frames_for(c.pre_roll_ms)
        self._hangover_frames = c.frames_for(c.hangover_ms)
        self._min_speech_frames = max(1, c.frames_for(c.min_speech_ms))
        self._start_gap_frames = max(1, c.frames_for(c.start_gap_ms))
        self._max_frames = max(1, int(c.max_utterance_s * 1000 // c.frame_ms))
        self._pause_frames = c.frames_for(c.pause_ms) if c.pause_ms else 0
        self._undecided_max = c.frames_for(UNDECIDED_WAIT_MS)
        self._tail_floor = 10.0 ** (-c.tail_floor_db / 10.0) if c.tail_floor_db > 0 else 0.0
        self._splitter = FrameSplitter(self._frame_samples)
        self._frames_seen = 0
        self.reset()

    def reset(self) -> None:
        """Return to silence and forget buffered audio; stream time keeps counting."""
        self._state = _State.SILENCE
        self._pre_roll: deque[np.ndarray] = deque(maxlen=self._pre_roll_frames)  # maxlen 0 keeps nothing
        self._utterance: list[np.ndarray] = []
        self._onset_frame = 0
        self._utterance_start = 0
        self._peak_energy = 0.0
        self._peak_abs = 0.0  # the loudest sample of a voiced frame in the utterance
        self._voiced = 0
        self._unvoiced_run = 0
        self._undecided_run = 0  # trailing frames webrtcvad calls speech and the model not (yet)
        self._last_voiced = 0  # index of the last voiced frame in the utterance
        self._quiet_run = 0  # frames since webrtcvad last said speech
        self.last_voiced = False  # the last frame pushed counted as voice (both stages, above the tail floor)
        self.last_heard = False  # webrtcvad heard speech in the last frame pushed (the first stage alone)
        self._model_warm = False
        self.last_probability = 0.0  # the model's latest speech probability (for meters and tests)
        self._splitter.reset()
        if self.speech_model is not None:
            self.speech_model.reset()

    @property
    def in_speech(self) -> bool:
        """True between SpeechStart and SpeechEnd."""
        return self._state is _State.SPEECH

    @property
    def onset(self) -> tuple[float, float] | None:
        """While speech is starting but not yet confirmed (min_speech_ms): the stream time (s) of its
        first voiced frame and its voiced seconds so far; None otherwise. For a quicker barge-in."""
        if self._state is not _State.ONSET:
            return None
        return self._frame_time(self._onset_frame), self._voiced * self.config.frame_ms / 1000.0

    @property
    def voiced_end_t(self) -> float | None:
        """In speech, the stream time (s) where its last voiced frame ended (it moves on when the
        speaker goes on after a SpeechPause); None outside speech."""
        return self._frame_time(self._last_voiced + 1) if self._state is _State.SPEECH else None

    @property
    def time(self) -> float:
        """Stream time in seconds: the end of the last frame pushed."""
        return self._frames_seen * self.config.frame_ms / 1000.0

    @property
    def hangover_ms(self) -> int:
        """The silence that ends an utterance now (config.hangover_ms unless set_hangover_ms changed it)."""
        return self._hangover_frames * self.config.frame_ms

    def set_hangover_ms(self, ms: int) -> None:
        """End utterances after `ms` of silence from now on (at least one frame), e.g. shorter while a
        mistaken end can be taken back."""
        self._hangover_frames = max(1, self.config.frames_for(ms))

    def set_pre_roll_ms(self, ms: int) -> None:
        """Keep `ms` of audio before an utterance's first voiced frame from now on (config.pre_roll_ms
        until changed); Silero still warms up on config.pre_roll_ms of it."""
        frames = self.config.frames_for(ms)
        if frames != self._pre_roll.maxlen:
            self._pre_roll = deque(self._pre_roll, maxlen=frames)

    def skip(self) -> None:
        """A frame was heard but not listened to (dropped): stream time goes on, the state does not change."""
        self._frames_seen += 1

    def push(self, frame: bytes | np.ndarray) -> list[Event]:
        """Feed exactly one frame (int16 PCM bytes, or an int16/float array); return the events it caused."""
        audio = to_float32(frame)
        if audio.size != self._frame_samples:
            raise ValueError(
                f"frame has {audio.size} samples, expected {self._frame_samples} "
                f"({self.config.frame_ms} ms at {self.config.sample_rate} Hz)"
            )
        pcm = frame if isinstance(frame, (bytes, bytearray)) else to_pcm16(audio)
        heard = bool(self.is_speech(bytes(pcm), self.config.sample_rate))
        voiced = self._confirm(audio, heard) if self.speech_model is not None else heard
        index = self._frames_seen
        self._frames_seen += 1
        self.last_voiced, self.last_heard = False, heard
        return self._step(audio.copy(), voiced, index, undecided=heard and not voiced)

    def _confirm(self, audio: np.ndarray, first_stage: bool) -> bool:
        """Second stage: Silero's probability, run while webrtcvad heard speech within the pre-roll.

        Starting cold, the model first hears the pre-roll, so its recurrent state has context.
        """
        self._quiet_run = 0 if first_stage else self._quiet_run + 1
        if self._state is _State.SILENCE and self._quiet_run > self._pre_roll_frames:
            self._model_warm = False
            self.last_probability = 0.0
            return False
        if not self._model_warm:
            self.speech_model.reset()
            for earlier in list(self._pre_roll)[len(self._pre_roll) - self._pre_roll_frames :]:
                self.speech_model.push(earlier)
            self._model_warm = True
        self.last_probability = self.speech_model.push(audio)
        threshold = self.config.keep_threshold if self._state is _State.SPEECH else self.config.start_threshold
        return first_stage and self.last_probability >= threshold

    def feed(self, audio: np.ndarray) -> list[Event]:
        """Feed audio of any length at the configured rate; a partial frame waits for the next call."""
        events: list[Event] = []
        for frame in self._splitter.push(audio):
            events.extend(self.push(frame))
        return events

    def flush(self) -> list[Event]:
        """End of stream: close an utterance in progress (as a forced end) and return to silence."""
        events: list[Event] = []
        if self._state is _State.SPEECH:
            events.append(self._close(forced=True))
        self.reset()
        return events

    # -- state machine -------------------------------------------------------------------

    def _frame_time(self, index: int) -> float:
        return index * self.config.frame_ms / 1000.0

    def _step(self, audio: np.ndarray, voiced: bool, index: int, undecided: bool = False) -> list[Event]:
        """Advance by one frame. `undecided`: webrtcvad heard speech that the model has not (yet) confirmed."""
        energy = float(np.dot(audio, audio)) / max(1, audio.size)
        if self._state is _State.SILENCE:
            if not voiced:
                self._pre_roll.append(audio)
                return []
            # First voiced frame: open an onset with the pre-roll in front of it.
            self._utterance = list(self._pre_roll)
            self._utterance_start = index - len(self._pre_roll)
            self._pre_roll.clear()
            self._utterance.append(audio)
            self._onset_frame = self._last_voiced = index
            self._peak_energy = energy
            self._peak_abs = float(np.abs(audio).max())
            self.last_voiced = True
            self._voiced, self._unvoiced_run, self._undecided_run = 1, 0, 0
            self._state = _State.ONSET
            return self._confirm_if_enough()

        self._utterance.append(audio)
        if self._tail_floor:
            loud_enough = energy >= self._peak_energy * self._tail_floor
            voiced, undecided = voiced and loud_enough, undecided and loud_enough
            if voiced:
                self._peak_energy = max(self._peak_energy, energy)
        if voiced:
            self._voiced += 1
            self._unvoiced_run = self._undecided_run = 0
            self._last_voiced = index
            self._peak_abs = max(self._peak_abs, float(np.abs(audio).max()))
            self.last_voiced = True
        else:
            self._unvoiced_run += 1
            self._undecided_run = self._undecided_run + 1 if undecided else 0

        if self._state is _State.ONSET:
            if voiced:
                return self._confirm_if_enough()
            if self._unvoiced_run >= self._start_gap_frames:
                self._drop_onset()
            return []

        # In speech. Why wait on undecided frames: after a pause the model needs ~100 ms to
        # confirm a soft onset that webrtcvad hears at once; ending meanwhile cuts the speaker off.
        waiting = 0 < self._undecided_run < self._undecided_max
        if self._unvoiced_run >= self._hangover_frames and not waiting:
            return [self._close(forced=False)]
        if len(self._utterance) >= self._max_frames:
            return [self._close(forced=True)]
        if self._pause_frames and self._unvoiced_run == self._pause_frames:
            return [
                SpeechPause(
                    t=self.time,
                    audio=np.concatenate(self._utterance),
                    voiced_end_t=self._frame_time(self._last_voiced + 1),
                    audio_start_t=self._frame_time(self._utterance_start),
                    speech_end_t=self._speech_end_t(),
                )
            ]
        return []

    def _speech_end_t(self) -> float:
        """Stream time of the last sample above SPEECH_END_FLOOR of the peak (and the noise), from the
        frame before the last voiced one to TAIL_SEARCH_MS past it (the voiced frame's end when none is)."""
        # From the frame before the last voiced one (which noise may have kept voiced) on.
        first = max(0, self._last_voiced - self._utterance_start - 1)
        tail_frames = self.config.frames_for(TAIL_SEARCH_MS)
        tail = np.concatenate(self._utterance[first : first + 2 + tail_frames])
        # Above the room's noise too: 5 × the RMS of the utterance's quietest frame.
        noise = min(float(np.sqrt(np.mean(np.square(f)))) for f in self._utterance)
        loud = np.flatnonzero(np.abs(tail) > max(SPEECH_END_FLOOR * self._peak_abs, 5 * noise))
        if not loud.size:
            return self._frame_time(self._last_voiced + 1)
        return self._frame_time(self._utterance_start + first) + (int(loud[-1]) + 1) / self.config.sample_rate

    def _confirm_if_enough(self) -> list[Event]:
        if self._voiced < self._min_speech_frames:
            return []
        self._state = _State.SPEECH
        events: list[Event] = [SpeechStart(t=self._frame_time(self._onset_frame))]
        if len(self._utterance) >= self._max_frames:
            events.append(self._close(forced=True))
        return events

    def _drop_onset(self) -> None:
        """The onset was a click or noise: its frames become pre-roll again."""
        self._pre_roll.extend(self._utterance)
        self._utterance = []
        self._state = _State.SILENCE

    def _close(self, forced: bool) -> SpeechEnd:
        audio = np.concatenate(self._utterance) if self._utterance else np.zeros(0, dtype=np.float32)
        event = SpeechEnd(
            t=self.time,
            audio=audio,
            forced=forced,
            audio_start_t=self._frame_time(self._utterance_start),
            voiced_end_t=self._frame_time(self._last_voiced + 1),
            speech_end_t=self._speech_end_t(),
        )
        self._utterance = []
        self._state = _State.SILENCE
        self._voiced = self._unvoiced_run = self._undecided_run = 0
        return event
