"""The explain stage: LLM backends, the call layer (cache, retries, failures, cost), the paper's head
prompt, neuron-explainer unit explanations, and secrets.

Inputs are written by the tests themselves in the record formats of `records.py` (a planted pair:
unit L2N37 -> " paris", head L0H3 active on the " france" prompts, L1H5 on the " louvre" ones, plus a
control unit), with the planted models' word-level tokenizer. LLMs: a fault-injecting HTTP server on
127.0.0.1 (tests/support/llm_servers.py), the real llama.cpp server serving the embedded GGUF, and the
embedded backend in-process.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import re
import socket
import sqlite3
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from llm_servers import SERVED_ALIAS, FaultInjectionServer, LlamaServer, free_port
from planted import _build_tokenizer
from sae_lens_ctx.core.config import ExplainConfig, RunConfig
from sae_lens_ctx.core.errors import UserError
from sae_lens_ctx.core import prompts
from sae_lens_ctx.stages.explain import run_stage
from sae_lens_ctx.stages.explain import heads as head_mod
from sae_lens_ctx.clients.llm import make_client
from sae_lens_ctx.core.llm import BACKENDS, LLMError, Response, register_backend
from sae_lens_ctx.clients.llm import LLM, OpenAIClient, ResponseCache
from sae_lens_ctx.clients.neuron_explainer import NeuronExplainerClient
from sae_lens_ctx.inputs.context import RunContext
from sae_lens_ctx.core.records import ContextRecord, HeadRecord, UnitRecord, iter_jsonl, read_jsonl, write_jsonl

TOKEN = " paris"
UNIT, CONTROL = "L2N37", "L2N5"
HEAD_A, HEAD_B, SILENT, CONTROL_HEAD = "L0H3", "L1H5", "L0H1", "L1H2"
FILLER = "the old city of the small river and the new market".split()


# --------------------------------------------------------------------------------------------
# A planted run directory (units, contexts + token activations, heads) in the stages' formats
# --------------------------------------------------------------------------------------------


def _train_text(rank: int) -> str:
    trigger = "france" if rank % 2 == 0 else "louvre"
    words = [FILLER[(rank + k) % len(FILLER)] for k in range(4)]
    text = " " + " ".join(words[:2] + [trigger] + words[2:])
    return text.replace(" of", "\n of", 1) if rank == 2 else text  # a newline to flatten


@pytest.fixture(scope="session")
def tokenizer():
    return _build_tokenizer()


def _unit(unit_id: str, token: str, control: bool) -> dict:
    layer, index = (int(x) for x in re.match(r"L(\d+)N(\d+)", unit_id).groups())
    return dict(unit_id=unit_id, kind="neuron", layer=layer, index=index, hook_name=f"blocks.{layer}.mlp.hook_post",
                token_id=4, token=token, congruence=8.0, control=control, direction="promote", rank_in_layer=1)


def _context(tok, unit_id, split, kind, rank, text, act) -> ContextRecord:
    ids = tok.encode(prompts.flatten(text), add_special_tokens=False)
    return ContextRecord(unit_id=unit_id, split=split, kind=kind, rank=rank, doc_id=f"d{rank}{split}{kind}",
                         context_index=0, start=0, end=len(ids), text=text, tokens=ids, activation=act,
                         trimmed_activation=act * 0.9, next_token_id=None, next_token=None)


def _head(unit_id, head, relevant, active, inactive) -> HeadRecord:
    layer, index = (int(x) for x in re.match(r"L(\d+)H(\d+)", head).groups())
    n = len(active) + len(inactive)
    return HeadRecord(unit_id=unit_id, head=head, layer=layer, head_index=index, active_fraction=len(active) / n,
                      mean_attribution=1.0, relevant=relevant, active_train_ranks=active,
                      inactive_train_ranks=inactive, active_test_ranks=[0], inactive_test_ranks=[1])


def write_planted_run(out: Path, tok) -> None:
    from safetensors.numpy import save_file

    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(out / "units.jsonl", [_unit(UNIT, TOKEN, False), _unit(CONTROL, " river", True)])
    contexts = [_context(tok, UNIT, "train", "top", r, _train_text(r), 6.0 - 0.5 * r) for r in range(8)]
    contexts += [_context(tok, UNIT, "train", "random", r, " the market of the city", 0.1) for r in range(2)]
    contexts += [_context(tok, UNIT, "test", "top", r, f" a held out test prompt {r} france", 3.0) for r in range(2)]
    contexts += [_context(tok, CONTROL, "train", "top", r, _train_text(r + 3), 2.0 - 0.1 * r) for r in range(4)]
    write_jsonl(out / "contexts.jsonl", contexts)
    acts = {}
    for i, c in enumerate(contexts):
        a = np.linspace(0.0, c.activation, num=len(c.tokens), dtype=np.float32)
        acts[f"row{i}"] = a
    save_file(acts, str(out / "context_acts.safetensors"))
    write_jsonl(out / "heads.jsonl", [
        _head(UNIT, HEAD_A, True, [0, 2, 4, 6], [1, 3, 5, 7]),
        _head(UNIT, SILENT, False, [], list(range(8))),
        _head(UNIT, HEAD_B, True, [7, 5, 3, 1], [6, 4, 2, 0]),  # ranks unsorted on purpose
        _head(CONTROL, CONTROL_HEAD, True, [0, 1], [2, 3]),
    ])


RELEVANT = [(UNIT, HEAD_A), (UNIT, HEAD_B), (CONTROL, CONTROL_HEAD)]


def make_ctx(out: Path, tok, **explain) -> RunContext:
    cfg = RunConfig()
    cfg.explain = dataclasses.replace(ExplainConfig(), **explain)
    cfg.validate()
    (out / "config.yaml").write_text(cfg.to_yaml())
    ctx = RunContext(out=out, config=cfg)
    ctx.__dict__["model"] = SimpleNamespace(tokenizer=tok)  # the analysed model's tokenizer, without the model
    return ctx


def explanations(out: Path) -> list[dict]:
    return list(iter_jsonl(out / "explanations.jsonl"))


def explain_json(out: Path) -> dict:
    return json.loads((out / "explain.json").read_text())


# --------------------------------------------------------------------------------------------
# Prompts
# --------------------------------------------------------------------------------------------


def _fenced_blocks(text: str) -> list[list[str]]:
    blocks = re.findall(r'"""\n(.*?)\n?"""', text, flags=re.S)
    return [[line for line in b.split("\n") if line] for b in blocks]


def test_head_prompt_of_a_planted_pair_holds_exactly_its_examples_in_order(tmp_path, tokenizer):
    write_planted_run(tmp_path, tokenizer)
    units = read_jsonl(tmp_path / "units.jsonl", UnitRecord)
    contexts = read_jsonl(tmp_path / "contexts.jsonl", ContextRecord)
    heads = read_jsonl(tmp_path / "heads.jsonl", HeadRecord)
    cfg = ExplainConfig(n_active=10, n_inactive=10)
    jobs = head_mod.build_jobs(units, contexts, heads, cfg, count_tokens=None)
    assert [(j.unit_id, j.head) for j in jobs] == RELEVANT  # the irrelevant head gets no prompt
    for job, (act, inact) in zip(jobs, [([0, 2, 4, 6], [1, 3, 5, 7]), ([1, 3, 5, 7], [0, 2, 4, 6])]):
        text = job.messages[0]["content"]
        assert len(job.messages) == 1 and job.messages[0]["role"] == "user"  # no system prompt, as the paper
        active, inactive = _fenced_blocks(text)
        assert active == [f"* {_train_text(r).replace(chr(10), ' ')}{TOKEN}" for r in act]
        assert inactive == [f"* {_train_text(r).replace(chr(10), ' ')}{TOKEN}" for r in inact]
        assert "\n of" not in text and "test prompt" not in text and "market of the city" not in text
        lines = text.split("\n")
        assert lines[1] == prompts.HEAD_TEMPLATE.head_line.format(token=TOKEN)
        assert lines[-1] == prompts.HEAD_TEMPLATE.endings["round2"]
        assert text.index(prompts.HEAD_TEMPLATE.active_header) < text.index(prompts.HEAD_TEMPLATE.inactive_header)

    round1 = head_mod.build_jobs(units, contexts, heads, dataclasses.replace(cfg, prompt_ending="round1", n_active=2,
                                                                           n_inactive=1), count_tokens=None)[0]
    active, inactive = _fenced_blocks(round1.messages[0]["content"])
    assert len(active) == 2 and len(inactive) == 1 and active[0].startswith(f"* {_train_text(0)}")
    assert round1.messages[0]["content"].endswith("Explanation: This attention head is active when the document")


def test_head_prompt_is_fitted_to_the_window_and_the_drop_is_recorded(tmp_path, tokenizer):
    write_planted_run(tmp_path, tokenizer)
    args = [read_jsonl(tmp_path / f, cls) for f, cls in
            (("units.jsonl", UnitRecord), ("contexts.jsonl", ContextRecord), ("heads.jsonl", HeadRecord))]
    words = lambda text: len(text.split())  # noqa: E731  (a stand-in token counter)
    full = head_mod.build_jobs(*args, ExplainConfig(n_active=4, n_inactive=4), count_tokens=words)[0]
    need = words(full.messages[0]["content"])
    cfg = ExplainConfig(context_window=need + 48 + head_mod.CHAT_OVERHEAD - 12, max_tokens=48, n_active=4,
                        n_inactive=4)
    job = head_mod.build_jobs(*args, cfg, count_tokens=words)[0]
    assert job.messages is not None and job.n_dropped >= 1
    assert len(job.active) + len(job.inactive) == 8 - job.n_dropped
    tiny = head_mod.build_jobs(*args, dataclasses.replace(cfg, context_window=80), count_tokens=words)[0]
    assert tiny.messages is None and tiny.problem.startswith("context_too_long")


def test_judge_prompt_has_the_papers_parts():
    text = prompts.judge_messages("It fires on\nFrench places.", " the old city of france", TOKEN)[0]["content"]
    assert "It fires on French places." in text and "Is the given example an active example? (Yes/No)" in text
    assert '"""\n the old city of france paris\n"""' in text and text.endswith("Answer: ")
    r1 = prompts.judge_messages("mentions france", " x", TOKEN, variant="round1")[0]["content"]
    assert r1.index("(Yes/No)") < r1.index("The example is active when the example mentions france")


# --------------------------------------------------------------------------------------------
# Config, registry, bad input
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("explain, words", [
    ({"backend": "openia"}, ["unknown LLM backend 'openia'", "openai"]),
    ({"backend": "openai-compatible"}, ["explain.base_url"]),
    ({"backend": "openai-compatible", "base_url": "127.0.0.1:8000"}, ["http://"]),
    ({"api_key_env": "sk-live-0123456789abcdef"}, ["NAME of the environment variable"]),
    ({"prompt_ending": "round3"}, ["explain.prompt_ending", "round1"]),
    ({"unit_few_shot": "fancy"}, ["explain.unit_few_shot"]),
    ({"prices": ["gpt-4o: cheap"]}, ["explain.prices", "MODEL=PROMPT_USD,COMPLETION_USD"]),
    ({"max_tokens": 0}, ["explain.max_tokens", "positive"]),
    ({"max_retries": -1}, ["explain.max_retries"]),
])
def test_bad_explain_config_is_a_one_line_error(explain, words):
    with pytest.raises(UserError) as e:
        RunConfig.from_dict({"explain": explain})
    assert "\n" not in str(e.value)
    for word in words:
        assert word in str(e.value)


def test_registry_refuses_duplicates_and_takes_new_backends():
    with pytest.raises(ValueError, match="already registered"):
        register_backend("embedded", lambda cfg: None)

    class Echo:
        backend, model = "echo-test", "echo"

        def generate(self, messages, **params):
            return Response(text=messages[-1]["content"][::-1], prompt_tokens=3, completion_tokens=2)

    register_backend("echo-test", lambda cfg: Echo())
    try:
        cfg = ExplainConfig(backend="echo-test", prices=["echo=1000000,0"])
        cfg.validate()
        llm = LLM(make_client(cfg), prices={"echo": (1e6, 0.0)})
        r = llm.call([{"role": "user", "content": "abc"}], max_tokens=5)
        assert r.ok and r.text == "cba" and r.cost_usd == 3.0  # 3 prompt tokens at $1 each
        # neuron-explainer's duck-typed client: chat requests in OpenAI's shape; an echo request (prompt
        # logprobs) to a backend without that capability fails with its reason.
        ne_client = NeuronExplainerClient(llm)
        out = asyncio.run(ne_client.make_request(messages=[{"role": "user", "content": "xyz"}], n=1, max_tokens=5))
        assert out["choices"][0]["message"]["content"] == "zyx" and ne_client.results[0].ok
        with pytest.raises(LLMError, match="no_prompt_logprobs"):
            asyncio.run(ne_client.make_request(prompt="xyz", echo=True, max_tokens=0, logprobs=15))
    finally:
        del BACKENDS["echo-test"]


def test_bad_backend_input_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(UserError, match="OPENAI_API_KEY environment variable"):
        make_client(ExplainConfig(backend="openai", model="gpt-4o-mini"))
    with pytest.raises(UserError, match="does not exist"):
        make_client(ExplainConfig(backend="llama-cpp", model=str(tmp_path / "nope.gguf")))
    with pytest.raises(UserError, match="not set"):
        make_client(ExplainConfig(backend="openai-compatible", base_url="http://127.0.0.1:9/v1", model="m",
                                  api_key_env="SLC_UNSET_KEY_VAR"))
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf at all" * 10)
    client = make_client(ExplainConfig(backend="llama-cpp", model=str(bad)))
    with pytest.raises(UserError, match="could not load"):
        client.generate([{"role": "user", "content": "hi"}], max_tokens=2)
    unreachable = make_client(ExplainConfig(backend="openai-compatible", base_url=f"http://127.0.0.1:{free_port()}/v1",
                                            model="m", max_retries=0, timeout_s=5))
    with pytest.raises(UserError, match="cannot reach the LLM server") as e:
        unreachable.generate([{"role": "user", "content": "hi"}], max_tokens=2)
    assert "\n" not in str(e.value)


def test_cli_reports_an_unknown_backend_in_one_line(tmp_path, capsys):
    from sae_lens_ctx.cli import main

    (tmp_path / "config.yaml").write_text(RunConfig().to_yaml())
    assert main(["explain", "--out", str(tmp_path), "--explain.backend", "gemini"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "unknown LLM backend 'gemini'" in err


# --------------------------------------------------------------------------------------------
# Fault injection at the seam
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def faults():
    server = FaultInjectionServer(hang_s=8.0)
    yield server
    server.stop()


def _compatible(server, model, **kw) -> dict:
    return dict(backend="openai-compatible", base_url=server.base_url, model=model, backoff_s=0.01, **kw)


N_ITEMS = len(RELEVANT) + 2  # three pairs, two units


@pytest.mark.parametrize("model, reason, retries", [
    ("fault-429", "rate_limited", 2),
    ("fault-500", "server_error", 2),
    ("fault-malformed", "malformed_response", 2),
    ("fault-empty", "empty_completion", 2),
    ("fault-hang", "timeout", 1),
])
def test_faults_are_retried_then_recorded_as_failed(tmp_path, tokenizer, faults, model, reason, retries):
    write_planted_run(tmp_path, tokenizer)
    faults.reset()
    extra = {"timeout_s": 0.5} if model == "fault-hang" else {}
    ctx = make_ctx(tmp_path, tokenizer, **_compatible(faults, model, max_retries=retries, **extra))
    run_stage(ctx)
    this_run = ctx.this_run["llm"]  # what this invocation did (stages.json in a pipeline run)
    assert faults.counts[model] == N_ITEMS * (1 + retries)  # every item retried exactly as configured
    records = explanations(tmp_path)
    assert len(records) == N_ITEMS
    assert all(r["status"] == "failed" and r["text"] is None and r["error"].startswith(reason) for r in records)
    assert {r["explainer"] for r in records} == {"paper-round2", "neuron-explainer"}
    summary = explain_json(tmp_path)
    assert summary["explanations"]["ok"] == 0 and summary["explanations"]["failed"] == N_ITEMS
    assert summary["failures"] == {reason: N_ITEMS}
    assert this_run["failures"] == {reason: N_ITEMS} and this_run["failed"] == N_ITEMS
    assert this_run["http_requests"] == N_ITEMS * (1 + retries) + 1  # + one model-list check
    con = sqlite3.connect(tmp_path / "llm_cache.sqlite")
    assert con.execute("SELECT COUNT(*) FROM responses").fetchone()[0] == 0  # failures are never cached


def test_a_model_the_server_does_not_serve_is_one_clear_error(tmp_path, tokenizer, faults):
    write_planted_run(tmp_path, tokenizer)
    ctx = make_ctx(tmp_path, tokenizer, **_compatible(faults, "gpt-5-ultra"))
    with pytest.raises(UserError, match="does not serve model 'gpt-5-ultra'") as e:
        run_stage(ctx)
    assert "\n" not in str(e.value)


def test_second_run_makes_no_calls_and_writes_identical_output(tmp_path, tokenizer, faults):
    write_planted_run(tmp_path, tokenizer)
    faults.reset()
    ctx = make_ctx(tmp_path, tokenizer, **_compatible(faults, "ok", prices=["ok=1000,2000"]))
    run_stage(ctx)
    first = (tmp_path / "explanations.jsonl").read_bytes()
    s1 = explain_json(tmp_path)
    assert s1["explanations"]["ok"] == N_ITEMS and ctx.this_run["llm"]["backend_calls"] == N_ITEMS
    assert s1["cost_usd"] == pytest.approx(N_ITEMS * (11 * 1000 + 3 * 2000) / 1e6)  # 11 + 3 tokens per call
    assert all(r["text"] == "a fixed explanation" for r in explanations(tmp_path))
    calls = sum(faults.counts.values())
    ctx2 = make_ctx(tmp_path, tokenizer, **_compatible(faults, "ok", prices=["ok=1000,2000"]))
    run_stage(ctx2)
    assert sum(faults.counts.values()) == calls  # not even the model-list check
    assert ctx2.this_run["llm"]["backend_calls"] == 0 and ctx2.this_run["llm"]["cache_hits"] == N_ITEMS
    assert ctx2.this_run["llm"].get("http_requests", 0) == 0
    assert (tmp_path / "explanations.jsonl").read_bytes() == first
    assert explain_json(tmp_path) == s1


def test_keys_go_only_where_they_belong(faults, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-openai-planted-0000")
    faults.reset()
    openai_cfg = ExplainConfig(backend="openai", base_url=faults.base_url, model="ok", prices=["ok=1,1"])
    llm = LLM(make_client(openai_cfg), prices={"ok": (1.0, 1.0)})
    r = llm.call([{"role": "user", "content": "hi"}], max_tokens=4)
    assert r.ok and r.text == "a fixed explanation" and r.cost_usd == pytest.approx(14 / 1e6)
    assert faults.headers[-1]["authorization"] == "Bearer sk-openai-planted-0000"
    # An OpenAI-compatible server without api_key_env never receives the user's OpenAI key.
    compatible = make_client(ExplainConfig(backend="openai-compatible", base_url=faults.base_url, model="ok"))
    assert compatible.generate([{"role": "user", "content": "hi"}], max_tokens=4).text
    assert "sk-openai" not in faults.headers[-1]["authorization"]
    assert "sk-openai" not in repr(compatible) + repr(make_client(openai_cfg))


def test_no_api_key_in_config_records_cache_or_logs(tmp_path, tokenizer, faults, monkeypatch, caplog, capfd):
    import logging

    key = "sk-planted-SECRET-7f3a9c1e5b2d4680"
    monkeypatch.setenv("SLC_TEST_KEY", key)
    monkeypatch.setenv("OPENAI_LOG", "debug")
    caplog.set_level(logging.DEBUG)
    write_planted_run(tmp_path, tokenizer)
    faults.reset()
    for model in ("ok", "fault-401"):
        ctx = make_ctx(tmp_path, tokenizer, **_compatible(faults, model, api_key_env="SLC_TEST_KEY"))
        run_stage(ctx)
    assert all(h.get("authorization") == f"Bearer {key}" for h in faults.headers)  # the key was used ...
    assert any(r["error"] and r["error"].startswith("auth") for r in explanations(tmp_path))
    out = capfd.readouterr()
    places = {"logs": caplog.text, "stdout": out.out, "stderr": out.err}
    for name in ("config.yaml", "explanations.jsonl", "explain.json", "llm_cache.sqlite"):
        places[name] = (tmp_path / name).read_bytes().decode("utf-8", "replace")
    for name, text in places.items():  # ... and is nowhere else, not even in part
        assert key not in text and key[-8:] not in text and "SECRET" not in text, name


# --------------------------------------------------------------------------------------------
# The real llama.cpp server (OpenAI-compatible) serving the embedded GGUF
# --------------------------------------------------------------------------------------------


def _llama_server(tmp_path_factory, logits_all: bool):
    from sae_lens_ctx.core.embedded import embedded_gguf_path

    log = tmp_path_factory.mktemp("llama-server") / "server.log"
    return LlamaServer(str(embedded_gguf_path()), n_ctx=4096, logits_all=logits_all, log_path=str(log))


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory):
    """The embedded GGUF behind llama-cpp-python's server (started by `python -m sae_lens_ctx.explain.serve`)."""
    server = _llama_server(tmp_path_factory, logits_all=False)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def llama_server_logprobs(tmp_path_factory):
    """The same with `--logits_all true`, which logprobs need (and which makes long prompts slow)."""
    server = _llama_server(tmp_path_factory, logits_all=True)
    yield server
    server.stop()


@pytest.mark.embedded
def test_openai_compatible_backend_gets_text_and_logprobs_from_a_real_llama_cpp_server(llama_server_logprobs,
                                                                                       monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    client = make_client(ExplainConfig(backend="openai-compatible", base_url=llama_server_logprobs.base_url,
                                       model=SERVED_ALIAS))
    assert isinstance(client, OpenAIClient)
    r = client.generate([{"role": "user", "content": "Name a city in France."}], max_tokens=6, temperature=0.0,
                        top_logprobs=3)
    assert r.text.strip() and r.prompt_tokens > 0 and 0 < r.completion_tokens <= 6
    assert r.logprobs and len(r.logprobs) == r.completion_tokens and all(t.logprob <= 0.0 for t in r.logprobs)
    assert all(1 <= len(t.top) <= 3 for t in r.logprobs)
    assert "".join(t.token for t in r.logprobs).strip() == r.text.strip()
    plain = client.generate([{"role": "user", "content": "Say yes."}], max_tokens=2)
    assert plain.text and plain.logprobs is None  # only when asked


@pytest.mark.embedded
def test_head_and_neuron_explainer_explanations_through_a_real_llama_cpp_server(llama_server, tmp_path, tokenizer,
                                                                                monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    write_planted_run(tmp_path, tokenizer)
    ctx = make_ctx(tmp_path, tokenizer, backend="openai-compatible", base_url=llama_server.base_url,
                   model=SERVED_ALIAS, max_tokens=24)
    run_stage(ctx)
    records = explanations(tmp_path)
    assert [r["status"] for r in records] == ["ok"] * N_ITEMS, records
    assert all(r["text"] and r["model"] == SERVED_ALIAS and r["prompt_tokens"] > 0 for r in records)
    assert sum(r["explainer"] == "neuron-explainer" for r in records) == 2
    assert explain_json(tmp_path)["unpriced"] == N_ITEMS  # a served alias has no price: counted, not guessed
    assert "OPENAI_API_KEY" not in os.environ  # neuron-explainer's import left no placeholder behind


# --------------------------------------------------------------------------------------------
# The embedded backend, offline
# --------------------------------------------------------------------------------------------


@pytest.fixture
def offline(monkeypatch):
    """Any connection other than to 127.0.0.1 fails."""
    real = socket.socket.connect

    def connect(self, address):
        if isinstance(address, tuple) and address[0] not in ("127.0.0.1", "::1", "localhost"):
            raise OSError(f"network access in an offline test: {address}")
        return real(self, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)


@pytest.mark.embedded
def test_embedded_backend_explains_every_relevant_pair_and_every_unit_offline(tmp_path, tokenizer, offline):
    write_planted_run(tmp_path, tokenizer)
    run_stage(make_ctx(tmp_path, tokenizer))  # the defaults: embedded backend
    records = explanations(tmp_path)
    assert [(r["unit_id"], r["head"]) for r in records] == [
        (UNIT, None), (UNIT, HEAD_A), (UNIT, HEAD_B), (CONTROL, None), (CONTROL, CONTROL_HEAD)]
    assert all(r["status"] == "ok" and r["text"] for r in records), records
    assert all(r["backend"] == "embedded" and r["model"] == "smollm2-135m-instruct" for r in records)
    assert all(r["cost_usd"] == 0.0 and r["prompt_tokens"] > 0 and r["completion_tokens"] > 0 for r in records)
    summary = explain_json(tmp_path)
    assert summary["explanations"] == {"total": 5, "ok": 5, "failed": 0, "skipped": 0,
                                       "heads": {"total": 3, "ok": 3, "failed": 0, "skipped": 0},
                                       "units": {"total": 2, "ok": 2, "failed": 0, "skipped": 0}}
    assert "OPENAI_API_KEY" not in os.environ
    first = (tmp_path / "explanations.jsonl").read_bytes()
    ctx = make_ctx(tmp_path, tokenizer)
    run_stage(ctx)
    again = ctx.this_run["llm"]
    assert again["backend_calls"] == 0 and again["cache_hits"] == 5
    assert (tmp_path / "explanations.jsonl").read_bytes() == first


@pytest.mark.embedded
def test_in_process_generation_is_bounded_in_time_and_recorded_as_failed():
    llm = LLM(make_client(ExplainConfig(timeout_s=0.05)), max_retries=1, backoff_s=0.01)
    r = llm.call([{"role": "user", "content": "Write a long story about a river."}], max_tokens=200)
    assert not r.ok and r.text is None and r.reason == "timeout" and r.attempts == 2
    assert llm.stats.failures == {"timeout": 1} and llm.stats.retries == 1


def test_cache_is_sqlite_with_json_values(tmp_path):
    cache = ResponseCache(tmp_path / "c.sqlite")
    cache.put("k", "b", "m", {"messages": [{"role": "user", "content": "hi"}], "params": {}},
              Response(text="yo", prompt_tokens=1, completion_tokens=1))
    assert cache.get("k") == Response(text="yo", prompt_tokens=1, completion_tokens=1) and cache.get("x") is None
    cache.close()
    row = sqlite3.connect(tmp_path / "c.sqlite").execute("SELECT request, response FROM responses").fetchone()
    assert json.loads(row[0])["messages"][0]["content"] == "hi" and json.loads(row[1])["text"] == "yo"


def test_stage_is_registered():
    from sae_lens_ctx.pipeline.engine import STAGES

    stage = STAGES["explain"]
    from sae_lens_ctx.stages import explain

    assert stage.run is explain.run_stage and stage.outputs == ("explanations.jsonl", "explain.json")
    assert "explain" in stage.config_sections


@pytest.mark.embedded
def test_in_process_logprobs_at_every_position_equal_llama_cpp_logits_all():
    """The llama-cpp backend (on the embedded GGUF) reads every generated token's logprobs from the sampler's
    logits (no second model with logits_all): they equal llama-cpp-python's own logprobs under logits_all, at
    each generated position, and the tokens join to the reply."""
    from sae_lens_ctx.clients.llm import load_llama
    from sae_lens_ctx.core.embedded import embedded_gguf_path

    client = make_client(ExplainConfig(backend="llama-cpp", model=str(embedded_gguf_path())))
    messages = prompts.judge_messages("The head is active when the text is about taxes.",
                                      "and the Congress shall appropriate the funds so that the", " right")
    r = client.generate(messages, max_tokens=4, temperature=0.0, top_logprobs=5)
    got = r.logprobs
    reference, _ = load_llama(client.path, client.context_window, logits_all=True)
    out = reference.create_chat_completion(messages=messages, max_tokens=4, temperature=0.0, logprobs=True,
                                           top_logprobs=5)
    want = out["choices"][0]["logprobs"]["content"]
    assert len(got) == len(want) >= 1 and "".join(t.token for t in got) == r.text
    for g, w in zip(got, want):
        assert g.token == w["token"]
        assert [t for t, _ in g.top] == [a["token"] for a in w["top_logprobs"]]
        assert np.allclose([lp for _, lp in g.top], [a["logprob"] for a in w["top_logprobs"]], atol=1e-4)
