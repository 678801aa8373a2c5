"""Typed records passed between stages, and their JSONL (de)serialisation.

Every file a stage writes goes through `atomic_write`: the content is written to a temporary file in
the same directory, flushed to disk and renamed over the target, so a reader (or a resumed run) never
sees a half-written file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
import os
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from .errors import UserError

if TYPE_CHECKING:
    import torch

R = TypeVar("R")


def atomic_write(path: str | os.PathLike, data: str | bytes) -> None:
    """Write `data` to `path` so that the file is either the old one or the complete new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = "wb" if isinstance(data, bytes) else "w"
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, **({} if mode == "wb" else {"encoding": "utf-8"})) as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; a results file is as readable as any other
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside `path` for a writer that wants a file name (safetensors, sqlite);
    on success it replaces `path` in one rename, on failure it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def to_json_line(record: Any) -> str:
    """One record as one JSON line (keys in field order, non-ASCII kept readable)."""
    obj = dataclasses.asdict(record) if dataclasses.is_dataclass(record) else record
    return json.dumps(obj, ensure_ascii=False, allow_nan=False)


def write_jsonl(path: str | os.PathLike, records: Iterable[Any]) -> int:
    """Write records (dataclasses or dicts) to `path` atomically; returns how many were written."""
    lines = [to_json_line(r) for r in records]
    atomic_write(path, "".join(line + "\n" for line in lines))
    return len(lines)


def iter_jsonl(path: str | os.PathLike) -> Iterator[dict]:
    """The records of a JSONL file as dicts."""
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserError(f"{path} line {number} is not valid JSON ({e.msg}): the file was edited or damaged; "
                                    "re-run the stage that writes it (`sae-lens-ctx <stage> --out DIR --force`)") from e


def read_jsonl(path: str | os.PathLike, cls: type[R]) -> list[R]:
    """The records of a JSONL file as instances of the dataclass `cls`.

    Raises `UserError` (naming the file and record) for a line that is not JSON or lacks a field of `cls`."""
    out = []
    for number, row in enumerate(iter_jsonl(path), 1):
        try:
            out.append(cls(**row))
        except TypeError as e:
            raise UserError(f"{path} record {number} is not a {cls.__name__} ({e}): the file was written by another "
                            "version or edited; re-run the stage that writes it (`sae-lens-ctx <stage> --out DIR "
                            "--force`)") from e
    return out


@dataclass(frozen=True)
class DocumentRecord:
    """One corpus document and the side of the train/test split it landed on (`documents.jsonl`)."""

    doc_id: str
    """Stable id: a hash of the document text (so the same text always gets the same id)."""
    split: str
    """'train' (mining, attribution, explanation) or 'test' (held-out scoring)."""
    source: str
    """Where the document came from: file path and line/block, or dataset name and row index."""
    n_tokens: int
    """Tokens in the document under the run's tokenizer (without BOS)."""
    n_contexts: int
    """How many token contexts of `corpus.context_size` the document was cut into."""


@dataclass(frozen=True)
class ModelRecord:
    """What was loaded and in which weight convention (`model.json`)."""

    model_name: str
    """The model as configured (`embedded`, a hub id, a directory or a GGUF path)."""
    source: str
    """Resolved source: 'embedded-gguf', 'gguf', 'hf-directory', 'hub' or 'object'."""
    model_class: str
    """The TransformerLens class behind the view ('TransformerBridge', 'HookedTransformer', ...)."""
    weights: str
    """Weight convention of every direction the run reads: 'folded' or 'raw' (see ModelView)."""
    architecture: str
    """'gelu-mlp' or 'gated-mlp'."""
    normalization: str
    """'LN' or 'RMS'."""
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_model: int
    d_head: int
    d_mlp: int
    d_vocab: int
    n_ctx: int
    """Longest context the model accepts."""
    dtype: str
    device: str
    norm_gain: str = "w"
    """How the model's norms apply their stored gain: 'w', or '1+w' (Gemma-family RMSNorm)."""
    block: str = "sequential"
    """Block layout: 'sequential', 'parallel' (attention and MLP both read resid_pre: GPT-NeoX, Phi,
    GPT-J) or 'sandwich' (attention and MLP outputs normalised before the residual add: Gemma 2/3)."""
    prepend_bos: bool | None = None
    """Whether the run put the tokenizer's BOS in front of every context (`corpus.prepend_bos`)."""
    bos_token: str | None = None
    """The tokenizer's own BOS token, or None where it has none (a BOS the loading library substituted,
    such as EOS, counts as none)."""


@dataclass(frozen=True)
class ContextRecord:
    """One prompt of one unit (a line of `contexts.jsonl`), as mining wrote it.

    A prompt is a suffix of one token context that ends at (and includes) the token where the unit
    fires: the unit predicts the token after it. Token-level activations of the prompt live in
    `context_acts.safetensors` under the key `row{line_number}` (line numbers from 0).
    """

    unit_id: str
    split: str
    """'train' (explanation and attribution) or 'test' (held-out scoring)."""
    kind: str
    """'top' (a top-activating context), 'low' (a low-activating one, held-out negatives) or
    'random' (a random context, as neuron-explainer wants beside the top ones)."""
    rank: int
    """0-based rank within (unit, split, kind): by activation for 'top' (descending) and 'low'
    (ascending), by draw order for 'random'."""
    doc_id: str
    context_index: int
    """Which token context of the document (`TokenContext.index`)."""
    start: int
    """Document token offset of the prompt's first token (after trimming)."""
    end: int
    """Document token offset just past the prompt's last token (the max-activation token)."""
    text: str
    """The prompt as text (the trimmed token span decoded)."""
    tokens: list[int]
    """The prompt's token ids (no BOS)."""
    activation: float
    """The unit's activation at the prompt's last token in the untrimmed context."""
    trimmed_activation: float
    """The unit's activation at the last token of the trimmed prompt (run with BOS when configured)."""
    next_token_id: int | None
    """The token that actually followed in the document (None at the document's end)."""
    next_token: str | None


@dataclass(frozen=True)
class HeadRecord:
    """One (unit, upstream head) pair (a line of `heads.jsonl`), relevant or not.

    `active_fraction` is over the unit's train 'top' prompts; the `*_ranks` lists hold the `rank`s of
    the unit's 'top' prompts (see `ContextRecord`) on which the head is active / inactive, per split:
    the explainer shows train ones, the judge is scored against the test ones.
    """

    unit_id: str
    head: str
    """`L{layer}H{head}`."""
    layer: int
    head_index: int
    active_fraction: float
    mean_attribution: float
    """Mean direct attribution of the head to the unit's pre-activation over the train prompts."""
    relevant: bool
    """Active on a fraction of train prompts inside the configured band (paper: 25 %–75 %)."""
    active_train_ranks: list[int]
    inactive_train_ranks: list[int]
    active_test_ranks: list[int]
    inactive_test_ranks: list[int]
    ablation_effect: float | None = None
    """Mean drop of the unit's token probability when the head is ablated, on test prompts where it is
    active, minus the same on prompts where it is inactive (None when not measured)."""
    ablation_pvalue: float | None = None
    """Two-sample KS test p-value of active vs inactive drops (None when not measured)."""
    prob_drop_active: float | None = None
    """Mean drop of the unit's token probability under ablation, on test prompts where the head is active."""
    prob_drop_inactive: float | None = None
    """The same on test prompts where the head is inactive."""
    act_drop_active: float | None = None
    """Mean drop of the unit's activation under ablation, on test prompts where the head is active."""
    act_drop_inactive: float | None = None
    """The same on test prompts where the head is inactive."""
    branch: str = "in"
    """Which branch's attributions ranked heads ('in', 'gate', 'up' or 'latent')."""
    branch_mean_attribution: dict[str, float] = field(default_factory=dict)
    """Mean attribution per branch (gated neurons have 'gate' and 'up')."""


@dataclass(frozen=True)
class HeadTokensRecord:
    """A relevant head's direct attribution to its unit at every token of one held-out window (a line of
    `head_tokens.jsonl`): what the head's explanations are simulated against, token by token (issue #26,
    docs/simulation.md)."""

    unit_id: str
    head: str
    line: int
    """Line number (from 0) of the window in `windows.jsonl`."""
    kind: str
    """The window's kind: 'top' or 'random'."""
    rank: int
    attributions: list[float]
    """`A[h]` at each token of the window (its `windows.jsonl` tokens, BOS excluded): the head's direct
    contribution to the unit's pre-activation at that position, in the rank branch and divided by the norm
    scale there, exactly as the paper's quantity at the last position (`stages/attribute/direct.py`)."""


@dataclass(frozen=True)
class ExplanationRecord:
    """One explanation (a line of `explanations.jsonl`): of a (unit, head) pair, or of the unit itself.

    A failed call is recorded with `status` 'failed', its `error` and `text` None: it is never turned
    into an explanation. Lines hold nothing run-specific (no timings, no cache flags), so a re-run
    from the cache writes the same file.
    """

    unit_id: str
    head: str | None
    """`L{layer}H{head}`, or None for the unit's own explanation."""
    explainer: str
    """'paper-round1' / 'paper-round2' (the paper's head prompt with that closing line) or
    'neuron-explainer' (TokenActivationPairExplainer on the unit's token-activation pairs)."""
    text: str | None
    """The explanation as the LLM wrote it (whitespace stripped; neuron-explainer's: what follows
    "the main thing this neuron does is find"); None when failed."""
    status: str
    """'ok', 'failed' (the call failed, or the prompt cannot fit the window) or 'skipped' (nothing to
    show the explainer: no examples)."""
    error: str | None
    """Why it failed or was skipped ('reason: detail'), None when ok."""
    backend: str
    model: str
    prompt_hash: str
    """First 16 hex digits of sha256 over the messages sent ('' when nothing was sent)."""
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float | None
    """From the price table (0 in-process); None when the model has no price."""
    finish_reason: str | None = None
    """'stop', or 'length' when the explanation was cut off at max_tokens."""
    n_active: int = 0
    """Active examples shown (head explanations) or top records shown (unit explanations)."""
    n_inactive: int = 0
    """Inactive examples shown (head explanations) or random records shown (unit explanations)."""
    n_dropped: int = 0
    """Examples left out so that the prompt fits the explainer's context window."""
    pattern: dict | None = None
    """The structured pattern a deterministic explanation states (explainer 'lookup', `lookups.py`): its
    tokens with their ids and train counts, which the deterministic judge simulates; None for LLM text."""


@dataclass(frozen=True)
class ScoreRecord:
    """One score (a line of `scores.jsonl`): of a (unit, head) pair's explanation, or of a unit's.

    Scorers: 'E' (balanced accuracy of the Yes/No judge on head activity, the paper's score) and
    'auroc' (from the judge's P(Yes)) per pair; 'shuffled_E' / 'shuffled_auroc' (the same prompts
    judged with another pair's explanation); 'unit_E', 'unit_auroc' (the unit's own explanation on
    its held-out top vs low prompts) and 'unit_sim_correlation' (simulate-and-score) per unit;
    'unit_plus_head_E' / 'unit_plus_head_auroc' (the unit's explanation joined with one head's);
    'sim_ev_correlation', 'sim_rsquared', 'sim_absolute_dev_explained' per unit: OpenAI's per-token
    simulate-and-score (its `target`, `metric` and `tier` fields say what was simulated and how).
    """

    unit_id: str
    head: str | None
    """`L{layer}H{head}`, or None for a unit's own scores."""
    scorer: str
    value: float | None
    """None when the score is undefined (see `skipped`): never a silent 0 or 0.5."""
    ci_low: float | None
    """Bootstrap interval over the prompts (score.confidence); None when too few prompts."""
    ci_high: float | None
    n: int
    """Judgements the value rests on."""
    control: bool = False
    """The unit is a random control unit (discovery's controls)."""
    n_positive: int = 0
    n_negative: int = 0
    n_parsed: int = 0
    n_unparsed: int = 0
    """Replies with no Yes/No: counted, never scored."""
    n_failed: int = 0
    """Judge calls that failed: counted, never scored."""
    skipped: str | None = None
    """Why `value` is None ('one class only', 'no logprobs from the judge', ...)."""
    explainer: str = ""
    """The `explainer` of the scored explanation ('paper-round1', 'paper-round2', 'neuron-explainer', 'lookup'), or,
    for a confound control that scores no explanation, the control's name ('length', 'token')."""
    control_kind: str | None = None
    """None for a real score; for a control: 'random_unit', 'shuffled', 'length' or 'token'."""
    target: str | None = None
    """What a per-token simulation score predicts: 'unit' (the unit's activation at every token of held-out
    sequences); None for the judge's scores (docs/simulation.md)."""
    metric: str | None = None
    """A simulation score's metric, neuron-explainer's: 'ev_correlation', 'rsquared' or 'absolute_dev_explained'."""
    tier: str | None = None
    """How a simulation score's predictions were made: 'prompt-logprobs' (OpenAI's all-at-once simulator,
    exact), 'token-by-token', 'logprob-free' or 'deterministic' (a look-up pattern or a confound control,
    no LLM). Scores of different tiers are never pooled."""
    n_tokens: int = 0
    """Tokens a simulation score rests on (`n` counts its sequences)."""
    failures: dict[str, int] | None = None
    """A simulation score's failed sequences (and tokens neuron-explainer could not predict) by reason."""


CONFOUND_CONTROLS = ("length", "token")
"""`ScoreRecord.control_kind`s of the confound controls (a length-only and a unit-token-present judge): scored
beside the real scores under the same scorer names, reported against them, never aggregated with them."""


# -- units -----------------------------------------------------------------------------------------

_NEURON_ID = re.compile(r"^L(\d+)N(\d+)$")

OBJECT_PREFIX = "object:"
"""`discover.saes` entries of SAEs passed as Python objects (the API), not loaded from a path or registry."""


def neuron_id(layer: int, index: int) -> str:
    return f"L{layer}N{index}"


def parse_neuron_id(unit_id: str) -> tuple[int, int] | None:
    m = _NEURON_ID.match(unit_id)
    return (int(m.group(1)), int(m.group(2))) if m else None


@dataclass(frozen=True)
class UnitRecord:
    """One next-token unit (a line of `units.jsonl`)."""

    unit_id: str
    """`L{layer}N{index}` for a neuron, `{sae_id}:{index}` for an SAE latent."""
    kind: str
    """'neuron' or 'sae_latent'."""
    layer: int
    """Layer of the unit's hook (an SAE's layer is parsed from its hook name)."""
    index: int
    """Neuron index in the MLP, or latent index in the SAE."""
    hook_name: str
    """TransformerLens hook whose activation is the unit's (`blocks.L.mlp.hook_post` for neurons)."""
    token_id: int
    """The token the unit writes most strongly: argmax (promote) or argmin (suppress) of write · W_U."""
    token: str
    """`token_id` decoded."""
    congruence: float
    """write · W_U at `token_id` (negative for suppression units)."""
    control: bool
    """A random unit drawn as a control (the paper's random-neuron baseline), not a selected one."""
    direction: str
    """'promote' or 'suppress': which end of the distribution `token` comes from."""
    rank_in_layer: int
    """Rank of the unit's congruence among all units of its layer (or SAE), 1 = strongest."""
    top_tokens: list[list[Any]] = field(default_factory=list)
    """Five strongest [token, value] pairs in the unit's direction."""
    min_token: str = ""
    """The most suppressed token (the other end of the distribution)."""
    min_value: float = 0.0
    kurtosis: float = 0.0
    """Excess kurtosis of write · W_U over the vocabulary (prediction units are heavy-tailed)."""
    skew: float = 0.0
    """Skew of write · W_U over the vocabulary (positive: prediction; negative: suppression)."""
    sae_id: str | None = None
    """For SAE latents: the SAE's id (`release/sae_id`, or the directory name for a local SAE)."""
    sae_release: str | None = None
    """For SAE latents: the SAE-Lens release the SAE came from (its metadata's `release`), when known."""
    neuronpedia_id: str | None = None
    """For SAE latents: the SAE's Neuronpedia id (`model/source`, its metadata's `neuronpedia_id`), when known."""


# -- tensors -------------------------------------------------------------------------------------


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Named tensors as safetensors, written to a temporary file and renamed over `path` (never half-written).

    Each tensor is detached, moved to the CPU and made contiguous, so views that share memory are saved as
    their own copies."""
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}, str(tmp), metadata=metadata)


def load_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and the string metadata of a safetensors file written by `save_tensors`."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
