"""ASR-WER and ASR-CER of a speech reply's transcript against the model's own text reply, with a stated normaliser.

The normaliser (both sides alike): Unicode NFKC; lower case; apostrophes deleted ("don't" → "dont");
every other punctuation character (Unicode category P) replaced by a space; whitespace collapsed.
Numbers stay as written: "42" and "forty-two" differ (→ "42" and "forty two"), as they do in what a
listener can check. Counts come from jiwer; a corpus rate is the sum of errors over the sum of
reference words (characters), not a mean of per-item rates.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass

NORMALISER = "NFKC, lower case, apostrophes deleted, other punctuation → space, whitespace collapsed, numbers as written"
_APOSTROPHES = {"'", "\u2019", "\u02bc"}


def normalise(text: str) -> str:
    """`text` as WER and CER compare it (see NORMALISER)."""
    text = unicodedata.normalize("NFKC", text).lower()
    chars = []
    for ch in text:
        if ch in _APOSTROPHES:
            continue
        chars.append(" " if unicodedata.category(ch).startswith("P") else ch)
    return " ".join("".join(chars).split())


@dataclass(frozen=True)
class ErrorCounts:
    """Edit operations between a normalised reference and hypothesis, in words and in characters."""

    word_errors: int
    words: int
    char_errors: int
    chars: int

    @property
    def wer(self) -> float:
        """Word error rate (percent)."""
        return 100.0 * self.word_errors / self.words if self.words else 0.0

    @property
    def cer(self) -> float:
        """Character error rate (percent); spaces count as characters, as jiwer counts them."""
        return 100.0 * self.char_errors / self.chars if self.chars else 0.0


def error_counts(reference: str, hypothesis: str) -> ErrorCounts | None:
    """Word and character edit counts of `hypothesis` against `reference`, both normalised; None when the reference is empty."""
    import jiwer

    ref, hyp = normalise(reference), normalise(hypothesis)
    if not ref:
        return None
    if not hyp:  # jiwer refuses an empty string: everything was deleted
        return ErrorCounts(len(ref.split()), len(ref.split()), len(ref), len(ref))
    words = jiwer.process_words(ref, hyp)
    chars = jiwer.process_characters(ref, hyp)
    return ErrorCounts(
        words.substitutions + words.deletions + words.insertions, len(ref.split()),
        chars.substitutions + chars.deletions + chars.insertions, len(ref),
    )


def corpus_rates(counts: Iterable[ErrorCounts]) -> tuple[float | None, float | None]:
    """(WER, CER) in percent over many items: total errors over total reference words / characters."""
    counts = list(counts)
    words = sum(c.words for c in counts)
    chars = sum(c.chars for c in counts)
    if not words:
        return None, None
    return 100.0 * sum(c.word_errors for c in counts) / words, 100.0 * sum(c.char_errors for c in counts) / chars
