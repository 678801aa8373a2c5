"""Typed records passed between stages, and their JSONL (de)serialisation.

Every file a stage writes goes through `atomic_write`: the content is written to a temporary file in
the same directory, flushed to disk and renamed over the target, so a reader (or a resumed run) never
sees a half-written file.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

R = TypeVar("R")


def atomic_write(path: str | os.PathLike, data: str | bytes) -> None:
    """Write `data` to `path` so that the file is either the old one or the complete new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = "wb" if isinstance(data, bytes) else "w"
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, **({} if mode == "wb" else {"encoding": "utf-8"})) as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def to_json_line(record: Any) -> str:
    """One record as one JSON line (keys in field order, non-ASCII kept readable)."""
    obj = dataclasses.asdict(record) if dataclasses.is_dataclass(record) else record
    return json.dumps(obj, ensure_ascii=False, allow_nan=False)


def write_jsonl(path: str | os.PathLike, records: Iterable[Any]) -> int:
    """Write records (dataclasses or dicts) to `path` atomically; returns how many were written."""
    lines = [to_json_line(r) for r in records]
    atomic_write(path, "".join(line + "\n" for line in lines))
    return len(lines)


def iter_jsonl(path: str | os.PathLike) -> Iterator[dict]:
    """The records of a JSONL file as dicts."""
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def read_jsonl(path: str | os.PathLike, cls: type[R]) -> list[R]:
    """The records of a JSONL file as instances of the dataclass `cls`."""
    return [cls(**row) for row in iter_jsonl(path)]


@dataclass(frozen=True)
class DocumentRecord:
    """One corpus document and the side of the train/test split it landed on (`documents.jsonl`)."""

    doc_id: str
    """Stable id: a hash of the document text (so the same text always gets the same id)."""
    split: str
    """'train' (mining, attribution, explanation) or 'test' (held-out scoring)."""
    source: str
    """Where the document came from: file path and line/block, or dataset name and row index."""
    n_tokens: int
    """Tokens in the document under the run's tokenizer (without BOS)."""
    n_contexts: int
    """How many token contexts of `corpus.context_size` the document was cut into."""


@dataclass(frozen=True)
class ModelRecord:
    """What was loaded and in which weight convention (`model.json`)."""

    model_name: str
    """The model as configured (`embedded`, a hub id, a directory or a GGUF path)."""
    source: str
    """Resolved source: 'embedded-gguf', 'gguf', 'hf-directory', 'hub' or 'object'."""
    model_class: str
    """The TransformerLens class behind the view ('TransformerBridge', 'HookedTransformer', ...)."""
    weights: str
    """Weight convention of every direction the run reads: 'folded' or 'raw' (see ModelView)."""
    architecture: str
    """'gelu-mlp' or 'gated-mlp'."""
    normalization: str
    """'LN' or 'RMS'."""
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_model: int
    d_head: int
    d_mlp: int
    d_vocab: int
    n_ctx: int
    """Longest context the model accepts."""
    dtype: str
    device: str
