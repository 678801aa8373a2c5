"""Validate, then load: bad input fails before any model, corpus or LLM is loaded and before the run directory
is made; names are resolved first (a run directory never shadows a model); inputs are named by content, so a
model or corpus replaced at the same path re-runs what reads it (case B11); lists as users write them."""

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch

from sae_lens_ctx.cli import main

from tiny import PROSE  # noqa: E402  (tests/support/tiny.py: the same tiny families as the cases' make_tiny.py)
from tiny import make_tiny as build_tiny  # noqa: E402


def one_line_error(capsys, *args):
    code = main(list(args))
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("sae-lens-ctx: error:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture
def loader_spy(monkeypatch):
    """A spy at every loader seam (model, corpus, in-process LLM): records each call, then fails the test."""
    import sae_lens_ctx.clients.llama_cpp_client
    import sae_lens_ctx.clients.local_hf
    import sae_lens_ctx.inputs.context

    calls = []

    def spy(name):
        def called(*args, **kwargs):
            calls.append(name)
            raise AssertionError(f"{name} was called before the input was validated")
        return called

    # where the run context calls them (it imports them by name)
    monkeypatch.setattr(sae_lens_ctx.inputs.context, "load_model", spy("load_model"))
    monkeypatch.setattr(sae_lens_ctx.inputs.context, "build_corpus", spy("build_corpus"))
    monkeypatch.setattr(sae_lens_ctx.clients.llama_cpp_client, "load_llama", spy("load_llama"))
    monkeypatch.setattr(sae_lens_ctx.clients.local_hf, "load_gguf_lm", spy("load_gguf_lm"))
    return calls


@pytest.fixture
def docs(tmp_path):
    path = tmp_path / "docs.txt"
    shutil.copy(PROSE, path)
    return path


def test_bad_input_fails_before_any_loader_and_before_the_run_directory(tmp_path, capsys, monkeypatch, loader_spy,
                                                                       planted_gpt2, docs):
    monkeypatch.chdir(tmp_path)
    model = ["--model", str(planted_gpt2.directory)]
    no_tokenizer = tmp_path / "no-tokenizer"
    shutil.copytree(planted_gpt2.directory, no_tokenizer)
    for p in no_tokenizer.iterdir():
        if p.name.startswith(("tokenizer", "vocab", "merges", "special_tokens")):
            p.unlink()
    (tmp_path / "models").mkdir()
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    n_ctx = planted_gpt2.hf_model.config.n_positions
    cases = [
        (["--corpus", "/nonexistent/c.txt", *model], ["corpus path /nonexistent/c.txt does not exist"]),
        ([*model, "--corpus", str(docs), "explain.model=gpt-4o"], ["embedded backend", "explain.model"]),
        ([*model, "--corpus", str(docs), "explain.backend=llama-cpp", "explain.model=/no/such.gguf"],
         ["/no/such.gguf", "does not exist"]),
        ([*model, "--corpus", str(docs), "explain.backend=openai", "explain.model=gpt-4o"], ["OPENAI_API_KEY"]),
        ([*model, "--corpus", str(docs), f"corpus.context_size={n_ctx * 4}"], [str(n_ctx * 4), str(n_ctx)]),
        (["--model", str(no_tokenizer), "--corpus", str(docs)], ["no tokenizer files", "tokenizer.save_pretrained"]),
        (["--model", "models/x", "--corpus", str(docs)], ["model path models/x does not exist"]),
        (["--model", "nobody/not-cached", "--corpus", str(docs)],
         ["neither an existing path", "nor a hub id in the local HF cache", "hf download nobody/not-cached"]),
        ([*model, "--corpus", str(docs), "discover.saes=[./no-sae]"], ["SAE directory ./no-sae"]),
    ]
    for args, words in cases:
        out = tmp_path / "r"
        line = one_line_error(capsys, "run", *args, "--out", str(out))
        for word in words:
            assert word in line, (word, line)
        assert not out.exists(), args
    assert loader_spy == []


def test_b2_whitespace_only_blocks_are_counted_as_empty(tmp_path, capsys, planted_gpt2):
    blank = tmp_path / "blank.txt"
    blank.write_text("   \n\n \t \n\n\n   ")
    line = one_line_error(capsys, "run", "--out", str(tmp_path / "r"), "--model", str(planted_gpt2.directory),
                          "--corpus", str(blank))
    assert "has no usable document (3 empty, 0 duplicate and 0 too-short documents skipped)" in line


def test_lists_as_users_write_them(tmp_path):
    from sae_lens_ctx.cli import _config_parser, _parse_config
    from sae_lens_ctx.core.config import RunConfig

    def parse(*args):
        return _parse_config(_config_parser("t", "", RunConfig()), list(args)).config

    assert parse("discover.unit_ids=[L1N5,L1N6]").discover.unit_ids == ["L1N5", "L1N6"]
    assert parse("--discover.unit_ids", "L1N5", "L1N6").discover.unit_ids == ["L1N5", "L1N6"]
    assert parse("--discover.layers", "9", "10").discover.layers == [9, 10]
    assert parse("--discover.layers=[9, 10]").discover.layers == [9, 10]
    assert parse("discover.layers=9,10").discover.layers == [9, 10]
    assert parse("explain.prices=[gpt-4=30,60, m=1.5,2]").explain.prices == ["gpt-4=30,60", "m=1.5,2"]
    yaml_list = tmp_path / "c.yaml"
    yaml_list.write_text("discover:\n  unit_ids:\n    - L1N5\n    - L1N6\n  layers: [9, 10]\n")
    cfg = RunConfig.from_yaml(yaml_list)
    assert (cfg.discover.unit_ids, cfg.discover.layers) == (["L1N5", "L1N6"], [9, 10])


def test_the_embedded_llm_never_gets_more_context_than_its_own(loader_spy):
    from sae_lens_ctx.core.config import ExplainConfig
    from sae_lens_ctx.core.embedded import embedded_gguf_path
    from sae_lens_ctx.clients.llama_cpp_client import gguf_context_length
    from sae_lens_ctx.clients.llm import make_client

    own = gguf_context_length(embedded_gguf_path())
    assert own == 8192  # SmolLM2-135M-Instruct's llama.context_length
    assert make_client(ExplainConfig(context_window=128_000)).context_window == own
    assert make_client(ExplainConfig(context_window=1024)).context_window == 1024


def test_saved_tensors_never_share_memory(tmp_path):
    from safetensors.torch import load_file

    from sae_lens_ctx.core.records import save_tensors

    whole = torch.arange(12.0)
    views = {"a": whole[:4], "b": whole[4:8], "c": whole[2:6]}  # views of one storage, as the mine stage's rows
    save_tensors(tmp_path / "v.safetensors", views)
    back = load_file(tmp_path / "v.safetensors")
    assert all(torch.equal(back[k], v) for k, v in views.items())


def test_input_digests_follow_content_not_path_or_time(tmp_path, planted_gpt2, docs):
    from sae_lens_ctx.core.config import RunConfig
    from sae_lens_ctx.pipeline.preflight import input_digests

    def digests(model, corpus):
        cfg = RunConfig()
        cfg.model.model_name, cfg.corpus.dataset_path = str(model), str(corpus)
        return input_digests(cfg)

    before = digests(planted_gpt2.directory, docs)
    copy = tmp_path / "copy"
    shutil.copytree(planted_gpt2.directory, copy)  # new path, new modification times, same content
    docs2 = tmp_path / "docs2.txt"
    docs2.write_bytes(docs.read_bytes())
    assert digests(copy, docs2) == before
    weights = next(copy.glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one weight changed, same header
    weights.write_bytes(bytes(data))
    docs2.write_text(docs.read_text() + "\n\nOne more paragraph.")
    after = digests(copy, docs2)
    assert after["model"] != before["model"] and after["corpus"] != before["corpus"]


# -- names resolved first --------------------------------------------------------------------------


def hf_cache_entry(cache: Path, repo_id: str, model_dir: Path) -> Path:
    """A local HF hub cache entry for `repo_id` holding `model_dir`'s files (the cache layout, built offline)."""
    commit = "0" * 40
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    shutil.copytree(model_dir, snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    return snapshot


SMALL = ["corpus.context_size=16", "corpus.max_tokens=3000", "corpus.min_documents=10", "discover.top_k=2",
         "mine.top_k=8", "explain.backend=offline-test-llm"]


def test_model_gpt2_out_gpt2_runs_from_the_hf_cache_and_resumes(tmp_path, capsys, monkeypatch, planted_gpt2, docs):
    import huggingface_hub.constants

    snapshot = hf_cache_entry(tmp_path / "hub", "gpt2", planted_gpt2.directory)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    args = ["run", "--model", "gpt2", "--out", "gpt2", "--corpus", str(docs), *SMALL]
    assert main(args) == 0, capsys.readouterr().err
    assert (work / "gpt2" / "stages.json").is_file() and not (work / "gpt2" / "config.json").exists()
    record = json.loads((work / "gpt2" / "model.json").read_text())
    assert record["source"] == "hub" and record["d_model"] == planted_gpt2.hf_model.config.n_embd
    capsys.readouterr()
    assert main(args) == 0  # resumed: the run directory 'gpt2' is not taken for the model
    printed = capsys.readouterr().out
    assert "load skipped" in printed and "score skipped" in printed
    # a TransformerLens alias of the same hub id, from the folder that holds the run directory 'gpt2'
    assert main(["run", "--model", "gpt2-small", "--out", "small", "--corpus", str(docs), *SMALL]) == 0
    assert json.loads((work / "small" / "model.json").read_text())["n_layers"] == planted_gpt2.hf_model.config.n_layer
    assert snapshot.is_dir()


# -- case B11: a model or corpus replaced at the same path -----------------------------------------


def make_tiny(arch: str, out: Path) -> None:
    if out.exists():
        shutil.rmtree(out)
    build_tiny(arch, out)


def test_b11_a_replaced_model_or_corpus_re_runs_what_reads_it(tmp_path, capsys, caplog):
    caplog.set_level(logging.INFO, logger="sae_lens_ctx")
    model, corpus, out = tmp_path / "m_swap", tmp_path / "prose.txt", tmp_path / "r"
    shutil.copy(PROSE, corpus)
    args = ["run", "--out", str(out), "--model", str(model), "--corpus", str(corpus), *SMALL]
    make_tiny("gpt2", model)
    assert main(args) == 0
    first = json.loads((out / "model.json").read_text())
    units = (out / "units.jsonl").read_text()
    capsys.readouterr()

    make_tiny("llama-gqa", model)  # another architecture at the same path
    caplog.clear()
    assert main(args) == 0
    captured = capsys.readouterr()
    assert "load ran" in captured.out and "discover ran" in captured.out
    assert "the model's files changed since the last run" in caplog.text
    second = json.loads((out / "model.json").read_text())
    assert (first["architecture"], first["normalization"]) == ("gelu-mlp", "LN")
    assert (second["architecture"], second["normalization"]) == ("gated-mlp", "RMS")
    assert (out / "units.jsonl").read_text() != units

    corpus.write_text("\n\n".join(reversed(PROSE.read_text().split("\n\n"))) + "\n\nA new closing paragraph here.")
    caplog.clear()
    assert main(args) == 0
    captured = capsys.readouterr()
    assert "load ran" in captured.out and "the corpus's files changed" in caplog.text
    assert main(args) == 0 and "load skipped" in capsys.readouterr().out  # unchanged: nothing re-runs
