"""The unit look-up explanations (no LLM, `core/unit_lookups.py`): each unit's occlusion records against
windows of its train 'random' prompts where it is inactive."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from ...core.errors import UserError
from ...core.records import ContextRecord, ExplanationRecord, UnitRecord, read_jsonl
from ...core.unit_lookups import INACTIVE_FRACTION, OcclusionRecord, explain_units, inactive_windows
from ...inputs.context import RunContext


def train_negatives(contexts: Sequence[ContextRecord], occlusions: Sequence[OcclusionRecord],
                    acts_path: Path) -> dict[str, list[list[int]]]:
    """unit → its negatives (`unit_lookups.inactive_windows`): per positive (an occlusion record of a prompt
    where the unit is active, rank order), a window of its length of one of its train 'random' prompts,
    ending at a token where the activation recorded by mining (`context_acts.safetensors`) is at most
    `INACTIVE_FRACTION` of its largest train 'top' activation."""
    from safetensors import safe_open

    peak: dict[str, float] = defaultdict(float)
    rows: dict[str, list[int]] = defaultdict(list)
    for line, c in enumerate(contexts):
        if c.split != "train":
            continue
        if c.kind == "top":
            peak[c.unit_id] = max(peak[c.unit_id], c.activation)
        elif c.kind == "random":
            rows[c.unit_id].append(line)
    lengths: dict[str, list[int]] = defaultdict(list)
    for r in sorted(occlusions, key=lambda r: (r.unit_id, r.rank)):
        if r.status != "inactive":
            lengths[r.unit_id].append(r.n_tokens)
    if not any(rows[u] for u in lengths):
        return {}
    if not acts_path.is_file():
        raise UserError(f"{acts_path} is missing: the unit look-up explainer needs the mine stage's token "
                        "activations (run `sae-lens-ctx mine`)")
    out = {}
    with safe_open(str(acts_path), framework="numpy") as f:
        for unit_id, wanted in lengths.items():
            candidates = [(contexts[i].tokens, f.get_tensor(f"row{i}").reshape(-1).tolist()) for i in rows[unit_id]]
            out[unit_id] = inactive_windows(wanted, candidates, INACTIVE_FRACTION * max(peak[unit_id], 0.0))
    return out


def unit_lookup_explanations(ctx: RunContext, units: Sequence[UnitRecord],
                             contexts: Sequence[ContextRecord]) -> list[ExplanationRecord]:
    """An `ExplanationRecord` (explainer 'lookup', `head` None) per unit; none from a run directory without
    occlusions (`attribute.occlusion=false`, or written before they existed). `contexts`: all of
    `contexts.jsonl`, in file order."""
    path = ctx.path("occlusions.jsonl")
    occlusions = read_jsonl(path, OcclusionRecord) if path.is_file() else []
    if not occlusions:
        return []
    negatives = train_negatives(contexts, occlusions, ctx.path("context_acts.safetensors"))
    return explain_units(units, occlusions, negatives, ctx.config.explain)
