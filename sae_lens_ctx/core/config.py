"""Dataclass configs: one per stage (`config_analysis`, `config_explain`) plus `RunConfig` holding them.

Every field has a docstring under it: `simple_parsing` turns it into the `--help` text of the CLI flag
(`--corpus.context_size`), and the same docstring is the reference documentation. Configs are read
from YAML with `dacite` (strict: unknown keys and wrong types are errors) and checked by each
class's `validate()`; `to_dict()`/`from_dict()` follow SAE-Lens's convention.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dacite
import yaml

from .config_analysis import AttributeConfig, CorpusConfig, DiscoverConfig, MineConfig, ModelConfig
from .config_base import EMBEDDED
from .config_explain import ExplainConfig, LoggingConfig, ScoreConfig
from .errors import UserError

__all__ = ["EMBEDDED", "AttributeConfig", "CorpusConfig", "DiscoverConfig", "ExplainConfig", "LoggingConfig", "MineConfig",
           "ModelConfig", "RunConfig", "ScoreConfig", "field_paths", "list_field_paths"]

@dataclass
class RunConfig:
    """A whole run: the model, the corpus, each stage's settings, logging and the seed."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """The model."""

    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    """The corpus."""

    discover: DiscoverConfig = field(default_factory=DiscoverConfig)
    """Next-token unit discovery."""

    mine: MineConfig = field(default_factory=MineConfig)
    """Top-activating contexts per unit."""

    attribute: AttributeConfig = field(default_factory=AttributeConfig)
    """Head attribution."""

    explain: ExplainConfig = field(default_factory=ExplainConfig)
    """LLM explanations of heads and units."""

    score: ScoreConfig = field(default_factory=ScoreConfig)
    """Scoring explanations on held-out prompts."""

    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Logging."""

    seed: int = 0
    """Seed of every random choice (control units, samples, bootstrap)."""

    def validate(self) -> RunConfig:
        for section in (self.model, self.corpus, self.discover, self.mine, self.attribute, self.explain,
                        self.score, self.logging):
            section.validate()
        return self

    # -- SAE-Lens-style (de)serialisation ------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        """Build and validate a config; unknown keys and wrong types are `UserError`s."""
        if not isinstance(data, dict):
            raise UserError(f"a config must be a mapping of sections, got {type(data).__name__}")
        _check_keys(cls, data, prefix="")
        try:
            cfg = dacite.from_dict(cls, data, config=dacite.Config(strict=True, cast=[Path]))
        except dacite.WrongTypeError as e:
            raise UserError(f"config key '{e.field_path}' {_type_problem(e)}") from e
        except dacite.DaciteError as e:
            raise UserError(f"invalid config: {e}") from e
        return cfg.validate()

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)

    @classmethod
    def from_yaml(cls, path: str | Path) -> RunConfig:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"config file {path} does not exist")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            where = getattr(e, "problem_mark", None)
            at = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
            raise UserError(f"config file {path} is not valid YAML{at}: fix its syntax") from e
        return cls.from_dict(data or {})


def _type_problem(e: dacite.WrongTypeError) -> str:
    expected = getattr(e.field_type, "__name__", str(e.field_type))
    return f"should be {expected}, got {e.value!r} ({type(e.value).__name__})"


def field_paths(cls: type = RunConfig, prefix: str = "") -> list[str]:
    """Every settable dotted key: `['model.model_name', ..., 'seed']`."""
    paths = []
    for f in dataclasses.fields(cls):
        sub = _dataclass_type(cls, f.name)
        paths += field_paths(sub, f"{prefix}{f.name}.") if sub else [prefix + f.name]
    return paths


def list_field_paths(cls: type = RunConfig, prefix: str = "") -> set[str]:
    """The dotted keys whose value is a list (`discover.layers`, `discover.unit_ids`, ...)."""
    import typing

    paths: set[str] = set()
    for f in dataclasses.fields(cls):
        sub = _dataclass_type(cls, f.name)
        if sub:
            paths |= list_field_paths(sub, f"{prefix}{f.name}.")
        elif typing.get_origin(_hints(cls)[f.name]) is list:
            paths.add(prefix + f.name)
    return paths


def _dataclass_type(cls: type, name: str) -> type | None:
    hint = _hints(cls)[name]
    return hint if dataclasses.is_dataclass(hint) else None


def _hints(cls: type) -> dict[str, Any]:
    import typing

    return typing.get_type_hints(cls)


def _suggest_key(full: str) -> str:
    """The closest valid key to a mistyped one: by full dotted path, else by its last part."""
    leaves = field_paths(RunConfig)
    keys = leaves + sorted({p.split(".", 1)[0] for p in leaves if "." in p})
    by_last: dict[str, list[str]] = {}
    for k in keys:
        by_last.setdefault(k.rsplit(".", 1)[-1], []).append(k)
    last = full.rsplit(".", 1)[-1]
    # a right key in the wrong place: every section holding it ('max_tokens' is in three)
    close = by_last.get(last) or difflib.get_close_matches(full, keys, n=1, cutoff=0.6)
    if not close:
        close = [k for m in difflib.get_close_matches(last, list(by_last), n=1) for k in by_last[m]]
    if not close:
        return ""
    quoted = [f"'{k}'" for k in close]
    return f" (did you mean {' or '.join([', '.join(quoted[:-1]), quoted[-1]] if len(quoted) > 1 else quoted)}?)"


def _check_keys(cls: type, data: dict, prefix: str) -> None:
    known = {f.name for f in dataclasses.fields(cls)}
    for key, value in data.items():
        if key not in known:
            full = f"{prefix}{key}"
            raise UserError(f"unknown config key '{full}'{_suggest_key(full)}")
        sub = _dataclass_type(cls, key)
        if sub is not None and not isinstance(value, dict):
            raise UserError(f"config key '{prefix}{key}' must be a section (a mapping), got {value!r}")
        if sub is not None:
            _check_keys(sub, value, prefix=f"{prefix}{key}.")
