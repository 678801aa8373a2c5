"""Tokens as words: a token's own text with its word-start space, and per-token pieces that spell the text.

Decoding one token alone is not its text. SentencePiece tokenizers (Llama-2, Mistral, Gemma) mark a
word start with `▁` and their decoder strips one leading space, so `decode([id('▁river')])` is
`'river'`; byte-level BPE (GPT-2, Llama-3, Qwen) cuts a rare character over several tokens that
decode alone to U+FFFD. Here a token's text is read in context instead: decoded after a fixed probe
token (a one-token word) and the probe's own text removed, so the decoder's word-start handling
applies exactly as it does inside a sentence (`▁`, `Ġ` and byte-fallback pieces such as `<0x20>` all
come out as the characters they stand for).

`token_strings` is the vocabulary view (the paper's leading-space token filter, `units.jsonl`, the
explainer prompts); `token_pieces` the rendering view (the report's shaded prompts), whose pieces
concatenate exactly to the decoded text.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

REPLACEMENT = "\ufffd"
"""What a decoder writes for bytes that are not (yet) a whole UTF-8 character."""


def _decode_all(tokenizer: Any, rows: list[list[int]]) -> list[str]:
    return tokenizer.batch_decode(rows, clean_up_tokenization_spaces=False)


def _probe(tokenizer: Any) -> tuple[int, str] | None:
    """A token that is one plain word on its own (id, its decoded text), or None where there is none."""
    for word in ("a", "x", "the", "I", "A", "0"):
        ids = tokenizer(word, add_special_tokens=False)["input_ids"]
        if len(ids) == 1:
            text = _decode_all(tokenizer, [ids])[0]
            if text and REPLACEMENT not in text:
                return int(ids[0]), text
    return None


def token_strings(tokenizer: Any, ids: Sequence[int]) -> list[str]:
    """Each token's own text, `[len(ids)]` strings: a word-start marker (SentencePiece `▁`, byte-level
    `Ġ`, a byte-fallback `<0x20>`) as a leading space, so `▁river` is `' river'`.

    Read in context: `decode([probe, id])` minus `decode([probe])`, where `probe` is a one-token word;
    a token whose text cannot be separated that way (or a tokenizer without such a word) falls back to
    decoding it alone. Special tokens keep their names (`'<s>'`). A byte that is part of a longer
    character decodes to U+FFFD, as it does alone."""
    ids = [int(i) for i in ids]
    alone = _decode_all(tokenizer, [[i] for i in ids])
    probe = _probe(tokenizer)
    if probe is None or not ids:
        return alone
    pid, ptext = probe
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    paired = _decode_all(tokenizer, [[pid, i] for i in ids])
    return [a if i in special or not p.startswith(ptext) else p[len(ptext):]
            for i, a, p in zip(ids, alone, paired)]


def token_pieces(tokenizer: Any, ids: Sequence[int]) -> list[str]:
    """Per-token pieces, `[len(ids)]` strings, that concatenate exactly to `decode(ids)` (for rendering).

    Each piece is what the token adds to the decoded prefix. A prefix that ends in half a character
    (U+FFFD from bytes still waiting for the rest of an emoji or CJK character) adds nothing yet: the
    whole character goes to the token that completes it. Where a decoder rewrites earlier text (so a
    prefix is not the start of the next one), the piece is empty and the rest goes to the next token
    (and if the full text does not extend the pieces so far, the last token carries all of it)."""
    ids = [int(i) for i in ids]
    if not ids:
        return []
    prefixes = _decode_all(tokenizer, [ids[:n] for n in range(1, len(ids) + 1)])
    pieces, done = [], ""
    for n, now in enumerate(prefixes, start=1):
        if n < len(ids):
            now = now.rstrip(REPLACEMENT)
        if now.startswith(done):
            pieces.append(now[len(done):])
            done = now
        else:
            pieces.append("")
    if done != prefixes[-1]:  # a rewrite the last token did not undo: one piece, still spelling the text
        pieces = [""] * (len(ids) - 1) + [prefixes[-1]]
    return pieces


def own_bos_token_id(tokenizer: Any) -> int | None:
    """The tokenizer's own BOS id, or None where it has none.

    A BOS that the loading library substituted counts as none: TransformerLens sets a missing BOS to the
    EOS token, so a BOS equal to EOS that the tokenizer's own configuration (`init_kwargs`) does not
    name is not the tokenizer's. (GPT-2, whose configuration names `<|endoftext|>` as both, keeps it.)"""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    named = (getattr(tokenizer, "init_kwargs", None) or {}).get("bos_token")
    if named is None and bos == getattr(tokenizer, "eos_token_id", None):
        return None
    return int(bos)


SAMPLE_TEXT = "The river carried the forgotten map."


def tokenizer_problem(tokenizer: Any, vocab_size: int | None) -> str | None:
    """Why a tokenizer cannot be the model's (one phrase), or None. transformers 5 builds an empty
    tokenizer (a vocabulary of one, every text encoded to nothing) for a directory without tokenizer
    files instead of raising, so this looks at what it does: it must encode a sample sentence, and its
    vocabulary must be at least half the model's `vocab_size` (models pad theirs, never by half)."""
    try:
        n = len(tokenizer)
        ids = tokenizer(SAMPLE_TEXT, add_special_tokens=False)["input_ids"]
    except Exception as e:  # a broken tokenizer raises anything
        return f"it fails on a sample sentence ({type(e).__name__})"
    if not ids:
        return f"it encodes a sample sentence to no tokens (a vocabulary of {n})"
    if vocab_size and 2 * n < vocab_size:
        return f"its vocabulary of {n} is far smaller than the model's {vocab_size}"
    return None
