"""Rate conversion for streams of audio blocks (microphone, speaker, echo canceller, network clients)."""

from __future__ import annotations

from math import gcd

import numpy as np


class StreamResampler:
    """Convert a stream of blocks between two rates, giving the same samples as one resample_poly call.

    Each block is resampled together with enough of the previous input that the polyphase
    filter never sees a block edge; output that would still depend on future input is held
    back (about half the filter, under a millisecond) until the next block or `flush()`.
    Why: resampling each block alone clicks at every block boundary.
    """

    def __init__(self, rate_in: int, rate_out: int) -> None:
        g = gcd(int(rate_in), int(rate_out))
        self.rate_in, self.rate_out = int(rate_in), int(rate_out)
        self.up, self.down = self.rate_out // g, self.rate_in // g
        # resample_poly's default filter has 10 * max(up, down) taps on each side at the
        # upsampled rate; in input samples that is the context one output sample needs.
        self._half = int(np.ceil(10 * max(self.up, self.down) / self.up)) + 1
        if not self.passthrough:
            # Imported here, not at the top: scipy.signal takes ~2 s to import on a busy machine,
            # and device checks must answer within 2 s. Never on the audio thread: __init__ runs in start().
            from scipy.signal import resample_poly

            self._resample_poly = resample_poly
        self._buffer = np.zeros(0, dtype=np.float32)
        self._buffer_start = 0  # absolute input index of _buffer[0]; always a multiple of `down`
        self._next_out = 0  # absolute index of the next output sample to emit
        self._consumed = 0  # absolute input samples received

    @property
    def passthrough(self) -> bool:
        """True when both rates are equal and blocks pass unchanged."""
        return self.up == self.down

    def _render(self, final: bool) -> np.ndarray:
        if self._buffer.size == 0:
            return np.zeros(0, dtype=np.float32)
        end_in = self._consumed
        # Last output index whose filter support lies inside the received input (or any, at the end).
        if final:
            last_out = (end_in * self.up - 1) // self.down
        else:
            last_out = ((end_in - self._half) * self.up) // self.down
        if last_out < self._next_out:
            return np.zeros(0, dtype=np.float32)
        # Pad zeros on the right only when flushing; resample_poly of the whole signal pads the same way.
        out = self._resample_poly(self._buffer, self.up, self.down).astype(np.float32)
        first_local = self._next_out - self._buffer_start * self.up // self.down
        count = last_out - self._next_out + 1
        chunk = out[first_local : first_local + count]
        self._next_out += chunk.size
        # Keep only the input still needed as left context for the next output sample.
        keep_from = max(0, (self._next_out * self.down) // self.up - self._half)
        keep_from -= keep_from % self.down
        keep_from = max(keep_from, self._buffer_start)
        self._buffer = self._buffer[keep_from - self._buffer_start :]
        self._buffer_start = keep_from
        return chunk

    def process(self, block: np.ndarray) -> np.ndarray:
        """Feed one input block; return the output samples that are now final."""
        block = np.asarray(block, dtype=np.float32).reshape(-1)
        if self.passthrough:
            return block
        self._buffer = np.concatenate([self._buffer, block])
        self._consumed += block.size
        return self._render(final=False)

    def flush(self) -> np.ndarray:
        """Return the held-back tail as if the stream ended here, then start a fresh stream."""
        if self.passthrough:
            return np.zeros(0, dtype=np.float32)
        tail = self._render(final=True)
        self.reset()
        return tail

    def reset(self) -> None:
        """Forget all input (e.g. playback was cut); the next block starts a new stream."""
        self._buffer = np.zeros(0, dtype=np.float32)
        self._buffer_start = self._next_out = self._consumed = 0
