"""Active-head rules: which heads count as active on a prompt, from that prompt's attributions.

The paper (§3.2, and the authors' code) marks a head active on a prompt when its direct attribution to
the unit's pre-activation is among the prompt's top 3 (`top3`); `mean+2std` is its z-score variant.
Parsing lives here (torch-free) so that a config can be checked before anything is loaded; `mask`
works on any tensor type with torch's methods.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from .errors import UserError


@dataclass(frozen=True)
class ActiveRule:
    """Marks the heads active on each prompt from that prompt's attributions."""

    kind: str
    """'topk' or 'zscore'."""
    value: float

    def mask(self, attributions: Any) -> Any:
        """`[n_prompts, n_heads]` attributions → boolean mask of active heads.

        `topk` marks the k largest attributions of a prompt that are positive: a head whose direct
        contribution is zero or negative does not switch the unit on (on real models the top heads are
        positive, so this is the paper's top-3; on exact zeros it stops ties from being picked at random).
        Values within 1e-6 of the prompt's largest magnitude count as zero.
        """
        if attributions.shape[1] == 0:  # a unit with no upstream heads (layer 0, resid_pre)
            return attributions.new_zeros(attributions.shape, dtype=bool)
        floor = 1e-6 * attributions.abs().amax(dim=1, keepdim=True)
        if self.kind == "topk":
            k = min(int(self.value), attributions.shape[1])
            idx = attributions.topk(k, dim=1).indices
            top = attributions.new_zeros(attributions.shape, dtype=bool).scatter_(1, idx, True)
            return top & (attributions > floor)
        mean = attributions.mean(dim=1, keepdim=True)
        std = attributions.std(dim=1, keepdim=True) if attributions.shape[1] > 1 else mean.new_zeros(mean.shape)
        return (attributions > mean + self.value * std) & (attributions > floor)


_RULES = {"mean+2std": ActiveRule("zscore", 2.0), "top3": ActiveRule("topk", 3)}


def parse_rule(text: str) -> ActiveRule:
    """'mean+2std' | 'top3' | 'topk:N' | 'zscore:X'."""
    if text in _RULES:
        return _RULES[text]
    m = re.fullmatch(r"(topk|zscore):([0-9]*\.?[0-9]+)", text)
    if not m or (m.group(1) == "topk" and (not m.group(2).isdigit() or int(m.group(2)) < 1)):
        raise UserError(f"unknown active-head rule '{text}': use mean+2std, top3, topk:N or zscore:X")
    return ActiveRule(m.group(1), float(m.group(2)))
