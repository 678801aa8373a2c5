"""Fault injection for the crash tests (tests/pipeline/test_crash_resume.py): `sae-lens-ctx` in this process with a
SIGKILL armed at one seam. A fake at the seams, named as such; everything else is the real CLI.

    python tests/support/kill_harness.py [--kill SEAM:N] [--calls FILE] -- <sae-lens-ctx arguments>

`--kill SEAM:N` sends SIGKILL to this process on the N-th time it reaches SEAM (counted from this
process's start), before that call does anything: nothing is flushed, no `finally` runs. `--calls FILE`
appends one line per LLM call the offline test backend answers (a hash of the request), so a test can
prove that no answered call is ever made again. Before dying it prints `killed at SEAM:N (detail)`
on stderr.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import offline_llm  # noqa: E402  (registers the offline-test-llm backend)
from sae_lens_ctx.stages import attribute, discover
from sae_lens_ctx.stages import mine
from sae_lens_ctx.stages.mine import trim
from sae_lens_ctx.stages.report import plots
from sae_lens_ctx.pipeline import wandb_log as track  # noqa: E402
from sae_lens_ctx.cli import main  # noqa: E402
from sae_lens_ctx.pipeline.engine import RunDirectory  # noqa: E402

SEAMS = {
    "discover": (discover, "congruence_stats"),       # one unit group's congruence, inside discovery
    "attribute": (attribute, "_unit_results"),        # one unit's records, after its pass's batched forwards
    "report-plot": (plots, "save"),                   # one plot of the report
    "wandb-tables": (track, "log_tables"),            # W&B run started, tracking.json written, tables next
    "wandb-artifact": (track, "results_artifact"),    # tables and plots logged, the results artifact next
    "manifest": (RunDirectory, "write_manifest"),     # one write of stages.json
    "rename": (os, "replace"),                        # one atomic rename (any file the run writes)
}
"""Seams that wrap a function: SIGKILL on entry to its N-th call. Plus `scan-train` / `scan-test` (after
the N-th batch of that split's scan), `trim` (the N-th batched evaluation while trimming), `explain-call`
and `judge-call` (the N-th LLM call of that kind)."""


def die(where: str) -> None:
    print(f"killed at {where}", file=sys.stderr, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


def arm(seam: str, n: int) -> None:
    count = 0

    def hit(detail: str = "") -> None:
        nonlocal count
        count += 1
        if count == n:
            die(f"{seam}:{n}" + (f" ({detail})" if detail else ""))

    if seam in SEAMS:
        owner, name = SEAMS[seam]
        original = getattr(owner, name)

        def wrapped(*args, **kwargs):
            hit(Path(str(args[1])).name if seam == "rename" and len(args) > 1 else "")
            return original(*args, **kwargs)
        setattr(owner, name, wrapped)
    elif seam in ("scan-train", "scan-test"):
        split = seam.split("-")[1]
        mine._fault_injection_after_batch = lambda s, batches: hit(f"batch {batches}") if s == split else None
    elif seam == "trim":
        make = trim.suffix_evaluator

        def evaluator(*args, **kwargs):
            evaluate = make(*args, **kwargs)
            return lambda *a, **k: (hit(), evaluate(*a, **k))[1]
        trim.suffix_evaluator = evaluator
    elif seam in ("explain-call", "judge-call"):
        hooks.append((seam == "judge-call", hit))
    else:
        raise SystemExit(f"unknown seam {seam!r}")


hooks: list = []
"""(for judge calls?, hit) of an armed LLM-call seam."""


def log_calls(path: Path | None) -> None:
    generate = offline_llm.OfflineTestLLM.generate

    def logged(self, messages, **params):
        judge = "(Yes/No)" in messages[-1]["content"]
        for for_judge, hit in hooks:
            if for_judge == judge:
                hit()
        response = generate(self, messages, **params)
        if path is not None:
            key = hashlib.sha256(json.dumps([messages, params], sort_keys=True).encode()).hexdigest()[:20]
            with open(path, "a", encoding="utf-8") as f:
                f.write(f"{key}\n")
                f.flush()
                os.fsync(f.fileno())
        return response
    offline_llm.OfflineTestLLM.generate = logged


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--kill", default=None, help="SEAM:N")
    parser.add_argument("--calls", type=Path, default=None)
    parser.add_argument("cli", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    if args.kill:
        seam, n = args.kill.rsplit(":", 1)
        arm(seam, int(n))
    log_calls(args.calls)
    sys.exit(main([a for a in args.cli if a != "--"]))
