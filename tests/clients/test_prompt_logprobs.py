"""Prompt logprobs (core.llm.PromptLogprobs) and OpenAI's all-at-once simulator on every backend tier: the
in-process embedded model against a by-hand expected value over one plain forward, a loopback server speaking
vLLM's completions-echo answer backed by the same model, a chat-only server (the probe's fallback), and the bad
inputs (misaligned echo tokens, a server that stops giving logprobs, tab and newline tokens, an empty
explanation)."""

from __future__ import annotations

import asyncio
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from sae_lens_ctx.clients.llm import LLM, make_client
from sae_lens_ctx.clients.local_hf import TransformersClient, load_gguf_lm
from sae_lens_ctx.clients.neuron_explainer import NeuronExplainerClient
from sae_lens_ctx.core.config import ExplainConfig, ScoreConfig
from sae_lens_ctx.core.llm import PromptLogprobs
from sae_lens_ctx.stages.score.simulation import (UNPREDICTED, SimSequence, llm_simulator, probe_tier, simulate,
                                                   simulation_scores)

from llm_servers import EchoCompletionsServer

EXPLANATION = "the word cat and words about animals"
TOKENS = [" The", " cat", " sat", " on", " the", " warm", " mat", " with", " a", " dog", "."]
ACTS = [0.0, 3.0, 0.2, 0.0, 0.0, 0.1, 0.4, 0.0, 0.0, 2.5, 0.0]


@pytest.fixture(scope="module")
def embedded():
    c = make_client(ExplainConfig(embedded_precision="float32"))  # compared with a plain fp32 forward (1e-5)
    assert isinstance(c, TransformersClient)
    return c


@pytest.fixture(scope="module")
def server(embedded):
    s = EchoCompletionsServer(lambda prompt, k: embedded.prompt_logprobs([prompt], k)[0], stop_after=1)
    yield s
    s.stop()


def _llm(server, model):
    return LLM(make_client(ExplainConfig(backend="openai-compatible", base_url=server.base_url, model=model,
                                         max_retries=0)))


def _simulate(llm, tokens=TOKENS, explanation=EXPLANATION):
    return asyncio.run(llm_simulator("prompt-logprobs", explanation, NeuronExplainerClient(llm)).simulate(tokens))


def by_hand_expected_values(embedded, tokens) -> list[float]:
    """neuron-explainer's expected value at every "unknown" position of the simulation prompt, computed here from
    one plain transformers forward over the whole prompt: the probabilities of the tokens "0".."10" among the 15
    most likely at the position before it, normalised over those digits, times their values."""
    hf, tok, _ = load_gguf_lm(embedded.path)
    prompt = llm_simulator("prompt-logprobs", EXPLANATION, None).make_simulation_prompt(tokens)
    enc = tok(prompt, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"]
    pieces = [tok.decode([i]) for i in ids]
    start = prompt.rfind("<start>")
    with torch.inference_mode():
        logprobs = torch.log_softmax(hf(input_ids=torch.tensor([ids])).logits[0].double(), dim=-1)
    digit_ids = {d: tok(str(d), add_special_tokens=False)["input_ids"] for d in range(11)}
    out = []
    for i in range(1, len(ids)):
        if enc["offset_mapping"][i][0] >= start and pieces[i] == "unknown" and pieces[i - 1] == "\t":
            top = set(logprobs[i - 1].topk(15).indices.tolist())
            p = {d: math.exp(float(logprobs[i - 1, t[0]])) for d, t in digit_ids.items() if len(t) == 1 and t[0] in top}
            out.append(sum(d * q for d, q in p.items()) / sum(p.values()) if p else 0.0)
    return out


@pytest.mark.embedded
def test_in_process_expected_values_equal_a_by_hand_forward(embedded):
    llm = LLM(embedded)
    sim = _simulate(llm)
    expected = by_hand_expected_values(embedded, TOKENS)
    assert len(expected) == len(TOKENS) == len(sim.expected_activations)
    np.testing.assert_allclose(sim.expected_activations, expected, atol=1e-5, rtol=0)
    assert sim.tokens == TOKENS and max(expected) > 0  # a real distribution, not all-zero


@pytest.mark.embedded
def test_prompt_logprobs_in_one_call_share_their_opening_and_agree_with_one_by_one(embedded):
    """Prompts that share an opening are computed together (the opening once): the same tokens and offsets,
    log-probabilities within 1e-4 of each prompt alone (rows of one batched forward); alternatives only from
    the offset asked for."""
    prompts = [llm_simulator("prompt-logprobs", EXPLANATION, None).make_simulation_prompt(TOKENS[k:]) for k in (0, 3)]
    offsets = [p.rfind("<start>") for p in prompts]
    together = embedded.prompt_logprobs(prompts, 5, offsets)
    for prompt, offset, got in zip(prompts, offsets, together):
        [alone] = embedded.prompt_logprobs([prompt], 5, [offset])
        assert isinstance(got, PromptLogprobs) and got.tokens == alone.tokens and got.text_offset == alone.text_offset
        first = next(i for i, o in enumerate(got.text_offset) if o >= offset)
        assert all(t is None for t in got.top_logprobs[:first]) and all(got.top_logprobs[first:])
        for a, b in zip(got.top_logprobs[first:], alone.top_logprobs[first:]):
            assert a.keys() == b.keys() or len(a.keys() & b.keys()) >= 4
            assert max(abs(a[k] - b[k]) for k in a.keys() & b.keys()) < 1e-4


@pytest.mark.embedded
def test_a_vllm_echo_server_gives_the_in_process_expected_values(embedded, server):
    """The server tier (`/v1/completions` with echo, as vLLM answers it) backed by the same model: the same
    expected activations as in-process (1e-4); the probe picks the prompt-logprobs tier."""
    llm = _llm(server, "echo")
    assert probe_tier(llm)[0] == "prompt-logprobs"
    [request] = [r for r in server.requests if r.get("prompt") is not None][-1:]
    assert request["echo"] is True and request["max_tokens"] == 0 and request["logprobs"] == 2
    remote = _simulate(llm)
    local = _simulate(LLM(embedded))
    np.testing.assert_allclose(remote.expected_activations, local.expected_activations, atol=1e-4, rtol=0)


def _inputs(explanation: str):
    """A score stage's inputs made for these tests: one unit with an LLM explanation and no look-up pattern."""
    unit = SimpleNamespace(control=False, token_id=0)
    e = SimpleNamespace(text=explanation, status="ok", explainer="neuron-explainer")
    return SimpleNamespace(units={"L1N1": unit}, unit_explanations={"L1N1": e}, lookup_explanations={})


def _sequences():
    return {"L1N1": [SimSequence("top", r, TOKENS[: 6 + r], list(range(6 + r)), ACTS[: 6 + r]) for r in range(3)]}


@pytest.mark.embedded
def test_a_chat_only_server_makes_the_probe_fall_back_and_the_records_say_which(server):
    llm = _llm(server, "chat-only")
    tier, why = probe_tier(llm)
    assert tier == "token-by-token" and "no prompt logprobs" in why
    run = simulation_scores(llm, tier, _inputs(EXPLANATION), _sequences(), ScoreConfig(shuffled_control=False), 0,
                            partner=lambda units: {})
    [ev] = [s for s in run.scores if s.metric == "ev_correlation" and s.explainer == "neuron-explainer"]
    assert ev.tier == "token-by-token" and ev.n == 3 and ev.value is not None and ev.n_tokens == 6 + 7 + 8
    assert run.info["tier"] == "token-by-token"
    too_long = simulate(llm_simulator(tier, EXPLANATION, NeuronExplainerClient(llm)), _sequences()["L1N1"], tier,
                        max_calls=6)
    assert too_long.failures == {"longer than score.simulation_max_calls_per_sequence": 2}


@pytest.mark.embedded
def test_bad_echo_answers_and_explanations_are_counted_never_nan_never_a_crash(server, embedded):
    seqs = _sequences()["L1N1"]
    misaligned = simulate(llm_simulator("prompt-logprobs", EXPLANATION, NeuronExplainerClient(_llm(server, "echo-misaligned"))),
                          seqs, "prompt-logprobs")
    assert misaligned.values["ev_correlation"] is None and sum(misaligned.failures.values()) == 3
    assert all("misaligned" in reason for reason in misaligned.failures)
    # the server answers the first request (the probe's) with logprobs, then stops giving them
    stops = _llm(server, "echo-stops")
    assert probe_tier(stops)[0] == "prompt-logprobs"
    stopped = simulate(llm_simulator("prompt-logprobs", EXPLANATION, NeuronExplainerClient(stops)), seqs,
                       "prompt-logprobs")
    assert stopped.failures == {"call failed: no_prompt_logprobs": 3} and stopped.skipped.startswith("no sequence")
    empty = simulation_scores(LLM(embedded), "prompt-logprobs", _inputs("  "), _sequences(), ScoreConfig(), 0,
                              partner=lambda units: {})
    [ev] = [s for s in empty.scores if s.metric == "ev_correlation" and s.explainer == "neuron-explainer"]
    assert ev.value is None and ev.skipped == "empty explanation" and ev.failures == {"empty explanation": 3}
    # a tab and a newline token: neuron-explainer folds them into the line break and predicts 0 there; counted
    odd = [SimSequence("top", 0, [" The", "\t", " cat", "\n", " sat", " on"], list(range(6)), [0, 1, 3, 0, 1, 0])]
    folded = simulate(llm_simulator("prompt-logprobs", EXPLANATION, NeuronExplainerClient(LLM(embedded))), odd,
                      "prompt-logprobs")
    assert folded.failures == {UNPREDICTED: 2} and folded.values["ev_correlation"] is not None
    assert all(np.isfinite(v) for v in folded.values.values() if v is not None)


@pytest.mark.embedded
def test_llama_cpp_in_process_prompt_logprobs_simulate_like_transformers(embedded):
    """The llama-cpp backend (the optional extra; CI installs it) on the same GGUF: its prompt logprobs serve the
    all-at-once simulator, the same tokens and expected values close to the transformers tier (another engine
    with its own kernels: within 0.2; 0.11 at most when this was written)."""
    pytest.importorskip("llama_cpp")
    from sae_lens_ctx.core.embedded import embedded_gguf_path

    llm = LLM(make_client(ExplainConfig(backend="llama-cpp", model=str(embedded_gguf_path()))))
    assert probe_tier(llm)[0] == "prompt-logprobs"
    theirs, ours = _simulate(llm), _simulate(LLM(embedded))
    assert theirs.tokens == ours.tokens == TOKENS
    np.testing.assert_allclose(theirs.expected_activations, ours.expected_activations, atol=0.2, rtol=0)
