"""Sharded mining: split one scan across jobs or processes and merge into exactly the single-process result.

A shard `i/n` scans the windows of `batch_size × 8` contexts (the scan's sort windows, `mine.batches`)
whose number is i modulo n, in each split. Every batch a shard runs is the batch the single-process
scan runs (same contexts, same order, same padding), so every context's activations are bit-identical
to it, and merging the shards' running top-k tracks by the scan's own order (value, then corpus index;
`Track.merge`) gives exactly the single-process tracks. Trimming and records then run once, on the
merged tracks, as in a single process.

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
import os
import re
import time
from pathlib import Path

import torch

from .config import RunConfig
from .errors import UserError
from .mine import (ScanResult, Track, _load_safetensors, _save_safetensors, finish_stage, prepare_stage,
                   remove_checkpoints, scan_identities, scan_splits)
from .pipeline import (RunContext, RunDirectory, _require_upstream, finished_stage, get_stage,
                       stage_fingerprints)

log = logging.getLogger(__name__)

SHARD_FILE = "mine.shard{i}of{n}.safetensors"
_SHARD_RE = re.compile(r"^mine\.shard(\d+)of(\d+)\.safetensors$")


def parse_shard(text: str) -> tuple[int, int]:
    """'i/n' → (i, n) with 0 <= i < n."""
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text or "")
    if not m or not int(m.group(2)) >= 1 or not int(m.group(1)) < int(m.group(2)):
        raise UserError(f"--shard takes i/n with 0 <= i < n (shard i of n, counted from 0), got '{text}'")
    return int(m.group(1)), int(m.group(2))


# -- merging --------------------------------------------------------------------------------------


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
                               sum(r.resumed_at for r in rs), rs[0].identity)
    return out


def save_shard(path: Path, results: dict[str, ScanResult], shard: tuple[int, int], fingerprint: str) -> None:
    tensors, splits = {}, {}
    for name, r in results.items():
        for key, t in r.tracks.items():
            tensors.update(t.tensors(f"{name}.{key}"))
        splits[name] = {"tracks": {k: t.largest for k, t in r.tracks.items()}, "n_contexts": r.n_contexts,
                        "n_tokens": r.n_tokens, "n_skipped": r.n_skipped, "seconds": r.seconds,
                        "tokens_scanned": r.tokens_scanned, "resumed_at": r.resumed_at, "identity": r.identity}
    meta = {"shard": list(shard), "fingerprint": fingerprint, "splits": splits}
    _save_safetensors(path, tensors, {"sae_lens_ctx_shard": json.dumps(meta)})


def load_shard(path: Path) -> tuple[dict[str, ScanResult], tuple[int, int], str]:
    tensors, meta = _load_safetensors(path)
    if "sae_lens_ctx_shard" not in meta:
        raise UserError(f"{path} is not a mining shard written by `sae-lens-ctx mine --shard`")
    m = json.loads(meta["sae_lens_ctx_shard"])
    results = {}
    for name, s in m["splits"].items():
        tracks = {k: Track.from_tensors(tensors, f"{name}.{k}", largest) for k, largest in s["tracks"].items()}
        results[name] = ScanResult(tracks, s["n_contexts"], s["n_tokens"], s["n_skipped"], s["seconds"],
                                   s["tokens_scanned"], s["resumed_at"], s["identity"])
    return results, tuple(m["shard"]), m["fingerprint"]


# -- separate jobs ----------------------------------------------------------------------------------


def _context(config: RunConfig, out: str | Path, model=None) -> tuple[RunDirectory, RunContext, dict, dict]:
    config.validate()
    rundir = RunDirectory(out)
    manifest = rundir.prepare(config, overwrite=False)
    prints = stage_fingerprints(config)
    _require_upstream("mine", manifest, prints)
    return rundir, RunContext(out=rundir.out, config=config, model_object=model, _manifest=manifest), manifest, prints


def run_shard(config: RunConfig, out: str | Path, shard: tuple[int, int], model=None) -> Path:
    """`sae-lens-ctx mine --shard i/n`: scan shard i of n of every split; write its tracks to the run directory."""
    _, ctx, _, prints = _context(config, out, model)
    units, reader, splits = prepare_stage(ctx)
    results = scan_splits(ctx, reader, splits, shard=shard)
    path = ctx.path(SHARD_FILE.format(i=shard[0], n=shard[1]))
    save_shard(path, results, shard, prints["mine"])
    remove_checkpoints(ctx, shard)
    scanned = sum(r.tokens_scanned for r in results.values())
    print(f"mine shard {shard[0]}/{shard[1]}: scanned {scanned:,} tokens of "
          f"{sum(r.n_tokens for r in results.values()):,} for {len(units)} units -> {path.name}; "
          f"when all {shard[1]} shards are done: sae-lens-ctx merge --out {ctx.out}")
    return path


def shard_files(out: Path) -> dict[tuple[int, int], Path]:
    return {(int(m.group(1)), int(m.group(2))): p for p in sorted(Path(out).glob("mine.shard*of*.safetensors"))
            if (m := _SHARD_RE.match(p.name))}


def merge_run(out: str | Path, model=None, keep_shards: bool = False) -> dict[str, ScanResult]:
    """`sae-lens-ctx merge --out DIR`: merge the shards in DIR, trim, write the mine stage's files, mark it done."""
    rundir = RunDirectory(out)
    config = rundir.read_config()
    rundir, ctx, manifest, prints = _context(config, out, model)
    files = shard_files(rundir.out)
    if not files:
        raise UserError(f"{rundir.out} holds no mining shards: run `sae-lens-ctx mine --out {rundir.out} --shard i/n` "
                        "for every i first")
    counts = {n for _, n in files}
    if len(counts) != 1:
        raise UserError(f"{rundir.out} holds shards of different splittings ({', '.join(f'/{n}' for n in sorted(counts))}): "
                        "remove the stale mine.shard*.safetensors files")
    n = counts.pop()
    missing = [i for i in range(n) if (i, n) not in files]
    if missing:
        raise UserError(f"shards {', '.join(f'{i}/{n}' for i in missing)} are missing in {rundir.out}: run "
                        f"`sae-lens-ctx mine --out {rundir.out} --shard i/{n}` for them, then merge again")
    parts = []
    for (i, _), path in sorted(files.items()):
        results, _, fingerprint = load_shard(path)
        if fingerprint != prints["mine"]:
            raise UserError(f"{path.name} was written under another config than {rundir.out}/config.yaml: "
                            "run that shard again")
        parts.append(results)
    units, reader, splits = prepare_stage(ctx)
    expected = scan_identities(ctx, reader, splits)
    for name, ident in expected.items():
        if any(p[name].identity != ident for p in parts):
            raise UserError(f"the shards were scanned with other units or another corpus than {rundir.out} holds "
                            "now (discover re-ran?): run every shard again")
    merged = merge_results(parts)
    stage = get_stage("mine")
    manifest["stages"].pop("mine", None)
    rundir.write_manifest(manifest)
    start = time.perf_counter()
    finish_stage(ctx, units, reader, splits, merged)
    manifest["stages"]["mine"] = finished_stage(stage, prints["mine"], time.perf_counter() - start,
                                                {**ctx.this_run, "merged_shards": n})
    rundir.write_manifest(manifest)
    if not keep_shards:
        for path in files.values():
            path.unlink(missing_ok=True)
    return merged


# -- torch.distributed --------------------------------------------------------------------------------


class Distributed:
    """This process's place under torchrun: `shard = (rank, world_size)`; gathers scan results to rank 0."""

    def __init__(self, rank: int, world: int, owns_group: bool):
        self.rank, self.world, self.owns_group = rank, world, owns_group

    @property
    def shard(self) -> tuple[int, int]:
        return self.rank, self.world

    @classmethod
    def from_env(cls) -> Distributed | None:
        """None unless launched with WORLD_SIZE > 1; joins (or reuses) the process group (gloo)."""
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return None
        import torch.distributed as dist

        owns = False
        if not dist.is_initialized():
            dist.init_process_group(backend="gloo")  # CPU tensors are gathered; env:// as torchrun sets it
            owns = True
        if torch.cuda.is_available() and "LOCAL_RANK" in os.environ:
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]) % torch.cuda.device_count())
        return cls(dist.get_rank(), dist.get_world_size(), owns)

    def gather(self, results: dict[str, ScanResult]) -> dict[str, ScanResult] | None:
        """Every rank's results merged on rank 0 (None on the other ranks)."""
        import torch.distributed as dist

        parts = [None] * self.world if self.rank == 0 else None
        dist.gather_object(results, parts, dst=0)
        return merge_results(parts) if self.rank == 0 else None

    def barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier()

    def __enter__(self) -> Distributed:
        return self

    def __exit__(self, *exc) -> None:
        if self.owns_group:
            import torch.distributed as dist

            dist.destroy_process_group()
