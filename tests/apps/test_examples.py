"""Every script in examples/ runs, offline, as a user would run it, and checks its own output.

Each example asserts on its own results and prints `<name>: OK` last; here each one must exit 0 and
print that line after real output. The paper protocol on GPT-2 small needs the hub and an API key, so CI
runs its `--check-config` mode (its config is built and validated against the paper's settings).
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

RUNS = {
    "quickstart.py": ["{tmp}/quickstart"],
    "sae_lens_workflow.py": ["{tmp}/sae"],
    "head_vs_neuron.py": ["{quickstart}"],  # the quickstart's finished run directory
    "team_tracking.py": ["{tmp}/team"],
    "paper_protocol_gpt2_small.py": ["--check-config"],
}
"""How CI runs each example (arguments)."""


def run_example(name: str, *args: str, timeout: int = 600) -> str:
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="offline", MPLBACKEND="Agg", PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, str(EXAMPLES / name), *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=EXAMPLES.parent)
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    assert len(lines) >= 5, f"{name} printed almost nothing:\n{proc.stdout}"
    assert lines[-1].startswith(f"{name.removesuffix('.py')}: OK"), lines[-5:]
    return proc.stdout


def test_every_example_has_a_header_and_runs_in_ci():
    scripts = sorted(p.name for p in EXAMPLES.glob("*.py"))
    assert scripts == sorted(RUNS), "an example CI does not run (or a stale entry in RUNS)"
    for name in scripts:
        doc = ast.get_docstring(ast.parse((EXAMPLES / name).read_text()))
        assert doc and "What it shows" in doc and "Run it" in doc, name


@pytest.fixture(scope="module")
def quickstart_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("examples") / "quickstart"
    stdout = run_example("quickstart.py", str(out))
    return out, stdout


@pytest.mark.embedded
def test_quickstart(quickstart_run):
    out, stdout = quickstart_run
    assert "== top next-token units ==" in stdout and "== explanations ==" in stdout
    assert (out / "units.jsonl").is_file() and (out / "scores.jsonl").stat().st_size > 0


@pytest.mark.embedded
def test_head_vs_neuron_on_the_quickstart_run(quickstart_run):
    out, _ = quickstart_run
    stdout = run_example("head_vs_neuron.py", str(out))
    assert "unit_score" in stdout and "head_score_mean" in stdout


@pytest.mark.embedded
def test_sae_lens_workflow(tmp_path):
    stdout = run_example("sae_lens_workflow.py", str(tmp_path / "sae"))
    assert "trained SAE" in stdout and "latent " in stdout
    assert (tmp_path / "sae" / "explanations.jsonl").is_file()


def test_team_tracking(tmp_path):
    stdout = run_example("team_tracking.py", str(tmp_path / "team"))
    assert stdout.count("W&B run") == 2
    assert len(list((tmp_path / "team").glob("run-*/wandb/offline-run-*"))) == 2


def test_paper_protocol_config():
    stdout = run_example("paper_protocol_gpt2_small.py", "--check-config")
    assert "BAD" not in stdout
