"""A newcomer's first hour: a quick CLI that imports no torch for help and config errors, quiet library
logging, `run --until STAGE` without an LLM, a single stage on a fresh directory pointing at it, and
progress lines when the output goes to a pipe or a file (issue 20)."""

import json
import os
import re
import subprocess
import sys

import pytest

# Hang guards, not timing assertions: many times what these take on a busy 2-core machine.
HELP_HANG_GUARD_S = 300
RUN_HANG_GUARD_S = 1800


def python(code: str, env: dict | None = None, timeout: float = HELP_HANG_GUARD_S) -> subprocess.CompletedProcess:
    """`code` in a fresh interpreter that imports this checkout, its output piped."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), **(env or {})}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=timeout)


PROBE = """
import logging, sys
from sae_lens_ctx.cli import main
try:
    rc = main({args!r})
except SystemExit as e:
    rc = e.code
print("RC", rc, "TORCH", "torch" in sys.modules, "HTTPX", logging.getLogger("httpx").getEffectiveLevel())
"""


@pytest.mark.parametrize("args, rc, words", [
    (["--help"], 0, ["usage: sae-lens-ctx COMMAND", "run", "--help"]),
    (["run", "--help"], 0, ["usage: sae-lens-ctx run [CONFIG.yaml]", "--until STAGE", "--discover.top_k",
                            "(default: 2)", "DiscoverConfig ['config.discover']", "ExplainConfig", "(default: embedded)"]),
    (["run", "--mine.top_k", "0"], 2, ["sae-lens-ctx: error: mine.top_k must be positive"]),
    (["run", "--mine.topk", "3"], 2, ["unknown option '--mine.topk'", "--mine.top_k"]),
], ids=["help", "run-help", "config-error", "unknown-option"])
def test_help_and_config_errors_import_no_torch(args, rc, words):
    p = python(PROBE.format(args=args))
    out = p.stdout + p.stderr
    assert f"RC {rc} TORCH False" in p.stdout, out[-2000:]
    for w in words:
        assert w in out, (w, out[-3000:])
    if rc:
        assert p.stderr.count("\n") == 1  # one line


def test_library_chatter_is_quiet_unless_verbose():
    quiet = python(PROBE.format(args=["run", "--mine.top_k", "0"]))
    verbose = python(PROBE.format(args=["-v", "run", "--mine.top_k", "0"]))
    assert "HTTPX 30" in quiet.stdout and "HTTPX 20" in verbose.stdout  # WARNING by default, INFO with -v


def test_a_single_stage_on_a_fresh_directory_points_at_run_until(tmp_path):
    p = python(PROBE.format(args=["mine", "--out", str(tmp_path / "new")]))
    assert "RC 2 TORCH False" in p.stdout
    assert p.stderr.count("\n") == 1 and f"sae-lens-ctx run --out {tmp_path / 'new'} --until mine" in p.stderr
    assert not (tmp_path / "new").exists()


UNTIL = """
import sys
import sae_lens_ctx.clients.llm as llm
def no_llm(cfg):  # fault injection at the seam: any LLM client construction fails the run
    raise AssertionError("an LLM client was constructed")
llm.make_client = no_llm
from sae_lens_ctx.cli import main
sys.exit(main({args!r}))
"""


def test_run_until_attribute_writes_units_contexts_heads_without_an_llm_and_logs_progress(tmp_path, planted_gpt2):
    from planted import planted_corpus

    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": t}) + "\n" for t in planted_corpus(planted_gpt2, n_docs=120)))
    out = tmp_path / "run"
    args = ["run", "--model", str(planted_gpt2.directory), "--corpus", str(docs), "--out", str(out),
            "--until", "attribute", "corpus.context_size=16", "corpus.max_tokens=4000", "corpus.min_documents=10",
            "mine.batch_size=4"]
    # piped output; a progress line at every update (pace 0 s), so the scan's several batches show several lines
    p = python(UNTIL.format(args=args), env={"SAE_LENS_CTX_PROGRESS_S": "0"}, timeout=RUN_HANG_GUARD_S)
    assert p.returncode == 0, p.stderr[-3000:]
    for name in ("units.jsonl", "contexts.jsonl", "heads.jsonl"):
        assert (out / name).stat().st_size > 0, name
    assert not (out / "explanations.jsonl").exists() and not (out / "scores.jsonl").exists()
    manifest = json.loads((out / "stages.json").read_text())
    assert sorted(manifest["stages"]) == ["attribute", "discover", "load", "mine"]
    lines = [line for line in p.stderr.splitlines() if re.fullmatch(
        r"mine[^:]*: \d+/\d+ tok \(\d+%\)(, [\d.e+]+ tok/s)?(, \S+ left|, done in \S+)?", line)]
    assert len(lines) >= 3, p.stderr[-3000:]
    scans: dict[str, list[str]] = {}  # one bar per scan (its desc names it), each with its own lines
    for line in lines:
        scans.setdefault(line.split(":")[0], []).append(line)
    for scan in scans.values():
        done = [int(re.search(r": (\d+)/", line).group(1)) for line in scan]
        assert done == sorted(done) and done[-1] == int(re.search(r"/(\d+) tok", scan[-1]).group(1))
        assert "done in" in scan[-1]
    assert any(" left" in line for line in lines)
    assert re.search(r"^attribute: \d+/\d+ unit", p.stderr, re.M)


def test_wandb_is_on_by_default_and_offline_inside_the_run_directory_without_a_login(tmp_path, planted_gpt2):
    from planted import planted_corpus
    from wandb_offline import Offline

    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": t}) + "\n" for t in planted_corpus(planted_gpt2, n_docs=120)))
    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k not in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_DISABLED")}
    env.update(NETRC=str(tmp_path / "no-netrc"), WANDB_CONFIG_DIR=str(tmp_path / "wandb-config"))
    args = ["run", "--model", str(planted_gpt2.directory), "--corpus", str(docs), "--out", str(out),
            "--until", "discover", "corpus.context_size=16", "corpus.max_tokens=4000", "corpus.min_documents=10"]
    code = f"import sys; from sae_lens_ctx.cli import main; sys.exit(main({args!r}))"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=RUN_HANG_GUARD_S,
                       env={**env, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stderr.count("no login found") == 1  # announced once
    runs = sorted((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    run = Offline(str(runs[0]))
    units = [json.loads(line) for line in (out / "units.jsonl").read_text().splitlines()]
    assert run.run["job_type"] == "discover" and run.summary["units/n_units"] == sum(not u["control"] for u in units)
    assert json.loads((out / "tracking.json").read_text())["mode"] == "offline"
