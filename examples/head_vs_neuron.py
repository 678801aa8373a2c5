"""Head versus neuron: does a unit's own explanation predict it better than its heads' explanations?

What it shows
    For one run directory, the head-versus-neuron comparison of the paper's extension: per unit and per
    scorer (balanced accuracy E, AUROC), the score of the unit's own explanation (neuron-explainer, judged
    on the unit's held-out top vs low prompts) beside the mean and best score of its relevant heads'
    explanations (the paper's prompt structure in our words, judged on whether attribution marks the head
    active). It prints the table (`RunResult.head_vs_neuron()`, a pandas DataFrame, the same rows as the
    report's table and W&B's `scores/head_vs_neuron`), checks it against `scores.jsonl`, and draws it as a PNG.

Run it
    python examples/head_vs_neuron.py RUN_DIR      # any finished run, e.g. runs/demo or the quickstart's
    python examples/head_vs_neuron.py              # no RUN_DIR: first runs the planted GPT-2 of
                                                   # tests/support/planted.py with the embedded explainer (~1 min)
"""

import json
import math
import sys
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import sae_lens_ctx as slc  # noqa: E402


def planted_run(work: Path) -> Path:
    """A small finished run on the planted GPT-2 (hand-set weights; tests/support/planted.py), offline."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "support"))
    from planted import make_planted_gpt2, planted_corpus

    plant = make_planted_gpt2(work / "planted-gpt2")
    config = slc.RunConfig(
        corpus=slc.CorpusConfig(context_size=16, max_tokens=4000, min_documents=10),
        discover=slc.DiscoverConfig(n_last_layers=1, top_k=1),
        mine=slc.MineConfig(top_k=8, n_test_prompts=4, n_random=2),
        attribute=slc.AttributeConfig(n_prompts=8),
        explain=slc.ExplainConfig(n_active=2, n_inactive=2, unit_n_top=2, max_tokens=32),
        score=slc.ScoreConfig(n_prompts=4, bootstrap_resamples=200),
    )
    return slc.run(str(plant.directory), planted_corpus(plant, n_docs=120), config, out=work / "run").out


run_dir = Path(sys.argv[1]) if len(sys.argv) > 1 else planted_run(Path(tempfile.mkdtemp(prefix="sae-lens-ctx-hvn-")))
result = slc.open_run(run_dir)
table = result.head_vs_neuron()
if table.empty:
    sys.exit(f"{run_dir} has no scores yet: run the explain and score stages first")

print(f"== head versus neuron: {run_dir} ==")
cols = ["unit_id", "token", "control", "scorer", "unit_score", "head_score_mean", "head_score_max", "best_head", "n_heads"]
print(table[cols].to_string(index=False, float_format=lambda v: f"{v:.3f}"))
summary = result.summary.get("head_vs_neuron")
if summary:
    print("\nsummary.json head_vs_neuron:", json.dumps(summary)[:400])

# The plot: per scorer, each unit's own score (x) against its heads' mean score (y); above the diagonal,
# the heads' explanations predict better than the unit's own.
both = table[table.unit_score.notna() & table.head_score_mean.notna()]
scorers = sorted(set(both.scorer)) or sorted(set(table.scorer))[:2]
fig, axes = plt.subplots(1, len(scorers), figsize=(4 * len(scorers), 4), squeeze=False)
n_points = 0
for ax, scorer in zip(axes[0], scorers):
    rows = table[(table.scorer == scorer) & table.unit_score.notna() & table.head_score_mean.notna()]
    for control, marker in ((False, "o"), (True, "x")):
        part = rows[rows.control == control]
        ax.scatter(part.unit_score, part.head_score_mean, marker=marker, label="control units" if control else "units")
        n_points += len(part)
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
    ax.set(xlim=(-0.05, 1.05), ylim=(-0.05, 1.05), xlabel="unit's own explanation", ylabel="its heads' (mean)",
           title=scorer)
    ax.legend(fontsize=7)
fig.suptitle("head versus neuron explanations", fontsize=10)
fig.tight_layout()
png = Path(tempfile.mkdtemp(prefix="sae-lens-ctx-hvn-plot-")) / "head_vs_neuron.png"
fig.savefig(png, dpi=80)
print(f"\nplot: {png} ({n_points} points); the report's own: {run_dir / 'plots' / 'head_vs_neuron.png'}")

# The example checks its own output: every row agrees with scores.jsonl, recomputed here by hand.
scores = result.scores.to_pandas()
# the LLM explanations' own scores: not the look-up explainer's, not the length/token confound controls
scores = scores[(scores.explainer != "lookup") & ~scores.control_kind.isin(["length", "token"])]
for row in table.itertuples():
    unit_scorer = {"E": "unit_E", "auroc": "unit_auroc"}.get(row.scorer, row.scorer)
    own = scores[(scores.unit_id == row.unit_id) & scores["head"].isna() & (scores.scorer == unit_scorer)].value.dropna()
    heads = scores[(scores.unit_id == row.unit_id) & scores["head"].notna() & (scores.scorer == row.scorer)].value.dropna()
    assert row.n_heads == len(heads), (row, len(heads))
    if len(heads):
        assert math.isclose(row.head_score_mean, heads.mean()) and math.isclose(row.head_score_max, heads.max())
    if len(own):
        assert math.isclose(row.unit_score, own.iloc[0])
assert png.is_file() and png.stat().st_size > 1000
print("head_vs_neuron: OK")
