"""Every prompt the package sends to an LLM, in one place to read and override.

* The head-explanation prompt of the paper (paper-method §5.2), with its two closings: round 1's
  completion stem and round 2's "two to three sentences" instruction.
* The Yes/No judge prompt of §5.3 (used by the scoring stage), both variants, and the unit judge
  (ours: does the neuron fire at the last token of this text?) with its unit + head variant.

Unit explanations do not live here: they reuse neuron-explainer's own prompt and parsing unchanged
(`explain/units.py`).

The paper's verbatim prompt is in its Appendix C, which is not available to us; the wording below
follows the structure recorded from the authors' code (paper-method §5.2/§5.3) part by part, in the
same order. It is our wording, not the authors' strings: both the explainer and the judge prompts differ
from the text in their code, and an LLM's explanations and answers (so E) can depend on the wording
(docs/authors-code.md). To use another wording (theirs, say), replace the template before the stage
runs, for example::

    from dataclasses import replace
    from sae_lens_ctx.explain import prompts
    prompts.HEAD_TEMPLATE = replace(prompts.HEAD_TEMPLATE, instruction="...")
    prompts.HEAD_TEMPLATE.endings["mine"] = "Say in one sentence when the head is active."  # explain.prompt_ending=mine

`heads.py` and the scorer read `prompts.HEAD_TEMPLATE` / `prompts.JUDGE_TEMPLATES` at call time.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

FENCE = '"""'
LOOKUP_OPEN, LOOKUP_CLOSE = "[[", "]]"
"""Marks around a looked-up token in a head prompt's active examples (`explain.mark_lookups`): plain
ASCII brackets that BPE and SentencePiece vocabularies keep as their own tokens."""


def flatten(text: str) -> str:
    """Newlines (and carriage returns) become spaces, as the authors did for every example."""
    return text.replace("\r\n", " ").replace("\n", " ").replace("\r", " ")


def example_line(prompt_text: str, token: str) -> str:
    """One example as shown to the explainer and the judge: the prompt with the unit's token appended
    (whatever really followed in the document, as the authors did), newlines flattened."""
    return flatten(prompt_text + token)


@dataclass
class HeadPromptTemplate:
    """The parts of the head-explanation prompt, in the order they appear (paper-method §5.2)."""

    context: str = ("We're studying attention heads in a neural network. Each head looks for some "
                    "particular thing in a short document.")
    """1. Context line."""
    head_line: str = ('This attention head helps predict that the next token is "{token}", but it is '
                      "active only in some of the documents.")
    """2. Head line; `{token}` is the unit's token."""
    instruction: str = ("Look at the documents below and explain what makes the attention head active, "
                        "taking the documents where it is inactive into account.")
    """3. Instruction."""
    active_header: str = "Documents where the attention head is active:"
    """4. Title of the active examples' fenced list."""
    inactive_header: str = "Documents where the attention head is inactive:"
    """5. Title of the inactive examples' fenced list."""
    endings: dict[str, str] = field(default_factory=lambda: {
        "round1": "Explanation: This attention head is active when the document",
        "round2": "In two to three sentences, suggest when the attention head is active.",
    })
    """6. Closing line by name (`explain.prompt_ending`): round 1's open completion stem, which the
    model continues, or round 2's instruction."""

    lookup_note: str = (f"In the active documents, the tokens the attention head looked up are marked "
                        f"{LOOKUP_OPEN}like this{LOOKUP_CLOSE}.")
    """Said after the instruction only when the active examples mark look-ups (`explain.mark_lookups`)."""

    def render(self, token: str, active: Sequence[str], inactive: Sequence[str], ending: str,
               marked: bool = False) -> str:
        """The prompt for one (unit, head) pair; `active`/`inactive` are prompt texts in display order
        (`marked`: the active ones mark looked-up tokens, and the note that says so follows the instruction)."""
        if ending not in self.endings:
            raise KeyError(f"unknown prompt ending {ending!r}: choose one of {sorted(self.endings)}")
        return "\n".join([
            self.context,
            self.head_line.format(token=token),
            self.instruction,
            *([self.lookup_note] if marked else []),
            "",
            self.active_header,
            fenced_list(example_line(t, token) for t in active),
            "",
            self.inactive_header,
            fenced_list(example_line(t, token) for t in inactive),
            "",
            self.endings[ending],
        ])


def fenced_list(lines) -> str:
    """A `\"\"\"`-fenced block with one `* example` per line."""
    return "\n".join([FENCE, *(f"* {line}" for line in lines), FENCE])


HEAD_TEMPLATE = HeadPromptTemplate()
"""The head-explanation template in use (replace it to change the wording)."""


def head_messages(token: str, active: Sequence[str], inactive: Sequence[str], ending: str,
                  marked: bool = False) -> list[dict[str, str]]:
    """The chat request of the paper: one user message, no system prompt."""
    return [{"role": "user", "content": HEAD_TEMPLATE.render(token, active, inactive, ending, marked)}]


def mark_tokens(pieces: Sequence[str], positions: set[int]) -> str:
    """The text of `pieces` (one per token, word starts as a leading space) with the pieces at `positions`
    marked between `LOOKUP_OPEN` and `LOOKUP_CLOSE`, the leading space left outside: ' [[france]]'."""
    out = []
    for i, piece in enumerate(pieces):
        if i in positions and piece.strip():
            lead = piece[: len(piece) - len(piece.lstrip())]
            piece = f"{lead}{LOOKUP_OPEN}{piece.lstrip()}{LOOKUP_CLOSE}"
        out.append(piece)
    return "".join(out)


JUDGE_TEMPLATES: dict[str, str] = {
    # Round 2: the explanation, the question, the example fenced, then "Answer: ".
    "round2": ("Here is an explanation of when an attention head is active: {explanation}\n"
               "Is the given example an active example? (Yes/No)\n"
               f"{FENCE}\n{{example}}\n{FENCE}\n"
               "Answer: "),
    # Round 1: the question first, then "The example is active when the example" + explanation.
    "round1": ("Is the given example an active example? (Yes/No)\n"
               "The example is active when the example {explanation}\n"
               f"{FENCE}\n{{example}}\n{FENCE}\n"
               "Answer: "),
}
"""The zero-shot Yes/No judge of paper-method §5.3 (one call per held-out example, max_tokens=1)."""


def judge_messages(explanation: str, prompt_text: str, token: str, variant: str = "round2") -> list[dict[str, str]]:
    """The judge's request for one held-out example: explanation flattened, token appended."""
    text = JUDGE_TEMPLATES[variant].format(explanation=flatten(explanation).strip(),
                                           example=example_line(prompt_text, token))
    return [{"role": "user", "content": text}]


UNIT_JUDGE_TEMPLATE: str = (
    "Here is an explanation of when a neuron in a language model is active: {explanation}\n"
    "Is the neuron active on the last token of the given example? (Yes/No)\n"
    f"{FENCE}\n{{example}}\n{FENCE}\n"
    "Answer: ")
"""The unit judge (beyond the paper): the unit's own explanation against one held-out prompt, shown
as it is (the unit fires at its last token; nothing is appended)."""

UNIT_AND_HEAD: str = "{unit} It is switched on by an attention head that is active when {head}"
"""How a unit explanation and one head explanation are joined for the head-versus-neuron comparison."""
