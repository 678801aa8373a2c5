"""Token text for display and filters, read from the vocabulary (one function for every stage and the report).

Minimal version written for the look-ups (issue 16); issue 17 owns the full module (`token_pieces` as well).
"""

from __future__ import annotations

from collections.abc import Sequence

WORD_START = ("\u2581", "\u0120")
"""Word-start markers of vocabulary pieces: SentencePiece `▁`, byte-level BPE `Ġ`."""


def token_strings(tokenizer, ids: Sequence[int]) -> list[str]:
    """Each token's text with its word-start marker as a leading space (`▁paris` / `Ġparis` → ' paris'),
    byte pieces decoded (`<0x0A>` → '\\n'). `tokenizer` is a Hugging Face tokenizer; None gives '#ID'."""
    ids = [int(i) for i in ids]
    if tokenizer is None:
        return [f"#{i}" for i in ids]
    pieces = tokenizer.convert_ids_to_tokens(ids)
    out = []
    for i, piece in zip(ids, pieces):
        text = tokenizer.decode([i])
        if isinstance(piece, str) and piece.startswith(WORD_START) and not text.startswith(" "):
            text = " " + text
        out.append(text)
    return out
