"""The score stage: a Yes/No judge on held-out prompts, metrics, controls and bootstrap intervals.

What is judged (every call is one `explain/prompts.py` judge prompt through the explain section's
backend and cache):

* **(unit, head) pairs** (paper-method §5.3): the pair's explanation against each of the unit's
  held-out 'top' prompts; the ground truth is whether attribution marked the head active on that
  prompt (`HeadRecord.active_test_ranks`). E = balanced accuracy; AUROC from the judge's P(Yes).
* **shuffled control**: the same prompts judged with another pair's explanation.
* **units**: the unit's own explanation against its held-out 'top' (positive) and 'low' (negative)
  prompts: E and AUROC, and neuron-explainer's `simulate_and_score` correlation over top, low and
  random held-out prompts (each prompt one record, the simulated activation at its last token
  10·P(Yes)); and the unit explanation joined with its best head's explanation (highest E), for the
  head-versus-neuron table.

Metrics are pure functions of labels and judge outputs (`balanced_accuracy`, `auroc`, `parse_answer`,
`p_yes`, `bootstrap_ci`, `compare`, `paper_statistics`) so that they are checked by hand in tests.
A failed call, or a reply with no standalone yes/no word (`parse_answer`), or whose Yes/No position
holds less than `MIN_YES_NO_MASS` of Yes/No probability, is counted (unparsed) and never scored.

Outputs: `scores.jsonl` (`ScoreRecord`s), `judgements.jsonl` (every judge call, to trace a score
back to the answers), `summary.json` (aggregates beside their controls).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import random
import re
import time
import warnings
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
from scipy import stats

from ..clients.llm import LLM, CallResult
from ..clients.neuron_explainer import neuron_explainer_imports
from ..core import prompts
from ..core.config import ScoreConfig
from ..core.layout import require_inputs
from ..core.records import ScoreRecord, atomic_write, iter_jsonl, write_jsonl
from ..inputs.context import RunContext
from ..core.lookups import EXPLAINER as LOOKUP
from ..core.lookups import judge as lookup_judge
from .controls import control_scores, length_gaps

log = logging.getLogger(__name__)

INPUTS = ("units.jsonl", "contexts.jsonl", "heads.jsonl", "explanations.jsonl")
"""The files this stage reads (`core.layout` names the stage that writes each)."""

# --------------------------------------------------------------------------------------------
# Judge replies
# --------------------------------------------------------------------------------------------

_ANSWER_WORD = re.compile(r"(?<![a-z0-9])(yes|no)(?![a-z0-9])", re.IGNORECASE)

MIN_YES_NO_MASS = 0.1
"""P(Yes) is read only where the Yes/No variants hold at least this much probability (summed over the
answer token and its alternatives) at the reply's Yes/No position; below it the reply is unparsed."""


def parse_answer(text: str | None) -> bool | None:
    """The judge's Yes/No from its reply: the first standalone 'yes' or 'no' word (any case, any
    punctuation or markdown around it) decides. 'Yes', '**YES**', 'Sure, yes.' and 'I would say yes'
    are Yes; 'Answer: No', 'Final answer: No' and 'No, it does not.' are No; a reply with no
    standalone yes/no word ('Sure', 'Not sure', 'Maybe') is None: unparsed, never scored."""
    match = _ANSWER_WORD.search(text or "")
    return None if match is None else match.group(1).lower() == "yes"


def _yes_no(token: str) -> bool | None:
    word = token.strip().strip("*_`'\".:!,").lower()
    return True if word == "yes" else False if word == "no" else None


def answer_position(logprobs: Sequence[Any], text: str | None) -> int | None:
    """Index of the generated token that carries the reply's deciding Yes/No word (`parse_answer`'s):
    the token whose span holds the word's first character when the tokens join to the reply, else
    the first token that is itself a yes/no word. None when the reply has no Yes/No."""
    match = _ANSWER_WORD.search(text or "")
    if match is None or not logprobs:
        return None
    if "".join(p.token for p in logprobs) == text:
        offset = 0
        for i, p in enumerate(logprobs):
            offset += len(p.token)
            if offset > match.start():
                return i
    return next((i for i, p in enumerate(logprobs) if _yes_no(p.token) is not None), None)


def p_yes(logprobs: Sequence[Any] | None, text: str | None = None) -> float | None:
    """P(Yes) / (P(Yes) + P(No)) at the position where the reply carries its Yes/No token
    (`answer_position`; with no `text`, the first token that is a yes/no word), variants of case,
    spacing and punctuation summed over the token and its alternatives. None when the backend gave no
    logprobs, the reply has no Yes/No token, or the Yes/No mass there is below `MIN_YES_NO_MASS`
    (a "Sure" whose alternatives hold Yes and No at 1e-5 is never read as an answer)."""
    if not logprobs:
        return None
    if text is None:
        text = "".join(p.token for p in logprobs)
    i = answer_position(logprobs, text)
    if i is None:
        return None
    position = logprobs[i]
    alternatives = dict(position.top)
    alternatives.setdefault(position.token, position.logprob)
    mass = {True: 0.0, False: 0.0}
    for token, logprob in alternatives.items():
        side = _yes_no(token)
        if side is not None:
            mass[side] += math.exp(logprob)
    if mass[True] + mass[False] < MIN_YES_NO_MASS:
        return None
    return mass[True] / (mass[True] + mass[False])


# --------------------------------------------------------------------------------------------
# Metrics (pure)
# --------------------------------------------------------------------------------------------


def balanced_accuracy(labels: Sequence[bool], predictions: Sequence[bool], single_class: str = "skip") -> float | None:
    """E = ½(TPR + TNR) (paper-method §5.3). With one class only: None ('skip', round 2) or the one
    rate there is ('single-rate', round 1). None for no examples."""
    y, p = np.asarray(labels, bool), np.asarray(predictions, bool)
    if y.size == 0:
        return None
    rates = []
    if y.any():
        rates.append(float((p & y).sum() / y.sum()))
    if (~y).any():
        rates.append(float((~p & ~y).sum() / (~y).sum()))
    if len(rates) == 1 and single_class == "skip":
        return None
    return sum(rates) / len(rates)


def auroc(labels: Sequence[bool], scores: Sequence[float]) -> float | None:
    """Area under the ROC curve = P(score of a positive > score of a negative), ties counting ½
    (the Mann-Whitney U over n₊·n₋). None with one class."""
    y, s = np.asarray(labels, bool), np.asarray(scores, float)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    ranks = stats.rankdata(s)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def pearson(x: Sequence[float], y: Sequence[float]) -> float | None:
    x, y = np.asarray(x, float), np.asarray(y, float)
    if x.size < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return None
    return float(np.corrcoef(x, y)[0, 1])


def bootstrap_ci(statistic: Callable[..., float | None], arrays: Sequence[Sequence], n_resamples: int,
                 confidence: float, seed: int) -> tuple[float | None, float | None]:
    """Percentile bootstrap over items (the arrays are resampled together). Resamples on which the
    statistic is undefined (one class left) are dropped; fewer than half defined gives (None, None)."""
    columns = [np.asarray(a) for a in arrays]
    n = len(columns[0])
    if n < 2:
        return None, None
    rng = np.random.default_rng(seed)
    values = []
    for idx in rng.integers(0, n, size=(n_resamples, n)):
        v = statistic(*(c[idx] for c in columns))
        if v is not None and np.isfinite(v):
            values.append(v)
    if len(values) < n_resamples / 2:
        return None, None
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)


def aggregate(values: Sequence[float], n_resamples: int, confidence: float, seed: int) -> dict[str, Any]:
    """Mean, std and a bootstrap CI of the mean over items (scipy.stats.bootstrap, percentile)."""
    v = np.asarray([x for x in values if x is not None], float)
    out: dict[str, Any] = {"n": int(v.size), "mean": None, "std": None, "ci_low": None, "ci_high": None}
    if v.size == 0:
        return out
    out.update(mean=float(v.mean()), std=float(v.std(ddof=1)) if v.size > 1 else 0.0)
    if v.size > 1 and np.ptp(v) > 0:
        ci = stats.bootstrap((v,), np.mean, n_resamples=n_resamples, confidence_level=confidence,
                             method="percentile", random_state=np.random.default_rng(seed)).confidence_interval
        out.update(ci_low=float(ci.low), ci_high=float(ci.high))
    elif v.size > 1:
        out.update(ci_low=float(v[0]), ci_high=float(v[0]))
    return out


def compare(real: Sequence[float], control: Sequence[float], n_resamples: int, confidence: float, seed: int,
            paired: bool = False) -> dict[str, Any]:
    """real − control: the difference of means, its bootstrap CI, and a one-sided test that real is
    higher (Wilcoxon signed-rank when paired, Mann-Whitney U otherwise). `distinguishable` is True only
    when the whole interval lies above 0; the `verdict` says it in words."""
    r = np.asarray([x for x in real if x is not None], float)
    c = np.asarray([x for x in control if x is not None], float)
    out: dict[str, Any] = {"n_real": int(r.size), "n_control": int(c.size), "difference": None,
                           "ci_low": None, "ci_high": None, "pvalue": None, "test": None}
    if paired and len(real) != len(control):
        raise ValueError("paired comparison needs equally long sequences")
    if paired:
        both = [(a, b) for a, b in zip(real, control) if a is not None and b is not None]
        r, c = np.asarray([a for a, _ in both], float), np.asarray([b for _, b in both], float)
        out.update(n_real=len(both), n_control=len(both))
    if r.size == 0 or c.size == 0:
        out.update(distinguishable=False, verdict="cannot compare: no scores on one side")
        return out
    out["difference"] = float(r.mean() - c.mean())
    rng = np.random.default_rng(seed)
    boot = None
    if paired:
        d = r - c
        if r.size > 1:
            idx = rng.integers(0, d.size, size=(n_resamples, d.size))
            boot = d[idx].mean(1)
        if np.any(d != 0):
            out.update(test="wilcoxon signed-rank, one-sided",
                       pvalue=float(stats.wilcoxon(r, c, alternative="greater").pvalue))
    else:
        if r.size > 1 and c.size > 1:
            boot = r[rng.integers(0, r.size, (n_resamples, r.size))].mean(1) - \
                c[rng.integers(0, c.size, (n_resamples, c.size))].mean(1)
        out.update(test="mann-whitney U, one-sided",
                   pvalue=float(stats.mannwhitneyu(r, c, alternative="greater").pvalue))
    if boot is not None:
        tail = (1 - confidence) / 2 * 100
        lo, hi = np.percentile(boot, [tail, 100 - tail])
        out.update(ci_low=float(lo), ci_high=float(hi))
    out["distinguishable"] = bool(out["ci_low"] is not None and out["ci_low"] > 0)
    if out["ci_low"] is None:
        out["verdict"] = "too few scores for an interval: real and control cannot be told apart"
    elif out["distinguishable"]:
        out["verdict"] = "real scores above control"
    else:
        out["verdict"] = "real and control cannot be told apart (the interval of the difference holds 0)"
    return out


def paper_statistics(values: Sequence[float], well_explained: float) -> dict[str, Any]:
    """mean ± std, the histogram in 0.1 bins, the share at or above `well_explained`, the skew and
    D'Agostino's skewtest with the one-sided alternative 'greater' (paper-method §5.3, §7.1)."""
    v = np.asarray([x for x in values if x is not None], float)
    # 0.1-wide bins [0, 0.1), ..., [0.9, 1.0]; the tiny offset keeps 0.7 out of the 0.6 bin (float edges)
    counts = np.bincount(np.clip((v * 10 + 1e-9).astype(int), 0, 9), minlength=10)
    edges = np.linspace(0.0, 1.0, 11)
    out: dict[str, Any] = {"n": int(v.size), "mean": float(v.mean()) if v.size else None,
                           "std": float(v.std(ddof=1)) if v.size > 1 else None,
                           "histogram": {"edges": [round(e, 2) for e in edges], "counts": counts.tolist()},
                           "well_explained_threshold": well_explained,
                           "well_explained_fraction": float((v >= well_explained).mean()) if v.size else None,
                           "skew": None, "skewtest_pvalue": None}
    if v.size > 2 and np.ptp(v) > 0:
        out["skew"] = float(stats.skew(v))
    if v.size >= 8 and np.ptp(v) > 0:  # the test's own minimum
        out["skewtest_pvalue"] = float(stats.skewtest(v, alternative="greater").pvalue)
    else:
        out["skewtest_note"] = "skewtest needs at least 8 distinct-valued scores"
    return out


# --------------------------------------------------------------------------------------------
# Judging
# --------------------------------------------------------------------------------------------


@dataclass
class Judgement:
    """One judge call on one held-out prompt (a line of `judgements.jsonl`)."""

    task: str
    """'head' (a pair's own explanation), 'shuffled' (another pair's), 'unit' (the unit's own) or
    'unit+head' (the unit's joined with one head's)."""
    unit_id: str
    head: str | None
    explanation_of: str
    """Whose explanation was shown: 'UNIT' or 'UNIT/HEAD'."""
    kind: str
    """The prompt's kind in contexts.jsonl ('top', 'low', 'random')."""
    rank: int
    label: bool | None
    """Ground truth: the head was active on the prompt (head tasks) / the prompt is a top one (unit
    tasks; None for 'random' prompts, used only for the correlation)."""
    activation: float
    """The unit's activation at the prompt's last token."""
    answer: bool | None = None
    """The parsed Yes (True) / No (False); None when unparseable or failed."""
    p_yes: float | None = None
    status: str = "ok"
    """'ok', 'unparsed' (no Yes/No in the reply) or 'failed' (the call failed)."""
    reply: str | None = None
    error: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float | None = None
    """USD of the call (0 in-process; None when the judge model has no price), whether this run made it or
    read its answer from the cache: what the judgement costs, the same on every re-run."""
    explainer: str = ""
    """The `explainer` of the explanation shown ('paper-round2', 'neuron-explainer', 'lookup', ...). 'lookup'
    explanations are judged by `lookups.judge` (no call; `p_yes` then holds its graded score)."""


def unit_judge_messages(explanation: str, prompt_text: str) -> list[dict[str, str]]:
    """The unit judge's request: does the unit fire at the last token of this text?"""
    text = prompts.UNIT_JUDGE_TEMPLATE.format(explanation=prompts.flatten(explanation).strip(),
                                              example=prompts.flatten(prompt_text))
    return [{"role": "user", "content": text}]


def run_judgements(llm: LLM, jobs: list[tuple[Judgement, list[dict[str, str]]]], cfg: ScoreConfig) -> list[Judgement]:
    """Every job through the LLM layer (cached, bounded, retried); fills answer / p_yes / status."""
    from ..core.progress import tqdm

    params: dict[str, Any] = {"max_tokens": cfg.max_tokens, "temperature": 0.0}
    if cfg.top_logprobs:
        params["top_logprobs"] = cfg.top_logprobs
    out: list[Judgement] = []
    batch = max(1, llm.max_concurrency * 4)
    with tqdm(total=len(jobs), desc="judge", unit="call", disable=None) as bar:
        for start in range(0, len(jobs), batch):
            chunk = jobs[start:start + batch]
            for (j, _), result in zip(chunk, llm.map([(m, params) for _, m in chunk])):
                out.append(_fill(j, result))
            bar.update(len(chunk))
    return out


def _fill(j: Judgement, result: CallResult) -> Judgement:
    if not result.ok:
        j.status, j.error = "failed", result.error
        return j
    j.reply = result.text
    j.prompt_tokens, j.completion_tokens = result.response.prompt_tokens, result.response.completion_tokens
    j.cost_usd = result.cost_usd
    j.answer = parse_answer(result.text)
    lps = result.response.logprobs
    j.p_yes = p_yes(lps, result.text) if j.answer is not None else None
    if j.answer is not None and j.p_yes is None and answer_position(lps or [], result.text) is not None:
        j.answer = None  # the Yes/No token is there but its Yes/No mass is negligible (< MIN_YES_NO_MASS)
    if j.answer is None:
        j.status = "unparsed"  # no Yes/No in the reply: never scored, whatever its alternatives hold
    return j


# --------------------------------------------------------------------------------------------
# Building the jobs
# --------------------------------------------------------------------------------------------


@dataclass
class Inputs:
    units: dict[str, dict]
    test: dict[str, dict[str, list[dict]]]
    """unit_id → kind → its test prompts in rank order."""
    pairs: list[dict]
    """Relevant heads.jsonl lines."""
    head_explanations: dict[tuple[str, str], dict]
    unit_explanations: dict[str, dict]
    not_scored: Counter = field(default_factory=Counter)
    scorable: dict[tuple[str, str], str] = field(default_factory=dict)
    """(unit, head) → explanation text of every pair that is judged (filled by `build_jobs`)."""
    lookup_explanations: dict[tuple[str, str], dict] = field(default_factory=dict)
    """(unit, head) → its look-up explanation (explainer 'lookup', judged without an LLM)."""
    train: dict[str, dict[str, list[dict]]] = field(default_factory=dict)
    """unit_id → kind → its train prompts (what the length control is fitted on)."""


def read_inputs(ctx: RunContext) -> Inputs:
    require_inputs(ctx.out, INPUTS)
    units = {u["unit_id"]: u for u in iter_jsonl(ctx.path("units.jsonl"))}
    test: dict[str, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    train: dict[str, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for c in iter_jsonl(ctx.path("contexts.jsonl")):
        (test if c["split"] == "test" else train)[c["unit_id"]][c["kind"]].append(c)
    for per_kind in [*test.values(), *train.values()]:
        for rows in per_kind.values():
            rows.sort(key=lambda c: c["rank"])
    heads = [h for h in iter_jsonl(ctx.path("heads.jsonl")) if h["relevant"]]
    head_expl, unit_expl, lookup_expl = {}, {}, {}
    for e in iter_jsonl(ctx.path("explanations.jsonl")):
        if e.get("explainer") == LOOKUP:
            lookup_expl[(e["unit_id"], e["head"])] = e
        elif e["head"] is None:
            unit_expl[e["unit_id"]] = e
        else:
            head_expl[(e["unit_id"], e["head"])] = e
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
        key = (h["unit_id"], h["head"])
        e = inp.head_explanations.get(key)
        prompts_top = inp.test.get(h["unit_id"], {}).get("top", [])[: cfg.n_prompts]
        if e is None:
            inp.not_scored["not explained (explain.max_heads_per_unit)"] += 1
            continue
        if e["status"] != "ok":
            inp.not_scored["explanation " + e["status"]] += 1
            continue
        if not prompts_top:
            inp.not_scored["no held-out prompts"] += 1
            continue
        scorable.append((h, e, prompts_top))
    inp.scorable = {(h["unit_id"], h["head"]): e["text"] for h, e, _ in scorable}
    partner = shuffled_partner(list(inp.scorable), seed) if cfg.shuffled_control else {}
    for h, e, rows in scorable:
        token = inp.units[h["unit_id"]]["token"]
        active = set(h["active_test_ranks"])
        key = (h["unit_id"], h["head"])
        shown = [(key, "head")] + ([(partner[key], "shuffled")] if key in partner else [])
        for c in rows:
            for whose, task in shown:
                j = Judgement(task, h["unit_id"], h["head"], "/".join(whose), c["kind"], c["rank"],
                              c["rank"] in active, c["activation"], explainer=e["explainer"])
                jobs.append((j, prompts.judge_messages(inp.scorable[whose], c["text"], token, cfg.judge_prompt)))
    if not cfg.unit_scores:
        return jobs
    for unit_id, e in inp.unit_explanations.items():
        if e["status"] != "ok":
            inp.not_scored["unit explanation " + e["status"]] += 1
            continue
        rows = unit_prompts(inp, unit_id, cfg, kinds=("top", "low", "random"))
        if not rows:
            inp.not_scored["unit without held-out prompts"] += 1
            continue
        jobs += [unit_job("unit", unit_id, None, e["text"], c, e["explainer"]) for c in rows]
    return jobs


def lookup_judgements(inp: Inputs, cfg: ScoreConfig, seed: int) -> list[Judgement]:
    """Every pair with a look-up explanation judged by its pattern (`lookups.judge`, no LLM) on the same
    held-out prompts as the LLM's explanations, and again with another pair's pattern (the shuffled
    control, `score.shuffled_control`)."""
    patterns = {}
    for h in inp.pairs:
        key = (h["unit_id"], h["head"])
        e = inp.lookup_explanations.get(key)
        if e is None or e["status"] != "ok" or not inp.test.get(h["unit_id"], {}).get("top"):
            continue
        patterns[key] = (h, e["pattern"])
    partner = shuffled_partner(list(patterns), seed) if cfg.shuffled_control else {}
    out = []
    for key, (h, pattern) in patterns.items():
        shown = [(key, "head")] + ([(partner[key], "shuffled")] if key in partner else [])
        active = set(h["active_test_ranks"])
        for c in inp.test[h["unit_id"]]["top"][: cfg.n_prompts]:
            for whose, task in shown:
                answer, graded = lookup_judge(patterns[whose][1], c["tokens"])
                out.append(Judgement(task, h["unit_id"], h["head"], "/".join(whose), c["kind"], c["rank"],
                                     c["rank"] in active, c["activation"], answer=answer, p_yes=graded,
                                     explainer=LOOKUP))
    return out


def unit_prompts(inp: Inputs, unit_id: str, cfg: ScoreConfig, kinds: Sequence[str]) -> list[dict]:
    per_kind = inp.test.get(unit_id, {})
    return [c for kind in kinds for c in per_kind.get(kind, [])[: cfg.n_prompts]]


def unit_job(task: str, unit_id: str, head: str | None, explanation: str, c: dict, explainer: str = "") -> Job:
    label = {"top": True, "low": False}.get(c["kind"])
    j = Judgement(task, unit_id, head, unit_id if head is None else f"{unit_id}/{head}", c["kind"], c["rank"],
                  label, c["activation"], explainer=explainer)
    return j, unit_judge_messages(explanation, c["text"])


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
        if e is None or e["status"] != "ok":
            continue
        joined = prompts.UNIT_AND_HEAD.format(unit=e["text"].strip(), head=inp.scorable[(unit_id, head)].strip())
        jobs += [unit_job("unit+head", unit_id, head, joined, c)
                 for c in unit_prompts(inp, unit_id, cfg, kinds=("top", "low"))]
    return jobs


# --------------------------------------------------------------------------------------------
# Scores
# --------------------------------------------------------------------------------------------


def _counts(js: Sequence[Judgement]) -> dict[str, int]:
    c = Counter(j.status for j in js)
    return {"n_parsed": c["ok"], "n_unparsed": c["unparsed"], "n_failed": c["failed"]}


def score_group(js: Sequence[Judgement], unit_id: str, head: str | None, scorer_prefix: str, control: bool,
                cfg: ScoreConfig, seed: int) -> list[ScoreRecord]:
    """E and AUROC of one group of judgements (one pair, or one unit), with bootstrap CIs over prompts."""
    counts = _counts(js)
    scored = [j for j in js if j.status == "ok" and j.label is not None]
    y = np.array([j.label for j in scored], bool)
    base = dict(unit_id=unit_id, head=head, control=control, n=len(scored), n_positive=int(y.sum()),
                n_negative=int((~y).sum()), **counts)
    out = []
    single = cfg.single_class

    def e_stat(labels, answers):
        return balanced_accuracy(labels, answers, single)

    answers = np.array([j.answer for j in scored], bool)
    e = e_stat(y, answers)
    lo, hi = bootstrap_ci(e_stat, (y, answers), cfg.bootstrap_resamples, cfg.confidence, seed) if e is not None \
        else (None, None)
    reason = None if e is not None else ("no parsed judgements" if not scored else "one class only")
    out.append(ScoreRecord(scorer=f"{scorer_prefix}E", value=e, ci_low=lo, ci_high=hi, skipped=reason, **base))
    with_p = [j for j in scored if j.p_yes is not None]
    yp = np.array([j.label for j in with_p], bool)
    pp = np.array([j.p_yes for j in with_p], float)
    a = auroc(yp, pp) if with_p else None
    lo, hi = bootstrap_ci(auroc, (yp, pp), cfg.bootstrap_resamples, cfg.confidence, seed) if a is not None \
        else (None, None)
    reason = None if a is not None else ("no parsed judgements" if not scored else
                                         "no logprobs from the judge" if not with_p else "one class only")
    out.append(ScoreRecord(scorer=f"{scorer_prefix}auroc", value=a, ci_low=lo, ci_high=hi, skipped=reason,
                           **{**base, "n": len(with_p)}))
    return out


def simulation_score(js: Sequence[Judgement], unit_id: str, control: bool, cfg: ScoreConfig,
                     seed: int) -> ScoreRecord:
    """neuron-explainer's simulate-and-score correlation on the unit's held-out prompts (see module doc)."""
    usable = [j for j in js if j.status == "ok"]
    counts = _counts(js)
    sim = [10.0 * (j.p_yes if j.p_yes is not None else float(j.answer)) for j in usable]
    true = [j.activation for j in usable]
    value = simulate_and_score_correlation(true, sim) if len(usable) > 1 else None
    lo, hi = bootstrap_ci(pearson, (np.array(true), np.array(sim)), cfg.bootstrap_resamples, cfg.confidence,
                          seed) if value is not None else (None, None)
    reason = None if value is not None else "fewer than two judged prompts, or constant values"
    return ScoreRecord(unit_id=unit_id, head=None, scorer="unit_sim_correlation", value=value, ci_low=lo,
                       ci_high=hi, n=len(usable), control=control, skipped=reason, **counts)


def simulate_and_score_correlation(true: Sequence[float], simulated: Sequence[float]) -> float | None:
    """neuron-explainer's `simulate_and_score` on one-token records (one per prompt), with a simulator
    that returns the judge's simulated activations: its `ev_correlation_score`, the correlation pooled
    over every record."""
    with neuron_explainer_imports():
        from neuron_explainer.activations.activations import ActivationRecord
        from neuron_explainer.explanations.explanations import ActivationScale, SequenceSimulation
        from neuron_explainer.explanations.scoring import simulate_and_score
        from neuron_explainer.explanations.simulator import NeuronSimulator

    class PrecomputedSimulator(NeuronSimulator):
        """Returns the judge's answers computed beforehand (a record's one token is its index)."""

        async def simulate(self, tokens: Sequence[str]) -> SequenceSimulation:
            value = simulated[int(tokens[0])]
            return SequenceSimulation(tokens=list(tokens), expected_activations=[value],
                                      activation_scale=ActivationScale.SIMULATED_NORMALIZED_ACTIVATIONS,
                                      distribution_values=[], distribution_probabilities=[])

    records = [ActivationRecord(tokens=[str(i)], activations=[float(a)]) for i, a in enumerate(true)]
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")  # per-record correlations of one value are NaN, by design
        scored = asyncio.run(simulate_and_score(PrecomputedSimulator(), records))
    value = scored.ev_correlation_score
    return None if value is None or not np.isfinite(value) else float(value)


def compute_scores(judgements: Sequence[Judgement], units: dict[str, dict], cfg: ScoreConfig,
                   seed: int, inp: Inputs | None = None) -> list[ScoreRecord]:
    """Every `ScoreRecord` from the judgements: per pair (own and shuffled), per unit, per unit+head;
    with `inp`, each record's `explainer` and the confound controls beside them (`controls.py`).
    `control_kind`: 'random_unit' for a random control unit's scores, 'shuffled' for `shuffled_*`."""

    groups: dict[tuple, list[Judgement]] = defaultdict(list)
    for j in judgements:
        groups[(j.task, j.unit_id, j.head, j.explainer)].append(j)
    prefix = {"head": "", "shuffled": "shuffled_", "unit": "unit_", "unit+head": "unit_plus_head_"}
    records: list[ScoreRecord] = []
    for (task, unit_id, head, explainer), js in groups.items():
        control = bool(units.get(unit_id, {}).get("control", False))
        group = score_group(js, unit_id, head, prefix[task], control, cfg, seed)
        if task == "unit":
            group.append(simulation_score(js, unit_id, control, cfg, seed))
        kind = "shuffled" if task == "shuffled" else "random_unit" if control else None
        records += [replace(r, explainer=explainer, control_kind=kind) for r in group]
    if inp is not None:  # the confound controls of the LLM's explanations
        records += control_scores([j for j in judgements if j.explainer != LOOKUP], inp, cfg, seed)
    return records


def explainer_summary(scores: Sequence[ScoreRecord], explainer: str, cfg: ScoreConfig, seed: int,
                      well_explained: float) -> dict[str, Any]:
    """One explainer's E and AUROC (real pairs, random control units, shuffled explanations), the same
    aggregates and comparisons as the headline (`summarize`), and its paper statistics."""
    boot = dict(n_resamples=cfg.bootstrap_resamples, confidence=cfg.confidence, seed=seed)
    mine = [s for s in scores if s.explainer == explainer]
    out: dict[str, Any] = {}
    for scorer in ("E", "auroc"):
        real, ctrl = _values(mine, scorer, False), _values(mine, scorer, True)
        out[scorer] = {"real": aggregate(real, **boot), "random_units": aggregate(ctrl, **boot),
                       "real_minus_random_units": compare(real, ctrl, **boot)}
        paired_real, shuffled = _paired(mine, scorer, f"shuffled_{scorer}", False)
        out[scorer]["shuffled_explanations"] = aggregate([v for v in shuffled if v is not None], **boot)
        out[scorer]["real_minus_shuffled"] = compare(paired_real, shuffled, paired=True, **boot)
    out["paper_statistics"] = paper_statistics(_values(mine, "E", False), well_explained)
    out["pairs_scored"] = len([s for s in mine if s.scorer == "E" and s.value is not None])
    return out


# --------------------------------------------------------------------------------------------
# Summary
# --------------------------------------------------------------------------------------------


ONE_SIDED = 0.1
"""A judge that says Yes to fewer than this share of prompts, or No to fewer, is flagged as one-sided."""
CONFOUNDS = ("length", "token")
"""`control_kind`s of the confound controls (`controls.py`): judges that read no explanation."""


def _values(scores: Sequence[ScoreRecord], scorer: str, control: bool, kind: str | None = None) -> list[float]:
    """Values of one scorer on real (`control=False`) or random control units; `kind` picks a confound
    control's records instead of the judge's."""
    return [s.value for s in scores if s.scorer == scorer and s.control == control and s.value is not None
            and (s.control_kind if s.control_kind in CONFOUNDS else None) == kind]


def _paired(scores: Sequence[ScoreRecord], a: str, b: str, control: bool, kind: str | None = None) -> tuple[list, list]:
    """Values of scorer `a` (the judge's) and `b` (of confound `kind`, or the judge's) per (unit, head)."""
    def key_of(s):
        return s.control_kind if s.control_kind in CONFOUNDS else None
    by = {(s.unit_id, s.head, s.scorer): s.value for s in scores if s.control == control and key_of(s) == kind}
    keys = [(s.unit_id, s.head) for s in scores if s.scorer == a and s.control == control and key_of(s) is None]
    real = {(s.unit_id, s.head): s.value for s in scores if s.scorer == a and s.control == control and key_of(s) is None}
    return [real[k] for k in keys], [by.get((*k, b)) for k in keys]


def head_versus_neuron(scores: Sequence[ScoreRecord]) -> list[dict[str, Any]]:
    """One row per unit with relevant heads: its own explanation's E/AUROC on its held-out top-vs-low
    prompts, its head explanations' mean E/AUROC on head activity, and the best unit+head AUROC."""
    by_unit: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for s in scores:
        if s.control_kind not in CONFOUNDS:
            by_unit[s.unit_id][s.scorer].append(s.value)
    rows = []
    for unit_id, m in by_unit.items():
        if not m.get("E"):
            continue

        def mean(name):
            v = [x for x in m.get(name, []) if x is not None]
            return float(np.mean(v)) if v else None

        def best(name):
            v = [x for x in m.get(name, []) if x is not None]
            return float(max(v)) if v else None

        unit_auc, joined = mean("unit_auroc"), best("unit_plus_head_auroc")
        rows.append({"unit_id": unit_id, "n_heads": len(m["E"]), "unit_E": mean("unit_E"), "unit_auroc": unit_auc,
                     "unit_sim_correlation": mean("unit_sim_correlation"), "head_E_mean": mean("E"),
                     "head_auroc_mean": mean("auroc"), "unit_plus_head_E_best": best("unit_plus_head_E"),
                     "unit_plus_head_auroc_best": joined,
                     "heads_add_auroc": None if unit_auc is None or joined is None else joined - unit_auc})
    return rows


def summarize(scores: Sequence[ScoreRecord], judgements: Sequence[Judgement], inp: Inputs, cfg: ScoreConfig,
              seed: int, well_explained: float) -> dict[str, Any]:
    """summary.json: headline aggregates with their controls beside them, tests and counts."""
    boot = dict(n_resamples=cfg.bootstrap_resamples, confidence=cfg.confidence, seed=seed)
    headline: dict[str, Any] = {}
    for scorer in ("E", "auroc", "unit_E", "unit_auroc", "unit_sim_correlation", "unit_plus_head_auroc"):
        headline[scorer] = {"real": aggregate(_values(scores, scorer, False), **boot),
                            "random_units": aggregate(_values(scores, scorer, True), **boot)}
        headline[scorer]["real_minus_random_units"] = compare(
            _values(scores, scorer, False), _values(scores, scorer, True), **boot)
    for scorer in ("E", "auroc"):
        real, shuffled = _paired(scores, scorer, f"shuffled_{scorer}", False)
        headline[scorer]["shuffled_explanations"] = aggregate([v for v in shuffled if v is not None], **boot)
        headline[scorer]["real_minus_shuffled"] = compare(real, shuffled, paired=True, **boot)
    warnings_ = []
    for scorer in ("E", "auroc", "unit_E", "unit_auroc", "unit_sim_correlation"):
        for kind in CONFOUNDS:
            real, other = _paired(scores, scorer, scorer, False, kind)
            headline[scorer][f"{kind}_control"] = aggregate([v for v in other if v is not None], **boot)
            headline[scorer][f"real_minus_{kind}"] = c = compare(real, other, paired=True, **boot)
            if c["n_real"] and not c["distinguishable"]:
                warnings_.append(f"{scorer}: the real score does not beat its {kind}-only control "
                                 f"(real − {kind} = {_num(c['difference'])}, CI [{_num(c['ci_low'])}, "
                                 f"{_num(c['ci_high'])}]): {c['verdict']}")
    head_js = [j for j in judgements if j.task == "head" and j.status == "ok" and j.explainer != LOOKUP]
    labels = [j.label for j in head_js]
    yes_rate = float(np.mean([j.answer for j in head_js])) if head_js else None
    headline["constant_judges"] = {
        "always_yes_E": 0.5, "always_no_E": 0.5,
        "note": "a constant judge has TPR + TNR = 1 on every two-class pair: E = 0.5 exactly",
        "class_balance_active": float(np.mean(labels)) if labels else None,
        "judge_yes_rate": yes_rate,
    }
    rows = head_versus_neuron(scores)
    counts = Counter(j.status for j in judgements)
    by_scorer = Counter((s.scorer if s.control_kind not in CONFOUNDS else f"{s.scorer} ({s.control_kind} control)",
                         s.skipped) for s in scores if s.skipped)

    answered = [j.answer for j in judgements if j.status == "ok" and j.task in ("head", "unit")]
    overall_yes = float(np.mean(answered)) if answered else None
    headline["constant_judges"]["judge_yes_rate_all"] = overall_yes
    if overall_yes is not None and not ONE_SIDED < overall_yes < 1 - ONE_SIDED:
        warnings_.append(f"the judge answers one way almost always: Yes to {overall_yes:.1%} of {len(answered)} "
                         f"prompts (outside [{ONE_SIDED:.0%}, {1 - ONE_SIDED:.0%}]); its E is close to a constant "
                         "judge's 0.5 by construction")

    gaps = length_gaps(judgements, inp)
    if gaps["gaps"]:
        warnings_.append(gaps["verdict"])
    return {
        "headline": headline,
        "confound_warnings": warnings_,
        "length_gaps": gaps,
        "paper_statistics": {"real": paper_statistics(_values(scores, "E", False), well_explained),
                             "random_units": paper_statistics(_values(scores, "E", True), well_explained)},
        "head_versus_neuron": rows,
        "counts": {"pairs_relevant": len(inp.pairs),
                   "pairs_scored": len([s for s in scores if s.scorer == "E" and s.value is not None
                                        and s.control_kind not in CONFOUNDS]),
                   "not_scored": dict(inp.not_scored),
                   "skipped_scores": {f"{k}: {r}": v for (k, r), v in sorted(by_scorer.items())},
                   "judgements": len(judgements), "parsed": counts["ok"], "unparsed": counts["unparsed"],
                   "failed": counts["failed"]},
        "judge": {"prompt": cfg.judge_prompt, "max_tokens": cfg.max_tokens, "top_logprobs": cfg.top_logprobs},
    }


def _num(x: float | None) -> str:
    return "n/a" if x is None else f"{x:+.3f}"


def summary_text(s: dict) -> str:
    h, c = s["headline"], s["counts"]

    def fmt(a: dict) -> str:
        if a["mean"] is None:
            return "n/a (n=0)"
        ci = f" [{a['ci_low']:.3f}, {a['ci_high']:.3f}]" if a["ci_low"] is not None else ""
        return f"{a['mean']:.3f}{ci} (n={a['n']})"

    lines = [f"scored {c['pairs_scored']}/{c['pairs_relevant']} relevant pairs from {c['judgements']} judgements "
             f"({c['unparsed']} unparsed, {c['failed']} failed)"]
    for scorer in ("E", "auroc", "unit_auroc", "unit_sim_correlation"):
        lines.append(f"  {scorer:<21} real {fmt(h[scorer]['real'])}; random units {fmt(h[scorer]['random_units'])}")
        lines.append(f"  {'':<21} vs random units: {h[scorer]['real_minus_random_units']['verdict']}")
        if "real_minus_shuffled" in h[scorer]:
            lines.append(f"  {'':<21} vs shuffled explanations: {h[scorer]['real_minus_shuffled']['verdict']}")
        for kind in CONFOUNDS:
            if f"real_minus_{kind}" in h[scorer]:
                lines.append(f"  {'':<21} vs {kind}-only judge {fmt(h[scorer][f'{kind}_control'])}: "
                             f"{h[scorer][f'real_minus_{kind}']['verdict']}")
    lines += [f"warning: {w}" for w in s.get("confound_warnings", [])]
    for name, block in s.get("explainers", {}).items():
        for scorer in ("E", "auroc"):
            b = block[scorer]
            lines.append(f"  {name + ' ' + scorer:<21} real {fmt(b['real'])}; shuffled {fmt(b['shuffled_explanations'])}; "
                         f"random units {fmt(b['random_units'])}")
    return "\n".join(lines)


def run_cost(ctx: RunContext, judgements: Sequence[Judgement]) -> dict[str, Any]:
    """What the run's results cost in LLM calls: the explanations' (explain.json) and the judgements'.
    Calls answered from the cache count at their price (what this invocation paid is in `stages.json`)."""
    explained = json.loads(ctx.path("explain.json").read_text()) if ctx.path("explain.json").is_file() else {}
    ok = [j for j in judgements if j.status != "failed"]
    out = {"explain_usd": explained.get("cost_usd"), "explain_prompt_tokens": explained.get("prompt_tokens"),
           "explain_completion_tokens": explained.get("completion_tokens"),
           "judge_usd": round(sum(j.cost_usd or 0.0 for j in ok), 6),
           "judge_unpriced": sum(j.cost_usd is None for j in ok),
           "judge_prompt_tokens": sum(j.prompt_tokens for j in ok),
           "judge_completion_tokens": sum(j.completion_tokens for j in ok)}
    out["total_usd"] = round(sum(v for k, v in out.items() if k.endswith("usd") and v is not None), 6)
    return out


# --------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------


def run_stage(ctx: RunContext) -> None:
    """`sae-lens-ctx score`: write `scores.jsonl`, `judgements.jsonl` and `summary.json`; print a summary."""
    cfg = ctx.config.score
    inp = read_inputs(ctx)
    jobs = build_jobs(inp, cfg, ctx.config.seed)
    start = time.perf_counter()
    llm = LLM.from_config(ctx.config.explain, ctx.out)
    try:
        judgements = run_judgements(llm, jobs, cfg)
        judgements += run_judgements(llm, build_joined_jobs(inp, judgements, cfg), cfg)
    finally:
        llm.close()
    looked_up = lookup_judgements(inp, cfg, ctx.config.seed)
    write_jsonl(ctx.path("judgements.jsonl"), [asdict(j) for j in judgements + looked_up])
    scores = compute_scores(judgements + looked_up, inp.units, cfg, ctx.config.seed, inp)
    write_jsonl(ctx.path("scores.jsonl"), scores)
    llm_scores = [s for s in scores if s.explainer != LOOKUP]
    well = ctx.config.logging.well_explained
    summary = summarize(llm_scores, judgements + looked_up, inp, cfg, ctx.config.seed, well)
    summary["explainers"] = {LOOKUP: explainer_summary(scores, LOOKUP, cfg, ctx.config.seed, well)}
    by_unit = defaultdict(lambda: defaultdict(list))
    for s in scores:
        if s.explainer == LOOKUP and s.control_kind != "shuffled" and s.value is not None:
            by_unit[s.unit_id][s.scorer].append(s.value)
    for row in summary["head_versus_neuron"]:
        for scorer in ("E", "auroc"):
            v = by_unit[row["unit_id"]][scorer]
            row[f"lookup_{scorer}_mean"] = float(np.mean(v)) if v else None
    summary["cost"] = run_cost(ctx, judgements)
    atomic_write(ctx.path("summary.json"), json.dumps(summary, indent=2) + "\n")
    ctx.this_run.update(judge=llm.summary(), seconds=round(time.perf_counter() - start, 1))
    print(summary_text(summary))
