"""The README's main job: `sae-lens-ctx run` on the embedded default, offline, as a real process."""

import json
import os
import re
import shutil
import subprocess

import pytest
import yaml

from wandb_offline import Offline

# A hang guard, not a timing assertion: several times the main job's measured duration on a quiet 2-core
# machine (~9 minutes from a fresh install), so a slow or busy machine still passes and only a hang fails.
HANG_GUARD_S = 3600


@pytest.mark.embedded
@pytest.mark.timeout(2 * HANG_GUARD_S)
def test_run_with_no_model_arguments_uses_the_embedded_default_offline(tmp_path):
    out = tmp_path / "demo"
    # The README's first command as a new user runs it: no W&B login, no WANDB_MODE, so W&B (on by
    # default) logs offline inside the run directory.
    env = {k: v for k, v in os.environ.items() if k not in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_DISABLED")}
    env.update(HF_HUB_OFFLINE="1", NETRC=str(tmp_path / "no-netrc"), WANDB_CONFIG_DIR=str(tmp_path / "wandb-config"))
    proc = subprocess.run([shutil.which("sae-lens-ctx"), "run", "--out", str(out)], capture_output=True, text=True,
                          env=env, timeout=HANG_GUARD_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["model"]["model_name"] == "embedded" and config["corpus"]["dataset_path"] == "embedded"
    model = json.loads((out / "model.json").read_text())
    assert (model["source"], model["n_layers"], model["d_mlp"]) == ("embedded-gguf", 30, 1536)
    corpus = json.loads((out / "corpus.json").read_text())
    assert corpus["train"]["n_tokens"] > corpus["test"]["n_tokens"] > 0
    for name in ("units.jsonl", "contexts.jsonl", "heads.jsonl", "explanations.jsonl", "scores.jsonl",
                 "judgements.jsonl", "report/index.html"):
        assert (out / name).stat().st_size > 0, name
    units = [json.loads(line) for line in (out / "units.jsonl").read_text().splitlines()]
    assert any(u["control"] for u in units) and any(not u["control"] for u in units)
    summary = json.loads((out / "summary.json").read_text())
    for side in ("real", "random_units"):
        assert set(summary["headline"]["E"][side]) >= {"mean", "ci_low", "ci_high", "n"}
    assert summary["headline"]["E"]["real_minus_random_units"]["verdict"]
    assert "not built yet" not in proc.stdout and "scored" in proc.stdout
    # the end-of-run summary leads with what was found (issue 29): its first findings line names a head, a unit
    # and the tokens the head looks up, with E and its interval; the whole summary fits in 30 lines
    lines = proc.stdout.splitlines()
    end = lines[next(i for i, line in enumerate(lines) if line.startswith("Findings (")):]
    assert len(end) <= 30, "\n".join(end)
    assert re.fullmatch(r'  1\. L\d+H\d+ → L\d+N\d+ ".+" looks up ".+": E \d\.\d\d \[\d\.\d\d, \d\.\d\d\], n=\d+, .+',
                        end[1]), "\n".join(end)
    assert any(line.startswith("Verdicts (") for line in end) and end[-1].startswith("results in")
    print("\n".join(end))
    # matched negatives (scores issue): every unit's held-out positives and negatives differ in mean length by
    # at most 10 %, and the length-only judge cannot tell the units' classes apart
    mine = json.loads((out / "mine.json").read_text())
    for u in mine["per_unit"]:
        top, low = u["test_lengths"]["top"]["mean"], u["test_lengths"]["low"]["mean"]
        assert top and low and abs(top - low) <= 0.10 * top, (u["unit_id"], top, low)
    assert 0.40 <= summary["headline"]["unit_auroc"]["length_control"]["mean"] <= 0.60
    # look-ups: every relevant pair has its look-up records, its look-up explanation, and (where explained)
    # its look-up scores beside the LLM's
    rows = lambda name: [json.loads(line) for line in (out / name).read_text().splitlines()]  # noqa: E731
    relevant = {(h["unit_id"], h["head"]) for h in rows("heads.jsonl") if h["relevant"]}
    assert relevant and {(r["unit_id"], r["head"]) for r in rows("lookups.jsonl")} == relevant
    lookup = {(e["unit_id"], e["head"]): e for e in rows("explanations.jsonl") if e["explainer"] == "lookup"}
    assert {k for k in lookup if k[1] is not None} == relevant
    # the QK split of every relevant pair's looked-up positions: its marginals sum to the gap it splits
    qk = rows("qk.jsonl")
    assert {(r["unit_id"], r["head"]) for r in qk} == relevant
    for r in qk:
        if r["logit"] is not None:
            assert abs(sum(e["gap"] for e in r["key"]) - r["gap"]) <= 1e-4 * max(1.0, abs(r["gap"]))
            assert abs(r["logit"] - r["score"]) <= 1e-3 * max(1.0, abs(r["score"]))  # no softcap on SmolLM2
    # every unit: its occlusion records and its unit look-up explanation (head None), scored where ok
    fired = {c["unit_id"] for c in rows("contexts.jsonl") if c["split"] == "train" and c["kind"] == "top"}
    assert {r["unit_id"] for r in rows("occlusions.jsonl")} == fired
    assert {k[0] for k in lookup if k[1] is None} == {u["unit_id"] for u in units}
    unit_scored = {s["unit_id"] for s in rows("scores.jsonl") if s["explainer"] == "lookup" and s["scorer"] == "unit_E"}
    assert unit_scored == {k[0] for k, e in lookup.items() if k[1] is None and e["status"] == "ok"}
    assert "unit_E" in summary["explainers"]["lookup"]
    lookup = {k: e for k, e in lookup.items() if k[1] is not None}
    scored = {(s["unit_id"], s["head"]) for s in rows("scores.jsonl") if s["explainer"] == "lookup" and s["scorer"] == "E"}
    assert scored == {k for k, e in lookup.items() if e["status"] == "ok"}
    assert "lookup" in summary["explainers"]
    # per-token simulation (docs/simulation.md): every explained unit's LLM explanation on the exact tier (the
    # embedded model serves prompt logprobs) and its look-up pattern on the deterministic one, each with its tier
    sims = [s for s in rows("scores.jsonl")
            if s["metric"] == "ev_correlation" and s["control_kind"] in (None, "random_unit")]
    explained = {e["unit_id"] for e in rows("explanations.jsonl") if e["head"] is None and e["explainer"] != "lookup"
                 and e["status"] == "ok"}
    assert explained and {s["unit_id"] for s in sims if s["tier"] == "prompt-logprobs"} == explained
    assert {s["unit_id"] for s in sims if s["explainer"] == "lookup"} == unit_scored
    assert all(s["tier"] == "deterministic" and s["n"] >= 1 for s in sims if s["explainer"] == "lookup")
    assert summary["simulation"]["tier"] == "prompt-logprobs" and "simulation: prompt-logprobs tier" in proc.stdout
    # the offline W&B run, read back from disk
    assert proc.stderr.count("no login found") == 1  # announced once
    tracking = json.loads((out / "tracking.json").read_text())
    assert tracking["mode"] == "offline" and tracking["job_type"] == "run"
    runs = sorted((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and str(runs[0].resolve()).startswith(str(out.resolve()))
    run = Offline(str(runs[0]))
    assert run.summary["units/n_units"] == sum(not u["control"] for u in units)
    assert "cost/seconds_score" in run.summary
    again = subprocess.run([shutil.which("sae-lens-ctx"), "run", "--out", str(out)], capture_output=True, text=True,
                           env=env, timeout=HANG_GUARD_S)
    assert again.returncode == 0 and "skipped" in again.stdout
