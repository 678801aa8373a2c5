"""The embedded LLM through transformers (sae_lens_ctx/clients/local_hf.py), on the real embedded SmolLM2:
every generated token's logprobs recomputed with a plain transformers forward, stop strings, seeded
sampling, token counting, the cache key's engine, and the OpenAI-compatible server's one-line error
without the llama-cpp extra (a fault injection: the import of llama_cpp blocked in a subprocess)."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from sae_lens_ctx.core.config import ExplainConfig
from sae_lens_ctx.clients.llm import LLM, make_client
from sae_lens_ctx.core.llm import LLMError, Response, request_key
from sae_lens_ctx.clients.local_hf import ENGINE, TransformersClient, load_gguf_lm

# A hang guard, not a timing assertion: many times what the subprocess takes even on a busy 2-core machine
# (where a bare `sae-lens-ctx --help` once took a minute), so only a hang fails the test.
HANG_GUARD_S = 1800

MESSAGES = [{"role": "user", "content": "Name three rivers."}]


@pytest.fixture(scope="module")
def client():
    c = make_client(ExplainConfig(embedded_precision="float32"))  # exact comparisons with a plain fp32 forward
    assert isinstance(c, TransformersClient) and c.engine == ENGINE
    return c


@pytest.mark.embedded
def test_every_generated_token_has_logprobs_equal_to_a_plain_forward(client):
    r = client.generate(MESSAGES, max_tokens=12, temperature=0.0, top_logprobs=4)
    hf, tok, _ = load_gguf_lm(client.path)
    prompt = tok.apply_chat_template(MESSAGES, add_generation_prompt=True, return_dict=True,
                                     return_tensors="pt")["input_ids"]
    assert r.prompt_tokens == prompt.shape[1] and r.completion_tokens == 12 == len(r.logprobs)
    assert r.finish_reason == "length"
    # recompute: one forward over prompt + answer, no cache, log-softmax at every answer position
    answer = tok(r.text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        logits = hf(torch.cat([prompt, answer], dim=1)).logits[0, prompt.shape[1] - 1:-1].double()
    want = torch.log_softmax(logits, dim=-1)
    assert answer.shape[1] == 12
    for k, position in enumerate(r.logprobs):
        chosen = int(answer[0, k])
        assert position.token == tok.decode([chosen]) and int(want[k].argmax()) == chosen  # greedy
        assert np.isclose(position.logprob, float(want[k, chosen]), atol=1e-3)
        values, best = want[k].topk(4)
        assert [t for t, _ in position.top] == [tok.decode([int(i)]) for i in best]
        assert np.allclose([lp for _, lp in position.top], values.numpy(), atol=1e-3)


@pytest.mark.embedded
def test_stop_strings_seeded_sampling_and_no_logprobs_unless_asked(client):
    greedy = client.generate(MESSAGES, max_tokens=20)
    assert greedy.logprobs is None and greedy.text
    word = greedy.text.split()[2]
    stopped = client.generate(MESSAGES, max_tokens=20, stop=[word])
    assert stopped.finish_reason == "stop" and word not in stopped.text
    assert greedy.text.startswith(stopped.text)
    a = client.generate(MESSAGES, max_tokens=15, temperature=1.5, seed=3)
    b = client.generate(MESSAGES, max_tokens=15, temperature=1.5, seed=3)
    others = {client.generate(MESSAGES, max_tokens=15, temperature=1.5, seed=s).text for s in (4, 5, 6)}
    assert a.text == b.text and others - {a.text}  # the seed decides the sample


@pytest.mark.embedded
def test_token_count_is_the_models_tokenizer(client):
    _, tok, _ = load_gguf_lm(client.path)
    text = "The Congress shall appropriate<|im_end|> funds."
    assert client.count_tokens(text) == len(tok(text, add_special_tokens=False)["input_ids"]) > 5


def test_cache_key_names_the_engine():
    params = {"max_tokens": 1}
    keys = {request_key("embedded", "m", MESSAGES, params, engine) for engine in (ENGINE, "llama-cpp")}
    assert len(keys) == 2
    assert request_key("openai", "m", MESSAGES, params) == request_key("openai", "m", MESSAGES, params, None)


@pytest.mark.embedded
def test_llm_layer_caches_the_embedded_backend_under_its_engine(tmp_path, client):
    from sae_lens_ctx.clients.llm import ResponseCache

    llm = LLM(client, cache=ResponseCache(tmp_path / "c.sqlite"))
    first = llm.call(MESSAGES, max_tokens=3)
    again = llm.call(MESSAGES, max_tokens=3)
    assert first.ok and again.cached and again.text == first.text
    key = request_key("embedded", client.model, MESSAGES, {"max_tokens": 3}, ENGINE)
    assert llm.cache.get(key) is not None
    assert llm.cache.get(request_key("embedded", client.model, MESSAGES, {"max_tokens": 3})) is None


def test_serve_without_the_llama_cpp_extra_is_one_line_naming_the_install(tmp_path):
    # Fault injection: llama_cpp made unimportable in the child (sys.modules entry set to None).
    code = ("import sys; sys.modules['llama_cpp'] = None; sys.argv = ['serve']; "
            "from sae_lens_ctx.clients.serve import main; main()")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=HANG_GUARD_S)
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr.count("\n") == 1 and 'pip install "sae-lens-ctx[llama-cpp]"' in p.stderr, p.stderr


def _judge_messages(explanation: str, example: str) -> list[dict[str, str]]:
    from sae_lens_ctx.core import prompts

    return prompts.judge_messages(explanation, example, " right")


@pytest.mark.embedded
def test_a_batch_of_one_token_requests_answers_as_one_by_one(tmp_path, client):
    """`generate_batch` (groups by shared prefix, one forward a group) against `generate` per request: the
    same answers, log-probabilities and top alternatives to 1e-4; a request too long fails in its place."""
    explanations = ["the word 'right' after 'get it'", "legal rights and the courts", "directions: left or right"]
    examples = ["We're getting it right", "the right to vote", "turn right at the light", "I hope I got it",
                "all men are created equal and endowed with rights"]
    requests = [_judge_messages(e, x) for x in examples for e in explanations]  # explanations interleaved
    requests.append([{"role": "user", "content": "word " * 5000}])
    params = {"max_tokens": 1, "temperature": 0.0, "top_logprobs": 5}
    assert client.batchable(params) and not client.batchable({"max_tokens": 2})
    batched = client.generate_batch(requests, params, workers=2)
    assert isinstance(batched[-1], LLMError) and batched[-1].reason == "context_too_long"
    for messages, got in zip(requests[:-1], batched):
        want = client.generate(messages, **params)
        assert got.text == want.text and got.completion_tokens == want.completion_tokens == 1
        assert got.prompt_tokens == want.prompt_tokens and got.finish_reason == want.finish_reason
        assert [t for t, _ in got.logprobs[0].top] == [t for t, _ in want.logprobs[0].top]
        assert np.allclose([v for _, v in got.logprobs[0].top], [v for _, v in want.logprobs[0].top], atol=1e-4)


def test_prompts_are_grouped_by_their_shared_prefix():
    from sae_lens_ctx.clients.token_batches import group_by_prefix

    system = list(range(1000, 1030))
    a, b = system + list(range(50)), system + list(range(100, 140))
    prompts = [x + [7000 + k, 7001 + k, 2] for k in range(5) for x in (a, b)]  # two explanations, interleaved
    groups = group_by_prefix(prompts)
    assert sorted(sorted(g) for g in groups) == [[0, 2, 4, 6, 8], [1, 3, 5, 7, 9]]
    small = group_by_prefix(prompts, max_rows=3)
    assert max(len(g) for g in small) == 3 and sorted(i for g in small for i in g) == list(range(10))
    assert group_by_prefix([[5], [5], [6, 1]]) in ([[0, 1], [2]], [[0, 1, 2]])  # one-token prompts: no prefix left


@pytest.mark.embedded
def test_llm_layer_batches_caches_and_computes_duplicates_once(tmp_path, client):
    from sae_lens_ctx.clients.llm import ResponseCache

    llm = LLM(client, max_concurrency=2, cache=ResponseCache(tmp_path / "c.sqlite"))
    params = {"max_tokens": 1, "temperature": 0.0, "top_logprobs": 3}
    one = _judge_messages("legal rights", "the right to vote")
    two = _judge_messages("legal rights", "turn right")
    assert llm.call(one, **params).ok  # answered one by one, cached
    results = llm.map([(one, params), (two, params), (two, params)])
    assert [r.ok for r in results] == [True] * 3 and results[0].cached and not results[1].cached
    assert results[1].response is results[2].response and results[2].cached
    assert llm.stats.backend_calls == 2 and llm.stats.cache_hits == 2  # a duplicate counts as a cache hit
    key = request_key("embedded", client.model, two, params, ENGINE)
    assert llm.cache.get(key).text == results[1].text


class _FlakyBatches:
    """Fault injection at the batch seam (a fake, named as such): a client whose `generate_batch` fails
    one request with a transient error; one by one it answers."""

    backend, model, engine = "fake-batching", "fake", "fake"

    def __init__(self):
        self.one_by_one = []

    def batchable(self, params):
        return True

    def generate_batch(self, requests, params, workers=1):
        return [LLMError("timeout", "injected", transient=True) if i == 1 else Response(text="Yes")
                for i, _ in enumerate(requests)]

    def generate(self, messages, **params):
        self.one_by_one.append(messages[0]["content"])
        return Response(text="No")


def test_a_request_the_batch_failed_is_asked_again_on_its_own():
    fake = _FlakyBatches()
    llm = LLM(fake, max_concurrency=2)
    results = llm.map([([{"role": "user", "content": c}], {"max_tokens": 1}) for c in "abc"])
    assert [r.text for r in results] == ["Yes", "No", "Yes"] and fake.one_by_one == ["b"]
    assert llm.stats.attempt_errors == {"timeout": 1} and llm.stats.ok == 3 and llm.stats.failed == 0


@pytest.mark.embedded
def test_a_shared_prefix_is_computed_once_and_answers_as_a_fresh_store():
    from sae_lens_ctx.clients.prefix_cache import BLOCK, PrefixCache

    hf, tok, _ = load_gguf_lm(make_client(ExplainConfig()).path)
    shared = [int(i) for i in torch.randint(100, 40000, (BLOCK * 2 + 10,), generator=torch.Generator().manual_seed(0))]
    a, b = shared + [11, 12, 13], shared + [21, 22]
    store = PrefixCache()
    with torch.inference_mode():
        store.prefill(hf, a)
        cache, n = store.prefill(hf, b)
        assert n == 2 * BLOCK and store.computed == 2 and store.reused == 2
        reused = hf(input_ids=torch.tensor([b[n:]]), past_key_values=cache, use_cache=True).logits[0, -1]
        fresh_cache, _ = PrefixCache().prefill(hf, b)
        fresh = hf(input_ids=torch.tensor([b[n:]]), past_key_values=fresh_cache, use_cache=True).logits[0, -1]
    assert torch.equal(reused, fresh)  # a stored block is bit for bit what computing it again gives


@pytest.mark.embedded
def test_bfloat16_answers_close_to_float32_under_its_own_cache_key(tmp_path, client):
    """`explain.embedded_precision`: 'auto' is bf16 where the CPU has it natively; the bf16 engine has its own
    cache key, and its one-token answers (the judge's) are float32's to bf16 round-off: the same greedy token
    and top alternatives' log-probabilities within 0.3 on a plain question."""
    from sae_lens_ctx.clients.llm import embedded_precision
    from sae_lens_ctx.core.threads import bf16_available

    native = bf16_available(torch.device("cpu"))
    assert embedded_precision(ExplainConfig()) == ("bfloat16" if native else "float32")
    bf16 = make_client(ExplainConfig(embedded_precision="bfloat16"))
    assert bf16.engine == ENGINE + "-bf16" and bf16.precision == "bfloat16"
    assert request_key("embedded", "m", MESSAGES, {}, bf16.engine) != request_key("embedded", "m", MESSAGES, {}, ENGINE)
    hf, _, _ = load_gguf_lm(bf16.path, "bfloat16")
    assert next(hf.parameters()).dtype == torch.bfloat16
    params = {"max_tokens": 1, "temperature": 0.0, "top_logprobs": 5}
    questions = [[{"role": "user", "content": f"Is {x} a colour? Answer Yes or No."}] for x in ("red", "a river")]
    for want, got in zip(client.generate_batch(questions, params), bf16.generate_batch(questions, params)):
        assert got.text == want.text
        w = dict(want.logprobs[0].top)
        # bf16 keeps 8 significant bits: a logit near 20 is rounded in steps of 0.125, and a forward rounds at
        # every layer; measured here 0.07 to 0.13 between the two precisions
        assert max(abs(v - w[t]) for t, v in got.logprobs[0].top if t in w) < 0.3
    r = bf16.generate(MESSAGES, max_tokens=8, temperature=0.0)
    assert r.completion_tokens > 0 and r.text.strip()
