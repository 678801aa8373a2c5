"""The scan in bfloat16 with the fp32 scan's answer (`mine.scan_precision`): candidates in bf16, survivors in fp32.

Why: the scan is a forward over the whole corpus and, in fp32 on a CPU, near the floor of what the cores can
do; bf16 matmuls run faster where the hardware has them (AVX-512 BF16 / AMX, recent GPUs), but bf16 moves an
activation by up to a few percent, and that must not change which prompts a unit keeps.

How (`scan_checked`):

1. the model scans the split under bf16 autocast (`Bf16Reader`) as usual (`scan.scan`, checkpoints and shards included), keeping
   `candidates(k) = 2 k + 8` contexts per unit in the `top` and `low` tracks instead of k (the random tracks
   keep k: their choice does not depend on activations);
2. every kept context is run again in fp32 (in batches of the candidates alone), and each unit's tracks are
   rebuilt from those fp32 values, by the scan's own order (value, then corpus index), among that unit's
   candidates only: values, positions and rows are fp32 and equal the fp32 scan's within fp32 round-off
   (another batch composition; `shards.ROUND_OFF`);
3. the answer is the fp32 scan's when no rejected context can beat the k-th fp32 value. A rejected context's
   bf16 max is at most the last candidate's bf16 max `m`, and its fp32 max at most `m + margin`; so a unit's
   `top` track is exact when its k-th fp32 value exceeds `m + margin` (`low`: is below `m - margin`), or when
   the bf16 track was not full (every context was a candidate). `margin` bounds the bf16 error of a
   context's max: `MARGIN_SAFETY` × the largest error measured on the unit's own candidates (both
   precisions are known there), and at least `MARGIN_FRACTION` of the unit's largest |activation|;
4. a unit that fails the test is widened to the whole split: one fp32 scan of the split (only when some unit
   failed) gives those units their tracks. `ScanResult.n_units_rescanned` counts them.

What this guarantees: every unit's kept contexts are the fp32 scan's, exactly, provided the bf16 error of a
context's max stays within the margin, which is measured, not proven: ×2 the largest error seen on 2k + 8
contexts of the unit, floored at 3 % of its scale (bf16 keeps 8 significant bits; the planted models stay
within 2 %). Ties within fp32 round-off are ordered by round-off, as between any two batch shapes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import torch

from ...core.digest import digest
from ...core.threads import bf16_available
from ...inputs.corpus import TokenContext
from ...inputs.view import ModelView, pad_batch, pad_id
from .scan import (EMPTY, RANDOM_TRACKS, SORT_WINDOW, ScanResult, TopK, UnitReader, batches, random_keys, scan,
                   scan_identity)

log = logging.getLogger(__name__)

MARGIN_SAFETY = 2.0
"""The margin is at least this many times the largest bf16 error measured on the unit's candidates."""
MARGIN_FRACTION = 1 / 32
"""... and at least this fraction of the unit's largest |fp32 activation| among them (bf16: 8 significant bits)."""
VALUE_TRACKS = ("top", "low")
"""Tracks ranked by activation (widened in bf16 and checked); the others are ranked by a random key."""


def candidates(k: int) -> int:
    """Contexts a `top` or `low` track keeps per unit in the bf16 pass, for k in the answer."""
    return 2 * k + 8


AUTO_MAX_CANDIDATE_SHARE = 0.25
"""'auto' scans in bf16 only where every unit's candidates together are at most this share of the split's
contexts: the fp32 pass over the candidates costs that share of a whole fp32 scan, on top of the bf16 scan."""


def candidate_share(n_units: int, tracks: dict[str, int], n_contexts: int) -> float:
    """At most what share of a split's contexts the bf16 pass keeps as candidates (all units, all tracks)."""
    wide = sum(candidates(k) if name in VALUE_TRACKS else k for name, k in tracks.items())
    return n_units * wide / max(n_contexts, 1)


def resolve_precision(setting: str, view: ModelView, share: float = 0.0) -> str:
    """'bfloat16' or 'float32' for `mine.scan_precision` on this model: 'auto' is bf16 where `bf16_available`
    and the candidates' `share` of the split (`candidate_share`) is at most `AUTO_MAX_CANDIDATE_SHARE`; a model
    not loaded in fp32 scans in its own dtype ('float32' here means: no second pass)."""
    if view.dtype != torch.float32:
        return "float32"
    if setting == "auto":
        return "bfloat16" if bf16_available(view.device) and share <= AUTO_MAX_CANDIDATE_SHARE else "float32"
    return setting


class Bf16Reader:
    """`reader`'s units read under bf16 autocast (`torch.autocast`): the model's matmuls run in bf16 on its own
    fp32 weights (no second copy of the model; any model class), the activations come back as float32."""

    def __init__(self, reader: UnitReader):
        self.reader, self.view, self.n_units, self.unit_ids = reader, reader.view, reader.n_units, reader.unit_ids

    @property
    def hook_names(self) -> list[str]:
        return self.reader.hook_names

    @torch.inference_mode()
    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=self.view.device.type, dtype=torch.bfloat16):
            return self.reader(tokens).float()


def maxima(reader: UnitReader, rows: list[Sequence[int]], bos: int, width: int
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The scan's per-batch reduction: (keep `[B]`, max `[U, B']` float64, its position `[U, B']`, rows
    `[U, B', width]` float32 with NaN past each context's end), B' the contexts with a position after BOS."""
    view = reader.view
    lengths = torch.tensor([len(r) for r in rows], device=view.device)
    acts = reader(pad_batch(rows, pad_id(view.tokenizer)).to(view.device)).float()       # [B, T, U]
    positions = torch.arange(acts.shape[1], device=view.device)
    valid = (positions[None, :] >= bos) & (positions[None, :] < lengths[:, None])
    keep = valid.any(1)
    acts, valid = acts[keep], valid[keep]
    best, where = acts.nan_to_num(nan=-torch.inf).masked_fill(~valid[..., None], -torch.inf).max(dim=1)
    full = torch.full((reader.n_units, acts.shape[0], width), float("nan"), device=view.device)
    full[:, :, :acts.shape[1]] = acts.masked_fill(~valid[..., None] & (positions[None, :, None] != 0),
                                                  float("nan")).permute(2, 0, 1)
    return keep, best.T.double(), where.T, full


@torch.inference_mode()
def scan_checked(reader: UnitReader, reader16: UnitReader, contexts: Sequence[TokenContext], tracks: dict[str, int],
                 *, bos: int = 1, seed: int = 0, batch_size: int = 32, identity: str = "", desc: str = "mine",
                 **kwargs) -> ScanResult:
    """`scan.scan`'s result (same tracks, fp32 values) from a bf16 scan and an fp32 pass over its survivors
    (see the module doc). `reader16` reads the same units in bf16 (`Bf16Reader(reader)`); `kwargs` go to
    `scan.scan` (checkpoint, checkpoint_every, on_batch, shard, window)."""
    start = time.perf_counter()
    wide = {name: candidates(k) if name in VALUE_TRACKS else k for name, k in tracks.items()}
    first = scan(reader16, contexts, wide, bos=bos, seed=seed, batch_size=batch_size, desc=f"{desc} (bf16)",
                 identity=digest([identity, "bf16-candidates"]), **kwargs)
    device, n_units = reader.view.device, reader.n_units
    width = first.tracks[next(iter(tracks))].rows.shape[2]
    cand = {name: first.tracks[name].index.to(device) for name in tracks}            # [U, K'] (EMPTY: none)
    union = sorted({int(i) for t in cand.values() for i in t.flatten().tolist() if i != EMPTY})
    slot = torch.full((len(contexts) + 1,), -1, dtype=torch.long, device=device)
    slot[torch.tensor(union, dtype=torch.long, device=device)] = torch.arange(len(union), device=device)
    value32 = torch.full((n_units, len(union)), float("nan"), dtype=torch.float64, device=device)
    state = {name: TopK.empty(n_units, k, width, name == "top", device) for name, k in tracks.items()}
    subset = [contexts[i] for i in union]
    for idxs, _ in batches(subset, batch_size):
        keep, best, where, full = maxima(reader, [subset[j].tokens for j in idxs], bos, width)
        idxs = [j for j, k in zip(idxs, keep.tolist()) if k]
        if not idxs:
            continue
        glob = torch.tensor([union[j] for j in idxs], device=device)
        value32[:, idxs] = best
        for name, tr in state.items():
            v = best if name not in RANDOM_TRACKS else torch.from_numpy(
                random_keys(seed, [subset[j] for j in idxs], reader.unit_ids, name)).to(device)
            mine_ = (cand[name][:, :, None] == glob[None, None, :]).any(1)            # [U, B]: a candidate of u
            v = v.masked_fill(~mine_, -torch.inf if tr.largest else torch.inf)
            index = torch.where(mine_, glob[None, :].expand(n_units, -1), torch.full_like(mine_, EMPTY, dtype=torch.long))
            state[name] = tr.merge(v, index, where, full)
    checked = [name for name in VALUE_TRACKS if name in tracks]
    error = torch.zeros(n_units, dtype=torch.float64, device=device)
    scale = torch.zeros(n_units, dtype=torch.float64, device=device)
    for name in checked:  # the bf16 error and the scale, measured on the unit's candidates of both tracks
        idx16, val16 = first.tracks[name].index.to(device), first.tracks[name].values.to(device)
        real = idx16 != EMPTY
        v32 = value32.gather(1, slot[idx16.clamp(max=len(contexts))].clamp(min=0))
        finite = lambda t: t.masked_fill(~real, 0).nan_to_num(0.0, posinf=0.0, neginf=0.0)  # noqa: E731
        error = torch.maximum(error, finite((val16 - v32).abs()).amax(1))
        scale = torch.maximum(scale, finite(v32.abs()).amax(1))
    margin = torch.maximum(MARGIN_SAFETY * error, MARGIN_FRACTION * scale)
    failing = torch.zeros(n_units, dtype=torch.bool, device=device)
    for name in checked:
        t16, k = first.tracks[name], tracks[name]
        full_track = (t16.index != EMPTY).all(1).to(device)
        last16, kth32 = t16.values[:, -1].to(device), state[name].values[:, k - 1]
        ok = (kth32 > last16 + margin) if name == "top" else (kth32 < last16 - margin)
        failing |= full_track & ~ok
    n_failing = int(failing.sum())
    scanned = first.tokens_scanned + sum(len(c.tokens) for c in subset)
    if n_failing:
        log.warning("%s: %d of %d units have candidates within the bf16 margin of the k-th: rescanning the split "
                    "in fp32 for them", desc, n_failing, n_units)
        again = scan(reader, contexts, tracks, bos=bos, seed=seed, batch_size=batch_size, identity=identity,
                     desc=f"{desc} (fp32)", **{**kwargs, "checkpoint": None})
        for name, tr in state.items():
            a = again.tracks[name]
            pick = lambda f: torch.where(failing.view(-1, *[1] * (getattr(tr, f).dim() - 1)),  # noqa: E731
                                         getattr(a, f).to(device), getattr(tr, f))
            state[name] = TopK(pick("values"), pick("index"), pick("pos"), pick("rows"), tr.largest)
        scanned += again.tokens_scanned
    out = {k: TopK.from_tensors(t.tensors(k), k, t.largest) for k, t in state.items()}
    same = scan_identity(identity, reader.unit_ids, tracks, bos, seed, batch_size, kwargs.get("window", SORT_WINDOW),
                         contexts)  # the fp32 scan's: its shards and this one's merge alike (same answer)
    return ScanResult(out, first.n_contexts, first.n_tokens, first.n_skipped, time.perf_counter() - start, scanned,
                      first.resumed_at, same, precision="bfloat16", n_units_rescanned=n_failing,
                      n_recomputed=len(union))
