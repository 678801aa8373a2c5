"""Sharded mining: split one scan across jobs or processes and merge into exactly the single-process result.

A shard `i/n` scans the windows of `batch_size × 8` contexts (the scan's sort windows, `mine.batches`)
whose number is i modulo n, in each split. Every batch a shard runs is the batch the single-process
scan runs (same contexts, same order, same padding: the batch a context is computed in does not depend
on the layout), and merging the shards' running top-k tracks by the scan's own order (value, then
corpus index; `TopK.merge`) gives the single-process tracks. Trimming and records then run once, on the
merged tracks, as in a single process.

What "the same result" means, exactly:

* with the same intra-op thread count in every process (`torch.get_num_threads()`, `OMP_NUM_THREADS`)
  the files are byte-identical to the single process's;
* across thread counts (torchrun starts its ranks at `OMP_NUM_THREADS=1` while one process uses every
  core) the CPU kernels split their sums differently, so activations move in their last bits: the
  prompts, their ranks, texts and tokens are the same, and every activation is equal within
  `ROUND_OFF` (fp32 round-off). Only a comparison that falls within round-off of its threshold (a
  near-tie at the k-th place, a trimming ratio or negative bound met to the last bit) could change a
  kept prompt; `tests/stages/test_shard.py` checks both claims.

Two ways to run shards:

* separate jobs (Slurm arrays): `sae-lens-ctx mine --out DIR --shard i/n` writes
  `mine.shard{i}of{n}.safetensors` (the shard's tracks and counts) to the run directory;
  `sae-lens-ctx merge --out DIR` checks that all n shards are there and were made by this run's
  config and units, merges them, trims, writes the mine stage's files and marks it done;
* torch.distributed: under `torchrun --nproc_per_node N sae-lens-ctx mine --out DIR` (WORLD_SIZE > 1)
  each rank scans shard RANK/WORLD_SIZE, the tracks are gathered to rank 0 (gloo for CPU tensors)
  and merged there, and rank 0 alone trims and writes; the others wait at a barrier. The run
  directory must be on a filesystem every rank sees.

In the merged `mine.json`, a split's `seconds` is the slowest shard's, `tokens_scanned` and skipped
contexts are summed over the shards.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path


from ...core.errors import UserError
from .scan import ScanResult, TopK
from ...core.records import load_tensors, save_tensors

log = logging.getLogger(__name__)

ROUND_OFF = {"rtol": 1e-5, "atol": 1e-6}
"""How far one activation may move between two layouts or thread counts of one scan (fp32; relative to the
value, plus an absolute floor for values near 0): about 80 float32 ulps, far below any real difference."""

SHARD_FILE = "mine.shard{i}of{n}.safetensors"
_SHARD_RE = re.compile(r"^mine\.shard(\d+)of(\d+)\.safetensors$")


def parse_shard(text: str) -> tuple[int, int]:
    """'i/n' → (i, n) with 0 <= i < n."""
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text or "")
    if not m or not int(m.group(2)) >= 1 or not int(m.group(1)) < int(m.group(2)):
        raise UserError(f"--shard takes i/n with 0 <= i < n (shard i of n, counted from 0), got '{text}'")
    return int(m.group(1)), int(m.group(2))


# -- merging --------------------------------------------------------------------------------------


def save_shard(path: Path, results: dict[str, ScanResult], shard: tuple[int, int], fingerprint: str) -> None:
    tensors, splits = {}, {}
    for name, r in results.items():
        for key, t in r.tracks.items():
            tensors.update(t.tensors(f"{name}.{key}"))
        splits[name] = {"tracks": {k: t.largest for k, t in r.tracks.items()}, "n_contexts": r.n_contexts,
                        "n_tokens": r.n_tokens, "n_skipped": r.n_skipped, "seconds": r.seconds,
                        "tokens_scanned": r.tokens_scanned, "resumed_at": r.resumed_at, "identity": r.identity,
                        "precision": r.precision, "n_units_rescanned": r.n_units_rescanned,
                        "n_recomputed": r.n_recomputed}
    meta = {"shard": list(shard), "fingerprint": fingerprint, "splits": splits}
    save_tensors(path, tensors, {"sae_lens_ctx_shard": json.dumps(meta)})


def load_shard(path: Path) -> tuple[dict[str, ScanResult], tuple[int, int], str]:
    tensors, meta = load_tensors(path)
    if "sae_lens_ctx_shard" not in meta:
        raise UserError(f"{path} is not a mining shard written by `sae-lens-ctx mine --shard`")
    m = json.loads(meta["sae_lens_ctx_shard"])
    results = {}
    for name, s in m["splits"].items():
        tracks = {k: TopK.from_tensors(tensors, f"{name}.{k}", largest) for k, largest in s["tracks"].items()}
        results[name] = ScanResult(tracks, s["n_contexts"], s["n_tokens"], s["n_skipped"], s["seconds"],
                                   s["tokens_scanned"], s["resumed_at"], s["identity"], s.get("precision", "float32"),
                                   s.get("n_units_rescanned", 0), s.get("n_recomputed", 0))
    return results, tuple(m["shard"]), m["fingerprint"]


# -- separate jobs ----------------------------------------------------------------------------------


def shard_files(out: Path) -> dict[tuple[int, int], Path]:
    return {(int(m.group(1)), int(m.group(2))): p for p in sorted(Path(out).glob("mine.shard*of*.safetensors"))
            if (m := _SHARD_RE.match(p.name))}


# -- torch.distributed --------------------------------------------------------------------------------


