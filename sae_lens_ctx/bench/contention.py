"""Contention: a part of the pipeline alone, then beside a second copy of itself (`sae-lens-ctx bench --contention`).

Why: two runs side by side on a small machine (a user running two configs, or the tests beside a run) must
share the cores, not collapse. A fair share of the cores is half, so each copy beside another should take
about 2× its time alone; the goal is at most 2.5× (`CONTENTION_GOAL`). Once, two attribute stages side by side
each took 5.2× their time alone (4 spinning compute threads on 2 cores).

Each measurement runs the part in fresh subprocesses (`python -m sae_lens_ctx.bench.contention PART ...`), so
the thread settings the package applies at start (`core.threads`) hold there as in a real run: first one
copy alone, then two copies started together. `ratio` = the mean of the two copies' seconds beside each other
over the seconds alone. The parts, on a model of a named shape with random weights (`shapes.SHAPES`):

* `scan`: `mine.scan` over synthetic contexts (batches of `batch_size` contexts of up to 64 tokens);
* `attribution`: `attribute.attribute_jobs` for a few last-layer units over 30 short prompts each (batched across units)
  (the attribute stage's many small forwards).

On a machine already busy with other work the ratios are noisy: run it twice and report both.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

CONTENTION_GOAL = 2.5
"""The most a copy beside a second one may take, as a multiple of its time alone (a fair share of the cores is 2×)."""

PARTS = ("scan", "attribution")


def run_part(part: str, shape: str = "smollm2", *, n_contexts: int = 48, n_units: int = 4, batch_size: int = 16,
             dtype: str = "float32", seed: int = 0) -> float:
    """Seconds one copy of `part` takes in this process (after a warm-up on a little of the same work)."""
    import torch

    from .shapes import neuron_units, shape_model, synthetic_contexts

    view = shape_model(shape, dtype=dtype, seed=seed)
    last = view.n_layers - 1
    if part == "scan":
        from ..stages.mine.scan import UnitReader, scan

        contexts = synthetic_contexts(n_contexts, min(64, view.n_ctx), view.d_vocab, 0, seed=seed)
        reader = UnitReader(view, neuron_units(view, 64, [max(0, last - 1), last], seed=seed))
        scan(reader, contexts[:batch_size], {"top": 4}, batch_size=batch_size)  # warm-up
        start = time.perf_counter()
        scan(reader, contexts, {"top": 8}, batch_size=batch_size)
    elif part == "attribution":
        from ..core.config import AttributeConfig
        from ..stages.attribute import attribute_jobs, attribute_prompts, unit_read
        from .timings import attribution_units

        prompts = [list(c.tokens) for c in synthetic_contexts(30, min(16, view.n_ctx), view.d_vocab, 0, seed=seed + 3)]
        reads = [unit_read(view, u, AttributeConfig(), {}) for u in attribution_units(view, n_units, seed)]
        attribute_prompts(view, reads[0], prompts[:2], batch_size=batch_size)  # warm-up
        start = time.perf_counter()
        attribute_jobs(view, [(read, prompts) for read in reads], batch_size)  # batched across units, as the stage
    else:
        raise ValueError(f"unknown part '{part}': choose one of {', '.join(PARTS)}")
    del torch
    return time.perf_counter() - start


def _start(part: str, shape: str, sizes: dict, env: dict) -> subprocess.Popen:
    args = [sys.executable, "-c", "from sae_lens_ctx.core.threads import apply_thread_policy; apply_thread_policy(); "
            "import runpy; runpy.run_module('sae_lens_ctx.bench.contention', run_name='__main__')",
            part, shape, json.dumps(sizes)]
    return subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _seconds(proc: subprocess.Popen) -> float:
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"contention worker failed ({proc.returncode}): {err[-2000:]}")
    return float(json.loads(out.strip().splitlines()[-1])["seconds"])


def bench_contention(parts=PARTS, shape: str = "smollm2", *, env: dict | None = None, log=print, **sizes) -> dict:
    """Per part: seconds alone, seconds of each of two copies started together, and their ratio (see the
    module doc). `env` adds to this process's environment for the workers (e.g. `OMP_NUM_THREADS`)."""
    from ..core.threads import SET_HERE

    full = {k: v for k, v in os.environ.items() if k not in SET_HERE}  # each worker applies the policy itself
    full.update(env or {})
    root = str(Path(__file__).resolve().parents[2])
    full["PYTHONPATH"] = os.pathsep.join(p for p in (root, full.get("PYTHONPATH", "")) if p)
    out = {}
    for part in parts:
        alone = _seconds(_start(part, shape, sizes, full))
        pair = [_start(part, shape, sizes, full) for _ in range(2)]
        beside = [_seconds(p) for p in pair]
        ratio = sum(beside) / len(beside) / alone
        out[part] = {"alone_s": round(alone, 6), "beside_s": [round(b, 6) for b in beside], "ratio": round(ratio, 3)}
        log(f"contention [{shape}] {part}: alone {alone:.2f}s, beside a second copy {beside[0]:.2f}s / "
            f"{beside[1]:.2f}s: {ratio:.2f}x (goal <= {CONTENTION_GOAL}x; a fair share is 2x)")
    return {"shape": shape, "settings": sizes, "env": env or {}, "threads": _threads_note(full), "parts": out,
            "goal": CONTENTION_GOAL}


def _threads_note(env: dict) -> dict:
    return {k: env.get(k) for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "SAE_LENS_CTX_THREADS")}


if __name__ == "__main__":  # a worker: PART SHAPE SIZES_JSON → {"seconds": ...} on the last line
    part, shape, sizes = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    print(json.dumps({"seconds": run_part(part, shape, **sizes)}))
