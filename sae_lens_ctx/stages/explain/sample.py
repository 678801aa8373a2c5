"""The units whose pairs get LLM explanations (`explain.llm_units`): a seeded sample, half controls.

Why: at paper size (100 real units and 100 controls, several relevant heads each) an LLM call per pair
dominates a CPU run, while the look-up explainers need no LLM; a sample keeps the LLM's explanations and
scores beside the look-ups at a cost the user chooses.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from ...core.records import UnitRecord


def llm_sample(units: Sequence[UnitRecord], n: int, seed: int) -> set[str]:
    """The unit ids to explain with the LLM: every unit when `n` is 0 or covers them all; else `n // 2`
    controls (where there are that many) and the rest real units, each the smallest seeded keys
    (sha256 of seed and unit id), so the sample does not depend on the units' order."""
    if n <= 0 or n >= len(units):
        return {u.unit_id for u in units}
    key = lambda u: hashlib.sha256(f"{seed}\x00{u.unit_id}".encode()).digest()  # noqa: E731
    controls = sorted((u for u in units if u.control), key=key)
    real = sorted((u for u in units if not u.control), key=key)
    n_controls = min(len(controls), n // 2)
    n_real = min(len(real), n - n_controls)
    n_controls = min(len(controls), n - n_real)
    return {u.unit_id for u in real[:n_real] + controls[:n_controls]}
