"""Weights & Biases: one W&B run per `sae-lens-ctx` invocation, holding every table, plot and the results.

What a W&B run gets (SAE-Lens conventions, ecosystem-notes §2.7 and §4):

- `wandb.init` with the resolved config minus secrets, `job_type` = the stage run alone or `run`, tags,
  and a group named like the results artifact, so every invocation on one run directory sits together;
- a table per record file (`units/table`, `contexts/table`, `heads/table`, `explanations/table`,
  `scores/table`, and `scores/head_vs_neuron`), columns as in `results.TABLES`; the contexts table
  adds an `html` column, each prompt with its tokens shaded and every character escaped. A table with
  more rows than `wandb.Table.MAX_ROWS` (whose run-file copy W&B would cut silently) goes into an
  artifact instead, split into parts of at most `wandb.Table.MAX_ARTIFACT_ROWS` rows: never truncated;
- headline numbers as `group/name` metrics, never deeper (`units/...`, `heads/...`, `explanations/...`,
  `cost/...`, including `cost/seconds_<stage>`), logged once and kept in the summary; the scores as a
  few keys per scorer (`heads/E`, `heads/E_control`, `heads/E_vs_shuffled`, `heads/E_verdict` in words,
  `heads/E_well_explained`, `units/auroc`, ...: `RunTables.metrics`), and all of `summary.json` in the
  `scores/summary` table (one row per leaf);
- what the run found first, as on the console and the report's first screen (`stages.report.findings`):
  `findings/n_pairs`, `findings/n_units`, `findings/best` (the best-ranked finding in words) with
  `findings/best_E`, `findings/best_ci_low`, `findings/best_ci_high`, `findings/n_warnings`, one
  `verdicts/<explainer>_<scorer>` word per verdict row, and the tables `findings/table` (every finding,
  ranked) and `verdicts/table`;
- the plots of `plots.py` as images (per-unit heatmaps in the `plots/head_heatmaps` table);
- the whole run directory as a versioned artifact of type `sae-lens-ctx-results`.

Modes (`logging.wandb_mode`): 'auto' resolves to WANDB_MODE, else online with a login and offline
without (announced once); 'disabled' writes no W&B file at all. An online run that cannot reach W&B
falls back to offline with a message, and `tracking.json` in the run directory records what happened.
The W&B folder goes to `logging.wandb_dir`, else WANDB_DIR, else the run directory; unless
WANDB_DATA_DIR is set, artifact staging goes there too, so an offline run directory holds everything
`wandb sync` needs.
"""

from __future__ import annotations

import contextlib
import json
import logging
import netrc
import os
import re
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..core.version import __version__
from ..core.config import RunConfig
from ..stages.report.findings import findings
from ..stages.report.html import ContextRenderer, renderer_for, standalone, unit_peaks
from ..core.layout import MANIFEST, TABLES, table
from ..inputs.context import RunContext
from .engine import StageResult
from ..core.digest import digest
from ..stages.report.plots import write_plots
from ..core.records import atomic_write
from ..stages.report.tables import RunTables, cell, columns, safe_name

log = logging.getLogger(__name__)

RESULTS_TYPE = "sae-lens-ctx-results"
TABLE_TYPE = "sae-lens-ctx-table"
TRACKING_FILE = "tracking.json"
REDACTED = "<redacted>"

_SECRET_KEY = re.compile(r"(^|_)(api_?key|token|secret|password|passwd|access_key|credentials?)$", re.I)
"""Config keys whose values are secrets (`api_key_env`, which names a variable, is not one)."""
_SECRET_ENV = re.compile(r"(KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIALS?)$", re.I)
_SECRET_SHAPE = re.compile(r"\b(sk-[A-Za-z0-9_-]{16,}|hf_[A-Za-z0-9]{20,}|gh[pousr]_[A-Za-z0-9]{20,})\b")
_announced: set[str] = set()


# -- secrets ---------------------------------------------------------------------------------------


def secret_values() -> list[str]:
    """Values of environment variables that look like credentials (WANDB_API_KEY, OPENAI_API_KEY, ...)."""
    return sorted({v for k, v in os.environ.items() if _SECRET_ENV.search(k) and len(v) >= 8}, key=len, reverse=True)


def redact(obj: Any, secrets: list[str] | None = None) -> Any:
    """A copy of a JSON-like object with secrets removed: values of secret-named keys, any credential
    from the environment found inside a string, and strings shaped like well-known API keys."""
    secrets = secret_values() if secrets is None else secrets
    if isinstance(obj, dict):
        return {k: (REDACTED if _SECRET_KEY.search(str(k)) and obj[k] not in (None, "") else redact(v, secrets))
                for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [redact(v, secrets) for v in obj]
    if isinstance(obj, str):
        for secret in secrets:
            obj = obj.replace(secret, REDACTED)
        return _SECRET_SHAPE.sub(REDACTED, obj)
    return obj


# -- modes -----------------------------------------------------------------------------------------


def base_url() -> str:
    import wandb

    return os.environ.get("WANDB_BASE_URL") or wandb.Settings().base_url


def has_login() -> bool:
    """A W&B credential is present: WANDB_API_KEY, an identity token file, or a netrc entry for the host."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urllib.parse.urlparse(base_url()).hostname or ""
    path = os.environ.get("NETRC") or os.path.expanduser("~/.netrc")
    try:
        return bool(host) and netrc.netrc(path).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def _announce(message: str) -> None:
    if message not in _announced:
        _announced.add(message)
        log.warning(message)


def resolve_mode(mode: str) -> str:
    """'auto' → WANDB_MODE if set, else 'online' with a W&B login and 'offline' without (announced once)."""
    if mode != "auto":
        return mode
    env = os.environ.get("WANDB_MODE", "").strip().lower()
    if env in ("online", "offline", "disabled"):
        return env
    if env in ("dryrun", "run"):
        return {"dryrun": "offline", "run": "online"}[env]
    if os.environ.get("WANDB_DISABLED", "").lower() in ("1", "true", "yes"):
        return "disabled"
    if has_login():
        return "online"
    _announce("W&B: no login found (WANDB_API_KEY or `wandb login`), so the run is logged offline inside the run "
              "directory; upload it later with `wandb sync <out>/wandb/offline-run-*`")
    return "offline"


def unreachable(url: str, timeout: float = 5.0) -> str | None:
    """Why W&B's server cannot be reached, or None when it answers (any HTTP status counts as an answer)."""
    try:
        urllib.request.urlopen(url, timeout=timeout).close()
    except urllib.error.HTTPError:
        return None
    except (urllib.error.URLError, OSError, ValueError) as e:
        return str(getattr(e, "reason", e))
    return None


def wandb_root(config: RunConfig, out: Path) -> Path:
    """The folder W&B writes its `wandb/` folder into."""
    return Path(config.logging.wandb_dir or os.environ.get("WANDB_DIR") or out)


@contextlib.contextmanager
def _staging_under(root: Path) -> Iterator[None]:
    """Stage artifact files under `<root>/wandb/data` (unless WANDB_DATA_DIR is set) for the run's length."""
    if os.environ.get("WANDB_DATA_DIR"):
        yield
        return
    os.environ["WANDB_DATA_DIR"] = str(root / "wandb" / "data")
    try:
        yield
    finally:
        os.environ.pop("WANDB_DATA_DIR", None)


# -- names -----------------------------------------------------------------------------------------


def results_name(config: RunConfig) -> str:
    """`sae-lens-ctx-<model>-<digest of the analysis config>`: the same analysis of the same model gets the
    same name (a new version each time it is logged); logging settings do not change it."""
    analysis = {k: v for k, v in config.to_dict().items() if k != "logging"}
    model = Path(config.model.model_name).name or config.model.model_name
    return f"sae-lens-ctx-{safe_name(model)[:60]}-{digest(analysis)[:8]}"


def tags(config: RunConfig, job_type: str) -> list[str]:
    model = Path(config.model.model_name).name or config.model.model_name
    extra = [t.strip() for t in config.logging.wandb_tags.split(",") if t.strip()]
    return [t[:64] for t in ["sae-lens-ctx", safe_name(model), config.model.weights, f"job:{job_type}", *extra]]


# -- the W&B run -----------------------------------------------------------------------------------


def _init(config: RunConfig, root: Path, job_type: str, mode: str, settings: dict | None) -> Any:
    import wandb

    lc = config.logging
    project = lc.wandb_project
    if project == "sae-lens-ctx" and os.environ.get("WANDB_PROJECT"):
        project = os.environ["WANDB_PROJECT"]  # an explicit config value wins; the default yields to WANDB_*
    root.mkdir(parents=True, exist_ok=True)
    return wandb.init(
        project=project, entity=lc.wandb_entity, name=lc.run_name, id=lc.wandb_id,
        resume="allow" if lc.wandb_id else None, job_type=job_type, tags=tags(config, job_type),
        group=results_name(config), config=redact(config.to_dict()), dir=str(root), mode=mode,
        settings=wandb.Settings(**{"init_timeout": lc.wandb_init_timeout,
                                   "table_raise_on_max_row_limit_exceeded": True, **(settings or {})}))


def start_run(config: RunConfig, root: Path, job_type: str, settings: dict | None = None) -> tuple[Any, dict]:
    """Start the W&B run; an online run that cannot start falls back to offline. Returns (run, what happened)."""
    requested = config.logging.wandb_mode
    mode = resolve_mode(requested)
    info: dict[str, Any] = {"requested_mode": requested, "mode": mode, "fallback": None}
    if mode == "online":
        # no login: W&B would ask for one on the terminal (or fail without one); never block a finished run
        problem = unreachable(base_url()) if has_login() else "no W&B login: set WANDB_API_KEY or run `wandb login`"
        if problem is None:
            try:
                return _init(config, root, job_type, "online", settings), info
            except Exception as e:  # wandb raises CommError, UsageError, AuthenticationError, timeouts...
                problem = f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"
        info["fallback"] = (f"W&B could not start an online run at {base_url()} ({problem}); logged offline "
                            f"to {root / 'wandb'} instead: upload it later with `wandb sync`")
        info["mode"] = "offline"
        log.warning(info["fallback"])
    return _init(config, root, job_type, info["mode"], settings), info


def log_run(ctx: RunContext, results: list[StageResult] | tuple = (), job_type: str = "run",
            settings: dict | None = None) -> dict | None:
    """Log the run directory to one W&B run; returns what `tracking.json` records (None when disabled).

    `settings` are extra `wandb.Settings` (tests pass the fast offline ones).
    """
    config = ctx.config
    if resolve_mode(config.logging.wandb_mode) == "disabled":
        log.info("W&B logging is disabled (logging.wandb_mode / WANDB_MODE): no W&B files written")
        return None
    import wandb
    root = wandb_root(config, ctx.out)
    res = RunTables.load(ctx.out)
    with _staging_under(root), tempfile.TemporaryDirectory(prefix="sae-lens-ctx-plots-") as scratch:
        run, info = start_run(config, root, job_type, settings)
        try:
            info.update(run_id=run.id, project=run.project, job_type=job_type, results_artifact=results_name(config),
                        wandb_dir=str(Path(run.dir).parent.resolve()) if getattr(run, "dir", None) else None)
            atomic_write(ctx.path(TRACKING_FILE), json.dumps(info, indent=2) + "\n")
            payload: dict[str, Any] = {}
            payload.update(log_tables(run, res, renderer_for(ctx, res), config))
            metrics = res.metrics()
            for r in results:
                if r.status == "ran":
                    metrics[f"cost/seconds_{r.name}"] = round(r.seconds, 3)
            metrics["cost/seconds_total"] = round(sum(r.seconds for r in results if r.status == "ran"), 3)
            payload.update(metrics)
            payload.update(findings_payload(res))
            payload.update(plot_images(ctx, res, results, config, Path(scratch)))
            run.log(payload)
            if config.logging.log_results_artifact:
                run.log_artifact(results_artifact(ctx.out, root, config, metrics), aliases=["latest", job_type])
        finally:
            run.finish()
    return info


# -- tables ----------------------------------------------------------------------------------------


def table_rows(name: str, res: RunTables, renderer: ContextRenderer | None = None) -> tuple[list[str], list[list]]:
    """Columns and rows of one table as W&B gets them: JSONL values (lists and dicts as JSON text); the
    contexts table adds `html`, the prompt with shaded tokens as a `wandb.Html` cell, and the scores table
    `control`, whether the score's unit is a control unit."""
    import wandb

    if name == "lookups":
        return lookup_table(res)
    spec = table(name)
    rows = res.rows(name)
    cols = columns(spec, rows)
    data = [[cell(row.get(c)) for c in cols] for row in rows]
    if name == "scores" and "control" not in cols:  # controls beside: whether the row's unit is a control
        cols = cols + ["control"]
        for row, out in zip(rows, data):
            out.append(res.is_control(row))
    if name == "contexts" and renderer is not None:
        peaks = unit_peaks(res)
        cols = cols + ["html"]
        for line, (row, out) in enumerate(zip(rows, data)):
            out.append(wandb.Html(standalone(renderer.html(row, line, peaks.get(row["unit_id"], 0.0))), inject=False))
    return cols, data


LOOKUP_COLUMNS = ["unit_id", "head", "split", "rank", "prompt", "active", "token", "position", "attention",
                  "contribution", "attribution"]
"""The `lookups` table: one row per recorded source position of a (unit, head, prompt) (`lookups.jsonl`)."""


def lookup_table(res: RunTables) -> tuple[list[str], list[list]]:
    """`lookups.jsonl` flattened to one row per source position, with the prompt's text from `contexts.jsonl`."""
    text = {(c["unit_id"], c["split"], c["rank"]): c.get("text") for c in res.rows("contexts") if c.get("kind") == "top"}
    data = []
    for r in res.rows("lookups"):
        prompt = text.get((r["unit_id"], r["split"], r["rank"]))
        for s in r.get("sources") or []:
            data.append([r["unit_id"], r["head"], r["split"], r["rank"], prompt, r["active"], s["token"],
                         s["position"], s["attention"], s["contribution"], r["attribution"]])
    return LOOKUP_COLUMNS, data


QK_COLUMNS = ["unit_id", "head", "split", "rank", "position", "token", "side", "component", "contribution", "share",
              "score"]
"""The `qk/table`: one row per marginal entry of a `qk.jsonl` record (`side` 'key' or 'query'): `contribution` to the
gap and its `share`, and `score`, the same component's part of the attention logit."""


def qk_table(out: Path) -> list[list]:
    """`qk.jsonl` flattened to one row per (record, side, component); records without numbers are left out."""
    from ..core.records import iter_jsonl

    path = Path(out) / "qk.jsonl"
    data = []
    for r in iter_jsonl(path) if path.is_file() else []:
        for side in ("key", "query"):
            for e in r.get(side) or []:
                data.append([r["unit_id"], r["head"], r["split"], r["rank"], r["position"], r["token"], side,
                             e["component"], e["gap"], e["gap_share"], e["score"]])
    return data


def log_tables(run: Any, res: RunTables, renderer: ContextRenderer, config: RunConfig) -> dict[str, Any]:
    """Tables of every record file present: small ones for `run.log`, large ones as artifacts (logged here)."""
    payload: dict[str, Any] = {}
    tables = [(t.table, *table_rows(t.table, res, renderer)) for t in TABLES if t.table in res.tables]
    comparison = res.comparison()
    if comparison:
        cols = list(comparison[0])
        tables.append(("scores/head_vs_neuron", cols, [[cell(r[c]) for c in cols] for r in comparison]))
    qk = qk_table(res.out)
    if qk:
        tables.append(("qk/table", QK_COLUMNS, qk))
    summary = res.summary_rows()
    if summary:  # everything of summary.json beside the few headline keys
        tables.append(("scores/summary", ["path", "value"], [[r["path"], r["value"]] for r in summary]))
    for name, cols, data in tables:
        key = name if "/" in name else f"{name}/table"
        payload[f"{name}_rows" if "/" in name else f"{name}/rows"] = len(data)
        payload.update(_table_or_artifact(run, key, cols, data, config))
    return payload


def findings_payload(res: RunTables) -> dict[str, Any]:
    """The findings and verdicts (`stages.report.findings`) as headline keys and two tables; {} without scores."""
    import wandb

    if "scores" not in res.tables:
        return {}
    f = findings(res)
    ranked = f.all_pairs + f.all_units
    out: dict[str, Any] = {"findings/n_pairs": len(f.all_pairs), "findings/n_units": len(f.all_units),
                           "findings/n_warnings": f.n_warnings,
                           "findings/best": f"{ranked[0].title()}: {ranked[0].score()}, {ranked[0].verdict}"
                           if ranked else f.none_line()}
    if ranked:
        out.update({k: v for k, v in (("findings/best_E", ranked[0].value), ("findings/best_ci_low", ranked[0].ci_low),
                                      ("findings/best_ci_high", ranked[0].ci_high)) if v is not None})
    cols = ["rank", "kind", "unit_id", "head", "token", "looked_up", "explainer", "text", "scorer", "value", "ci_low",
            "ci_high", "n", "verdict"]
    out["findings/table"] = wandb.Table(columns=cols, data=[
        [i, x.kind, x.unit_id, x.head, x.token, " / ".join(x.looked_up), x.explainer, x.text, x.scorer, x.value,
         x.ci_low, x.ci_high, x.n, x.verdict] for i, x in enumerate(ranked, 1)])
    vcols = ["explainer", "scorer", "real", "n", "strongest_control", "control_mean", "difference", "ci_low", "ci_high",
             "verdict"]
    out["verdicts/table"] = wandb.Table(columns=vcols, data=[
        [v.explainer, v.scorer, v.real, v.n, v.control, v.control_mean, v.difference, v.ci_low, v.ci_high, v.verdict]
        for v in f.verdicts])
    for v in f.verdicts:
        out[f"verdicts/{safe_name(v.explainer.replace(' / ', '+'))}_{v.scorer}"] = v.verdict
    return out


def _table_or_artifact(run: Any, key: str, cols: list[str], data: list[list], config: RunConfig) -> dict[str, Any]:
    import wandb

    if len(data) <= wandb.Table.MAX_ROWS:
        return {key: wandb.Table(columns=cols, data=data)}
    name = f"{results_name(config)}-{safe_name(key.replace('/', '-'))}"
    art = wandb.Artifact(name, type=TABLE_TYPE, metadata={"key": key, "rows": len(data), "columns": cols})
    step = wandb.Table.MAX_ARTIFACT_ROWS
    for part, start in enumerate(range(0, len(data), step)):
        art.add(wandb.Table(columns=cols, data=data[start:start + step]), f"part{part:03d}")
    run.log_artifact(art)
    log.info("W&B: table %s has %d rows (over wandb.Table.MAX_ROWS = %d): logged whole as artifact %s",
             key, len(data), wandb.Table.MAX_ROWS, name)
    return {f"{key}_artifact": name}


# -- plots -----------------------------------------------------------------------------------------


def plot_images(ctx: RunContext, res: RunTables, results, config: RunConfig, scratch: Path) -> dict[str, Any]:
    """The plots as W&B images: those the report stage just wrote, else drawn afresh into `scratch` (a stage
    run alone, whose run directory may hold an older report)."""
    import wandb

    report_ran = any(r.name == "report" and r.status == "ran" for r in results)
    folder = ctx.path("plots")
    if report_ran and (ctx.out / "report.json").is_file():
        plots = {k: v.removeprefix("plots/") for k, v in
                 json.loads((ctx.out / "report.json").read_text(encoding="utf-8"))["plots"].items()}
    else:
        folder = scratch
        plots = write_plots(res, folder, config.logging.well_explained)
    payload: dict[str, Any] = {}
    heatmaps = wandb.Table(columns=["unit_id", "token", "heatmap"])
    for name, rel in sorted(plots.items()):
        image = wandb.Image(str(folder / rel))
        if name.startswith("heatmap:"):
            unit_id = name.removeprefix("heatmap:")
            heatmaps.add_data(unit_id, (res.unit(unit_id) or {}).get("token"), image)
        else:
            payload[f"plots/{name}"] = image
    if heatmaps.data:
        payload["plots/head_heatmaps"] = heatmaps
    return payload


# -- the results artifact --------------------------------------------------------------------------


def run_files(out: Path, root: Path) -> list[Path]:
    """Every file of the run directory, except W&B's own folder and half-written temporary files."""
    out = Path(os.path.abspath(out))
    skip = Path(os.path.abspath(root / "wandb"))  # compared lexically: W&B's logs there are symlinks
    files = []
    for path in sorted(out.rglob("*")):
        if not path.is_file() or path == skip or skip in path.parents:
            continue
        if path.name.startswith(".") and path.name.endswith(".tmp"):
            continue
        files.append(path)
    return files


def results_artifact(out: Path, root: Path, config: RunConfig, metrics: dict) -> Any:
    """The run directory as a versioned artifact; files holding a secret from the environment are
    added redacted (the run directory itself is left as it is)."""
    import wandb

    manifest = json.loads((out / MANIFEST).read_text(encoding="utf-8")) if (out / MANIFEST).is_file() else {}
    model = json.loads((out / "model.json").read_text(encoding="utf-8")) if (out / "model.json").is_file() else {}
    art = wandb.Artifact(results_name(config), type=RESULTS_TYPE, description="sae-lens-ctx run directory",
                         metadata={"package_version": __version__, "config": redact(config.to_dict()), "model": model,
                                   "stages": manifest.get("stages", {}), "metrics": metrics})
    secrets = secret_values()
    for path in run_files(out, root):
        rel = path.relative_to(os.path.abspath(out)).as_posix()
        text = _text_with_secret(path, secrets)
        if text is None:
            art.add_file(str(path), name=rel)
        else:
            with art.new_file(rel, mode="w", encoding="utf-8") as f:
                f.write(redact(text, secrets))
    return art


def _text_with_secret(path: Path, secrets: list[str]) -> str | None:
    """The file's text if it is a small text file holding a secret, else None."""
    if path.suffix not in (".yaml", ".yml", ".json", ".jsonl", ".txt", ".html") or path.stat().st_size > 50_000_000:
        return None
    text = path.read_text(encoding="utf-8", errors="replace")
    return text if any(s in text for s in secrets) or _SECRET_SHAPE.search(text) else None


def log_finished_run(ctx: RunContext, results: list[StageResult], job_type: str = "run") -> None:
    """The plan's finisher (`pipeline.engine.register_finisher`): one W&B run per invocation (tables, plots,
    artifact) when `logging.log_to_wandb` is set."""
    if ctx.config.logging.log_to_wandb:
        log_run(ctx, results, job_type=job_type)
