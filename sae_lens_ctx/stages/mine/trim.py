"""Trimming a prompt to the shortest suffix that keeps the unit's activation (paper §3.5), batched.

The paper trims each top prompt with a serial binary search over the suffix's start index: start at
`(start, end) = (0, n - 1)`, test `tokens[mid:]`, move `start` to `mid` if the activation at the last
token still reaches `ratio ×` the untrimmed one, else move `end` to `mid`; stop when `mid == start`.
`trim_serial` is that search, kept as the reference (tests and `bench` compare against it).

`trim_batched` returns exactly the same start for every prompt, but evaluates the candidates of many
prompts in one batched forward: each round it collects, for every prompt still searching, the
midpoints of the next `lookahead` levels of its search tree (1 midpoint for lookahead 1, 2^d - 1 for
d), evaluates them all at once, and then replays the serial search's decisions over the evaluated
activations. The search assumes the activation falls monotonically as the suffix shortens; where it
does not, the replay still follows the serial search's path, so the result is the serial result, not
the true shortest suffix.

`suffix_evaluator` runs the candidates (each distinct suffix once, in token-budgeted batches of similar
length) and `trim_prompts` trims mining's kept prompts (`Prompt`) with it.

Differences from the authors' code, on purpose: the comparison is `>=` (the issue's "at least 0.8×"),
and the recorded trimmed activation is the one at the returned start (the authors recorded the last
*evaluated* midpoint, which could be a failed one below the ratio).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from ...core.progress import tqdm  # a bar on a terminal, progress lines in a log

from ...core.config import MineConfig
from ...inputs.corpus import TokenContext
from ...inputs.view import length_batches, pad_batch, pad_id

Reader = Callable[[torch.Tensor], torch.Tensor]
"""`reader(tokens [B, T])` → every unit's activation `[B, T, U]`; it also has `.view` (the ModelView).
`mine.UnitReader` is one."""

Evaluate = Callable[[list[tuple[int, int]]], list[torch.Tensor]]
"""`evaluate([(prompt, start), ...])` → for each request, the unit's activation at every token of
`prompt[start:]` (1-D, last value = activation at the prompt's last token)."""


def trim_serial(activation_at: Callable[[int], float], n: int, original: float, ratio: float) -> int:
    """The paper's binary search: the start index of the trimmed suffix of an `n`-token prompt.

    `activation_at(s)` is the unit's activation at the last token of `prompt[s:]`; `original` the
    untrimmed prompt's. Never returns `n - 1` (the shortest result is two tokens), as the paper.
    """
    threshold = ratio * original
    start, end = 0, n - 1
    mid = (start + end) // 2
    while start != mid:
        if activation_at(mid) >= threshold:
            start = mid
        else:
            end = mid
        mid = (start + end) // 2
    return start


def search_candidates(start: int, end: int, depth: int) -> list[int]:
    """Midpoints the serial search can test in its next `depth` steps from the interval (start, end)."""
    out: list[int] = []
    frontier = [(start, end)]
    for _ in range(depth):
        nxt = []
        for s, e in frontier:
            m = (s + e) // 2
            if m == s:
                continue
            out.append(m)
            nxt += [(m, e), (s, m)]
        frontier = nxt
    return out


def replay(start: int, end: int, acts: dict[int, float], threshold: float, depth: int) -> tuple[int, int]:
    """Up to `depth` steps of the serial search over already evaluated activations `acts[mid]`."""
    for _ in range(depth):
        mid = (start + end) // 2
        if mid == start:
            break
        if acts[mid] >= threshold:
            start = mid
        else:
            end = mid
    return start, end


@dataclass
class TrimResult:
    """What `trim_batched` found for each prompt, and what it cost."""

    starts: list[int]
    """Start index of each prompt's trimmed suffix (equal to `trim_serial`'s)."""
    rows: list[torch.Tensor | None]
    """The evaluated token activations of each trimmed suffix; None where the start is 0 (the
    untrimmed prompt, never evaluated by the search)."""
    rounds: int
    """Batched rounds (each one call of `evaluate`)."""
    evaluated: int
    """Candidate suffixes requested from `evaluate`."""


def trim_batched(evaluate: Evaluate, lengths: Sequence[int], originals: Sequence[float], ratio: float,
                 lookahead: int = 1, progress: Callable[[int], None] | None = None) -> TrimResult:
    """The serial search's result for every prompt, evaluating candidates in batched rounds.

    `lengths[i]` is prompt i's token count and `originals[i]` its untrimmed activation; `evaluate`
    runs candidate suffixes (see `Evaluate`). `progress(n)` is told how many prompts finished.
    """
    if lookahead < 1:
        raise ValueError(f"lookahead must be at least 1, got {lookahead}")
    n = len(lengths)
    bounds = [(0, max(length - 1, 0)) for length in lengths]
    thresholds = [ratio * float(o) for o in originals]
    rows: list[torch.Tensor | None] = [None] * n
    active = [i for i in range(n) if (bounds[i][0] + bounds[i][1]) // 2 != bounds[i][0]]
    if progress:
        progress(n - len(active))
    rounds = evaluated = 0
    while active:
        requests = [(i, s) for i in active for s in search_candidates(*bounds[i], lookahead)]
        results = evaluate(requests)
        rounds += 1
        evaluated += len(requests)
        got: dict[int, dict[int, torch.Tensor]] = {}
        for (i, s), row in zip(requests, results):
            got.setdefault(i, {})[s] = row
        still = []
        for i in active:
            acts = {s: float(row[-1]) for s, row in got[i].items()}
            start, end = replay(*bounds[i], acts, thresholds[i], lookahead)
            if start != bounds[i][0]:
                rows[i] = got[i][start]
            bounds[i] = (start, end)
            if (start + end) // 2 != start:
                still.append(i)
        if progress:
            progress(len(active) - len(still))
        active = still
    return TrimResult([b[0] for b in bounds], rows, rounds, evaluated)


# -- evaluating candidates ----------------------------------------------------------------------


def suffix_evaluator(reader: Reader, prompts: Sequence[Sequence[int]], cols: Sequence[int],
                     bos_ids: Sequence[int], token_budget: int) -> Evaluate:
    """`evaluate([(prompt, start)])` for `trim_batched`: runs `bos_ids + prompts[i][start:]` and returns
    unit `cols[i]`'s activations after BOS. Each distinct sequence runs once (prompts of several units
    can share a suffix), in batches of similar length of at most `token_budget` padded tokens
    (`inputs.view.length_batches`)."""
    view = reader.view
    pad = pad_id(view.tokenizer)

    def evaluate(requests: list[tuple[int, int]]) -> list[torch.Tensor]:
        slots: dict[tuple[int, ...], int] = {}
        keys = [slots.setdefault((*bos_ids, *prompts[i][s:]), len(slots)) for i, s in requests]
        seqs = list(slots)
        acts: list[torch.Tensor] = [torch.empty(0)] * len(seqs)
        for chunk in length_batches([len(q) for q in seqs], token_budget):
            out = reader(pad_batch([seqs[j] for j in chunk], pad).to(view.device)).cpu()
            for r, j in enumerate(chunk):
                acts[j] = out[r, :len(seqs[j])]
        return [acts[k][len(bos_ids):, cols[i]] for (i, _), k in zip(requests, keys)]

    return evaluate


# -- trimming kept prompts ----------------------------------------------------------------------


@dataclass
class Prompt:
    """One kept context of one unit, before records are written."""

    unit: int
    split: str
    kind: str
    context: TokenContext
    end: int
    """Position (in the context's tokens, BOS counted) of the prompt's last token."""
    activation: float
    """The unit's activation there, in the context."""
    row: torch.Tensor
    """The unit's activation at every position of the context."""
    start: int = 0
    """First token of the prompt, counted from the first token after BOS (trimming moves it)."""
    acts: torch.Tensor | None = None
    """Token activations of the final prompt."""


def trim_prompts(reader: Reader, prompts: list[Prompt], cfg: MineConfig, bos: int, bos_ids: list[int],
                 width: int) -> dict:
    """Trim every top prompt in place (batched, equal to the serial search); return the trimming's cost."""
    top = [p for p in prompts if p.kind == "top"]
    tokens = [list(p.context.tokens[bos:p.end + 1]) for p in top]
    evaluate = suffix_evaluator(reader, tokens, [p.unit for p in top], bos_ids, cfg.batch_size * width)
    lookahead = cfg.trim_lookahead or (1 if reader.view.device.type == "cpu" else 3)
    with tqdm(total=len(top), desc="trim", unit="prompt", disable=None) as bar:
        res = trim_batched(evaluate, [len(t) for t in tokens], [p.activation for p in top], cfg.trim_ratio,
                           lookahead, progress=bar.update)
    exact = len(bos_ids) == bos  # the untrimmed prompt runs exactly as its context did
    redo = [i for i, row in enumerate(res.rows) if row is None and not exact]
    for i, row in zip(redo, evaluate([(i, 0) for i in redo]) if redo else []):
        res.rows[i] = row
    for p, s, row in zip(top, res.starts, res.rows):
        p.start, p.acts = s, row if row is not None else p.row[bos:p.end + 1]
    for p in prompts:
        if p.kind != "top":
            p.acts = p.row[bos:p.end + 1]
    return {"n_prompts": len(top), "rounds": res.rounds, "candidates": res.evaluated, "lookahead": lookahead,
            "mean_tokens_before": _mean([len(t) for t in tokens]),
            "mean_tokens_after": _mean([len(t) - s for t, s in zip(tokens, res.starts)])}


def _mean(xs: Sequence[float]) -> float | None:
    return round(sum(xs) / len(xs), 3) if xs else None
