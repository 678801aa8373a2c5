"""What the judge is asked: the held-out prompts of every relevant pair and unit, read from the run
directory, and the judge prompts built from them (own, shuffled, unit, unit + head, look-up)."""

from __future__ import annotations

import logging
import random
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field


from ...core import prompts
from ...core.config import ScoreConfig
from ...core.layout import require_inputs
from ...core.lookups import EXPLAINER as LOOKUP
from ...core.lookups import judge as lookup_judge
from ...core.records import ContextRecord, ExplanationRecord, HeadRecord, UnitRecord, read_jsonl
from ...inputs.context import RunContext
from .judge import Judgement, unit_judge_messages
from .metrics import auroc, balanced_accuracy

log = logging.getLogger(__name__)


INPUTS = ("units.jsonl", "contexts.jsonl", "heads.jsonl", "explanations.jsonl")
"""The files this stage reads (`core.layout` names the stage that writes each)."""


@dataclass
class Inputs:
    """What the score stage reads from the run directory, as typed records."""

    units: dict[str, UnitRecord]
    test: dict[str, dict[str, list[ContextRecord]]]
    """unit_id → kind → its test prompts in rank order."""
    pairs: list[HeadRecord]
    """The relevant pairs of heads.jsonl."""
    head_explanations: dict[tuple[str, str], ExplanationRecord]
    unit_explanations: dict[str, ExplanationRecord]
    not_scored: Counter = field(default_factory=Counter)
    scorable: dict[tuple[str, str], str] = field(default_factory=dict)
    """(unit, head) → explanation text of every pair that is judged (filled by `build_jobs`)."""
    lookup_explanations: dict[tuple[str, str], ExplanationRecord] = field(default_factory=dict)
    """(unit, head) → its look-up explanation (explainer 'lookup', judged without an LLM)."""
    train: dict[str, dict[str, list[ContextRecord]]] = field(default_factory=dict)
    """unit_id → kind → its train prompts (what the length control is fitted on)."""


def read_inputs(ctx: RunContext) -> Inputs:
    require_inputs(ctx.out, INPUTS)
    units = {u.unit_id: u for u in read_jsonl(ctx.path("units.jsonl"), UnitRecord)}
    test: dict[str, dict[str, list[ContextRecord]]] = defaultdict(lambda: defaultdict(list))
    train: dict[str, dict[str, list[ContextRecord]]] = defaultdict(lambda: defaultdict(list))
    for c in read_jsonl(ctx.path("contexts.jsonl"), ContextRecord):
        (test if c.split == "test" else train)[c.unit_id][c.kind].append(c)
    for per_kind in [*test.values(), *train.values()]:
        for rows in per_kind.values():
            rows.sort(key=lambda c: c.rank)
    heads = [h for h in read_jsonl(ctx.path("heads.jsonl"), HeadRecord) if h.relevant]
    head_expl, unit_expl, lookup_expl = {}, {}, {}
    for e in read_jsonl(ctx.path("explanations.jsonl"), ExplanationRecord):
        if e.explainer == LOOKUP:
            lookup_expl[(e.unit_id, e.head)] = e
        elif e.head is None:
            unit_expl[e.unit_id] = e
        else:
            head_expl[(e.unit_id, e.head)] = e
    return Inputs(units, test, heads, head_expl, unit_expl, lookup_explanations=lookup_expl, train=train)


def shuffled_partner(pairs: Sequence[tuple[str, str]], seed: int) -> dict[tuple[str, str], tuple[str, str]]:
    """A derangement of pairs: no pair gets its own explanation, and each gets one from another unit
    whenever the pairs span more than one unit (a pair's own unit's heads describe the same prompts)."""
    keys = list(pairs)
    if len(keys) < 2:
        return {}
    rng = random.Random(seed)
    for _ in range(100):
        order = keys[:]
        rng.shuffle(order)
        partner = dict(zip(keys, order))
        if all(p != k for k, p in partner.items()):
            other_unit = all(p[0] != k[0] for k, p in partner.items())
            if other_unit or len({k[0] for k in keys}) == 1:
                return partner
    # a unit holding most pairs can make other-unit derangements rare: fall back to a rotation
    return {k: keys[(i + 1) % len(keys)] for i, k in enumerate(keys)}


Job = tuple[Judgement, list[dict[str, str]]]


def build_jobs(inp: Inputs, cfg: ScoreConfig, seed: int) -> list[Job]:
    """Phase 1: every scorable pair with its own explanation (and another pair's, for the shuffled
    control), and every unit with its own explanation."""
    jobs: list[Job] = []
    scorable = []
    for h in inp.pairs:
        key = (h.unit_id, h.head)
        e = inp.head_explanations.get(key)
        prompts_top = inp.test.get(h.unit_id, {}).get("top", [])[: cfg.n_prompts]
        if e is None:
            inp.not_scored["not explained (explain.max_heads_per_unit)"] += 1
            continue
        if e.status != "ok":
            inp.not_scored["explanation " + e.status] += 1
            continue
        if not prompts_top:
            inp.not_scored["no held-out prompts"] += 1
            continue
        scorable.append((h, e, prompts_top))
    inp.scorable = {(h.unit_id, h.head): e.text for h, e, _ in scorable}
    partner = shuffled_partner(list(inp.scorable), seed) if cfg.shuffled_control else {}
    for h, e, rows in scorable:
        token = inp.units[h.unit_id].token
        active = set(h.active_test_ranks)
        key = (h.unit_id, h.head)
        shown = [(key, "head")] + ([(partner[key], "shuffled")] if key in partner else [])
        for c in rows:
            for whose, task in shown:
                j = Judgement(task, h.unit_id, h.head, "/".join(whose), c.kind, c.rank, c.rank in active,
                              c.activation, explainer=e.explainer)
                jobs.append((j, prompts.judge_messages(inp.scorable[whose], c.text, token, cfg.judge_prompt)))
    if not cfg.unit_scores:
        return jobs
    for unit_id, e in inp.unit_explanations.items():
        if e.status != "ok":
            inp.not_scored["unit explanation " + e.status] += 1
            continue
        rows = unit_prompts(inp, unit_id, cfg, kinds=("top", "low", "random"))
        if not rows:
            inp.not_scored["unit without held-out prompts"] += 1
            continue
        jobs += [unit_job("unit", unit_id, None, e.text, c, e.explainer) for c in rows]
    return jobs


def lookup_judgements(inp: Inputs, cfg: ScoreConfig, seed: int) -> list[Judgement]:
    """Every pair with a look-up explanation judged by its pattern (`lookups.judge`, no LLM) on the same
    held-out prompts as the LLM's explanations, and again with another pair's pattern (the shuffled
    control, `score.shuffled_control`)."""
    patterns = {}
    for h in inp.pairs:
        key = (h.unit_id, h.head)
        e = inp.lookup_explanations.get(key)
        if e is None or e.status != "ok" or not inp.test.get(h.unit_id, {}).get("top"):
            continue
        patterns[key] = (h, e.pattern)
    partner = shuffled_partner(list(patterns), seed) if cfg.shuffled_control else {}
    out = []
    for key, (h, pattern) in patterns.items():
        shown = [(key, "head")] + ([(partner[key], "shuffled")] if key in partner else [])
        active = set(h.active_test_ranks)
        for c in inp.test[h.unit_id]["top"][: cfg.n_prompts]:
            for whose, task in shown:
                answer, graded = lookup_judge(patterns[whose][1], c.tokens)
                out.append(Judgement(task, h.unit_id, h.head, "/".join(whose), c.kind, c.rank, c.rank in active,
                                     c.activation, answer=answer, p_yes=graded, explainer=LOOKUP))
    return out


def unit_prompts(inp: Inputs, unit_id: str, cfg: ScoreConfig, kinds: Sequence[str]) -> list[ContextRecord]:
    per_kind = inp.test.get(unit_id, {})
    return [c for kind in kinds for c in per_kind.get(kind, [])[: cfg.n_prompts]]


def unit_job(task: str, unit_id: str, head: str | None, explanation: str, c: ContextRecord,
             explainer: str = "") -> Job:
    label = {"top": True, "low": False}.get(c.kind)
    j = Judgement(task, unit_id, head, unit_id if head is None else f"{unit_id}/{head}", c.kind, c.rank,
                  label, c.activation, explainer=explainer)
    return j, unit_judge_messages(explanation, c.text)


def build_joined_jobs(inp: Inputs, phase1: Sequence[Judgement], cfg: ScoreConfig) -> list[Job]:
    """Phase 2, for the head-versus-neuron table: each unit's explanation joined with its best head's
    (the highest E on its own prompts, then AUROC), judged on the unit's top vs low prompts."""
    if not cfg.unit_scores:
        return []
    by_pair: dict[tuple[str, str], list[Judgement]] = defaultdict(list)
    for j in phase1:
        if j.task == "head":
            by_pair[(j.unit_id, j.head)].append(j)
    best: dict[str, tuple[tuple, str]] = {}
    for (unit_id, head), js in by_pair.items():
        ok = [j for j in js if j.status == "ok"]
        e = balanced_accuracy([j.label for j in ok], [j.answer for j in ok]) if ok else None
        a = auroc([j.label for j in ok if j.p_yes is not None], [j.p_yes for j in ok if j.p_yes is not None]) \
            if ok else None
        rank = (-1.0 if e is None else e, -1.0 if a is None else a)
        if unit_id not in best or rank > best[unit_id][0]:
            best[unit_id] = (rank, head)
    jobs: list[Job] = []
    for unit_id, (_, head) in best.items():
        e = inp.unit_explanations.get(unit_id)
        if e is None or e.status != "ok":
            continue
        joined = prompts.UNIT_AND_HEAD.format(unit=e.text.strip(), head=inp.scorable[(unit_id, head)].strip())
        jobs += [unit_job("unit+head", unit_id, head, joined, c)
                 for c in unit_prompts(inp, unit_id, cfg, kinds=("top", "low"))]
    return jobs
