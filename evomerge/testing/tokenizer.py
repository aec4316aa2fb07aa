"""A character-level tokenizer built locally with ``tokenizers`` (no hub download)."""

from __future__ import annotations

import string

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIAL = (PAD, BOS, EOS, UNK)
#: Every character the zoo's corpora and tasks use: digits, lowercase letters, a few symbols, space, newline.
ALPHABET = string.digits + string.ascii_lowercase + " +-*=:>,.?|\n"


def build_tokenizer(alphabet: str = ALPHABET) -> PreTrainedTokenizerFast:
    """Return the zoo's char-level tokenizer (ids: 4 specials, then ``alphabet`` in order; characters
    outside it become ``<unk>``)."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL)}
    for ch in alphabet:
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, padding_side="left", pad_token=PAD, bos_token=BOS, eos_token=EOS, unk_token=UNK
    )
    return fast
