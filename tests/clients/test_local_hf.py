"""The embedded LLM through transformers (sae_lens_ctx/explain/local_hf.py), on the real embedded SmolLM2:
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
from sae_lens_ctx.core.llm import request_key
from sae_lens_ctx.clients.local_hf import ENGINE, TransformersClient, load_gguf_lm

# A hang guard, not a timing assertion: many times what the subprocess takes even on a busy 2-core machine
# (where a bare `sae-lens-ctx --help` once took a minute), so only a hang fails the test.
HANG_GUARD_S = 1800

MESSAGES = [{"role": "user", "content": "Name three rivers."}]


@pytest.fixture(scope="module")
def client():
    c = make_client(ExplainConfig())
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
