"""Run the stages in order over one run directory; skip what is up to date; resume after a crash.

The run directory is the only state shared between stages. `stages.json` records, for each finished
stage, a fingerprint of what it depends on (its config sections, the content of the inputs it reads,
the upstream stages' fingerprints, the results format) and the files it wrote. A stage whose fingerprint is unchanged and whose files
exist is skipped; a changed config gives new fingerprints to that stage and every stage after it,
so they re-run. A directory written in an older results format is upgraded in place: its manifest
takes the current format and, the format being part of every fingerprint, each of its stages re-runs
(one log line says which); a newer format is refused.

Results are a function of the config, the seed and the inputs: two runs of the same config write the
same bytes (on CPU), and so does a run killed anywhere and run again. What depends on the clock or on
the history of the directory (timestamps, seconds, tokens/s, LLM calls made versus answered from the
cache, where a scan resumed) is kept in one place: each stage's entry in `stages.json`
(`finished_at`, `seconds`, `this_run`). Files are written atomically (`records.atomic_write`); the
temporary files a killed process leaves behind are removed by the next `run_pipeline`.

Stages are registered with `register_stage` (SAE-Lens style: an explicit registry that refuses
duplicates). A stage whose issue has not landed yet is registered with `run=None` and reported as
"not built yet", never faked.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .. import clients  # noqa: F401  (attaches the built-in LLM backends to the registry that configs are checked against)
from ..core.config import RunConfig
from ..core.digest import digest
from ..core.errors import UserError, did_you_mean
from ..core.layout import CONFIG_FILE, MANIFEST, RESULTS_FORMAT, read_run_config
from ..core.records import atomic_write
from ..core.version import __version__
from ..inputs.context import RunContext
from ..inputs.model import check_model_name
from .preflight import changed_inputs, check_inputs, input_digests

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Stage:
    """One pipeline stage: a function of the run context that writes `outputs` into the run directory."""

    name: str
    """CLI name of the stage (`sae-lens-ctx <name>`)."""
    outputs: tuple[str, ...]
    """Files the stage writes, relative to the run directory."""
    config_sections: tuple[str, ...]
    """`RunConfig` fields whose values the stage depends on (part of its fingerprint)."""
    run: Callable[[RunContext], None] | None
    """The stage itself; None while the issue that builds it has not landed."""
    summary: str
    """One line for `--help`."""
    reads_what_exists: bool = False
    """A showing stage (`report`): it reads whatever the earlier stages have written so far, so it runs
    even when one of them is not built yet or not up to date, and it runs every time (it is cheap, and a
    stage run alone may have changed its inputs without changing any fingerprint)."""
    inputs: tuple[str, ...] = ()
    """Inputs the stage reads, by their key in `preflight.input_digests` ('model', 'corpus', 'saes'): their
    content digests are part of its fingerprint, so a model or corpus replaced at the same path re-runs it."""


STAGES: dict[str, Stage] = {}
"""Registered stages in pipeline order."""


def register_stage(stage: Stage) -> Stage:
    """Add a stage at the end of the pipeline; a second stage of the same name is an error."""
    if stage.name in STAGES:
        raise ValueError(f"a stage named {stage.name!r} is already registered")
    STAGES[stage.name] = stage
    return stage


FINISHERS: list[Callable[..., None]] = []
"""Called after every pipeline invocation as `finish(ctx, results, job_type=...)`, in order (the plan
registers W&B logging here)."""


def register_finisher(finish: Callable[..., None]) -> None:
    """Add a finisher (once)."""
    if finish not in FINISHERS:
        FINISHERS.append(finish)


def get_stage(name: str) -> Stage:
    if name not in STAGES:
        raise UserError(f"unknown stage '{name}'{did_you_mean(name, STAGES)}")
    return STAGES[name]


def run_identity(config: RunConfig) -> str:
    """What makes two runs "the same run": the model and its weight convention."""
    m = config.model
    return digest({"model": m.model_name, "class": m.model_class, "weights": m.weights, "dtype": m.dtype})


@dataclass
class StageResult:
    """What happened to one stage in a pipeline run."""

    name: str
    status: str
    """'ran', 'skipped' (up to date), or 'not built yet'."""
    seconds: float = 0.0


class RunDirectory:
    """The run directory: its manifest, its config, and which stages are up to date."""

    def __init__(self, out: str | Path):
        self.out = Path(out)
        self.manifest_path = self.out / MANIFEST
        self.upgraded_from: int | None = None
        """The older results format the manifest was written in, when `read_manifest` upgraded it."""

    def exists(self) -> bool:
        return self.manifest_path.is_file()

    def read_manifest(self) -> dict:
        if not self.exists():
            return {}
        try:
            manifest = json.loads(self.manifest_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise UserError(f"{self.manifest_path} is corrupt: remove the run directory or pass --overwrite") from e
        version = manifest.get("results_format")
        if isinstance(version, int) and not isinstance(version, bool) and 0 < version < RESULTS_FORMAT:
            # an older format: every stage's fingerprint holds the format, so none of its stages is up to
            # date any more and each re-runs where the pipeline reaches it (`upgraded_from`, logged by run_pipeline)
            self.upgraded_from = version
            return {**manifest, "results_format": RESULTS_FORMAT}
        if version != RESULTS_FORMAT:
            raise UserError(f"{self.out} was written by an incompatible version of sae-lens-ctx (results format "
                            f"{version}, this version reads {RESULTS_FORMAT}): use a new --out or pass --overwrite")
        return manifest

    def read_config(self) -> RunConfig:
        return read_run_config(self.out)

    def prepare(self, config: RunConfig, overwrite: bool) -> dict:
        """Check that `config` may run here, clear it if asked, write `config.yaml`; return the manifest."""
        identity = run_identity(config)
        if self.out.exists() and not self.out.is_dir():
            raise UserError(f"--out {self.out} is a file, not a directory")
        if overwrite:
            self._clear()
        manifest = self.read_manifest()
        if manifest and not manifest.get("stages"):
            manifest = {}  # nothing finished here yet (an earlier attempt failed early): start afresh
        if manifest and manifest.get("identity") != identity:
            raise UserError(f"{self.out} holds the results of a different run (another model or weight convention): "
                            "use a new --out, or pass --overwrite to replace them")
        # W&B's folder outlives --overwrite (it may hold unsynced runs), and so does the LLM cache
        # (answers already paid for; keyed by the whole prompt, so never stale).
        ours = {MANIFEST, CONFIG_FILE, "wandb"}
        cache = Path(config.explain.cache_path).name
        kept = [p for p in self.out.iterdir() if p.name not in ours and not p.name.startswith(cache)
                and not _is_temporary(p)] if self.out.is_dir() else []
        if not manifest and kept:
            raise UserError(f"{self.out} is not empty and holds no sae-lens-ctx run: use a new --out, "
                            "or pass --overwrite to write into it")
        self.out.mkdir(parents=True, exist_ok=True)
        manifest = manifest or {"results_format": RESULTS_FORMAT, "identity": identity, "stages": {}}
        manifest["package_version"] = __version__
        atomic_write(self.out / CONFIG_FILE, config.to_yaml())
        self.write_manifest(manifest)
        return manifest

    def _clear(self) -> None:
        """Remove what earlier runs wrote here (known files only, never a user's other files)."""
        if not self.out.is_dir():
            return
        names = {MANIFEST, CONFIG_FILE, "tracking.json"} | {o for s in STAGES.values() for o in s.outputs}
        for name in names:
            p = self.out / name
            if p.is_dir():
                shutil.rmtree(p)
            else:
                p.unlink(missing_ok=True)

    def remove_stale_temporaries(self) -> list[Path]:
        """Remove the `.NAME.*.tmp` files (`records.atomic_write`) a killed process left behind.

        Called when a single-process run starts, not by shards or torchrun ranks: those write into the
        directory at the same time (`shard.py`), while one `run` per run directory at a time is the rule."""
        stale = [p for p in self.out.rglob(".*.tmp") if _is_temporary(p) and "wandb" not in p.relative_to(self.out).parts]
        for p in stale:
            p.unlink(missing_ok=True)
        if stale:
            log.info("removed %d temporary file(s) left by an interrupted run", len(stale))
        return stale

    def write_manifest(self, manifest: dict) -> None:
        atomic_write(self.manifest_path, json.dumps(manifest, indent=2, sort_keys=True) + "\n")


_TEMPORARY = re.compile(r"\.(.+)\.[a-z0-9_]{8}\.tmp")
"""`tempfile.mkstemp(prefix=".NAME.", suffix=".tmp")`'s names, as `records.atomic_write` makes them."""


def _is_temporary(path: Path) -> bool:
    """A temporary file of `records.atomic_write` / `atomic_path` (`.NAME.RANDOM.tmp`)."""
    return bool(_TEMPORARY.fullmatch(path.name)) and path.is_file()


def finished_stage(stage: Stage, fingerprint: str, seconds: float, this_run: dict[str, Any]) -> dict[str, Any]:
    """A finished stage's entry in `stages.json` (the clock and `this_run` live here, and only here)."""
    return {"fingerprint": fingerprint, "outputs": list(stage.outputs),
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "seconds": round(seconds, 3),
            "this_run": this_run}


def stage_fingerprints(config: RunConfig, inputs: dict[str, str] | None = None) -> dict[str, str]:
    """Each stage's fingerprint: its config sections, the digests of the inputs it reads (`inputs`, else
    `preflight.input_digests(config)`), plus every upstream stage's fingerprint."""
    from .preflight import input_digests

    cfg = asdict(config)
    inputs = input_digests(config) if inputs is None else inputs
    prints, upstream = {}, ""
    for stage in STAGES.values():
        upstream = prints[stage.name] = digest({
            "stage": stage.name, "format": RESULTS_FORMAT, "upstream": upstream,
            "config": {s: cfg[s] for s in stage.config_sections},
            "inputs": {k: inputs.get(k) for k in stage.inputs},
        })
    return prints


def run_pipeline(config: RunConfig, out: str | Path, *, overwrite: bool = False, only: str | None = None,
                 force: bool = False, model: Any = None, saes: dict[str, Any] | None = None,
                 until: str | None = None) -> list[StageResult]:
    """Run every built stage in order (or just `only`, or those up to and including `until`) over the run
    directory `out`. `model` is a model object to use instead of loading `config.model`; `saes` maps
    `discover.saes` specs to in-memory `SaeSource`s (the Python API's SAEs without a file)."""
    names = list(STAGES)
    if until is not None:
        names = names[: names.index(get_stage(until).name) + 1]
    if only is not None:
        names = [get_stage(only).name]
    # validate, then load: every input is checked, and named, before the run directory is touched
    check_inputs(config, names, model_given=model is not None)
    inputs = input_digests(config, model_given=model is not None)
    rundir = RunDirectory(out)
    manifest = rundir.prepare(config, overwrite=overwrite)
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:  # torchrun's ranks share the directory: none may clean it
        rundir.remove_stale_temporaries()
    ctx = RunContext(out=rundir.out, config=config, model_object=model, _manifest=manifest,
                     sae_objects=dict(saes or {}))
    prints = stage_fingerprints(config, inputs)
    for key in changed_inputs(manifest.get("inputs", {}), inputs):
        readers = " and ".join(s.name for s in STAGES.values() if key in s.inputs)
        log.info("the %s changed since the last run in %s: re-running %s and every stage after it",
                 _INPUT_NAMES.get(key, key), rundir.out, readers)
    if rundir.upgraded_from is not None:
        stale = [n for n in prints if n in manifest["stages"] and manifest["stages"][n].get("fingerprint") != prints[n]]
        log.info("%s was written in results format %d (this version writes %d, and a stage's fingerprint holds the "
                 "format): re-running %s", rundir.out, rundir.upgraded_from, RESULTS_FORMAT,
                 ", ".join(stale) or "no stage (none had finished)")
    manifest["inputs"] = inputs
    if only is not None and not get_stage(only).reads_what_exists:
        require_upstream(only, manifest, prints)
    results: list[StageResult] = []
    blocked = False
    for name in names:
        stage = STAGES[name]
        if stage.run is None or (blocked and not stage.reads_what_exists):
            blocked = True  # later stages need this one's outputs
            results.append(StageResult(name, "not built yet"))
            continue
        done = manifest["stages"].get(name, {})
        up_to_date = done.get("fingerprint") == prints[name] and all(ctx.path(o).exists() for o in stage.outputs)
        if up_to_date and not force and not stage.reads_what_exists:
            results.append(StageResult(name, "skipped"))
            continue
        manifest["stages"].pop(name, None)
        rundir.write_manifest(manifest)
        start, ctx.this_run = time.perf_counter(), {}
        stage.run(ctx)
        missing = [o for o in stage.outputs if not ctx.path(o).exists()]
        if missing:
            raise RuntimeError(f"stage {name} finished without writing {missing}")
        seconds = time.perf_counter() - start
        manifest["stages"][name] = finished_stage(stage, prints[name], seconds, ctx.this_run)
        rundir.write_manifest(manifest)
        results.append(StageResult(name, "ran", seconds))
    job_type = only or (until if until not in (None, list(STAGES)[-1]) else "run")
    for finish in FINISHERS:
        finish(ctx, results, job_type=job_type)
    return results


_INPUT_NAMES = {"model": "model's files", "corpus": "corpus's files", "saes": "SAE files"}


def require_upstream(name: str, manifest: dict, prints: dict[str, str]) -> None:
    for upstream in STAGES:
        if upstream == name:
            return
        if manifest["stages"].get(upstream, {}).get("fingerprint") != prints[upstream]:
            raise UserError(f"stage '{name}' needs stage '{upstream}' to be up to date in this run directory: "
                            f"run `sae-lens-ctx run --out DIR` (or `sae-lens-ctx {upstream}`) first")

