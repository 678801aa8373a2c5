"""Sharded mining across separate jobs: `sae-lens-ctx mine --shard i/n`, then `sae-lens-ctx merge`.

The shard files and the merge of scan results are the mine stage's (`stages.mine.shards`); this module
orchestrates them over a run directory (manifest, fingerprints, the stage's completion).
"""

from __future__ import annotations

import time
from pathlib import Path

from ..core.config import RunConfig
from ..core.errors import UserError
from ..inputs.context import RunContext
from ..stages.mine import finish_stage, prepare_stage, remove_checkpoints, scan_identities, scan_splits
from ..stages.mine.scan import ScanResult, merge_results
from ..stages.mine.shards import SHARD_FILE, load_shard, save_shard, shard_files
from .engine import RunDirectory, finished_stage, get_stage, require_upstream, stage_fingerprints


def _context(config: RunConfig, out: str | Path, model=None) -> tuple[RunDirectory, RunContext, dict, dict]:
    config.validate()
    rundir = RunDirectory(out)
    manifest = rundir.prepare(config, overwrite=False)
    prints = stage_fingerprints(config)
    require_upstream("mine", manifest, prints)
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
