"""Head explanations as the paper: one call per relevant (unit, head) pair (paper-method §5.1–§5.2).

Active examples are the unit's train 'top' prompts on which the head is active, inactive examples the
same unit's other train 'top' prompts; both lists in max-activation order (rank 0 first), each example
the prompt with the unit's token appended and newlines flattened. When the prompt does not fit the
explainer's context window, examples are dropped from the end of the longer list (and counted).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ...core.config import ExplainConfig
from ...core.records import ContextRecord, ExplanationRecord, HeadRecord, UnitRecord
from ...core import prompts
from ...clients.llm import LLM
from ...core.llm import Message, prompt_hash

log = logging.getLogger(__name__)

CHAT_OVERHEAD = 16
"""Tokens a chat template adds around one user message (counted against the window)."""


@dataclass
class HeadJob:
    """One relevant (unit, head) pair and its prompt."""

    unit_id: str
    head: str
    token: str
    active: list[str]
    inactive: list[str]
    messages: list[Message] | None
    """None when nothing can be sent (no examples, or no fit even with one of each)."""
    n_dropped: int = 0
    problem: str | None = None
    """Why `messages` is None ('reason: detail')."""
    marked: bool = False
    """The active examples mark the looked-up tokens (`explain.mark_lookups`)."""


def explainer_name(cfg: ExplainConfig) -> str:
    return f"paper-{cfg.prompt_ending}"


def build_jobs(units: Sequence[UnitRecord], contexts: Sequence[ContextRecord], heads: Sequence[HeadRecord],
               cfg: ExplainConfig,
               count_tokens: Callable[[str], int] | None, seed: int = 0,
               marked: dict[tuple[str, str, int], str] | None = None) -> list[HeadJob]:
    """A job per relevant pair (at most `explain.max_heads_per_unit` per unit), in the order of `heads.jsonl`.
    `marked` ((unit, head, rank) → text with the looked-up tokens marked, `explain.mark_lookups`) replaces
    the active examples' texts, and the prompt then says what the marks are."""
    token_of = {u.unit_id: u.token for u in units}
    text_of = {(c.unit_id, c.rank): c.text for c in contexts if c.split == "train" and c.kind == "top"}
    chosen = explained_heads(heads, cfg.max_heads_per_unit)
    jobs = []
    for h in heads:
        if (h.unit_id, h.head) not in chosen or h.unit_id not in token_of:
            continue
        unit_id, token = h.unit_id, token_of[h.unit_id]

        def texts(ranks: list[int]) -> list[str]:
            return [text_of[(unit_id, r)] for r in sorted(ranks) if (unit_id, r) in text_of]

        active = texts(h.active_train_ranks)[:cfg.n_active]
        if marked is not None:
            ranks = [r for r in sorted(h.active_train_ranks) if (unit_id, r) in text_of][:cfg.n_active]
            active = [marked.get((unit_id, h.head, r), t) for r, t in zip(ranks, active)]
        inactive = texts(h.inactive_train_ranks)[:cfg.n_inactive]
        if cfg.shuffle_examples:
            rng = random.Random(f"{seed}:{unit_id}:{h.head}")
            rng.shuffle(active)
            rng.shuffle(inactive)
        jobs.append(_fit(HeadJob(unit_id, h.head, token, active, inactive, None, marked=marked is not None),
                         cfg, count_tokens))
    return jobs


def explained_heads(heads: Sequence[HeadRecord], max_per_unit: int) -> set[tuple[str, str]]:
    """The relevant (unit, head) pairs to explain: per unit, the `max_per_unit` with the largest mean
    attribution (every relevant pair when 0)."""
    by_unit: dict[str, list[HeadRecord]] = {}
    for h in heads:
        if h.relevant:
            by_unit.setdefault(h.unit_id, []).append(h)
    chosen = set()
    for rows in by_unit.values():
        rows = sorted(rows, key=lambda h: -h.mean_attribution)
        chosen |= {(h.unit_id, h.head) for h in (rows[:max_per_unit] if max_per_unit else rows)}
    return chosen


def _fit(job: HeadJob, cfg: ExplainConfig, count_tokens: Callable[[str], int] | None) -> HeadJob:
    """Drop examples from the end of the longer list until the prompt fits the window."""
    if not job.active:
        job.problem = "no_examples: no train prompt of the unit on which this head is active was found"
        return job
    budget = cfg.context_window - cfg.max_tokens - CHAT_OVERHEAD
    while True:
        messages = prompts.head_messages(job.token, job.active, job.inactive, cfg.prompt_ending, marked=job.marked)
        n = count_tokens(messages[0]["content"]) if count_tokens else 0
        if n <= budget:
            job.messages = messages
            return job
        if len(job.active) <= 1 and len(job.inactive) <= 1:
            job.problem = (f"context_too_long: the prompt needs {n} tokens with one example of each kind; "
                           f"explain.context_window leaves {budget}")
            return job
        longer = job.active if len(job.active) >= len(job.inactive) else job.inactive
        longer.pop()
        job.n_dropped += 1


def explain_heads(llm: LLM, jobs: Sequence[HeadJob], cfg: ExplainConfig) -> list[ExplanationRecord]:
    """Explanation records of every job, in job order (concurrently, through the call layer)."""
    params = {"max_tokens": cfg.max_tokens, "temperature": cfg.temperature}
    sendable = [j for j in jobs if j.messages is not None]
    log.info("explaining %d (unit, head) pairs with %s (%s)", len(sendable), llm.backend, llm.model)
    results = iter(llm.map([(j.messages, params) for j in sendable]))
    records = []
    for job in jobs:
        base = dict(unit_id=job.unit_id, head=job.head, explainer=explainer_name(cfg), backend=llm.backend,
                    model=llm.model, n_active=len(job.active), n_inactive=len(job.inactive), n_dropped=job.n_dropped)
        if job.messages is None:
            records.append(ExplanationRecord(**base, text=None, status="skipped" if job.problem.startswith("no_")
                                             else "failed", error=job.problem, prompt_hash="", prompt_tokens=0,
                                             completion_tokens=0, cost_usd=None))
            continue
        r = next(results)
        resp = r.response
        records.append(ExplanationRecord(
            **base, text=resp.text.strip() if r.ok else None, status="ok" if r.ok else "failed", error=r.error,
            prompt_hash=prompt_hash(job.messages), prompt_tokens=resp.prompt_tokens if r.ok else 0,
            completion_tokens=resp.completion_tokens if r.ok else 0, cost_usd=r.cost_usd,
            finish_reason=resp.finish_reason if r.ok else None))
    return records
