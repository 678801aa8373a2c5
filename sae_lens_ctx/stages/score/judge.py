"""The Yes/No judge: its replies read honestly (the first standalone yes/no word; P(Yes) where that word was
generated), and the judge calls themselves (paper-method §5.3)."""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


from ...clients.llm import LLM, CallResult
from ...core import prompts
from ...core.progress import tqdm
from ...core.config import ScoreConfig

log = logging.getLogger(__name__)


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


@dataclass
class Judgement:
    """One judge call on one held-out prompt (a line of `judgements.jsonl`)."""

    task: str
    """'head' (a pair's own explanation), 'shuffled' (another pair's), 'unit' (the unit's own) or
    'unit+head' (the unit's joined with one head's); look-up patterns (`explainer` 'lookup') also
    'unit_shuffled' (another unit's pattern)."""
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
    params: dict[str, Any] = {"max_tokens": cfg.max_tokens, "temperature": 0.0}
    if cfg.top_logprobs:
        params["top_logprobs"] = cfg.top_logprobs
    out: list[Judgement] = []
    batch = max(1, llm.max_concurrency * 16)  # whole explanations' prompts in one map: a batching LLM groups them
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
