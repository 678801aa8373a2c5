"""W&B tracking read back from disk, plots, presets, the sweep and the dashboard spec.

Every W&B run here is a real offline run inside the test's run directory, read back with
`wandb leet inspect --json` (ecosystem-notes §4.4) and from the table files and staged artifact files
its records point to.
"""

import json
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
import yaml

import tracked_run
from wandb_offline import Offline
from sae_lens_ctx.cli import _config_parser, _parse_config, main
from sae_lens_ctx.core.config import RunConfig
from sae_lens_ctx.core.errors import UserError
from sae_lens_ctx.inputs.context import RunContext
from sae_lens_ctx.pipeline.engine import RunDirectory, run_pipeline
from sae_lens_ctx.core.records import iter_jsonl
from sae_lens_ctx.core.layout import TABLES, table
from sae_lens_ctx.stages.report.tables import cell
from sae_lens_ctx.pipeline.wandb_log import RESULTS_TYPE, TABLE_TYPE, log_run, redact, run_files

# A hang guard, not a timing assertion: many times what the subprocess takes even on a busy 2-core machine
# (where a bare `sae-lens-ctx --help` once took a minute), so only a hang fails the test.
HANG_GUARD_S = 1800

PRESETS = Path(__file__).resolve().parents[2] / "wandb_configs"
TABLE_OF_STAGE = {"discover": ("units",), "mine": ("contexts",), "attribute": ("heads", "lookups"),
                  "explain": ("explanations",), "score": ("scores",)}


@pytest.fixture(scope="session")
def base_run(planted_gpt2, tmp_path_factory):
    return tracked_run.build(planted_gpt2, tmp_path_factory.mktemp("tracked"))


@pytest.fixture(autouse=True)
def offline_wandb(monkeypatch):
    """These tests are about W&B: offline runs (conftest disables W&B for every other test)."""
    monkeypatch.setenv("WANDB_MODE", "offline")


def log(out: Path, job_type="run", **logging):
    cfg = RunDirectory(out).read_config()
    cfg.logging.log_to_wandb = True
    for key, value in logging.items():
        setattr(cfg.logging, key, value)
    return log_run(RunContext(out=out, config=cfg), [], job_type=job_type, settings=tracked_run.FAST_WANDB)


# -- reading an offline run back ---------------------------------------------------------------------


def expected(out: Path, name: str) -> tuple[list[str], list[list]]:
    """The run directory's JSONL rows as table rows, and the record dataclass's fields."""
    spec = table(name)
    if name == "lookups":  # one row per source position (wandb_log.lookup_table), checked against the file here
        rows = list(iter_jsonl(out / spec.name))
        from sae_lens_ctx.stages.report.tables import RunTables
        from sae_lens_ctx.pipeline.wandb_log import LOOKUP_COLUMNS, lookup_table

        cols, data = lookup_table(RunTables.load(out))
        assert cols == LOOKUP_COLUMNS and len(data) == sum(len(r["sources"]) for r in rows) > 0
        return cols, data
    rows = list(iter_jsonl(out / spec.name))
    cols = spec.record_columns()
    assert set(spec.documented) <= set(cols)  # the run-directory contract's columns are all there
    return cols, [[cell(r.get(c)) for c in cols] for r in rows]


def assert_tables_match(run: Offline, out: Path, present: set[str]):
    logged = {t.table for t in TABLES if f"{t.table}/table" in run.summary}
    assert logged == present
    for name in present:
        cols, rows = expected(out, name)
        table = run.table(f"{name}/table")
        extra = {"contexts": ["html"], "scores": [] if "control" in cols else ["control"]}.get(name, [])
        assert table["columns"] == cols + extra, name
        assert [r[: len(cols)] for r in table["data"]] == rows, name
        assert run.summary[f"{name}/rows"] == len(rows)


# -- the tests ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("stage", list(tracked_run.STAGE_FILES))
def test_an_offline_run_per_stage_holds_every_table_and_the_whole_run_directory(base_run, tmp_path, stage):
    out = tracked_run.copy_run(base_run, tmp_path / "run", upto=stage)
    info = log(out, job_type=stage)
    assert info["mode"] == "offline" and info["fallback"] is None
    run_dir = Path(info["wandb_dir"])
    assert run_dir.parent == out / "wandb"  # one directory holds everything about a run
    run = Offline(str(run_dir))
    assert run.state == "finished" and run.run["job_type"] == stage
    assert "sae-lens-ctx" in run.tags and f"job:{stage}" in run.tags
    assert run.config["model"]["model_name"] == RunDirectory(out).read_config().model.model_name

    stages = list(tracked_run.STAGE_FILES)
    done = stages[: stages.index(stage) + 1]
    present = {t for s in done for t in TABLE_OF_STAGE.get(s, ())}
    assert present == {t.table for t in TABLES if (out / t.name).exists()}
    assert_tables_match(run, out, present)
    if (out / "qk.jsonl").exists():  # the QK split, one row per marginal entry (wandb_log.qk_table)
        from sae_lens_ctx.pipeline.wandb_log import QK_COLUMNS, qk_table

        qk = run.table("qk/table")
        assert qk["columns"] == QK_COLUMNS and qk["data"] == qk_table(out) and len(qk["data"]) > 0
        assert run.summary["qk/table_rows"] == len(qk["data"])

    results = run.artifact(RESULTS_TYPE)
    assert results["name"] == info["results_artifact"]
    on_disk = {p.relative_to(out).as_posix() for p in run_files(out, out)}
    assert set(Offline.files(results)) == on_disk
    assert on_disk >= {f for s in done for f in tracked_run.STAGE_FILES[s]}
    assert "tracking.json" in on_disk
    for path, local in Offline.files(results).items():  # staged copies, inside the run's own W&B folder
        assert local.read_bytes() == (out / path).read_bytes() and out / "wandb" in local.parents
    if stage == "score":
        assert run.summary["heads/E"] == pytest.approx(0.85)
        assert run.summary["heads/E_control"] == pytest.approx(0.5)
        comparison = run.table("scores/head_vs_neuron")
        assert {"unit_id", "scorer", "unit_score", "head_score_mean", "best_head"} <= set(comparison["columns"])
        assert run.summary["cost/usd"] == pytest.approx(0.003)
        assert "plots/score_histograms" in run.summary and "plots/head_vs_neuron" in run.summary
    if stage in ("attribute", "score"):
        assert run.summary["heads/n_pairs"] == 2  # the two planted heads
        heatmaps = run.table("plots/head_heatmaps")
        assert heatmaps["columns"] == ["unit_id", "token", "heatmap"] and len(heatmaps["data"]) == 2
        assert "plots/ablation_boxplot" in run.summary


class _Text(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.text = set(), []

    def handle_starttag(self, tag, attrs):
        self.tags.add(tag)

    def handle_data(self, data):
        self.text.append(data)


def parse_html(text: str) -> _Text:
    parser = _Text()
    parser.feed(text)
    return parser


def test_hostile_text_is_inert_and_readable_in_the_wandb_html_cells(base_run, tmp_path):
    out = tracked_run.copy_run(base_run, tmp_path / "run")
    run = Offline(log(out)["wandb_dir"])
    art = run.artifact("run_table", f"run-{run.run['run_id']}-contextstable")
    table = json.loads(Offline.files(art)["contexts/table.table.json"].read_text(encoding="utf-8"))
    cols = table["columns"]
    nasty = next(r for r in table["data"] if r[cols.index("text")] == tracked_run.NASTY)
    html = Offline.files(art)[nasty[cols.index("html")]["path"]].read_text(encoding="utf-8")
    parsed = parse_html(html)
    assert "script" not in parsed.tags and "b" not in parsed.tags
    assert tracked_run.NASTY in "".join(parsed.text)  # readable: the exact text, unescaped by a parser
    assert "&lt;script&gt;" in html and "&amp;amp;" in html and "&quot;double&quot;" in html
    # an ordinary prompt is shaded token by token, the last token marked
    first = Offline.files(art)[table["data"][0][cols.index("html")]["path"]].read_text(encoding="utf-8")
    assert first.count('class="tok') == len(json.loads(table["data"][0][cols.index("tokens")]))
    assert 'class="tok last"' in first


def test_tables_over_the_row_limit_go_whole_into_an_artifact(base_run, tmp_path, monkeypatch):
    import wandb

    out = tracked_run.copy_run(base_run, tmp_path / "run", upto="mine")
    monkeypatch.setattr(wandb.Table, "MAX_ROWS", 50)
    monkeypatch.setattr(wandb.Table, "MAX_ARTIFACT_ROWS", 80)
    run = Offline(log(out)["wandb_dir"])
    assert "contexts/table" not in run.summary and "units/table" in run.summary
    art = run.artifact(TABLE_TYPE)
    assert run.summary["contexts/table_artifact"] == art["name"]
    parts = sorted((p, f) for p, f in Offline.files(art).items() if p.endswith(".table.json"))
    assert [p for p, _ in parts] == ["part000.table.json", "part001.table.json"]
    rows = [r for _, f in parts for r in json.loads(f.read_text(encoding="utf-8"))["data"]]
    cols, want = expected(out, "contexts")
    assert len(rows) == len(want) > 80 and [r[: len(cols)] for r in rows] == want


def test_disabled_mode_writes_no_wandb_files(base_run, tmp_path):
    out = tracked_run.copy_run(base_run, tmp_path / "run")
    assert log(out, wandb_mode="disabled") is None
    assert not (out / "wandb").exists() and not (out / "tracking.json").exists()
    cfg = RunDirectory(out).read_config()
    cfg.logging.log_to_wandb, cfg.logging.wandb_mode = True, "disabled"
    assert {r.name: r.status for r in run_pipeline(cfg, out, only="report")}["report"] == "ran"
    assert not (out / "wandb").exists()


def test_overwrite_replaces_the_report_and_keeps_wandb_runs(base_run, tmp_path):
    out = tracked_run.copy_run(base_run, tmp_path / "run")
    cfg = RunDirectory(out).read_config()
    cfg.logging.log_to_wandb, cfg.logging.wandb_mode = True, "offline"
    run_pipeline(cfg, out, only="report")
    assert (out / "tracking.json").is_file() and (out / "report" / "index.html").is_file()
    cfg.logging.log_to_wandb = False
    assert {r.name: r.status for r in run_pipeline(cfg, out, overwrite=True, only="load")} == {"load": "ran"}
    assert not (out / "report").exists() and not (out / "plots").exists() and not (out / "tracking.json").exists()
    assert list((out / "wandb").glob("offline-run-*"))  # unsynced offline runs are not thrown away


def test_no_secret_reaches_wandb(base_run, tmp_path, monkeypatch):
    openai_key, wandb_key = "sk-plantedOPENAIkey0123456789abcdef", "plantedwandbkey" + "0" * 25
    monkeypatch.setenv("OPENAI_API_KEY", openai_key)
    monkeypatch.setenv("WANDB_API_KEY", wandb_key)
    out = tracked_run.copy_run(base_run, tmp_path / "run")
    cfg = RunDirectory(out).read_config()
    cfg.corpus.split_salt = f"pasted-{openai_key}"  # a key pasted into a config value by mistake
    (out / "config.yaml").write_text(cfg.to_yaml())
    cfg.logging.log_to_wandb, cfg.logging.wandb_mode = True, "offline"
    info = log_run(RunContext(out=out, config=cfg), [], settings=tracked_run.FAST_WANDB)
    run = Offline(info["wandb_dir"])
    assert run.config["corpus"]["split_salt"] == "pasted-<redacted>"
    for path in (out / "wandb").rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert openai_key.encode() not in data and wandb_key.encode() not in data, path
    staged = Offline.files(run.artifact(RESULTS_TYPE))["config.yaml"].read_text()
    assert "pasted-<redacted>" in staged
    assert redact({"explain": {"api_key": "abc", "api_key_env": "MY_KEY"}, "x": "hf_" + "a" * 30}) == \
        {"explain": {"api_key": "<redacted>", "api_key_env": "MY_KEY"}, "x": "<redacted>"}


@pytest.mark.parametrize("login", [True, False])
def test_online_without_a_reachable_wandb_falls_back_to_offline(base_run, tmp_path, monkeypatch, caplog, login):
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    if login:
        monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    else:
        monkeypatch.delenv("WANDB_API_KEY", raising=False)
    out = tracked_run.copy_run(base_run, tmp_path / "run", upto="discover")
    info = log(out, wandb_mode="online")
    assert info["requested_mode"] == "online" and info["mode"] == "offline"
    assert "127.0.0.1:9" in info["fallback"] and "wandb sync" in info["fallback"]
    assert ("no W&B login" in info["fallback"]) != login
    assert any("could not start an online run" in r.message for r in caplog.records)
    assert json.loads((out / "tracking.json").read_text())["fallback"] == info["fallback"]
    assert_tables_match(Offline(info["wandb_dir"]), out, {"units"})  # nothing lost


def test_auto_mode_follows_wandb_mode_and_the_login(monkeypatch, tmp_path):
    from sae_lens_ctx.pipeline.wandb_log import resolve_mode

    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert resolve_mode("auto") == "disabled" and resolve_mode("offline") == "offline"
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "none"))
    assert resolve_mode("auto") == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    assert resolve_mode("auto") == "online"


@pytest.mark.parametrize("args, words", [
    (["--logging.wandb_project=team/project"], ["logging.wandb_project", "rejected by W&B"]),
    (["--logging.wandb_entity", "my team"], ["logging.wandb_entity", "rejected by W&B"]),
])
def test_names_wandb_would_reject_are_one_line_errors(tmp_path, capsys, args, words):
    assert main(["run", "--out", str(tmp_path / "run"), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and all(w in err for w in words)
    assert not (tmp_path / "run").exists()


def test_report_on_an_empty_run_directory_is_a_one_line_error(tmp_path, capsys, base_run):
    (tmp_path / "empty").mkdir()
    assert main(["report", "--out", str(tmp_path / "empty")]) == 2
    assert "not a sae-lens-ctx run directory" in capsys.readouterr().err
    out = tracked_run.copy_run(base_run, tmp_path / "loaded", upto="load")
    with pytest.raises(UserError, match="no units.jsonl"):
        run_pipeline(RunDirectory(out).read_config(), out, only="report")


def test_plots_are_files_and_identical_when_the_records_are(base_run, tmp_path):
    out = tracked_run.copy_run(base_run, tmp_path / "run")
    cfg = RunDirectory(out).read_config()
    run_pipeline(cfg, out, only="report")
    report = json.loads((out / "report.json").read_text())
    names = {"unit_layers", "score_histograms", "ablation_boxplot", "head_vs_neuron"}
    assert names <= set(report["plots"]) and sum(k.startswith("heatmap:") for k in report["plots"]) == 2
    assert all((out / p).read_bytes().startswith(b"\x89PNG") for p in report["plots"].values())
    outputs = [out / "report.json", out / "report" / "index.html", *sorted((out / "plots").rglob("*.png"))]
    first = {p: p.read_bytes() for p in outputs}
    run_pipeline(cfg, out, only="report")  # the report re-runs every time: same records, same bytes
    assert {p: p.read_bytes() for p in outputs} == first
    assert report["tables"] == {"units": 2, "contexts": len(list(iter_jsonl(out / "contexts.jsonl"))), "heads": 32,
                                "explanations": 4, "scores": 10,
                                "lookups": len(list(iter_jsonl(out / "lookups.jsonl")))}


# -- presets, sweep, dashboard ---------------------------------------------------------------------


RUN_PRESETS = sorted(p for p in PRESETS.glob("*.yaml") if p.name not in ("sweep.yaml", "dashboard.yaml"))


def test_the_paper_presets_are_all_there():
    names = {p.stem for p in RUN_PRESETS}
    assert {"gpt2-small", "gpt2-small-round1", "gpt2-medium", "gpt2-medium-round1", "gpt2-large",
            "gpt2-large-round1", "gpt2-large-random-control", "pythia-160m", "pythia-1.4b", "embedded",
            "sae-gpt2-small"} <= names


@pytest.mark.parametrize("path", RUN_PRESETS, ids=lambda p: p.stem)
def test_every_preset_loads_and_validates(path):
    from sae_lens_ctx.inputs.model import check_model_name

    cfg = RunConfig.from_yaml(path)  # strict: a mistyped key is an error
    check_model_name(cfg.model)  # the model name resolves (no network needed)
    assert cfg.logging.log_to_wandb
    for spec in cfg.discover.saes:
        from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

        release, sae_id = spec.split(":", 1)
        assert sae_id in get_pretrained_saes_directory()[release].saes_map
    if not path.stem.startswith("embedded"):  # the embedded presets run offline on the embedded LLM
        assert cfg.explain.backend == "openai" and "api_key" not in path.read_text().replace("OPENAI_API_KEY", "")
    if path.stem.startswith("gpt2-large") and "control" not in path.stem:
        assert cfg.discover.top_k == 40
    rules = {"round1": "top3", "embedded": "mean+2std-positive"}  # the paper presets: the authors' rules
    assert cfg.attribute.rule == rules.get(path.stem.rsplit("-", 1)[-1], "mean+2std")  # the default is ours


def test_the_embedded_preset_is_the_default():
    cfg = RunConfig.from_yaml(PRESETS / "embedded.yaml")
    default = RunConfig().to_dict()
    assert {k: v for k, v in cfg.to_dict().items() if k != "logging"} == {k: v for k, v in default.items()
                                                                            if k != "logging"}


@pytest.mark.embedded
def test_the_embedded_preset_runs_and_logs_offline(tmp_path, embedded_view):
    """The preset itself, as CI runs it: load, discover and the report, logged to an offline W&B run."""
    cfg = RunConfig.from_yaml(PRESETS / "embedded.yaml")
    out = tmp_path / "run"
    for stage in ("load", "discover", "report"):
        run_pipeline(cfg, out, only=stage, model=embedded_view.model)
    info = json.loads((out / "tracking.json").read_text())
    assert info["mode"] == "offline" and info["job_type"] == "report"
    run = Offline(info["wandb_dir"])
    assert_tables_match(run, out, {"units"})
    assert (out / "report" / "index.html").is_file() and run.summary["units/n_units"] == cfg.discover.top_k * cfg.discover.n_last_layers


def test_the_sweep_is_valid_for_wandb_and_our_parser():
    from wandb.sdk.launch.sweeps.utils import create_sweep_command_args, load_sweep_config

    sweep = load_sweep_config(str(PRESETS / "sweep.yaml"))
    allowed = {"program", "method", "parameters", "metric", "name", "early_terminate", "command", "project",
               "entity", "description", "run_cap"}
    assert set(sweep) <= allowed and {"program", "method", "parameters"} <= set(sweep)
    assert sweep["method"] in ("grid", "random", "bayes")
    command = sweep["command"]
    assert command[:3] == ["${env}", "sae-lens-ctx", "run"] and command[-1] == "${args}"
    assert shutil.which(command[1])
    base = RunConfig.from_yaml(PRESETS.parent / command[3])
    names = {"attribute.rule", "attribute.band_low", "attribute.band_high", "mine.trim_ratio", "discover.top_k"}
    assert set(sweep["parameters"]) == names
    combos = [{p: {"value": v}} for p, spec in sweep["parameters"].items() for v in spec["values"]]
    combos.append({p: {"value": spec["values"][-1]} for p, spec in sweep["parameters"].items()})
    for combo in combos:
        flags = create_sweep_command_args({"args": combo})["args"]  # what `wandb agent` passes: --param=value
        assert all(re.fullmatch(r"--[a-z_]+\.[a-z_]+=\S+", f) for f in flags)
        ns = _parse_config(_config_parser("sae-lens-ctx run", "", base), command[4:-1] + flags)
        for param, value in combo.items():
            section, key = param.split(".")
            assert getattr(getattr(ns.config, section), key) == value["value"]


def test_the_dashboard_spec_builds_a_workspace_and_names_only_logged_keys(base_run, tmp_path):
    from sae_lens_ctx.workspace import METRIC_PATTERNS, build_workspace, load_spec, publish

    spec = load_spec(PRESETS / "dashboard.yaml")
    workspace = build_workspace(spec, entity="team", project="sae-lens-ctx")
    assert [s.name for s in workspace.sections] == [s["name"] for s in spec["sections"]]
    assert "saved as the spec" in publish(PRESETS / "dashboard.yaml", "team", "sae-lens-ctx")  # offline here
    out = tracked_run.copy_run(base_run, tmp_path / "run")
    run = Offline(log(out)["wandb_dir"])  # every key a run logs is one a spec may name
    for key in run.summary:
        if not key.startswith("_"):
            assert any(re.fullmatch(p, key) for p in METRIC_PATTERNS), key
    bad = tmp_path / "bad.yaml"
    panel = {"type": "bar", "metrics": ["heads/typo"]}
    bad.write_text(yaml.safe_dump({"sections": [{"name": "x", "panels": [panel]}]}))
    with pytest.raises(UserError, match="do not log"):
        load_spec(bad)


def test_a_pipeline_invocation_logs_one_wandb_run(base_run, tmp_path):
    out = tracked_run.copy_run(base_run, tmp_path / "run")
    cfg = RunDirectory(out).read_config()
    cfg.logging.log_to_wandb, cfg.logging.wandb_mode = True, "offline"
    results = {r.name: r.status for r in run_pipeline(cfg, out, only="report")}
    assert results == {"report": "ran"}
    runs = sorted((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    run = Offline(str(runs[0]))
    assert run.run["job_type"] == "report" and "cost/seconds_report" in run.summary
    assert_tables_match(run, out, {"units", "contexts", "heads", "explanations", "scores", "lookups"})
    assert os.environ.get("WANDB_DATA_DIR") is None  # staging was pointed into the run only while logging
    sync = subprocess.run(["wandb", "sync", "--dry-run"], cwd=out, capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert sync.returncode == 0 and "Would sync 1 run" in sync.stdout + sync.stderr  # `wandb sync` finds it later
    assert run.run["run_id"] in sync.stdout + sync.stderr


def test_the_wandb_summary_holds_a_few_headline_keys_two_levels_deep_and_the_rest_in_a_table(base_run, tmp_path):
    """The planted run scored by the real score stage (the offline keyword judge of the score tests), then
    logged offline and read back: the summary holds a few `group/metric` keys per scorer, never deeper, with
    the verdict in words; everything of summary.json is a row of the `scores/summary` table."""
    from scored_run import KeywordJudge  # registers the offline keyword judge made for the score tests
    from sae_lens_ctx.stages import score

    out = tracked_run.copy_run(base_run, tmp_path / "run")
    cfg = RunDirectory(out).read_config()
    cfg.explain.backend, cfg.explain.cache = KeywordJudge.backend, False
    cfg.score.bootstrap_resamples = 200
    score.run_stage(RunContext(out=out, config=cfg))
    summary = json.loads((out / "summary.json").read_text())
    run = Offline(log(out)["wandb_dir"])
    keys = [k for k in run.summary if not k.startswith("_")]
    assert all(k.count("/") == 1 for k in keys), [k for k in keys if k.count("/") != 1]
    score_keys = [k for k in keys if re.fullmatch(r"(heads|units)/(E|auroc|lookup_E|lookup_auroc|sim_correlation).*", k)]
    assert 10 <= len(score_keys) <= 60 and len(keys) <= 120
    e = summary["headline"]["E"]
    assert run.summary["heads/E"] == pytest.approx(e["real"]["mean"])
    assert run.summary["heads/E_vs_length"] == pytest.approx(e["real_minus_length"]["difference"])
    compared = [c for c in ("random_units", "shuffled", "length", "token") if f"real_minus_{c}" in e]
    behind = [c for c in compared if not e[f"real_minus_{c}"]["distinguishable"]]
    assert compared == ["random_units", "shuffled", "length", "token"]
    assert run.summary["heads/E_verdict"] == ("cannot be told apart from: " + ", ".join(behind) if behind
                                              else "beats every control: " + ", ".join(compared))
    print(f"{len(keys)} summary keys, {len(score_keys)} of them scores'")
    well = summary["well_explained"]["scores"]
    heads_e = [w for w in well if w["scorer"] == "E"]
    assert run.summary["heads/E_well_explained"] == pytest.approx(sum(w["badge"] for w in heads_e) / len(heads_e))
    table = run.table("scores/summary")
    rows = dict(table["data"])
    assert table["columns"] == ["path", "value"] and run.summary["scores/summary_rows"] == len(rows) > 100
    assert json.loads(rows["headline/E/real_minus_length/verdict"]) == e["real_minus_length"]["verdict"]
    # what the run found, as on the console and the report's first screen: headline keys and two tables
    from sae_lens_ctx.stages.report.findings import findings
    from sae_lens_ctx.stages.report.tables import RunTables

    found = findings(RunTables.load(out))
    best = (found.all_pairs + found.all_units)[0]
    assert run.summary["findings/best"] == f"{best.title()}: {best.score()}, {best.verdict}"
    assert run.summary["findings/n_pairs"] == len(found.all_pairs) and run.summary["findings/best_E"] == best.value
    verdicts = run.table("verdicts/table")
    assert [r[:2] for r in verdicts["data"]] == [[v.explainer, v.scorer] for v in found.verdicts]
    assert [r[-1] for r in verdicts["data"]] == [v.verdict for v in found.verdicts]
    assert run.table("findings/table")["data"][0][7] == best.text
