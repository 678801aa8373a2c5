"""Bad input: a one-line error naming the problem, exit code 2, no traceback (unless --debug)."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from sae_lens_ctx.cli import main
from sae_lens_ctx.embedded import embedded_gguf_path


def run_cli(capsys, *args):
    code = main(list(args))
    err = capsys.readouterr().err
    return code, err


def assert_one_line_error(code, err, *words):
    lines = [line for line in err.splitlines() if line.startswith("sae-lens-ctx: error:")]
    assert code == 2, err
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for word in words:
        assert word in lines[0], (word, lines[0])


@pytest.fixture
def docs(tmp_path, planted_gpt2):
    from planted import planted_corpus

    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in planted_corpus(planted_gpt2, n_docs=60)))
    return path


def test_unknown_model_name(tmp_path, capsys):
    assert_one_line_error(*run_cli(capsys, "run", "--model", "gpt2-smal", "--out", str(tmp_path / "r")),
                          "unknown model name 'gpt2-smal'", "did you mean 'gpt2-small'")


def test_hub_name_while_offline(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert_one_line_error(*run_cli(capsys, "run", "--model", "sshleifer/tiny-gpt2-not-cached",
                                   "--out", str(tmp_path / "r")), "HF_HUB_OFFLINE", "local directory")


def test_missing_gguf_and_empty_directory(tmp_path, capsys):
    assert_one_line_error(*run_cli(capsys, "run", "--model", str(tmp_path / "m.gguf"), "--out", str(tmp_path / "r")),
                          "does not exist")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_one_line_error(*run_cli(capsys, "run", "--model", str(empty), "--out", str(tmp_path / "r")),
                          "no config.json")


def test_truncated_and_corrupt_gguf(tmp_path, capsys):
    truncated = tmp_path / "cut.gguf"
    with open(embedded_gguf_path(), "rb") as src:
        truncated.write_bytes(src.read(2_000_000))
    assert_one_line_error(*run_cli(capsys, "run", "--model", str(truncated), "--out", str(tmp_path / "r")),
                          "truncated or corrupt")
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"not a gguf at all" * 100)
    assert_one_line_error(*run_cli(capsys, "run", "--model", str(garbage), "--out", str(tmp_path / "r")),
                          "not a GGUF file")


def test_corpus_problems(tmp_path, capsys, planted_gpt2, docs):
    model = ["--model", str(planted_gpt2.directory)]
    assert_one_line_error(*run_cli(capsys, "run", *model, "--corpus", str(tmp_path / "nope.txt"),
                                   "--out", str(tmp_path / "r1")), "does not exist")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    assert_one_line_error(*run_cli(capsys, "run", *model, "--corpus", str(empty), "--out", str(tmp_path / "r2")))
    assert_one_line_error(*run_cli(capsys, "run", *model, "--corpus", str(docs), "corpus.min_documents=100000",
                                   "--out", str(tmp_path / "r3")), "100000")
    n_ctx = planted_gpt2.hf_model.config.n_positions
    assert_one_line_error(*run_cli(capsys, "run", *model, "--corpus", str(docs), f"corpus.context_size={n_ctx * 4}",
                                   "--out", str(tmp_path / "r4")), str(n_ctx * 4), str(n_ctx))


def test_config_problems(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("corpus: {context_size: [\n")
    assert_one_line_error(*run_cli(capsys, "run", str(bad)), "not valid YAML")
    typo = tmp_path / "typo.yaml"
    typo.write_text("corpus:\n  max_tokes: 10\n")
    assert_one_line_error(*run_cli(capsys, "run", str(typo)), "corpus.max_tokes", "corpus.max_tokens")
    assert_one_line_error(*run_cli(capsys, "run", "--corpus.max_tokes", "5"), "did you mean '--corpus.max_tokens'")
    assert_one_line_error(*run_cli(capsys, "run", "corpus.context_size=abc"), "corpus.context_size")
    assert_one_line_error(*run_cli(capsys, "run", "corpus.context_size=0"), "positive")
    assert_one_line_error(*run_cli(capsys, "run", "corpus.max_tokens=-3"), "positive")
    assert_one_line_error(*run_cli(capsys, "nonsense"), "unknown command")
    assert_one_line_error(*run_cli(capsys, "discover", "--out", str(tmp_path / "none")), "run directory")


def test_console_script_exit_code_and_debug_traceback(tmp_path):
    script = shutil.which("sae-lens-ctx")
    assert script, "the console script is not installed: pip install -e ."
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    plain = subprocess.run([script, "run", "--model", str(tmp_path / "x.gguf")], capture_output=True, text=True, env=env)
    assert plain.returncode == 2 and "Traceback" not in plain.stderr
    debug = subprocess.run([script, "run", "--debug", "--model", str(tmp_path / "x.gguf")],
                           capture_output=True, text=True, env=env)
    assert debug.returncode == 2 and "Traceback" in debug.stderr
    helped = subprocess.run([sys.executable, "-m", "sae_lens_ctx", "run", "--help"], capture_output=True, text=True)
    assert helped.returncode == 0 and "--corpus.context_size" in helped.stdout and "Tokens per context" in helped.stdout
