"""Team tracking: two runs with different active-head rules, logged to W&B, compared from their artifacts.

What it shows
    A team that wants to know how much the paper's active-head rule matters runs the same analysis
    twice, once with round 2's rule (`mean+2std-positive`: a head is active on a prompt when its attribution
    is above the mean plus two standard deviations of all upstream heads, and positive) and once with round
    1's (`top3-positive`: among the prompt's 3 largest, and positive; the authors' `top3` and `mean+2std`
    keep negative heads too, docs/authors-code.md),
    each logged as one W&B run with the whole run directory as a versioned `sae-lens-ctx-results`
    artifact. A teammate then compares the two from the artifacts alone (here: offline W&B runs read back
    from disk with `wandb leet inspect --json`; online, `wandb.Api().artifact(...)` gives the same files).

    The model is the planted GPT-2 of tests/support/planted.py (hand-set weights: neuron L2N37 predicts " paris",
    driven by head L0H3 after " france" and by head L1H5 after " louvre"), so the right answer is known:
    both rules must find exactly the two planted heads (one head drives the neuron on each prompt, and
    the `-positive` rules count only heads with a positive attribution: the authors' `top3` would also
    mark a silent head, of attribution exactly 0, where fewer than 3 heads are positive), so the
    comparison is a check that changing the rule changes nothing else. On a real model the two rules disagree: run this on your own model and
    corpus (the quickstart's settings) to see by how much.

Run it
    python examples/team_tracking.py [WORK_DIR]     # about a minute on 2 CPU cores; W&B offline
Online: drop `wandb_mode="offline"` (or set WANDB_MODE=online) and log in with `wandb login`.
"""

import copy
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "support"))  # the planted models
from planted import make_planted_gpt2, planted_corpus  # noqa: E402

import sae_lens_ctx as slc  # noqa: E402

RULES = ("mean+2std-positive", "top3-positive")
work = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="sae-lens-ctx-team-"))
plant = make_planted_gpt2(work / "planted-gpt2")
documents = planted_corpus(plant, n_docs=120)

base = slc.RunConfig(
    corpus=slc.CorpusConfig(context_size=16, max_tokens=4000, min_documents=10),
    discover=slc.DiscoverConfig(n_last_layers=1, top_k=1),
    mine=slc.MineConfig(top_k=12, n_test_prompts=4, n_random=2),
    attribute=slc.AttributeConfig(n_prompts=12),
    logging=slc.LoggingConfig(log_to_wandb=True, wandb_mode="offline", wandb_project="sae-lens-ctx-team",
                              wandb_tags="team-example"),
)

tracking = {}
for rule in RULES:
    config = copy.deepcopy(base)
    config.attribute.rule = rule
    config.logging.run_name = f"rule-{rule}"
    # load → discover → mine → attribute, then one W&B run (job_type "attribute") with tables and the artifact
    heads = slc.attribute_heads(str(plant.directory), corpus=documents, config=config, out=work / f"run-{rule}",
                                overwrite=True)
    tracking[rule] = json.loads((heads.out / "tracking.json").read_text())
    print(f"{rule}: W&B run {tracking[rule]['run_id']} ({tracking[rule]['mode']}), artifact "
          f"{tracking[rule]['results_artifact']}")


def artifact_files(info: dict) -> tuple[dict, dict[str, Path]]:
    """The results artifact of one offline W&B run: its record (metadata) and its files on disk."""
    wandb_cli = shutil.which("wandb") or "wandb"
    proc = subprocess.run([wandb_cli, "leet", "inspect", "--json", info["wandb_dir"]], capture_output=True,
                          text=True, timeout=300, env=dict(os.environ, WANDB_MODE="offline"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    records = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    art = next(r["artifact"] for r in records if r["type"] == "artifact" and r["artifact"]["type"] == "sae-lens-ctx-results")
    return art, {c["path"]: Path(c["local_path"]) for c in art["manifest"]["contents"]}


relevant, active, metrics = {}, {}, {}
for rule in RULES:
    art, files = artifact_files(tracking[rule])
    meta = art.get("metadata")
    meta = json.loads(meta) if isinstance(meta, str) else (meta or {})
    logged_rule = meta["config"]["attribute"]["rule"] if meta else None
    assert logged_rule in (rule, None), (logged_rule, rule)
    rows = [json.loads(line) for line in files["heads.jsonl"].read_text().splitlines() if line.strip()]
    units = {u["unit_id"]: u for u in map(json.loads, files["units.jsonl"].read_text().splitlines()) if u}
    real = [h for h in rows if not units[h["unit_id"]]["control"]]
    relevant[rule] = {(h["unit_id"], h["head"]) for h in real if h["relevant"]}
    active[rule] = {(h["unit_id"], h["head"]) for h in real if h["active_fraction"] > 0}
    metrics[rule] = meta.get("metrics", {})

print("\n== relevant (unit, head) pairs of the selected units, by rule (from the artifacts) ==")
for pair in sorted(relevant[RULES[0]] | relevant[RULES[1]]):
    print(f"  {pair[0]:<8} {pair[1]:<6} " + "  ".join(f"{rule}: {'yes' if pair in relevant[rule] else 'no ':<3}"
                                                      for rule in RULES))
print("  (unit, head) pairs active on at least one prompt: " + "  ".join(f"{rule}: {len(active[rule])}" for rule in RULES))
for key in ("heads/n_pairs", "heads/per_unit_mean", "heads/ablation_effect_mean"):
    print(f"  {key:<28} " + "  ".join(f"{rule}: {metrics[rule].get(key)}" for rule in RULES))

# The example checks its own output: the planted heads under the paper's round-2 rule, and that the
# comparison really came from two different artifacts.
planted = {("L2N37", "L0H3"), ("L2N37", "L1H5")}
round2, round1 = RULES
assert relevant[round2] == relevant[round1] == planted, relevant
assert active[round2] == active[round1] == planted, active  # silent heads (zero attribution) never active
assert metrics[round2]["heads/n_pairs"] == metrics[round1]["heads/n_pairs"] == len(planted)
assert tracking[RULES[0]]["run_id"] != tracking[RULES[1]]["run_id"]
assert tracking[RULES[0]]["results_artifact"] != tracking[RULES[1]]["results_artifact"]
print(f"team_tracking: OK (work directory {work})")
