"""Unit explanations through neuron-explainer (OpenAI's automated-interpretability, 0.0.1), reused as is.

For every unit, `TokenActivationPairExplainer` sees the unit's top-activating train records and a few
random ones (token-activation pairs from mining) and writes its own prompt (system message, few-shot
examples, "the main thing this neuron does is find"); its request goes to our backend through the
duck-typed `make_request` client (ecosystem-notes §3.5 a). Two things are patched, only for as long as
they are needed, never in the user's environment:

* its `api_client` asserts a non-empty `OPENAI_API_KEY` at import: a placeholder is set around the
  import and removed again (our client replaces its `ApiClient`, which never sends anything);
* its prompt builder counts tokens with tiktoken's cl100k_base, which is downloaded at run time:
  the module's `tiktoken` reference is pointed at a local tokenizer while our calls run (the backend's
  own when in-process, else SmolLM2's as an approximation of cl100k).

The explainer's `model_name` is 'gpt-4' only because neuron-explainer accepts its chat prompt format
(HARMONY_V4) for no other names; the request goes to the configured backend and model.

What does not work through this layer: neuron-explainer's simulators (`ExplanationNeuronSimulator`
needs `/completions` with `echo` and prompt logprobs, which a chat protocol does not have; its
`LogprobFreeExplanationTokenSimulator` is broken in 0.0.1). The adapter raises NotImplementedError for
such requests.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ...core.config import ExplainConfig
from ...core.errors import UserError
from ...core.records import ContextRecord, ExplanationRecord, UnitRecord
from ...clients.llm import LLM
from ...clients.neuron_explainer import NeuronExplainerCallFailed, NeuronExplainerClient, neuron_explainer
from ...inputs.tokens import token_pieces

log = logging.getLogger(__name__)

EXPLAINER = "neuron-explainer"
"""The `explainer` name of unit explanations."""


@dataclass
class UnitJob:
    unit_id: str
    top: list  # list[ActivationRecord]
    random: list


def sanitize_token(token: str) -> str:
    """Tabs and newlines would break neuron-explainer's `token<TAB>activation` lines."""
    return token.replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")


def token_strings(tokenizer, ids: Sequence[int]) -> list[str]:
    """Each token of a prompt as the text it adds (`tokens.token_pieces`: the pieces spell the prompt,
    SentencePiece's leading spaces kept, a character split over byte-level tokens given whole to the
    token that completes it)."""
    return token_pieces(tokenizer, ids)


def build_jobs(units: Sequence[UnitRecord], contexts: Sequence[ContextRecord], acts_path: Path, tokenizer,
               cfg: ExplainConfig) -> list[UnitJob]:
    """Token-activation records per unit: its first `unit_n_top` train 'top' and `unit_n_random` 'random' ones."""
    from neuron_explainer.activations.activations import ActivationRecord
    from safetensors import safe_open

    wanted: dict[str, dict[str, list[tuple[int, int]]]] = {u.unit_id: {"top": [], "random": []} for u in units}
    for i, c in enumerate(contexts):
        if c.split == "train" and c.kind in ("top", "random") and c.unit_id in wanted:
            wanted[c.unit_id][c.kind].append((c.rank, i))
    if not acts_path.is_file():
        raise UserError(f"{acts_path} is missing: unit explanations need the mine stage's token activations "
                        "(run `sae-lens-ctx mine`), or set explain.explain_units=false")
    jobs = []
    with safe_open(str(acts_path), framework="numpy") as f:
        keys = set(f.keys())

        def record(i: int):
            c = contexts[i]
            key = f"row{i}"
            if key not in keys:
                raise UserError(f"{acts_path} has no activations for line {i} of contexts.jsonl ({key}): "
                                "re-run the mine stage")
            acts = [float(a) for a in f.get_tensor(key).reshape(-1)]
            if len(acts) != len(c.tokens):
                raise UserError(f"{acts_path}:{key} holds {len(acts)} activations for {len(c.tokens)} tokens: "
                                "re-run the mine stage")
            return ActivationRecord(tokens=[sanitize_token(t) for t in token_strings(tokenizer, c.tokens)],
                                    activations=acts)

        for u in units:
            w = wanted[u.unit_id]
            top = [record(i) for _, i in sorted(w["top"])[:cfg.unit_n_top]]
            rnd = [record(i) for _, i in sorted(w["random"])[:cfg.unit_n_random]]
            jobs.append(UnitJob(u.unit_id, top, rnd))
    return jobs


def explain_units(llm: LLM, jobs: Sequence[UnitJob], cfg: ExplainConfig,
                  count_tokens: Callable[[str], int]) -> list[ExplanationRecord]:
    """One neuron-explainer explanation per unit, at most `max_concurrency` at once; records in job order."""
    log.info("explaining %d units with neuron-explainer through %s (%s)", len(jobs), llm.backend, llm.model)
    with neuron_explainer(count_tokens) as ne:
        return asyncio.run(_explain_all(ne, llm, jobs, cfg))


async def _explain_all(ne, llm: LLM, jobs: Sequence[UnitJob], cfg: ExplainConfig) -> list[ExplanationRecord]:
    slots = asyncio.Semaphore(cfg.max_concurrency)

    async def bounded(job: UnitJob) -> ExplanationRecord:
        async with slots:
            return await _explain_one(ne, llm, job, cfg)

    return list(await asyncio.gather(*(bounded(j) for j in jobs)))


def _context_size(ne, window: int):
    if window >= 4096:
        return ne.ContextSize.FOUR_K
    if window >= 2048:
        return ne.ContextSize.TWO_K
    return None


async def _explain_one(ne, llm: LLM, job: UnitJob, cfg: ExplainConfig) -> ExplanationRecord:
    from neuron_explainer.activations.activation_records import calculate_max_activation
    from neuron_explainer.explanations.few_shot_examples import FewShotExampleSet
    from neuron_explainer.explanations.prompt_builder import PromptFormat

    base = dict(unit_id=job.unit_id, head=None, explainer=EXPLAINER, backend=llm.backend, model=llm.model,
                n_active=len(job.top), n_inactive=len(job.random))
    context_size = _context_size(ne, cfg.context_window)
    problem = None
    if not job.top:
        problem = ("skipped", "no_examples: the unit has no train top-activating contexts")
    elif context_size is None:
        problem = ("failed", f"context_too_long: neuron-explainer's prompt needs a window of 2048 tokens or more "
                             f"(explain.context_window is {cfg.context_window})")
    elif calculate_max_activation(job.top) <= 0:
        problem = ("skipped", "no_examples: the unit's top activations are not positive "
                              "(neuron-explainer shows ReLU'd values)")
    if problem:
        return ExplanationRecord(**base, text=None, status=problem[0], error=problem[1], prompt_hash="",
                                 prompt_tokens=0, completion_tokens=0, cost_usd=None)
    explainer = ne.TokenActivationPairExplainer(
        model_name="gpt-4", prompt_format=PromptFormat.HARMONY_V4, context_size=context_size,
        few_shot_example_set=FewShotExampleSet.from_string(cfg.unit_few_shot), repeat_non_zero_activations=True,
        max_concurrent=None)
    client = NeuronExplainerClient(llm)
    explainer.client = client
    records = job.top + job.random
    try:
        texts = await explainer.generate_explanations(
            all_activation_records=records, max_activation=calculate_max_activation(job.top), num_samples=1,
            max_tokens=cfg.max_tokens, temperature=cfg.temperature, top_p=1.0)
    except NeuronExplainerCallFailed as e:
        r = e.result
        return ExplanationRecord(**base, text=None, status="failed", error=r.error, prompt_hash=r.prompt_hash,
                                 prompt_tokens=0, completion_tokens=0, cost_usd=None)
    r = client.results[-1]
    text = texts[0].strip()
    text = text[:-1].rstrip() if text.endswith(".") else text
    return ExplanationRecord(**base, text=text, status="ok", error=None, prompt_hash=r.prompt_hash,
                             prompt_tokens=r.response.prompt_tokens, completion_tokens=r.response.completion_tokens,
                             cost_usd=r.cost_usd, finish_reason=r.response.finish_reason)
