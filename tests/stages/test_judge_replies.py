"""Judge replies read honestly (cases 13 and 14): the first standalone yes/no word decides a reply's
answer, P(Yes) is read where the reply carries its Yes/No token, and a reply without one is never
scored. The judges here are `FaultInjectionServer` models (a fake OpenAI-compatible server at the
backend seam, tests/support/llm_servers.py): `judge-sure` and `judge-chatty`."""

from __future__ import annotations

import math

import pytest

from llm_servers import CHATTY_REPLIES, FaultInjectionServer
from sae_lens_ctx.stages import score
from sae_lens_ctx.core.config import RunConfig
from sae_lens_ctx.core.llm import TokenLogprob
from sae_lens_ctx.inputs.context import RunContext
from sae_lens_ctx.core.records import iter_jsonl
from scored_run import write_planted_run


@pytest.mark.parametrize("reply, answer", [
    ("Sure, yes.", True), ("Sure! Yes.", True), ("Final answer: No", False), ("I would say yes", True),
    ("**YES**", True), ("No, it does not.", False), ("Not sure", None), ("Sure", None), ("Nobody knows", None),
    ("yes-ish", True), ("Yesterday", None)])
def test_the_first_standalone_yes_or_no_word_decides(reply, answer):
    assert score.parse_answer(reply) is answer


def test_p_yes_is_read_at_the_position_of_the_yes_no_token():
    lp = [TokenLogprob("Sure", math.log(0.9), [("Sure", math.log(0.9)), ("No", math.log(0.05))]),
          TokenLogprob("!", -0.01, []),
          TokenLogprob(" Yes", math.log(0.6), [(" Yes", math.log(0.6)), ("No", math.log(0.2))])]
    assert score.answer_position(lp, "Sure! Yes") == 2
    assert score.p_yes(lp, "Sure! Yes") == pytest.approx(0.6 / 0.8)  # not 0 from the first position's "No"
    # a Yes/No position whose Yes/No mass is below MIN_YES_NO_MASS is not read
    weak = [TokenLogprob("yes", math.log(0.01), [("yes", math.log(0.01)), ("no", math.log(0.02))])]
    assert score.p_yes(weak, "yes") is None
    assert score.p_yes([TokenLogprob("Sure", -0.1, [("Yes", math.log(7e-6)), ("No", math.log(3e-6))])], "Sure") \
        is None


@pytest.fixture
def server():
    s = FaultInjectionServer()
    yield s
    s.stop()


def _score(tmp_path, server, model):
    write_planted_run(tmp_path)
    cfg = RunConfig.from_dict({"explain": {"backend": "openai-compatible", "base_url": server.base_url,
                                           "model": model, "cache": False},
                               "score": {"bootstrap_resamples": 50, "max_tokens": 16}})
    score.run_stage(RunContext(out=tmp_path, config=cfg))
    return list(iter_jsonl(tmp_path / "judgements.jsonl")), list(iter_jsonl(tmp_path / "scores.jsonl"))


def test_case13_a_judge_that_says_sure_gives_no_scored_judgement(tmp_path, server):
    judgements, scores = _score(tmp_path, server, "judge-sure")
    assert judgements and all(j["reply"] == "Sure" for j in judgements)
    assert all(j["status"] == "unparsed" and j["answer"] is None and j["p_yes"] is None for j in judgements)
    judged = [s for s in scores if s["control_kind"] not in ("length", "token")]  # the confound controls read
    assert judged and all(s["value"] is None and s["n_parsed"] == 0 for s in judged)  # no reply: they score


def test_case14_chatty_replies_parse_to_their_stated_answers(tmp_path, server):
    judgements, _ = _score(tmp_path, server, "judge-chatty")
    seen = {j["reply"] for j in judgements}
    assert seen == set(CHATTY_REPLIES)
    for j in judgements:
        want = CHATTY_REPLIES[j["reply"]]
        assert j["answer"] is want and j["status"] == ("unparsed" if want is None else "ok")
        assert j["p_yes"] == (None if want is None else pytest.approx(0.8 / 0.9 if want else 0.2 / 0.9))
