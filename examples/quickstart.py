"""Quickstart: the whole pipeline from Python on the embedded default, offline.

What it shows
    `sae_lens_ctx.run` on the embedded SmolLM2-135M-Instruct and the embedded corpus (both ship with the
    package; no network, no key), with sizes small enough for a laptop CPU (about two minutes on 2
    cores; random control units are left out here to keep it short). It then prints the top next-token units, the upstream heads attribution marks as relevant
    for each, and the LLM explanations, all read back as typed records / pandas DataFrames.

    The same run from the shell is
        sae-lens-ctx run --out runs/quickstart corpus.max_tokens=1500 discover.top_k=1 ...
    (the API and the CLI are one code path: given `out=`, they write the same run directory).

Run it
    python examples/quickstart.py [OUT_DIR]      # default: a temporary directory

The embedded explainer (SmolLM2-135M) makes the pipeline run anywhere but writes poor explanations:
use `explain.backend=openai` or an OpenAI-compatible server for findings.
"""

import sys

import sae_lens_ctx as slc

config = slc.RunConfig(
    corpus=slc.CorpusConfig(context_size=32, max_tokens=2000, test_fraction=0.35),
    discover=slc.DiscoverConfig(n_last_layers=1, top_k=1, controls=False),  # controls: see the README
    mine=slc.MineConfig(top_k=6, n_test_prompts=3, n_random=2),
    attribute=slc.AttributeConfig(n_prompts=6, rule="top3"),
    explain=slc.ExplainConfig(n_active=2, n_inactive=2, unit_n_top=2, max_tokens=32),
    score=slc.ScoreConfig(n_prompts=3, bootstrap_resamples=200),
)

out = sys.argv[1] if len(sys.argv) > 1 else None
result = slc.run(config=config, out=out)  # model=None, corpus=None: the embedded default

units = result.units.to_pandas()
real = units[~units.control].sort_values("congruence", ascending=False)
print("\n== top next-token units ==")
print(real[["unit_id", "token", "congruence", "kurtosis"]].to_string(index=False))

heads = result.heads.to_pandas()
relevant = heads[heads.relevant].sort_values(["unit_id", "mean_attribution"], ascending=[True, False])
print("\n== relevant upstream heads (active on 25-75 % of a unit's prompts) ==")
print(relevant[["unit_id", "head", "active_fraction", "mean_attribution", "ablation_effect"]].to_string(index=False))

print("\n== explanations ==")
for e in result.explanations:
    print(f"{e.unit_id:<12} {e.head or '(unit)':<8} {e.status:<7} {(e.text or e.error or '').strip()[:100]!r}")

print("\n== scores ==")
print(result.scores.to_pandas()[["unit_id", "head", "scorer", "value", "n"]].head(12).to_string(index=False))
print("\n== stages ==")
for s in result.stages:
    print(f"  {s.name:<10} {s.status:<8} {s.seconds:6.1f}s")
print(f"\nrun directory: {result.out}")

# The example checks its own output: every stage ran, and the records hang together.
assert [s.name for s in result.stages] == ["load", "discover", "mine", "attribute", "explain", "score", "report"]
assert all(s.status in ("ran", "skipped") for s in result.stages), result.stages
assert len(real) >= 1 and all(t.startswith(" ") for t in real.token)
assert set(heads.unit_id) == set(units.unit_id)  # every unit was attributed
assert len(result.explanations) >= len(units)  # at least one explanation (or recorded failure) per unit
assert {e.unit_id for e in result.explanations} <= set(units.unit_id)
assert any(e.status == "ok" and e.text for e in result.explanations)
assert len(result.scores) > 0 and (result.out / "report" / "index.html").is_file()
print("quickstart: OK")
