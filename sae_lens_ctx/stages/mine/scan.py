"""Mine contexts: one streaming scan per split serves every unit; batched trimming; held-out negatives.

The scan (`scan`) runs the contexts of one split through the model in batches, with hooks only on
the layers that hold units and the forward stopped after the last of them (`UnitReader`). For every
unit it reduces each context on the device to its max activation and that position, and merges them
into running top-k tensors (`TopK`), batch by batch: nothing grows with the corpus, only with
units × k × context size. Ties are broken by corpus order, so the result does not depend on how
contexts were batched and equals a brute-force sort of every context's max, up to float round-off:
values equal in exact arithmetic (contexts sharing a prefix) can differ by ~1e-7 between batch shapes
(padding length changes the kernels' summation order), and such near-ties are ordered by that
round-off. Batches are formed deterministically, so a rerun gives identical bits. The scan saves its
tracks every `checkpoint_every` batches; a killed scan resumes from there and ends with exactly the
uninterrupted result.

Per split it keeps these tracks (each context at most once per track):

* train: `top` (`mine.top_k`, the paper's max-activating contexts) and `random` (`mine.n_random`);
* test: `top` and `random`, `mine.n_test_prompts` each, and the negatives' candidates: `low` (the
  `n_test_prompts` lowest-max contexts) and `pool` (`POOL_FACTOR × n_test_prompts` random contexts).

A *random* context is one of the unit's `n` contexts with the smallest pseudo-random key
`hash(seed, doc_id, context index, unit_id)` (the `pool` track salts it with its name, so its sample
is drawn independently): a seeded uniform sample, independent of reading order.

Prompts (the paper §3): a top prompt is its context's text from after BOS up to and including the
max-activation token (the unit fires there and predicts the next token), then trimmed (`trim.py`) to
the shortest suffix keeping `trim_ratio` of the activation; prompts still `max_prompt_tokens` long
are dropped. Only positions after BOS count for the max. A random prompt ends at its context's last
token (cut to fewer than `max_prompt_tokens` tokens, never trimmed). The held-out negatives ('low'
prompts) are matched to the held-out positives one by one: same token length, from other documents,
ending where the unit does not fire (`negatives.py`); `mine.json` records each class's lengths. A unit "fires" in a context when its max there is above 0; a unit that fires
nowhere on the train side is recorded in `mine.json` and the summary, not an error.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from ...core.progress import tqdm  # a bar on a terminal, progress lines in a log

from ...core.digest import digest
from ...core.errors import UserError
from ...core.records import ContextRecord, UnitRecord, load_tensors, save_tensors
from ...inputs.corpus import SPLITS, TokenContext
from ...inputs.view import ModelView, pad_batch, pad_id
from ...inputs.sae import SaeSource
from .trim import Prompt
from ...inputs.tokens import token_strings
from .negatives import match_negatives

log = logging.getLogger(__name__)

EMPTY = 2**62
"""Context index of an empty slot (sorts after every real context among equal values)."""
SORT_WINDOW = 8
"""Batches whose contexts are sorted by length together (less padding; checkpoints fall between)."""
POOL_FACTOR = 4
"""The test split's `pool` track (candidate contexts for matched negatives) holds this many times
`mine.n_test_prompts` random contexts per unit."""
RANDOM_TRACKS = ("random", "pool")
"""Tracks ranked by a seeded random key, not by activation."""
NEGATIVE_POOLS = ("low", "pool")
"""Tracks whose contexts are candidates for matched negatives, never prompts themselves."""

# -- reading the units' activations -------------------------------------------------------------


class UnitReader:
    """`reader(tokens)` → every unit's activation `[batch, pos, unit]` (float32) from one forward.

    Hooks only the layers that hold units (neurons: `mlp_post` of their layer; SAE latents: the SAE's
    hook, encoded on the fly, `hook_z` flattened over heads), keeps only the units' columns, and
    stops the forward as soon as the last of those hooks has fired (`run_until_hooks`). Results are
    keyed by the hook each closure was registered for, never by `hook.name` (the Bridge reports
    canonical names).
    """

    def __init__(self, view: ModelView, units: Sequence[UnitRecord], saes: dict[str, SaeSource] | None = None,
                 compile: bool = False):
        saes = saes or {}
        self.view, self.unit_ids, self.n_units = view, [u.unit_id for u in units], len(units)
        groups: dict[tuple[str, str | None], tuple[list[int], list[int]]] = {}
        layers = []
        for col, u in enumerate(units):
            if u.kind == "neuron":
                hook, sae_id = view.hook_name("mlp_post", u.layer), None
                if not 0 <= u.index < view.d_mlp:
                    raise UserError(f"unit {u.unit_id}: neuron {u.index} does not exist (d_mlp={view.d_mlp})")
                layers.append(u.layer)
            else:
                if u.sae_id not in saes:
                    raise UserError(f"unit {u.unit_id} is a latent of SAE '{u.sae_id}', which discover.saes "
                                    "does not list: add the SAE there or re-run discover")
                hook, sae_id = saes[u.sae_id].hook_name, u.sae_id
                layers.append(saes[u.sae_id].layer)
            index, cols = groups.setdefault((hook, sae_id), ([], []))
            index.append(u.index)
            cols.append(col)
        dev = view.device
        self._hooks: dict[str, list] = {}
        for (hook, sae_id), (index, cols) in groups.items():
            self._hooks.setdefault(hook, []).append(
                (saes.get(sae_id) if sae_id else None, torch.tensor(index, device=dev), torch.tensor(cols, device=dev)))
        self.stop_at_layer = max(layers, default=-1) + 1
        """The first layer the forward never reaches (it stops inside the layer before)."""
        self._compiled = torch.compile(self._read, dynamic=True) if compile else None
        self.compile_error: str | None = None
        """Why `torch.compile` failed on this model, when it did (the reader then runs eagerly)."""

    @property
    def hook_names(self) -> list[str]:
        return list(self._hooks)

    @torch.inference_mode()
    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        if self._compiled is not None:
            try:
                return self._compiled(tokens)
            except Exception as e:  # torch.compile does not handle every model (HookedTransformer's numpy attn_scale)
                self._compiled, self.compile_error = None, f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                log.warning("mine.compile: torch.compile failed on this model (%s); scanning eagerly",
                            self.compile_error)
        return self._read(tokens)

    def _read(self, tokens: torch.Tensor) -> torch.Tensor:
        out = torch.full((*tokens.shape, self.n_units), float("nan"), device=self.view.device)

        def make(name: str):
            def fn(act: torch.Tensor, hook) -> None:
                for sae, index, cols in self._hooks[name]:
                    vals = act[..., index] if sae is None else _encode(sae, act)[..., index]
                    out[..., cols] = vals.float()
            return fn

        run_until_hooks(self.view, tokens, [(name, make(name)) for name in self._hooks])
        return out


class _AllHooksFired(Exception):
    """Raised by the last hook to end the forward there (nothing after it is needed)."""


def run_until_hooks(view: ModelView, tokens: torch.Tensor, hooks: list[tuple[str, Callable]]) -> None:
    """Run the forward until every hook in `hooks` has fired once, then stop it: the rest of the last
    hooked layer, the final norm and the unembedding are skipped (`stop_at_layer` alone cannot skip the
    unembedding when the last hooked layer is the model's last; the Bridge's HF model computes logits
    even for `return_type=None`). Hooks are removed by TransformerLens's own `finally`."""
    pending = {name for name, _ in hooks}

    def wrap(name: str, fn: Callable) -> Callable:
        def wrapped(act: torch.Tensor, hook) -> None:
            fn(act, hook)
            pending.discard(name)
            if not pending:
                raise _AllHooksFired
        return wrapped

    try:
        view.run_with_hooks(tokens, [(name, wrap(name, fn)) for name, fn in hooks])
    except _AllHooksFired:
        return
    raise RuntimeError(f"hooks {sorted(pending)} never fired")


def _encode(sae: SaeSource, act: torch.Tensor) -> torch.Tensor:
    x = act.flatten(-2) if sae.hook_kind == "attn.hook_z" else act
    return sae.sae.encode(x.to(sae.sae.W_enc.dtype))


# -- running top-k ------------------------------------------------------------------------------


@dataclass
class TopK:
    """The k best contexts so far for every unit (`largest`: by max activation; else smallest first)."""

    values: torch.Tensor
    """`[U, k]` float64: the context's max activation (`top`, `low`) or its random key (`random`)."""
    index: torch.Tensor
    """`[U, k]` int64: the context's index in its split (`EMPTY`: slot not filled)."""
    pos: torch.Tensor
    """`[U, k]` int64: position of the context's max activation (BOS included in the count)."""
    rows: torch.Tensor
    """`[U, k, W]` float32: the unit's activation at every position of the context (NaN past its end)."""
    largest: bool

    @classmethod
    def empty(cls, n_units: int, k: int, width: int, largest: bool, device=None) -> TopK:
        fill = -torch.inf if largest else torch.inf
        return cls(torch.full((n_units, k), fill, dtype=torch.float64, device=device),
                   torch.full((n_units, k), EMPTY, dtype=torch.long, device=device),
                   torch.zeros((n_units, k), dtype=torch.long, device=device),
                   torch.full((n_units, k, width), float("nan"), device=device), largest)

    def merge(self, values: torch.Tensor, index: torch.Tensor, pos: torch.Tensor, rows: torch.Tensor) -> TopK:
        """Keep the k best of the track and a batch (`[U, B]`, rows `[U, B, W]`): by value, then corpus order."""
        k = self.values.shape[1]
        v, i = torch.cat([self.values, values], 1), torch.cat([self.index, index], 1)
        by_index = torch.argsort(i, dim=1, stable=True)
        by_value = torch.argsort(v.gather(1, by_index), dim=1, descending=self.largest, stable=True)
        order = by_index.gather(1, by_value)[:, :k]
        r = torch.cat([self.rows, rows], 1)
        return TopK(v.gather(1, order), i.gather(1, order), torch.cat([self.pos, pos], 1).gather(1, order),
                     r.gather(1, order[..., None].expand(-1, -1, r.shape[2])), self.largest)

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        return {f"{prefix}.{f}": getattr(self, f).cpu().contiguous() for f in ("values", "index", "pos", "rows")}

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor], prefix: str, largest: bool, device=None) -> TopK:
        return cls(*(t[f"{prefix}.{f}"].to(device) for f in ("values", "index", "pos", "rows")), largest)


def _splitmix(x: np.ndarray) -> np.ndarray:
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _hash64(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")


def random_keys(seed: int, contexts: Sequence[TokenContext], unit_ids: Sequence[str],
                track: str = "random") -> np.ndarray:
    """`[U, B]` uniform keys in [0, 1) per (unit, context); the `n` smallest are a unit's random sample.

    Each track draws its own keys (`track` is hashed in; the 'random' track's are the unsalted ones), so
    the negatives' `pool` is a sample independent of the `random` prompts, not a superset of them."""
    salt = "" if track == "random" else f"{track}\x00"
    base = np.array([_hash64(f"{salt}{seed}\x00{c.doc_id}\x00{c.index}") for c in contexts], dtype=np.uint64)
    salts = np.array([_hash64(u) for u in unit_ids], dtype=np.uint64)
    return (_splitmix(salts[:, None] ^ base[None, :]) >> np.uint64(11)).astype(np.float64) / 2.0**53


# -- the scan -----------------------------------------------------------------------------------


@dataclass
class ScanResult:
    """A split's tracks (on the CPU) and what the scan cost."""

    tracks: dict[str, TopK]
    n_contexts: int
    n_tokens: int
    """Tokens in the split's contexts (BOS included)."""
    n_skipped: int
    """Contexts with no token to score (nothing after BOS): skipped."""
    seconds: float
    """Scan time in this process (a resumed scan counts only what it scanned itself)."""
    tokens_scanned: int
    """Tokens this process scanned (fewer than `n_tokens` after a resume)."""
    resumed_at: int = 0
    """Contexts already done in the checkpoint it resumed from (0: a fresh scan)."""
    identity: str = ""
    """What the result depends on (`scan_identity`); shards of one scan share it (`shard.py`)."""
    precision: str = "float32"
    """'bfloat16' where candidates were scanned in bf16 and the survivors recomputed in fp32 (`precision.py`)."""
    n_units_rescanned: int = 0
    """bf16 scans: units whose candidates came within the bf16 margin of the k-th, rescanned in fp32."""
    n_recomputed: int = 0
    """bf16 scans: candidate contexts run again in fp32."""

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_scanned / self.seconds if self.seconds > 0 else 0.0


def batches(contexts: Sequence[TokenContext], batch_size: int, window: int = SORT_WINDOW,
            begin: int = 0, shard: tuple[int, int] = (0, 1)) -> Iterator[tuple[list[int], int | None]]:
    """(context indices, contexts done after this batch or None): each window of `window` batches is
    sorted longest first; the second item is set on a window's last batch (where checkpoints go).
    With `shard=(i, n)` only the windows whose number is i modulo n (`shard.py`): every batch is the
    one the unsharded scan forms, so the shards' values are bit-identical to it."""
    size = batch_size * window
    for w0 in range(begin, len(contexts), size):
        if (w0 // size) % shard[1] != shard[0]:
            continue
        w1 = min(w0 + size, len(contexts))
        order = sorted(range(w0, w1), key=lambda i: -len(contexts[i].tokens))
        for b0 in range(0, len(order), batch_size):
            yield order[b0:b0 + batch_size], (w1 if b0 + batch_size >= len(order) else None)


@torch.inference_mode()
def scan(reader: UnitReader, contexts: Sequence[TokenContext], tracks: dict[str, int], *, bos: int = 1,
         seed: int = 0, batch_size: int = 32, window: int = SORT_WINDOW, checkpoint: Path | None = None,
         checkpoint_every: int = 50, identity: str = "", on_batch: Callable[[int], None] | None = None,
         desc: str = "mine", shard: tuple[int, int] = (0, 1)) -> ScanResult:
    """Stream `contexts` once and keep, per unit, the k best contexts of each track (`{"top": k, ...}`).

    `bos` is how many leading tokens of each context are BOS (not scored). With `checkpoint`, the
    tracks are saved there every `checkpoint_every` batches (and at the end) and resumed from there
    when the file matches this scan (`identity` plus every argument that changes the result).
    `shard=(i, n)` scans only shard i of n (see `batches`); `shard.merge_results` merges the n results
    into exactly the unsharded one.
    """
    view, n_units = reader.view, reader.n_units
    width, total = 0, 0
    for c in contexts:
        width, total = max(width, len(c.tokens)), total + len(c.tokens)
    if width > view.n_ctx:
        raise UserError(f"a context of {width} tokens is longer than the model's n_ctx={view.n_ctx}: "
                        f"set corpus.context_size to {view.n_ctx} or less")
    base = scan_identity(identity, reader.unit_ids, tracks, bos, seed, batch_size, window, contexts)
    ident = base if tuple(shard) == (0, 1) else digest([base, list(shard)])
    state = {name: TopK.empty(n_units, k, width, name == "top", view.device) for name, k in tracks.items()}
    done = n_skipped = n_batches = tokens_done = 0
    if checkpoint is not None and checkpoint.exists():
        saved, meta = load_tensors(checkpoint)
        if meta.get("identity") == ident:
            state = {name: TopK.from_tensors(saved, name, name == "top", view.device) for name in tracks}
            done, n_skipped, n_batches, tokens_done = (int(meta[k]) for k in ("done", "skipped", "batches", "tokens"))
            log.info("%s: resuming from a checkpoint after %d of %d contexts", desc, done, len(contexts))
        else:
            log.warning("%s: ignoring checkpoint %s written for another scan", desc, checkpoint)
    resumed_at, scanned, since, start = done, 0, 0, time.perf_counter()

    def save() -> None:
        tensors = {k: v for name, tr in state.items() for k, v in tr.tensors(name).items()}
        meta = {"identity": ident, "done": done, "skipped": n_skipped, "batches": n_batches, "tokens": tokens_done}
        save_tensors(checkpoint, tensors, {k: str(v) for k, v in meta.items()})

    pad = pad_id(view.tokenizer)
    bar = tqdm(total=total, initial=tokens_done, unit="tok", unit_scale=True, desc=desc, disable=None)
    for idxs, window_end in batches(contexts, batch_size, window, begin=done, shard=shard):
        rows = [contexts[i].tokens for i in idxs]
        lengths = torch.tensor([len(r) for r in rows], device=view.device)
        acts = reader(pad_batch(rows, pad).to(view.device))                  # [B, T, U]
        positions = torch.arange(acts.shape[1], device=view.device)
        valid = (positions[None, :] >= bos) & (positions[None, :] < lengths[:, None])
        keep = valid.any(1)
        if not bool(keep.all()):
            n_skipped += int((~keep).sum())
            idxs = [i for i, k in zip(idxs, keep.tolist()) if k]
            acts, valid = acts[keep], valid[keep]
        if idxs:
            best, where = acts.nan_to_num(nan=-torch.inf).masked_fill(~valid[..., None], -torch.inf).max(dim=1)
            full = torch.full((n_units, len(idxs), width), float("nan"), device=view.device)
            full[:, :, :acts.shape[1]] = acts.masked_fill(~valid[..., None] & (positions[None, :, None] != 0),
                                                          float("nan")).permute(2, 0, 1)
            index = torch.tensor(idxs, device=view.device).expand(n_units, -1)
            values = best.T.double()
            for name, tr in state.items():
                v = values if name not in RANDOM_TRACKS else torch.from_numpy(
                    random_keys(seed, [contexts[i] for i in idxs], reader.unit_ids, name)).to(view.device)
                state[name] = tr.merge(v, index, where.T, full)
        n_batches, since = n_batches + 1, since + 1
        batch_tokens = int(lengths.sum())
        tokens_done, scanned = tokens_done + batch_tokens, scanned + batch_tokens
        bar.update(batch_tokens)
        if window_end is not None:
            done = window_end
            if checkpoint is not None and since >= checkpoint_every:
                save()
                since = 0
        if on_batch is not None:
            on_batch(n_batches)
    bar.close()
    if checkpoint is not None:
        save()
    return ScanResult({k: TopK.from_tensors(t.tensors(k), k, t.largest) for k, t in state.items()},
                      len(contexts), total, n_skipped, time.perf_counter() - start, scanned, resumed_at, base)


def scan_identity(identity: str, unit_ids: Sequence[str], tracks: dict[str, int], bos: int, seed: int,
                  batch_size: int, window: int, contexts: Sequence[TokenContext]) -> str:
    """Digest of everything a scan's result depends on (a checkpoint or a shard must match it)."""
    width = max((len(c.tokens) for c in contexts), default=0)
    total = sum(len(c.tokens) for c in contexts)
    return digest([identity, list(unit_ids), tracks, bos, seed, batch_size, window, len(contexts), total, width])


# -- prompts ------------------------------------------------------------------------------------


def collect_prompts(result: ScanResult, split: str, contexts: Sequence[TokenContext], bos: int,
                    max_tokens: int) -> list[Prompt]:
    """The prompts of a split's tracks, in track order; top prompts only where the unit fired (> 0)."""
    out = []
    for kind, tr in result.tracks.items():
        for u in range(tr.values.shape[0]):
            for slot in range(tr.values.shape[1]):
                i, pos = int(tr.index[u, slot]), int(tr.pos[u, slot])
                if i == EMPTY or (kind == "top" and not float(tr.values[u, slot]) > 0):
                    continue
                c, row = contexts[i], tr.rows[u, slot]
                end = pos if kind != "random" else len(c.tokens) - 1
                if kind != "top":
                    end = min(end, bos + max_tokens - 2)  # fewer than max_tokens tokens
                out.append(Prompt(u, split, kind, c, end, float(row[end]), row))
    return out


def with_matched_negatives(reader: UnitReader, prompts: list[Prompt], bos: int, bos_ids: list[int],
                           token_budget: int, seed: int, max_tokens: int) -> tuple[list[Prompt], int]:
    """The prompts with the candidate tracks (`NEGATIVE_POOLS`) replaced by one length-matched negative
    per kept held-out positive (`negatives.match_negatives`); also how many positives got none."""
    keep = [p for p in prompts if p.kind not in NEGATIVE_POOLS]
    positives: dict[int, list[Prompt]] = {}
    pools: dict[int, list[Prompt]] = {}
    for p in prompts:
        if p.split == "test" and p.kind == "top" and p.end - bos - p.start + 1 < max_tokens:
            positives.setdefault(p.unit, []).append(p)
        elif p.split == "test" and p.kind in NEGATIVE_POOLS:
            pools.setdefault(p.unit, []).append(p)
    unmatched = 0
    for unit, pos in positives.items():
        negatives, missing = match_negatives(reader, pos, pools.get(unit, []), bos, bos_ids, token_budget, seed)
        keep += negatives
        unmatched += missing
    return keep, unmatched


# -- records and the stage ----------------------------------------------------------------------


def build_records(prompts: list[Prompt], units: Sequence[UnitRecord], tokenizer, texts: Callable[[str], str],
                  bos: int, max_tokens: int) -> tuple[list[ContextRecord], list[torch.Tensor], int]:
    """Records in (unit, split, kind, rank) order with their token activations; top prompts still
    `max_tokens` long after trimming are dropped (their count is returned). Ranks count kept prompts."""
    kinds = {"top": 0, "low": 1, "random": 2}
    order = sorted(range(len(prompts)), key=lambda j: (prompts[j].unit, SPLITS.index(prompts[j].split),
                                                        kinds[prompts[j].kind], j))
    docs = sorted({p.context.doc_id for p in prompts})
    ids = dict(zip(docs, tokenizer([texts(d) for d in docs], add_special_tokens=False, verbose=False)["input_ids"]
                   if docs else []))
    decode = lambda t: tokenizer.decode(t, clean_up_tokenization_spaces=False)  # noqa: E731
    records, acts, ranks, dropped = [], [], {}, 0
    for j in order:
        p = prompts[j]
        tokens = [int(t) for t in p.context.tokens[bos + p.start:p.end + 1]]
        if p.kind == "top" and len(tokens) >= max_tokens:
            dropped += 1
            continue
        key = (p.unit, p.split, p.kind)
        ranks[key] = rank = ranks.get(key, -1) + 1
        start, end = p.context.start + p.start, p.context.start + p.end - bos + 1
        doc = ids[p.context.doc_id]
        nxt = int(doc[end]) if end < len(doc) else None
        records.append(ContextRecord(
            unit_id=units[p.unit].unit_id, split=p.split, kind=p.kind, rank=rank, doc_id=p.context.doc_id,
            context_index=p.context.index, start=start, end=end, text=decode(tokens), tokens=tokens,
            activation=p.activation, trimmed_activation=float(p.acts[-1]), next_token_id=nxt,
            next_token=None if nxt is None else token_strings(tokenizer, [nxt])[0]))
        acts.append(p.acts.float().contiguous())
    return records, acts, dropped


# -- files --------------------------------------------------------------------------------------


def merge_results(parts: list[dict[str, ScanResult]]) -> dict[str, ScanResult]:
    """Merge the shards' per-split scan results into the single-process result (see the module docstring)."""
    if not parts:
        raise ValueError("no shard results to merge")
    out = {}
    for name in parts[0]:
        rs = [p[name] for p in parts]
        if len({r.identity for r in rs}) != 1 or len({r.n_contexts for r in rs}) != 1:
            raise UserError(f"the shards of the {name} split come from different scans (another config, corpus "
                            "or units): run every shard again with the same config")
        tracks = {}
        for key, first in rs[0].tracks.items():
            merged = first
            for r in rs[1:]:
                t = r.tracks[key]
                merged = merged.merge(t.values, t.index, t.pos, t.rows)
            tracks[key] = merged
        out[name] = ScanResult(tracks, rs[0].n_contexts, rs[0].n_tokens, sum(r.n_skipped for r in rs),
                               max(r.seconds for r in rs), sum(r.tokens_scanned for r in rs),
                               sum(r.resumed_at for r in rs), rs[0].identity,
                               "+".join(sorted({r.precision for r in rs})), sum(r.n_units_rescanned for r in rs),
                               sum(r.n_recomputed for r in rs))
    return out
