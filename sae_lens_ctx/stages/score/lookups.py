"""The unit look-up explanations judged without an LLM (`core.unit_lookups.judge`): on the same held-out
prompts as the LLM's unit explanation (top = positive, its matched low = negative, random for the
correlation), and with another unit's pattern on the same prompts (the shuffled control)."""

from __future__ import annotations

from ...core.config import ScoreConfig
from ...core.lookups import EXPLAINER as LOOKUP
from ...core.unit_lookups import judge as unit_judge
from .jobs import Inputs, shuffled_partner, unit_prompts
from .judge import Judgement

SHUFFLED_TASK = "unit_shuffled"
"""The task of a unit judged with another unit's look-up pattern (scorers `shuffled_unit_E`, ...)."""


def unit_lookup_judgements(inp: Inputs, cfg: ScoreConfig, seed: int) -> list[Judgement]:
    """Every unit with an 'ok' look-up pattern, judged on its held-out prompts by its own pattern (task
    'unit') and by a shuffled partner's (`SHUFFLED_TASK`, `score.shuffled_control`)."""
    if not cfg.unit_scores:
        return []
    patterns = {}
    for (unit_id, head), e in inp.lookup_explanations.items():
        if head is None and e.status == "ok" and unit_id in inp.units:
            rows = unit_prompts(inp, unit_id, cfg, kinds=("top", "low", "random"))
            if rows:
                patterns[(unit_id, None)] = (e.pattern, rows)
            else:
                inp.not_scored["unit look-up without held-out prompts"] += 1
    partner = shuffled_partner(list(patterns), seed) if cfg.shuffled_control else {}
    out = []
    for key, (_, rows) in patterns.items():
        shown = [(key, "unit")] + ([(partner[key], SHUFFLED_TASK)] if key in partner else [])
        for c in rows:
            label = {"top": True, "low": False}.get(c.kind)
            for whose, task in shown:
                answer, graded = unit_judge(patterns[whose][0], c.tokens)
                out.append(Judgement(task, key[0], None, whose[0], c.kind, c.rank, label, c.activation,
                                     answer=answer, p_yes=graded, explainer=LOOKUP))
    return out
