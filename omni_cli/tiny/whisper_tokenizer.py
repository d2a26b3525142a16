"""A tokenizer for the tiny Whisper, so its decoder can write text like the real checkpoint's (for `omni eval`'s ASR).

openai/whisper-large-v3 ships its tokenizer beside the weights; the tiny Whisper's vocabulary is a few
dozen ids, so its tokenizer is a word-level one over the same ids: the special ids the tiny config
uses (pad, end of text, start of transcript) and English words for the rest.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import GenerationConfig, PreTrainedTokenizerFast

# The ids tiny_whisper_config gives them: pad 0, end of text (bos/eos) 1, decoder start 2.
SPECIALS = ("<|pad|>", "<|endoftext|>", "<|startoftranscript|>")
_WORDS = (
    "the a is of and to in it you that what how was for on are with as be at this have from or one had by word "
    "but not all were we when your can said there use an each which she do their time if will way about many then"
).split()


def write_tiny_whisper_tokenizer(out_dir: Path, vocab_size: int, max_length: int) -> PreTrainedTokenizerFast:
    """Save a word-level tokenizer with exactly `vocab_size` ids into `out_dir` (beside the tiny Whisper), and a
    generation config that, like the real one, never writes the pad or start ids and does not end at once."""
    words = list(SPECIALS) + _WORDS
    if vocab_size > len(words):
        words += [f"w{i}" for i in range(vocab_size - len(words))]
    vocab = {word: i for i, word in enumerate(words[:vocab_size])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=SPECIALS[0], bos_token=SPECIALS[1], eos_token=SPECIALS[1], unk_token=SPECIALS[1],
        additional_special_tokens=[SPECIALS[2]],
    )
    fast.save_pretrained(str(out_dir))
    GenerationConfig(
        decoder_start_token_id=2, bos_token_id=1, eos_token_id=1, pad_token_id=0, max_length=max_length,
        suppress_tokens=[0, 2], begin_suppress_tokens=[1],
    ).save_pretrained(str(out_dir))
    return fast
