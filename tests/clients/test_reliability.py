"""Reliability under LLM faults and load, against the fault-injection server on 127.0.0.1
(tests/support/llm_servers.py, a fake at the HTTP seam, named as such).

* The score stage under a fault mix (10 % 429, 5 % 500, 5 % hangs, 5 % malformed bodies) completes;
  every faulted call is retried, then either succeeds or is recorded as failed and counted; scores
  rest on the successful judgements only, and the counts in summary.json match judgements.jsonl.
* The LLM layer holds its concurrency limit with 1,000 calls queued, and loses none; identical requests
  in flight together reach the backend once.
"""

from __future__ import annotations

import json

import pytest

from llm_servers import FaultInjectionServer
from sae_lens_ctx.stages import score
from sae_lens_ctx.core.config import ExplainConfig, RunConfig
from sae_lens_ctx.clients.llm import LLM, ResponseCache
from sae_lens_ctx.clients.llm import make_client
from sae_lens_ctx.inputs.context import RunContext
from sae_lens_ctx.core.records import iter_jsonl
from scored_run import write_planted_run


@pytest.fixture
def server():
    s = FaultInjectionServer(hang_s=2.0, seed=7)
    yield s
    s.stop()


def test_score_survives_a_fault_mix_and_counts_every_failure(tmp_path, server):
    write_planted_run(tmp_path)
    cfg = RunConfig.from_dict({
        "explain": {"backend": "openai-compatible", "base_url": server.base_url, "model": "fault-mix",
                    "max_retries": 2, "backoff_s": 0.01, "timeout_s": 0.5, "cache": False, "max_concurrency": 4},
        "score": {"bootstrap_resamples": 200}})
    score.run_stage(RunContext(out=tmp_path, config=cfg))
    judgements = list(iter_jsonl(tmp_path / "judgements.jsonl"))
    summary = json.loads((tmp_path / "summary.json").read_text())
    counts = summary["counts"]
    failed = [j for j in judgements if j["status"] == "failed"]
    print(f"fault mix: {server.counts['fault-mix']} requests for {len(judgements)} judgements; {counts}")
    assert counts["judgements"] == len(judgements) == counts["parsed"] + counts["unparsed"] + counts["failed"]
    assert counts["failed"] == len(failed) and counts["unparsed"] == 0
    assert server.counts["fault-mix"] > len(judgements)  # faulted calls were retried
    assert all(j["error"] and j["answer"] is None and j["p_yes"] is None for j in failed)
    assert counts["parsed"] > 0.8 * len(judgements)  # three attempts beat a 25 % fault rate
    # every score rests on its group's successful judgements only, and counts the rest
    groups: dict[tuple, list[dict]] = {}
    for j in judgements:
        groups.setdefault((j["task"], j["unit_id"], j["head"]), []).append(j)
    for s in iter_jsonl(tmp_path / "scores.jsonl"):
        if s["scorer"] not in ("E", "shuffled_E") or s["control_kind"] in ("length", "token"):
            continue  # the confound controls answer every prompt themselves
        js = groups[("head" if s["scorer"] == "E" else "shuffled", s["unit_id"], s["head"])]
        ok = [j for j in js if j["status"] == "ok"]
        assert (s["n_parsed"], s["n_failed"], s["n"]) == (len(ok), len(js) - len(ok), len(ok))
        expected = score.balanced_accuracy([j["label"] for j in ok], [j["answer"] for j in ok])
        assert s["value"] == pytest.approx(expected) if expected is not None else s["value"] is None


def test_llm_layer_holds_its_concurrency_limit_with_a_thousand_queued_calls(server):
    cfg = ExplainConfig(backend="openai-compatible", base_url=server.base_url, model="slow-ok",
                        check_server=False, cache=False)
    llm = LLM(make_client(cfg), max_concurrency=4, max_retries=0)
    requests = [([{"role": "user", "content": f"call {i}"}], {"max_tokens": 4}) for i in range(1000)]
    results = llm.map(requests)
    assert len(results) == 1000 and all(r.ok for r in results)
    assert server.counts["slow-ok"] == 1000  # none lost, none sent twice
    assert 2 <= server.max_in_flight <= 4
    assert llm.stats.ok == 1000 and llm.stats.failed == 0


def test_identical_requests_in_flight_together_reach_the_backend_once(server, tmp_path):
    cfg = ExplainConfig(backend="openai-compatible", base_url=server.base_url, model="slow-ok", check_server=False)
    llm = LLM(make_client(cfg), max_concurrency=8, max_retries=0, cache=ResponseCache(tmp_path / "cache.sqlite"))
    requests = [([{"role": "user", "content": f"call {i % 10}"}], {"max_tokens": 4}) for i in range(40)]
    before = server.counts["slow-ok"]
    results = llm.map(requests)
    assert all(r.ok for r in results) and server.counts["slow-ok"] - before == 10  # one call per distinct request
    assert llm.stats.backend_calls == 10 and llm.stats.cache_hits == 30
    for i, r in enumerate(results):
        assert r.text == results[i % 10].text
    llm.close()
