"""Plots of a run, drawn with matplotlib (Agg, no display) and saved as PNG files.

PNG because the HTML report embeds them with no JavaScript and no server, W&B shows them as images,
and they need no browser to draw (plotly's static export does). Each plot is drawn only when the
records it needs exist; the files are byte-identical when the records are (no timestamps).

| file | from | shows |
|---|---|---|
| `unit_layers.png` | units | units per layer, selected and control |
| `heatmaps/<unit>.png` | heads | per unit: mean direct attribution, layer × head; relevant heads boxed |
| `score_histograms.png` | scores | per scorer, two per row: head explanation scores, controls overlaid, well-explained bins marked on E |
| `ablation_boxplot.png` | heads | token-probability drop when a relevant head is ablated, active vs inactive (§5.4) |
| `head_vs_neuron.png` | scores | per scorer: a unit's own explanation score against its heads' mean |
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

from ...core.records import CONFOUND_CONTROLS, atomic_path  # noqa: E402
from ...core.rules import PAPER_WELL_EXPLAINED, ROUND_OFF  # noqa: E402
from .tables import RunTables, number, safe_name, scorer_label  # noqa: E402

REAL, CONTROL, MARK = "#1f77b4", "#999999", "#d62728"


def save(fig: Figure, path: Path) -> Path:
    """Write a figure as a PNG (atomically, without the metadata that would make identical plots differ)."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)
    return path


def layer_histogram(res: RunTables) -> Figure | None:
    units = res.units
    if not units:
        return None
    layers = sorted({u["layer"] for u in units})
    x = np.arange(len(layers))
    real = [sum(1 for u in units if u["layer"] == lay and not u.get("control")) for lay in layers]
    ctrl = [sum(1 for u in units if u["layer"] == lay and u.get("control")) for lay in layers]
    fig, ax = plt.subplots(figsize=(max(4, 0.5 * len(layers) + 2), 3))
    ax.bar(x - 0.2, real, 0.4, color=REAL, label="selected")
    if any(ctrl):
        ax.bar(x + 0.2, ctrl, 0.4, color=CONTROL, label="control")
    ax.set_xticks(x, [str(lay) for lay in layers])
    ax.set_xlabel("layer")
    ax.set_ylabel("units")
    ax.set_title("Next-token units per layer")
    ax.legend(frameon=False)
    return fig


def head_heatmap(res: RunTables, unit_id: str, heads: list[dict]) -> Figure | None:
    """Mean direct attribution over the unit's train prompts, layer × head; relevant heads boxed."""
    if not heads:
        return None
    layers = sorted({h["layer"] for h in heads})
    n_heads = max(h["head_index"] for h in heads) + 1
    grid = np.full((len(layers), n_heads), np.nan)
    for h in heads:
        grid[layers.index(h["layer"]), h["head_index"]] = number(h.get("mean_attribution")) or 0.0
    bound = float(np.nanmax(np.abs(grid))) or 1.0
    fig, ax = plt.subplots(figsize=(min(14, 1.5 + 0.35 * n_heads), 1.2 + 0.3 * len(layers)))
    image = ax.imshow(grid, cmap="RdBu_r", vmin=-bound, vmax=bound, aspect="auto", interpolation="nearest")
    for h in heads:
        if h.get("relevant"):
            ax.add_patch(Rectangle((h["head_index"] - 0.5, layers.index(h["layer"]) - 0.5), 1, 1,
                                   fill=False, edgecolor="black", linewidth=2))
    ax.set_yticks(range(len(layers)), [f"L{lay}" for lay in layers])
    step = max(1, n_heads // 16)
    ax.set_xticks(range(0, n_heads, step), [f"H{i}" for i in range(0, n_heads, step)])
    unit = res.unit(unit_id) or {}
    ax.set_title(f"{unit_id} → {unit.get('token', '')!r}: mean head attribution (boxed: relevant)", fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.03, pad=0.02)
    return fig


PANEL = (4.2, 2.8)
"""Inches (width, height) of one score histogram: at the PNGs' 100 dpi, two panels side by side are
840 px wide, about the report's width, whatever the number of scorers (more go on more rows)."""


def is_e_scorer(scorer: str) -> bool:
    """An E scorer (balanced accuracy: `E`, `shuffled_E`, `unit_plus_head_E`, `lookup_E`, ...), the only
    kind the paper's "well explained" threshold applies to (not AUROC, not a correlation)."""
    return scorer == "E" or scorer.endswith("_E")


def score_histograms(res: RunTables, well_explained: float) -> Figure | None:
    """Per scorer, head explanation scores of selected units with the control units' overlaid (the
    confound controls' scores are not explanations: left out). Two panels per row at a fixed size;
    the well-explained line and red bins only on E scorers."""
    by: dict[str, dict[bool, list[float]]] = {}
    for s in res.rows("scores"):
        value = number(s.get("value"))
        if value is None or s.get("head") is None or s.get("control_kind") in CONFOUND_CONTROLS:
            continue
        by.setdefault(scorer_label(s), {False: [], True: []})[res.is_control(s)].append(value)
    if not by:
        return None
    n_cols = min(2, len(by))
    n_rows = -(-len(by) // n_cols)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(PANEL[0] * n_cols, PANEL[1] * n_rows), squeeze=False,
                             layout="constrained")
    for ax in axes.flat[len(by):]:
        ax.set_visible(False)
    for ax, (scorer, values) in zip(axes.flat, sorted(by.items())):
        everything = values[False] + values[True]
        lo, hi = min(everything + [0.0]), max(everything + [1.0])
        bins = np.linspace(lo, hi, 16)
        marked = is_e_scorer(scorer)
        edge = well_explained - ROUND_OFF  # a bin edge at the threshold, so red bins are exactly the well explained
        if marked and lo < edge < hi:
            bins = np.unique(np.append(bins[np.abs(bins - edge) > (hi - lo) / 60], edge))
        counts, edges, patches = ax.hist(values[False], bins=bins, color=REAL, alpha=0.8, label="selected")
        if values[True]:
            ax.hist(values[True], bins=bins, histtype="step", color="black", linewidth=1.5, label="control")
        if marked:
            for patch, left in zip(patches, edges[:-1]):
                if left >= edge:
                    patch.set_facecolor(MARK)
            ax.axvline(well_explained, color=MARK, linestyle="--", linewidth=1)
            ax.set_title(f"{scorer} (red: ≥ {well_explained:g}, well explained)", fontsize=9)
        else:
            ax.set_title(scorer, fontsize=9)
        ax.set_xlabel("score", fontsize=8)
        ax.set_ylabel("(unit, head) pairs", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.legend(frameon=False, fontsize=7)
    return fig


def ablation_boxplot(res: RunTables) -> Figure | None:
    """Paper §5.4: per relevant pair, mean drop in the unit's token probability when the head is
    ablated, on prompts where it is active vs inactive (selected units; controls beside when present)."""
    groups: list[tuple[str, list[float]]] = []
    for label, control in (("", False), (" (control)", True)):
        pairs = [h for h in res.rows("heads") if h.get("relevant") and res.is_control(h) == control
                 and number(h.get("prob_drop_active")) is not None
                 and number(h.get("prob_drop_inactive")) is not None]
        if pairs:
            groups.append((f"active{label}", [h["prob_drop_active"] for h in pairs]))
            groups.append((f"inactive{label}", [h["prob_drop_inactive"] for h in pairs]))
    if not groups:
        return None
    fig, ax = plt.subplots(figsize=(1.6 * len(groups) + 2, 3.5))
    ax.boxplot([g[1] for g in groups], showfliers=True)
    ax.set_xticks(range(1, len(groups) + 1), [f"{g[0]}\n(n={len(g[1])})" for g in groups], fontsize=8)
    ax.axhline(0.0, color="black", linewidth=0.5)
    ax.set_ylabel("decrease in token probability")
    ax.set_title("Decrease in token probability after ablating attention head", fontsize=9)
    return fig


def head_vs_neuron(res: RunTables) -> Figure | None:
    rows = [r for r in res.comparison() if r["unit_score"] is not None and r["head_score_mean"] is not None]
    if not rows:
        return None
    scorers = sorted({r["scorer"] for r in rows})
    fig, axes = plt.subplots(1, len(scorers), figsize=(4 * len(scorers), 3.6), squeeze=False)
    for ax, scorer in zip(axes[0], scorers):
        for control, color, marker in ((False, REAL, "o"), (True, CONTROL, "x")):
            pts = [r for r in rows if r["scorer"] == scorer and r["control"] == control]
            if pts:
                ax.scatter([r["unit_score"] for r in pts], [r["head_score_mean"] for r in pts], c=color,
                           marker=marker, label="control" if control else "selected")
        ax.axline((0, 0), slope=1, color="black", linewidth=0.5)
        ax.set_xlabel("unit's own explanation")
        ax.set_ylabel("its heads' explanations (mean)")
        ax.set_title(f"{scorer}: head vs neuron", fontsize=9)
        ax.legend(frameon=False, fontsize=8)
    return fig


def heatmap_file(unit_id: str) -> str:
    return f"heatmaps/{safe_name(unit_id)}.png"


def write_plots(res: RunTables, folder: Path, well_explained: float = PAPER_WELL_EXPLAINED) -> dict[str, str]:
    """Draw every plot whose records exist into `folder`; returns name → path relative to `folder`."""
    folder = Path(folder)
    written: dict[str, str] = {}
    for name, fig in (("unit_layers", layer_histogram(res)),
                      ("score_histograms", score_histograms(res, well_explained)),
                      ("ablation_boxplot", ablation_boxplot(res)),
                      ("head_vs_neuron", head_vs_neuron(res))):
        if fig is not None:
            save(fig, folder / f"{name}.png")
            written[name] = f"{name}.png"
    for unit_id, heads in res.grouped("heads").items():
        fig = head_heatmap(res, unit_id, heads)
        if fig is not None:
            save(fig, folder / heatmap_file(unit_id))
            written[f"heatmap:{unit_id}"] = heatmap_file(unit_id)
    return written
