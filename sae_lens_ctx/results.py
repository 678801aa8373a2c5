"""What the Python API returns: a run directory read back as typed records.

`RunResult` holds one run directory (and, for a result of this process, the Python objects behind it, so a
stage function can continue in it); each collection (`Units`, `Contexts`, `Heads`, `Explanations`, `Scores`)
is a list of typed records with `.to_pandas()`. `to_neuronpedia` and `latent_explanations` give the shapes
Neuronpedia and SAE-Lens users expect.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

from .core.config import RunConfig
from .core.errors import UserError
from .core.records import ContextRecord, ExplanationRecord, HeadRecord, ScoreRecord, UnitRecord, iter_jsonl
from .inputs.sae import SaeSource
from .pipeline.engine import RunDirectory, StageResult

R = TypeVar("R")


# -- the session a result carries: where its run directory is, and the Python objects behind it --------


@dataclass
class _Session:
    out: Path
    config: RunConfig
    model: Any = None
    """The model object the run used (None: loaded from `config.model`)."""
    saes: dict[str, SaeSource] = field(default_factory=dict)
    """In-memory SAEs by their `discover.saes` spec."""
    stages: list[StageResult] = field(default_factory=list)
    """What the call that made this session ran or skipped."""


# -- results -----------------------------------------------------------------------------------------


class Records(Generic[R]):
    """The typed records of one JSONL file of a run directory (a list you can index and iterate).

    `records` are dataclass instances; `.to_pandas()` gives every column of the file (also those a
    later version adds), optionally joined with the unit's facts (kind, layer, token, SAE metadata).
    """

    file: str = ""
    record_type: type = dict

    def __init__(self, out: str | Path, session: _Session | None = None):
        self.out = Path(out)
        self._session = session
        path = self.out / self.file
        self.rows: list[dict] = list(iter_jsonl(path)) if path.is_file() else []
        names = {f.name for f in dataclasses.fields(self.record_type)}
        self.records: list[R] = [self.record_type(**{k: v for k, v in row.items() if k in names}) for row in self.rows]

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[R]:
        return iter(self.records)

    def __getitem__(self, i: int) -> R:
        return self.records[i]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self)} records in {self.out / self.file})"

    def to_pandas(self, with_units: bool = False):
        """A `pandas.DataFrame` of the file's rows; `with_units` adds the unit's kind, layer, index, token
        and SAE metadata (sae_id, sae_release, neuronpedia_id, hook_name) by `unit_id`."""
        import pandas as pd

        df = pd.DataFrame(self.rows)
        if with_units and "unit_id" in df.columns and self.file != "units.jsonl":
            units = pd.DataFrame(list(iter_jsonl(self.out / "units.jsonl")))
            keep = [c for c in ("unit_id", "kind", "layer", "index", "token", "control", "hook_name", "sae_id",
                                "sae_release", "neuronpedia_id") if c in units.columns]
            units = units[keep].rename(columns={c: f"unit_{c}" for c in keep if c != "unit_id" and c in df.columns})
            df = df.merge(units, on="unit_id", how="left")
        return df


class Units(Records[UnitRecord]):
    """`units.jsonl`: next-token units (neurons `L{l}N{n}`, SAE latents `{sae_id}:{i}`) and their controls."""

    file, record_type = "units.jsonl", UnitRecord

    def ids(self, controls: bool = True) -> list[str]:
        return [u.unit_id for u in self.records if controls or not u.control]


class Contexts(Records[ContextRecord]):
    """`contexts.jsonl`: one record per (unit, prompt): train top prompts, held-out top/low/random ones."""

    file, record_type = "contexts.jsonl", ContextRecord


class Heads(Records[HeadRecord]):
    """`heads.jsonl`: one record per (unit, upstream head), relevant or not."""

    file, record_type = "heads.jsonl", HeadRecord

    def relevant(self) -> list[HeadRecord]:
        return [h for h in self.records if h.relevant]


class Explanations(Records[ExplanationRecord]):
    """`explanations.jsonl`: the unit's own explanation (`head` None) and one per relevant (unit, head)."""

    file, record_type = "explanations.jsonl", ExplanationRecord

    def text(self, unit_id: str, head: str | None = None, explainer: str | None = None) -> str | None:
        """The explanation text of a unit (`head=None`) or of one of its heads, by `explainer` ('lookup' for
        the look-up explainer's; None: the LLM's); None if absent or failed."""
        for e in self.records:
            if e.unit_id == unit_id and e.head == head and e.status == "ok" and \
                    (e.explainer == explainer if explainer else e.explainer != "lookup"):
                return e.text
        return None

    def to_neuronpedia(self, **kwargs: Any) -> list[dict]:
        """See `to_neuronpedia`."""
        return to_neuronpedia(self.out, **kwargs)


class Scores(Records[ScoreRecord]):
    """`scores.jsonl`: E, AUROC, simulate-and-score and controls, each with its CI."""

    file, record_type = "scores.jsonl", ScoreRecord


class RunResult:
    """What a run directory holds, typed: `units`, `contexts`, `heads`, `explanations`, `scores` (each a
    `Records` with `.to_pandas()`), `summary` (summary.json), `stages` (what ran or was skipped), and
    `head_vs_neuron()`. `out` is the run directory."""

    def __init__(self, out: str | Path, stages: Sequence[StageResult] = (), session: _Session | None = None):
        self.out = Path(out)
        self.stages = list(stages)
        self._session = session or _Session(self.out, RunDirectory(self.out).read_config())
        self._cache: dict[str, Records] = {}

    def _records(self, cls: type[Records]) -> Records:
        if cls.file not in self._cache:
            self._cache[cls.file] = cls(self.out, self._session)
        return self._cache[cls.file]

    @property
    def config(self) -> RunConfig:
        return self._session.config

    @property
    def units(self) -> Units:
        return self._records(Units)

    @property
    def contexts(self) -> Contexts:
        return self._records(Contexts)

    @property
    def heads(self) -> Heads:
        return self._records(Heads)

    @property
    def explanations(self) -> Explanations:
        return self._records(Explanations)

    @property
    def scores(self) -> Scores:
        return self._records(Scores)

    @property
    def summary(self) -> dict:
        path = self.out / "summary.json"
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}

    def head_vs_neuron(self):
        """The head-versus-neuron table (per unit and scorer: the unit's own score beside its heads'), as
        the report and W&B show it, as a `pandas.DataFrame`."""
        import pandas as pd

        from .stages.report.tables import RunTables

        return pd.DataFrame(RunTables.load(self.out).comparison())

    def to_neuronpedia(self, **kwargs: Any) -> list[dict]:
        """See `to_neuronpedia`."""
        return to_neuronpedia(self.out, **kwargs)

    def __repr__(self) -> str:
        ran = ", ".join(f"{s.name}:{s.status}" for s in self.stages)
        return f"RunResult({self.out}; {len(self.units)} units{'; ' + ran if ran else ''})"


def open_run(out: str | Path) -> RunResult:
    """The results of an existing run directory (written by the CLI or the API).

    >>> open_run("/nonexistent/run")
    Traceback (most recent call last):
    ...
    sae_lens_ctx.core.errors.UserError: /nonexistent/run is not a sae-lens-ctx run directory (no config.yaml): ...
    """
    return RunResult(out)


# -- Neuronpedia / SAE-Lens shapes --------------------------------------------------------------------


def to_neuronpedia(run: str | Path | RunResult, *, include_heads: bool = False,
                   include_controls: bool = False, include_lookups: bool = False) -> list[dict]:
    """Explanations in the shape Neuronpedia exports and SAE-Lens users pass around: one dict per unit
    explanation with `modelId`, `layer` (Neuronpedia's source id, e.g. `8-res-jb`), `index` (a string),
    `description`, `explanationModelName`, `typeName`, plus our `unit_id`, `sae_id`, `scores` (the unit's
    own scores by scorer) and, with `include_heads`, `head` rows for each relevant (unit, head) pair. The LLM's
    explanations only, unless `include_lookups` (then the look-up explainer's too, `typeName` 'lookup').

    `modelId`/`layer` come from the SAE's `neuronpedia_id` (`model/source`) when it has one; otherwise
    `modelId` is the run's model name and `layer` the SAE id (or `L{layer}-mlp` for neurons).
    """
    out = Path(run.out if isinstance(run, RunResult) else run)
    units = {u["unit_id"]: u for u in iter_jsonl(out / "units.jsonl")} if (out / "units.jsonl").is_file() else {}
    model_json = out / "model.json"
    model_name = json.loads(model_json.read_text())["model_name"] if model_json.is_file() else None
    scores: dict[tuple[str, str | None], dict[str, float | None]] = {}
    if (out / "scores.jsonl").is_file():
        for s in iter_jsonl(out / "scores.jsonl"):  # each explanation's own scores (no shuffled or confound control)
            if s.get("control_kind") in (None, "random_unit"):
                scores.setdefault((s["unit_id"], s.get("head"), s.get("explainer")), {})[s["scorer"]] = s.get("value")
    rows = []
    path = out / "explanations.jsonl"
    for e in (iter_jsonl(path) if path.is_file() else ()):
        unit = units.get(e["unit_id"], {})
        if e.get("status", "ok") != "ok" or (e.get("head") is not None and not include_heads):
            continue
        if e.get("explainer") == "lookup" and not include_lookups:
            continue
        if unit.get("control") and not include_controls:
            continue
        np_id = unit.get("neuronpedia_id")
        model_id, _, source = np_id.partition("/") if np_id else (model_name, "", "")
        if not source:
            source = unit.get("sae_id") if unit.get("kind") == "sae_latent" else f"{unit.get('layer')}-mlp"
        rows.append({
            "modelId": model_id, "layer": source, "index": str(unit.get("index", "")),
            "description": e["text"], "explanationModelName": e.get("model"), "typeName": e.get("explainer"),
            "unit_id": e["unit_id"], "head": e.get("head"), "kind": unit.get("kind"), "sae_id": unit.get("sae_id"),
            "sae_release": unit.get("sae_release"), "hook_name": unit.get("hook_name"), "token": unit.get("token"),
            "scores": scores.get((e["unit_id"], e.get("head"), e.get("explainer")), {}),
        })
    return rows


def latent_explanations(run: str | Path | RunResult, sae_id: str | None = None) -> dict[int, str]:
    """Explanation text per latent index for one SAE's latents (the only SAE of the run when `sae_id` is
    None): the `{latent_id: explanation}` dict SAE-Lens and Neuronpedia users pass around."""
    rows = [r for r in to_neuronpedia(run) if r["kind"] == "sae_latent"]
    ids = sorted({r["sae_id"] for r in rows})
    if sae_id is None:
        if len(ids) > 1:
            raise UserError(f"the run explains latents of several SAEs ({', '.join(ids)}): pass sae_id=")
        sae_id = ids[0] if ids else None
    return {int(r["index"]): r["description"] for r in rows if r["sae_id"] == sae_id}
