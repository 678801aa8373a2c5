"""Active-head rules (which heads count as active on a prompt, from that prompt's attributions) and the
paper's "well explained" threshold.

The authors' code (fbarez/Interpreting-Context-Look-ups, commit f97f993, `src/neuron_heads.py` and the
`4_head_attribution` notebook) marks a head active on a prompt when its direct attribution to the unit's
pre-activation is

* among the prompt's top 3, whatever its sign (`torch.topk(A, k=3)`; round 1): the rule `top3`;
* above the mean plus two standard deviations (torch's `std`, ddof=1) of all upstream heads' attributions
  on that prompt (round 2, the EMNLP paper): the rule `mean+2std`.

Each rule has a `-positive` variant, ours, that also requires the attribution to be positive (above 1e-6 of
the prompt's largest magnitude): a head whose direct contribution is zero or negative does not switch the
unit on, and exact zeros (silent heads) are never picked at random among ties. `mean+2std-positive` is the
default; the paper presets use the authors' rules. On real models they rarely differ (the top heads are
positive); on a model with 4 upstream heads `top3` and `top3-positive` gave other active sets on 25 of 240
prompts (docs/authors-code.md).

Parsing lives here (torch-free) so that a config can be checked before anything is loaded; `mask` works on
any tensor type with torch's methods.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from .errors import UserError

ROUND_OFF = 1e-9
"""Slack for float round-off when a score is compared with a threshold: E = 2/3 computed as
(1/3 + 1)/2 or as (0.7 + 0.6333...)/2 must land on the same side of a bin edge at 6/9."""

PAPER_WELL_EXPLAINED = 6 / 9
"""The paper's (round 2) "well explained" threshold: the authors' histogram (`7_results` at f97f993) has the
bin edges `np.linspace(0, 1, 10)` and colours the last three bins red, so E >= 6/9 (E = 2/3 included).
Round 1 used `np.linspace(0, 1, 11)`, so E >= 0.7."""


def at_least(value: float, threshold: float) -> bool:
    """`value >= threshold`, up to float round-off (`ROUND_OFF`): how every "well explained" comparison
    is made, so that E = 2/3 counts at the threshold 6/9 however it was summed."""
    return value >= threshold - ROUND_OFF


@dataclass(frozen=True)
class ActiveRule:
    """Marks the heads active on each prompt from that prompt's attributions."""

    kind: str
    """'topk' or 'zscore'."""
    value: float
    """k for 'topk', the number of standard deviations for 'zscore'."""
    positive: bool = False
    """Also require a positive attribution (ours, the `-positive` rules); False is the authors' rule."""

    @property
    def name(self) -> str:
        """The rule's canonical text ('top3', 'topk-positive:5', 'mean+2std-positive', 'zscore:1.5')."""
        suffix = "-positive" if self.positive else ""
        if self.kind == "topk" and self.value == 3:
            return "top3" + suffix
        if self.kind == "zscore" and self.value == 2:
            return "mean+2std" + suffix
        return f"{self.kind}{suffix}:{int(self.value) if self.kind == 'topk' else self.value:g}"

    def mask(self, attributions: Any) -> Any:
        """`[n_prompts, n_heads]` attributions → boolean mask of active heads.

        `topk`: the k largest attributions of a prompt, whatever their sign (as `torch.topk(k=3)` in the
        authors' code; k is capped at the number of heads, where theirs raises). `zscore`: attributions above
        the prompt's mean plus `value` standard deviations (ddof=1, torch's default as theirs; a prompt with
        one head has none active). With `positive`, a head must also have an attribution above 1e-6 of the
        prompt's largest magnitude.
        """
        if attributions.shape[1] == 0:  # a unit with no upstream heads (layer 0, resid_pre)
            return attributions.new_zeros(attributions.shape, dtype=bool)
        if self.kind == "topk":
            k = min(int(self.value), attributions.shape[1])
            idx = attributions.topk(k, dim=1).indices
            active = attributions.new_zeros(attributions.shape, dtype=bool).scatter_(1, idx, True)
        else:
            mean = attributions.mean(dim=1, keepdim=True)
            std = attributions.std(dim=1, keepdim=True) if attributions.shape[1] > 1 else None
            active = attributions > mean + self.value * std if std is not None \
                else attributions.new_zeros(attributions.shape, dtype=bool)
        if self.positive:
            active = active & (attributions > 1e-6 * attributions.abs().amax(dim=1, keepdim=True))
        return active


_RULES = {"top3": ActiveRule("topk", 3), "top3-positive": ActiveRule("topk", 3, True),
          "mean+2std": ActiveRule("zscore", 2.0), "mean+2std-positive": ActiveRule("zscore", 2.0, True)}


def parse_rule(text: str) -> ActiveRule:
    """'top3' | 'mean+2std' | 'topk:N' | 'zscore:X', each optionally with '-positive' (before the colon)."""
    if text in _RULES:
        return _RULES[text]
    m = re.fullmatch(r"(topk|zscore)(-positive)?:([0-9]*\.?[0-9]+)", text)
    if not m or (m.group(1) == "topk" and (not m.group(3).isdigit() or int(m.group(3)) < 1)):
        raise UserError(f"unknown active-head rule '{text}': use top3, mean+2std, topk:N or zscore:X, "
                        "or one of them with -positive (top3-positive, topk-positive:N, ...)")
    return ActiveRule(m.group(1), float(m.group(3)), bool(m.group(2)))
