"""A hand-built scored run directory for the score-stage tests: units, held-out contexts, heads with known
held-out labels and explanations, written in the stages' record formats, and `KeywordJudge`, an offline backend
made for these tests (it answers Yes exactly when the explanation's last word occurs in the example, with fixed
logprobs, so every score can be computed by hand)."""

from __future__ import annotations

import math
import re

from sae_lens_ctx.core.llm import BACKENDS, Response, TokenLogprob, register_backend
from sae_lens_ctx.core.records import UnitRecord, write_jsonl

UNIT, CONTROL = "L2N37", "L2N5"
HEAD_A, HEAD_B, HEAD_ALL, HEAD_FAILED, CONTROL_HEAD = "L0H3", "L1H5", "L1H1", "L0H2", "L1H2"

# The held-out 'top' prompts of UNIT, by rank, and on which of them each head was active.
TOP = [" the city of france", " the old louvre", " new france market", " a louvre river",
       " the small river", " france and the river"]
ACTIVE = {HEAD_A: [0, 2, 4], HEAD_B: [1, 3], HEAD_ALL: [0, 1, 2, 3, 4, 5], HEAD_FAILED: [0, 1]}
LOW = [" the old market", " a new city", " the small louvre"]  # held-out negatives of UNIT
EXPLAINED = {HEAD_A: "the document mentions france", HEAD_B: "the document mentions louvre",
             HEAD_ALL: "the document mentions city", CONTROL_HEAD: "the document mentions river"}
P_YES, P_NO = 0.9, 0.2  # the keyword judge's P(Yes) when it answers Yes / No


class KeywordJudge:
    """Offline judge made for these tests: Yes iff the explanation's last word is in the example."""

    backend, model = "keyword-judge-for-tests", "keyword"
    reply_yes, reply_no = "Yes", "No"
    logprobs = True

    def generate(self, messages, **params):
        text = messages[-1]["content"]
        explanation = re.search(r"is active: (.*)\n", text).group(1)
        example = text.split('"""\n')[1].split('\n"""')[0]
        yes = explanation.split()[-1].strip(".") in example
        p = P_YES if yes else P_NO
        lps = [TokenLogprob("Yes" if yes else "No", math.log(p if yes else 1 - p),
                            [("Yes", math.log(p)), ("No", math.log(1 - p))])] if self.logprobs else None
        return Response(text=self.reply_yes if yes else self.reply_no, logprobs=lps, prompt_tokens=5,
                        completion_tokens=1)


class MumblingJudge(KeywordJudge):
    """Offline judge made for these tests: never says Yes or No, and gives no logprobs."""

    backend = "mumbling-judge-for-tests"
    reply_yes = reply_no = "Perhaps."
    logprobs = False


for _judge in (KeywordJudge, MumblingJudge):
    if _judge.backend not in BACKENDS:
        register_backend(_judge.backend, lambda cfg, j=_judge: j())


def unit_row(unit_id, control):
    return UnitRecord(unit_id=unit_id, kind="neuron", layer=2, index=int(unit_id.split("N")[1]),
                      hook_name="blocks.2.mlp.hook_post", token=" paris", token_id=4, congruence=8.0, control=control,
                      direction="promote", rank_in_layer=1)


def context_row(unit_id, kind, rank, text, act):
    return dict(unit_id=unit_id, split="test", kind=kind, rank=rank, doc_id=f"{unit_id}{kind}{rank}", context_index=0,
                start=0, end=3, text=text, tokens=[1, 2, 3], activation=act, trimmed_activation=act,
                next_token_id=None, next_token=None)


def head_row(unit_id, head, active, n=len(TOP)):
    layer, index = (int(x) for x in re.match(r"L(\d+)H(\d+)", head).groups())
    return dict(unit_id=unit_id, head=head, layer=layer, head_index=index, relevant=True, active_fraction=0.5,
                mean_attribution=1.0, active_train_ranks=[0], inactive_train_ranks=[],
                active_test_ranks=active, inactive_test_ranks=[r for r in range(n) if r not in active])


def explanation_row(unit_id, head, text, status="ok"):
    return dict(unit_id=unit_id, head=head, explainer="paper-round2", text=text if status == "ok" else None,
                status=status, error=None if status == "ok" else "timeout: slow", backend="b", model="m",
                prompt_hash="", prompt_tokens=0, completion_tokens=0, cost_usd=0.0)


def write_planted_run(out, unit_explanations=True):
    out.mkdir(exist_ok=True)
    write_jsonl(out / "units.jsonl", [unit_row(UNIT, False), unit_row(CONTROL, True)])
    contexts = [context_row(UNIT, "top", r, t, 10.0 - r) for r, t in enumerate(TOP)]
    contexts += [context_row(UNIT, "low", r, t, 0.5 * r) for r, t in enumerate(LOW)]
    contexts += [context_row(UNIT, "random", 0, " france again", 3.0)]
    contexts += [context_row(CONTROL, "top", r, t, 5.0) for r, t in enumerate(TOP[:4])]
    contexts.append(dict(context_row(UNIT, "top", 0, " a train prompt", 9.0), split="train"))
    write_jsonl(out / "contexts.jsonl", contexts)
    heads = [head_row(UNIT, h, a) for h, a in ACTIVE.items()]
    heads += [head_row(CONTROL, CONTROL_HEAD, [0, 1], n=4), dict(head_row(UNIT, "L0H0", [0]), relevant=False)]
    write_jsonl(out / "heads.jsonl", heads)
    expl = [explanation_row(UNIT, h, t) for h, t in EXPLAINED.items() if h != CONTROL_HEAD]
    expl += [explanation_row(UNIT, HEAD_FAILED, None, status="failed"), explanation_row(CONTROL, CONTROL_HEAD,
                                                                                   EXPLAINED[CONTROL_HEAD])]
    if unit_explanations:
        expl += [explanation_row(UNIT, None, "words like france"), explanation_row(CONTROL, None, "words like zebra")]
    write_jsonl(out / "explanations.jsonl", expl)
