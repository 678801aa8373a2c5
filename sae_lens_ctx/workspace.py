"""The team dashboard: a W&B workspace that compares runs, built from `wandb_configs/dashboard.yaml`.

The layout lives in that YAML spec (sections of panels over the `group/name` summary metrics that
`track.py` logs), so it is reviewed like code and kept offline. With a W&B login it is created through
the `wandb-workspaces` library (`pip install wandb-workspaces`):

    python -m sae_lens_ctx.workspace --entity TEAM --project sae-lens-ctx [--spec wandb_configs/dashboard.yaml]

Without one (or with WANDB_MODE=offline) nothing is sent: the spec stays the saved layout, and the
command says how to publish it later.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any

import yaml

from .core.errors import UserError

PANEL_TYPES = ("bar", "scalar", "scatter", "media")
DEFAULT_SPEC = Path(__file__).resolve().parents[1] / "wandb_configs" / "dashboard.yaml"

METRIC_PATTERNS = (
    r"(units|contexts|heads|explanations|scores|lookups)/(table|table_artifact)",
    r"lookups/rows",
    r"qk/(table|table_artifact|table_rows)",
    r"findings/(best|best_E|best_ci_low|best_ci_high|n_pairs|n_units|n_warnings|table|table_artifact|table_rows)",
    r"verdicts/(table|table_artifact|table_rows|[A-Za-z0-9_.+-]+)",
    r"units/(n_units|n_controls|n_layers|congruence_mean|rows)",
    r"contexts/(n_contexts|n_units|top_activation_mean|trimmed_activation_mean|rows)",
    r"heads/(n_pairs|per_unit_mean|ablation_effect_mean|ablation_significant_fraction)(_control)?",
    r"heads/(ablation_ks_(statistic|pvalue|mean_drop_active|mean_drop_inactive)|rows)",
    r"explanations/(n|n_failed|n_heads|n_units|rows)",
    r"cost/(usd|n_unpriced|prompt_tokens|completion_tokens|seconds_total|seconds_[a-z]+)",
    r"(heads/(E|auroc|lookup_E|lookup_auroc)|units/(E|auroc|sim_correlation))"
    r"(_control|_n|_vs_(random_units|shuffled|length|token)|_verdict|_well_explained)?",
    r"scores/(rows|head_vs_neuron|head_vs_neuron_rows|summary|summary_rows)",
    r"plots/(unit_layers|score_histograms|ablation_boxplot|head_vs_neuron|head_heatmaps)",
    r"config\..+",
)
"""Keys `track.py` logs (summary metrics, plots) or W&B run config keys: a spec may name only these."""


def load_spec(path: str | Path = DEFAULT_SPEC) -> dict:
    """Read and check a dashboard spec: known panel types, and metric keys that our runs log."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"dashboard spec {path} does not exist")
    spec = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(spec.get("sections"), list) or not spec["sections"]:
        raise UserError(f"dashboard spec {path} has no sections")
    for section in spec["sections"]:
        for panel in section.get("panels", []):
            if panel.get("type") not in PANEL_TYPES:
                raise UserError(f"dashboard spec {path}: panel '{panel.get('title')}' has type {panel.get('type')!r}; "
                                f"use one of {', '.join(PANEL_TYPES)}")
            for key in panel_keys(panel):
                if not any(re.fullmatch(p, key) for p in METRIC_PATTERNS):
                    raise UserError(f"dashboard spec {path}: panel '{panel.get('title')}' names {key!r}, "
                                    "which sae-lens-ctx runs do not log")
    return spec


def panel_keys(panel: dict) -> list[str]:
    keys = list(panel.get("metrics", [])) + list(panel.get("media_keys", []))
    keys += [panel[k] for k in ("metric", "x", "y", "groupby") if panel.get(k)]
    return keys


def _metric(key: str) -> Any:
    import wandb_workspaces.reports.v2 as wr

    return wr.Config(key.removeprefix("config.")) if key.startswith("config.") else wr.SummaryMetric(key)


def _panel(panel: dict) -> Any:
    import wandb_workspaces.reports.v2 as wr

    title, kind = panel.get("title"), panel["type"]
    if kind == "bar":
        return wr.BarPlot(title=title, metrics=[_metric(m) for m in panel["metrics"]],
                          groupby=_metric(panel["groupby"]) if panel.get("groupby") else None,
                          groupby_aggfunc=panel.get("aggregate"))
    if kind == "scalar":
        return wr.ScalarChart(title=title, metric=_metric(panel["metric"]))
    if kind == "scatter":
        return wr.ScatterPlot(title=title, x=_metric(panel["x"]), y=_metric(panel["y"]))
    return wr.MediaBrowser(title=title, media_keys=list(panel["media_keys"]))


def build_workspace(spec: dict, entity: str, project: str) -> Any:
    """The `wandb_workspaces` Workspace the spec describes (built locally; `.save()` publishes it)."""
    import wandb_workspaces.workspaces as ws

    sections = [ws.Section(name=s["name"], panels=[_panel(p) for p in s.get("panels", [])], is_open=True)
                for s in spec["sections"]]
    return ws.Workspace(entity=entity, project=project, name=spec.get("name", "sae-lens-ctx"), sections=sections)


def publish(spec_path: str | Path, entity: str, project: str) -> str:
    """Create the workspace on W&B when online with a login; otherwise say where the saved spec is."""
    from .pipeline.wandb_log import base_url, has_login, resolve_mode, unreachable

    spec = load_spec(spec_path)
    mode = resolve_mode("auto")
    if mode != "online" or not has_login():
        return (f"W&B is {mode} here: the dashboard stays saved as the spec {spec_path}; publish it later with "
                f"`python -m sae_lens_ctx.workspace --entity {entity} --project {project}` where you are logged in")
    problem = unreachable(base_url())
    if problem:
        return f"W&B is not reachable ({problem}): the dashboard stays saved as the spec {spec_path}"
    try:
        workspace = build_workspace(spec, entity, project)
    except ImportError as e:
        raise UserError("creating the W&B dashboard needs the wandb-workspaces library: "
                        "pip install wandb-workspaces") from e
    workspace.save()
    return f"dashboard created: {workspace.url}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sae_lens_ctx.workspace", description=__doc__.split("\n\n")[0])
    parser.add_argument("--entity", required=True, help="W&B entity (user or team)")
    parser.add_argument("--project", default="sae-lens-ctx", help="W&B project")
    parser.add_argument("--spec", default=str(DEFAULT_SPEC), help="dashboard spec (YAML)")
    args = parser.parse_args(argv)
    try:
        print(publish(args.spec, args.entity, args.project))
    except UserError as e:
        print(f"sae-lens-ctx: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
