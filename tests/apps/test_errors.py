"""Bad input: a one-line error naming the problem and the fix, exit code 2, no traceback (unless --debug).

Model names and files, corpora, config files and values, commands, and the machine and the run directory:
a full disk, an unreadable or unwritable path, a damaged results file, a corrupt or incompatible
stages.json, another run's directory, a foreign directory, a pickle-only checkpoint. (Ctrl-C: exit 130
and resumable, in test_crash_resume.py.)"""

import contextlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cli import assert_one_line_error, run_cli
from sae_lens_ctx.cli import main
from sae_lens_ctx.core.embedded import embedded_gguf_path


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


# -- the machine and the run directory -------------------------------------------------------------


def small_run(planted_gpt2, docs, out):
    return ["run", "--model", str(planted_gpt2.directory), "--corpus", str(docs), "corpus.context_size=16",
            "corpus.max_tokens=4000", "corpus.min_documents=10", "explain.backend=offline-test-llm", "--out", str(out)]


def test_a_full_disk_is_one_line_and_the_same_command_resumes(tmp_path, capsys, planted_gpt2, docs):
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=400k", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("mounting a tiny tmpfs needs root")
    try:
        args = small_run(planted_gpt2, docs, disk / "run")
        assert_one_line_error(*run_cli(capsys, *args), "no space left on the disk", "run the same command again")
        assert not [p for p in (disk / "run").rglob(".*.tmp")]  # nothing half-written left behind
        subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
        assert main(args) == 0
        assert (disk / "run" / "report" / "index.html").is_file()
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


@contextlib.contextmanager
def unprivileged():
    """Root reads and writes anything: act as 'nobody' for a permission check (restored after)."""
    if os.geteuid() != 0:
        yield
        return
    os.seteuid(65534)
    try:
        yield
    finally:
        os.seteuid(0)


def test_unreadable_config_and_unwritable_run_directory(tmp_path, capsys, monkeypatch, planted_gpt2):
    import tempfile

    readable = Path(tempfile.mkdtemp()) / "model"  # inputs 'nobody' may read: the checks read them first
    shutil.copytree(planted_gpt2.directory, readable)
    (readable.parent / "docs.txt").write_text("A readable corpus.\n")
    for p in [readable.parent, readable, *readable.parent.rglob("*")]:
        p.chmod(0o755)
    locked = tmp_path / "locked.yaml"
    locked.write_text("seed: 1\n")
    locked.chmod(0)
    monkeypatch.chdir("/")  # a working directory 'nobody' may enter (the model name is first tried as a path)
    from sae_lens_ctx.core.config import RunConfig
    from sae_lens_ctx.pipeline.preflight import check_inputs

    check_inputs(RunConfig(), ["load", "explain"])  # imports what the checks need while root may still read it
    with unprivileged():
        config_error = run_cli(capsys, "run", str(locked))
        out_error = run_cli(capsys, "run", "--model", str(readable), "--corpus", str(readable.parent / "docs.txt"),
                            "explain.backend=offline-test-llm",
                            "--out", str(tmp_path / "closed" / "run"))
    shutil.rmtree(readable.parent)
    (tmp_path / "closed").mkdir(exist_ok=True)
    assert_one_line_error(*config_error, "permission denied", "locked.yaml")
    assert_one_line_error(*out_error, "permission denied", "closed")


def test_run_directory_problems(tmp_path, capsys, planted_gpt2, docs):
    out = tmp_path / "run"
    assert main(small_run(planted_gpt2, docs, out)) == 0
    manifest = json.loads((out / "stages.json").read_text())
    # a damaged results file (edited by hand, or copied half-way)
    units = (out / "units.jsonl").read_text()
    (out / "units.jsonl").write_text(units[: len(units) // 2])
    assert_one_line_error(*run_cli(capsys, "mine", "--out", str(out), "--force"), "units.jsonl line", "not valid JSON",
                          "--force")
    (out / "units.jsonl").write_text(units)
    # a corrupt manifest, then one from an incompatible version
    (out / "stages.json").write_text("{")
    assert_one_line_error(*run_cli(capsys, *small_run(planted_gpt2, docs, out)), "stages.json is corrupt")
    (out / "stages.json").write_text(json.dumps({**manifest, "results_format": 99}))
    assert_one_line_error(*run_cli(capsys, *small_run(planted_gpt2, docs, out)), "incompatible version",
                          "--overwrite")
    (out / "stages.json").write_text(json.dumps(manifest))
    # another model's results, and a directory that is not ours
    assert_one_line_error(*run_cli(capsys, "run", "--model", "embedded", "--out", str(out)), "different run",
                          "--overwrite")
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "cat.jpg").write_bytes(b"\xff\xd8")
    assert_one_line_error(*run_cli(capsys, *small_run(planted_gpt2, docs, foreign)), "not empty", "new --out")


def test_a_pickle_checkpoint_is_refused_unless_allowed(tmp_path, capsys, planted_gpt2):
    import torch

    from sae_lens_ctx.core.config import ModelConfig
    from sae_lens_ctx.inputs.model import load_model

    pickled = tmp_path / "pickled"
    shutil.copytree(planted_gpt2.directory, pickled)
    for weights in pickled.glob("*.safetensors"):
        weights.unlink()
    torch.save(planted_gpt2.hf_model.state_dict(), pickled / "pytorch_model.bin")
    assert_one_line_error(*run_cli(capsys, "run", "--model", str(pickled), "--out", str(tmp_path / "r")),
                          "pickle-based weights only", "pytorch_model.bin", "model.allow_pickle=true")
    view = load_model(ModelConfig(model_name=str(pickled), allow_pickle=True))  # torch.load(weights_only=True)
    reference = load_model(ModelConfig(model_name=str(planted_gpt2.directory)))
    assert torch.equal(view.W_U, reference.W_U)
