"""Silero VAD through onnxruntime: a speech probability for streaming 16 kHz audio, without torch.

The `silero-vad` wheel ships the model as ONNX next to its torch code; we locate the file
without importing the package (its __init__ imports torch) and run it with onnxruntime on one
thread (~0.3 ms per 32 ms chunk on a loaded 2-core CPU). Silero is a small recurrent network:
it hears 512-sample chunks (32 ms at 16 kHz) with the previous 64 samples as context, and
carries a state from chunk to chunk, so it is fed the stream in order.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from omni_cli.errors import AudioInputError, one_line

MODEL_FILE = "silero_vad.onnx"  # opset 16, 8 and 16 kHz
CHUNK = {16000: 512, 8000: 256}
CONTEXT = {16000: 64, 8000: 32}


class SpeechModelUnavailable(AudioInputError):
    """Silero VAD cannot run here; the message is one line saying why."""


def model_path() -> Path:
    """The ONNX file inside the installed silero-vad wheel (found without importing it)."""
    spec = importlib.util.find_spec("silero_vad")
    if spec is None or not spec.submodule_search_locations:
        raise SpeechModelUnavailable("speech confirmation unavailable: the silero-vad package is not installed (pip install silero-vad).")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / MODEL_FILE
    if not path.is_file():
        raise SpeechModelUnavailable(f"speech confirmation unavailable: {path} is missing; reinstall silero-vad.")
    return path


class SpeechModel:
    """Streaming Silero VAD: `push(audio)` → the speech probability of the latest complete chunk.

    Audio arrives in any lengths (our frames are 30 ms, Silero's chunks 32 ms); the remainder
    waits for the next push, and the returned probability is that of the newest chunk heard.
    """

    def __init__(self, sample_rate: int = 16000, path: Path | None = None) -> None:
        if sample_rate not in CHUNK:
            raise SpeechModelUnavailable(f"speech confirmation unavailable: Silero VAD runs at 8 or 16 kHz, not {sample_rate} Hz.")
        try:
            import onnxruntime
        except ImportError as exc:
            raise SpeechModelUnavailable("speech confirmation unavailable: onnxruntime is not installed (pip install onnxruntime).") from exc
        options = onnxruntime.SessionOptions()
        # One thread: the model is tiny, and the audio thread must not fight torch for cores.
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        options.log_severity_level = 3  # errors only: nothing on the user's terminal
        try:
            self._session = onnxruntime.InferenceSession(str(path or model_path()), sess_options=options, providers=["CPUExecutionProvider"])
        except SpeechModelUnavailable:
            raise
        except Exception as exc:  # noqa: BLE001 - onnxruntime's load errors are not typed
            raise SpeechModelUnavailable(f"speech confirmation unavailable: cannot load Silero VAD ({one_line(exc)}).") from exc
        self.sample_rate = sample_rate
        self._chunk, self._context_size = CHUNK[sample_rate], CONTEXT[sample_rate]
        self._rate = np.array(sample_rate, dtype=np.int64)
        self.reset()

    def reset(self) -> None:
        """Forget the stream: a fresh recurrent state, no context, no pending samples."""
        self._state = np.zeros((2, 1, 128), dtype=np.float32)
        self._context = np.zeros(self._context_size, dtype=np.float32)
        self._pending = np.zeros(0, dtype=np.float32)
        self.probability = 0.0

    def push(self, audio: np.ndarray) -> float:
        """Add float32 samples; run every complete chunk; return the newest chunk's speech probability."""
        data = np.concatenate([self._pending, np.asarray(audio, dtype=np.float32).reshape(-1)])
        n = data.size // self._chunk
        for i in range(n):
            chunk = data[i * self._chunk : (i + 1) * self._chunk]
            window = np.concatenate([self._context, chunk])[None, :]
            out, self._state = self._session.run(None, {"input": window, "state": self._state, "sr": self._rate})
            self._context = chunk[-self._context_size :]
            self.probability = float(out[0, 0])
        self._pending = data[n * self._chunk :]
        return self.probability
