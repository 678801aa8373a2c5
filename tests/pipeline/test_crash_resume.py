"""Crash anywhere and resume identically: `sae-lens-ctx run` on the planted GPT-2, with the offline test LLM
and W&B offline, killed with SIGKILL at many points (tests/support/kill_harness.py), then run again.

* One run directory goes through a chain of kills, each at a later point of the pipeline (discovery,
  mid-scan of each split, trimming, attribution, explain calls, judge calls, the report's plots, W&B
  tables and artifact, stages.json, atomic renames); every re-run is the same command.
* After every kill no visible file is half-written: each parses as its format.
* The run that finally completes wrote the same bytes as an uninterrupted run, file for file. The
  exceptions are the known volatile places: `stages.json`'s `finished_at` / `seconds` / `this_run`, the
  W&B run id in `tracking.json`, W&B's own folder, and the LLM cache (compared by its rows).
* No answered LLM call was made twice: across all the killed processes and the last one, the backend
  answered exactly the calls of the uninterrupted run, each once.
* Ctrl-C stops cleanly (exit 130, one line, no traceback) and the same command resumes.
* Two uninterrupted runs of the same config and seed write identical results (determinism on CPU).
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml

# A hang guard, not a timing assertion: many times what the subprocess takes even on a busy 2-core machine
# (where a bare `sae-lens-ctx --help` once took a minute), so only a hang fails the test.
HANG_GUARD_S = 1800

HARNESS = Path(__file__).resolve().parents[1] / "support" / "kill_harness.py"

CHAIN = ["rename:2", "discover:1", "scan-train:20", "scan-test:3", "trim:2", "rename:7", "attribute:2",
         "manifest:4", "explain-call:3", "judge-call:10", "judge-call:25", "rename:5", "report-plot:3",
         "wandb-tables:1", "wandb-artifact:1"]
"""Kill points, in pipeline order: each process dies at its point; the next one, the same command, resumes."""

VOLATILE_STAGE_FIELDS = {"finished_at", "seconds", "this_run"}


@pytest.fixture(scope="module")
def command(planted_gpt2, tmp_path_factory):
    from planted import planted_corpus

    root = tmp_path_factory.mktemp("crash")
    docs = root / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": t}) + "\n" for t in planted_corpus(planted_gpt2, n_docs=120)))

    def args(out: Path) -> list[str]:
        return ["run", "--model", str(planted_gpt2.directory), "--corpus", str(docs), "corpus.context_size=16",
                "corpus.max_tokens=4000", "corpus.min_documents=10", "explain.backend=offline-test-llm",
                "explain.max_concurrency=1", "mine.batch_size=4", "mine.checkpoint_every=1",
                "logging.log_to_wandb=true", "--out", str(out)]
    return args


def harness(cli_args: list[str], calls: Path, kill: str | None = None, **popen) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "OMP_NUM_THREADS": "2"}
    cmd = [sys.executable, str(HARNESS), *(["--kill", kill] if kill else []), "--calls", str(calls), "--", *cli_args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=HANG_GUARD_S, **popen)


@pytest.fixture(scope="module")
def reference(command, tmp_path_factory):
    """An uninterrupted run: its directory and the LLM calls it made."""
    root = tmp_path_factory.mktemp("reference")
    proc = harness(command(root / "run"), root / "calls")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root / "run", (root / "calls").read_text().split()


# -- what "the same results" means ----------------------------------------------------------------


def results_files(out: Path) -> set[str]:
    return {p.relative_to(out).as_posix() for p in out.rglob("*")
            if p.is_file() and "wandb" not in p.relative_to(out).parts}


def cache_rows(out: Path) -> list[tuple]:
    with sqlite3.connect(out / "llm_cache.sqlite") as con:
        return con.execute("SELECT key, response FROM responses ORDER BY key").fetchall()


def stable_manifest(out: Path) -> dict:
    manifest = json.loads((out / "stages.json").read_text())
    for stage in manifest["stages"].values():
        assert set(stage) >= {"fingerprint", "outputs", "finished_at", "seconds", "this_run"}
        for key in VOLATILE_STAGE_FIELDS:
            stage.pop(key)
    return manifest


def assert_same_results(out: Path, ref: Path) -> None:
    files = results_files(out)
    assert files == results_files(ref), files ^ results_files(ref)  # no leftover temp or checkpoint file
    special = {"stages.json", "tracking.json", "llm_cache.sqlite", "llm_cache.sqlite-wal", "llm_cache.sqlite-shm"}
    differ = [f for f in sorted(files - special) if (out / f).read_bytes() != (ref / f).read_bytes()]
    assert differ == [], differ
    assert stable_manifest(out) == stable_manifest(ref)
    tracked, tracked_ref = (json.loads((d / "tracking.json").read_text()) for d in (out, ref))
    assert tracked.keys() == tracked_ref.keys()
    assert {k: v for k, v in tracked.items() if k not in ("run_id", "wandb_dir")} == \
        {k: v for k, v in tracked_ref.items() if k not in ("run_id", "wandb_dir")}
    assert cache_rows(out) == cache_rows(ref)


def assert_nothing_half_written(out: Path) -> int:
    """Every visible file parses as its format (temporary files are dot-files, never a result's name)."""
    from safetensors import safe_open

    checked = 0
    for path in out.rglob("*"):
        rel = path.relative_to(out)
        if not path.is_file() or "wandb" in rel.parts or path.name.startswith("."):
            continue
        data = path.read_bytes()
        suffix = path.suffix
        if suffix == ".json":
            json.loads(data)
        elif suffix == ".jsonl":
            assert not data or data.endswith(b"\n"), rel
            [json.loads(line) for line in data.splitlines() if line.strip()]
        elif suffix == ".yaml":
            yaml.safe_load(data)
        elif suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as f:
                [f.get_tensor(k) for k in f.keys()]
        elif suffix == ".png":
            assert data.startswith(b"\x89PNG\r\n\x1a\n") and data.endswith(b"IEND\xaeB`\x82"), rel
        elif suffix == ".html":
            assert data.rstrip().endswith(b"</html>"), rel
        elif path.name.startswith("llm_cache.sqlite"):
            continue  # sqlite's own journal keeps it whole; read back by cache_rows at the end
        else:
            raise AssertionError(f"unexpected file {rel}")
        checked += 1
    return checked


# -- the tests ----------------------------------------------------------------------------------------


def test_killed_anywhere_the_same_command_resumes_to_the_same_bytes(command, reference, tmp_path):
    ref, ref_calls = reference
    out, calls = tmp_path / "run", tmp_path / "calls"
    where = []
    for point in CHAIN:
        proc = harness(command(out), calls, kill=point)
        assert proc.returncode == -signal.SIGKILL, (point, proc.returncode, proc.stderr[-2000:])
        where.append(next(line for line in proc.stderr.splitlines() if line.startswith("killed at")))
        assert_nothing_half_written(out)
    final = harness(command(out), calls)
    assert final.returncode == 0, final.stderr[-3000:]
    print(f"{len(CHAIN)} kill points: " + "; ".join(w.removeprefix("killed at ") for w in where))
    assert_same_results(out, ref)
    made = calls.read_text().split()
    assert [k for k, n in Counter(made).items() if n > 1] == []  # no answered call made twice
    assert sorted(made) == sorted(ref_calls)  # and exactly the calls of the uninterrupted run
    assert len(list((out / "wandb").glob("offline-run-*"))) >= 3  # the killed W&B runs stay, for `wandb sync`


def test_ctrl_c_stops_cleanly_and_the_same_command_resumes(command, reference, tmp_path):
    ref, _ = reference
    out, calls = tmp_path / "run", tmp_path / "calls"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    proc = subprocess.Popen([sys.executable, str(HARNESS), "--calls", str(calls), "--", *command(out)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (out / "units.jsonl").exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=HANG_GUARD_S)
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err and "interrupted; run the same command again to resume" in err
    assert_nothing_half_written(out)
    done = harness(command(out), calls)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_results(out, ref)


def test_two_runs_of_one_config_and_seed_write_the_same_results(command, reference, tmp_path):
    ref, ref_calls = reference
    again = harness(command(tmp_path / "run"), tmp_path / "calls")
    assert again.returncode == 0, again.stderr[-3000:]
    assert_same_results(tmp_path / "run", ref)
    assert sorted((tmp_path / "calls").read_text().split()) == sorted(ref_calls)
