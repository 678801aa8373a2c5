"""`offline-test-llm`: a deterministic LLM backend made for the tests (a fake at the LLM seam).

Pipeline tests on planted models exercise every stage's plumbing; running them through the embedded
SmolLM2 would make them slow without testing anything more (the embedded backend has its own tests).
This backend answers instantly and deterministically:

* a Yes/No judge prompt (it holds "(Yes/No)"): Yes when the explanation's last word occurs in the
  example, with logprobs P(Yes) = 0.9 / 0.2;
* the paper's head prompt (two fenced lists, active then inactive examples): "the document mentions
  WORD", WORD the word in the most active and fewest inactive examples (a tiny contrastive explainer:
  on a planted model it names the planted head's trigger);
* any other prompt (neuron-explainer's unit prompt): "the document mentions WORD", WORD the longest
  word of the first fenced block.
"""

from __future__ import annotations

import math
import re

from sae_lens_ctx.core.llm import BACKENDS, Response, TokenLogprob, register_backend

NAME = "offline-test-llm"


class OfflineTestLLM:
    backend, model = NAME, "offline-test"

    def generate(self, messages, **params):
        text = messages[-1]["content"]
        if "(Yes/No)" in text:
            yes = keyword_says_yes(text)
            p = 0.9 if yes else 0.2
            lps = [TokenLogprob("Yes" if yes else "No", math.log(p if yes else 1 - p),
                                [("Yes", math.log(p)), ("No", math.log(1 - p))])]
            return Response(text="Yes" if yes else "No", logprobs=lps if params.get("top_logprobs") else None,
                            prompt_tokens=len(text.split()), completion_tokens=1, finish_reason="stop")
        blocks = text.split('"""')[1::2]
        if len(blocks) >= 2:
            active, inactive = (_examples(b) for b in blocks[:2])
            vocab = sorted(set().union(*active)) or ["nothing"]
            word = max(vocab, key=lambda w: (sum(w in e for e in active) - sum(w in e for e in inactive), -vocab.index(w)))
        else:
            words = re.findall(r"[a-z]+", (blocks[0] if blocks else text).lower()) or ["nothing"]
            word = max(words, key=len)
        answer = f"the document mentions {word}"
        return Response(text=answer, prompt_tokens=len(text.split()), completion_tokens=4, finish_reason="stop")


def keyword_says_yes(prompt: str) -> bool:
    """The keyword judge: Yes when the explanation's last word occurs in the fenced example."""
    explanation = re.search(r"active[^:\n]*: (.*)\n", prompt)
    word = (explanation.group(1).split() or [""])[-1].strip(".").lower() if explanation else ""
    example = prompt.split('"""')[1].lower() if prompt.count('"""') >= 2 else ""
    return bool(word) and word in example


def _examples(block: str) -> list[set[str]]:
    return [set(re.findall(r"[a-z]+", line.lower())) for line in block.splitlines() if line.startswith("* ")]


if NAME not in BACKENDS:
    register_backend(NAME, lambda cfg: OfflineTestLLM())
