"""The Python API: the pipeline from a notebook, on model and SAE objects you already hold.

Every function here goes through `pipeline.run_pipeline` over a run directory, exactly as the CLI does,
so the API and `sae-lens-ctx run` write the same files (given `out=`; without it, a temporary directory
kept until the interpreter exits). What the functions add is the Python side:

* models: a `HookedTransformer`, `HookedSAETransformer` or `TransformerBridge` object (or a model name);
* SAEs: SAE-Lens `SAE` objects passed as `saes=[...]` or attached with `model.add_sae(...)`, used in
  memory (no file): `discover.saes` records them as `object:{sae_id}#{digest of the weights}`;
  attached SAEs are detached for the run (the analysis is of the model itself, each SAE reading its hook)
  and re-attached afterwards;
* corpora: a list of strings (or of dicts with `corpus.text_field`) besides a name or path;
* results: typed records (`UnitRecord`, `ContextRecord`, `HeadRecord`, `ExplanationRecord`, `ScoreRecord`)
  read back from the run directory, each collection with `.to_pandas()`.

A stage function continues in the run directory of the result it is given, so a chain
`find_next_token_units → mine_contexts → attribute_heads → explain_units → score_explanations` is one run directory, and
a stage that is up to date there is skipped (stage fingerprints, as for the CLI).

>>> import sae_lens_ctx as slc
>>> slc.RunResult, slc.run, slc.find_next_token_units  # doctest: +ELLIPSIS
(<class 'sae_lens_ctx.api.RunResult'>, <function run at ...>, <function find_next_token_units at ...>)
"""

from __future__ import annotations

import atexit
import copy
import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

from .core.config import EMBEDDED, RunConfig, field_paths
from .core.errors import UserError, did_you_mean
from .pipeline.engine import STAGES, RunDirectory, StageResult, run_pipeline
from .core.records import ContextRecord, ExplanationRecord, HeadRecord, ScoreRecord, iter_jsonl
from .core.records import OBJECT_PREFIX, UnitRecord
from .inputs.sae import SaeSource

R = TypeVar("R")

__all__ = [
    "Contexts", "Explanations", "Heads", "Records", "RunResult", "Scores", "Units", "attribute_heads",
    "explain_units", "find_next_token_units", "latent_explanations", "mine_contexts", "open_run", "run",
    "score_explanations", "to_neuronpedia",
]


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

    def text(self, unit_id: str, head: str | None = None) -> str | None:
        """The explanation text of a unit (`head=None`) or of one of its heads; None if absent or failed."""
        for e in self.records:
            if e.unit_id == unit_id and e.head == head and e.status == "ok":
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

        from .stages.report.results import RunResults

        return pd.DataFrame(RunResults.load(self.out).comparison())

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
    sae_lens_ctx.errors.UserError: /nonexistent/run is not a sae-lens-ctx run directory (no config.yaml): ...
    """
    return RunResult(out)


# -- Neuronpedia / SAE-Lens shapes --------------------------------------------------------------------


def to_neuronpedia(run: str | Path | RunResult, *, include_heads: bool = False,
                   include_controls: bool = False) -> list[dict]:
    """Explanations in the shape Neuronpedia exports and SAE-Lens users pass around: one dict per unit
    explanation with `modelId`, `layer` (Neuronpedia's source id, e.g. `8-res-jb`), `index` (a string),
    `description`, `explanationModelName`, `typeName`, plus our `unit_id`, `sae_id`, `scores` (the unit's
    own scores by scorer) and, with `include_heads`, `head` rows for each relevant (unit, head) pair.

    `modelId`/`layer` come from the SAE's `neuronpedia_id` (`model/source`) when it has one; otherwise
    `modelId` is the run's model name and `layer` the SAE id (or `L{layer}-mlp` for neurons).
    """
    out = Path(run.out if isinstance(run, RunResult) else run)
    units = {u["unit_id"]: u for u in iter_jsonl(out / "units.jsonl")} if (out / "units.jsonl").is_file() else {}
    model_json = out / "model.json"
    model_name = json.loads(model_json.read_text())["model_name"] if model_json.is_file() else None
    scores: dict[tuple[str, str | None], dict[str, float | None]] = {}
    if (out / "scores.jsonl").is_file():
        for s in iter_jsonl(out / "scores.jsonl"):
            scores.setdefault((s["unit_id"], s.get("head")), {})[s["scorer"]] = s.get("value")
    rows = []
    path = out / "explanations.jsonl"
    for e in (iter_jsonl(path) if path.is_file() else ()):
        unit = units.get(e["unit_id"], {})
        if e.get("status", "ok") != "ok" or (e.get("head") is not None and not include_heads):
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
            "scores": scores.get((e["unit_id"], e.get("head")), {}),
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


# -- inputs: model, SAEs, corpus, config -------------------------------------------------------------


_TEMP_DIRS: list[str] = []


def _cleanup_temp_dirs() -> None:
    for d in _TEMP_DIRS:
        shutil.rmtree(d, ignore_errors=True)


atexit.register(_cleanup_temp_dirs)


def _temp_out() -> Path:
    d = tempfile.mkdtemp(prefix="sae-lens-ctx-run-")
    _TEMP_DIRS.append(d)
    return Path(d) / "run"


def _is_model_object(obj: Any) -> bool:
    return all(hasattr(obj, a) for a in ("cfg", "run_with_hooks", "to_tokens"))


def _apply_model(model: Any, config: RunConfig) -> Any:
    """Put a model name into the config, or return the model object to use (config updated to describe it)."""
    from .inputs.model import ModelView, detect_weights

    if model is None:
        return None
    if isinstance(model, (str, os.PathLike)):
        config.model.model_name = str(model)
        return None
    if isinstance(model, ModelView):
        model = model.model
    if not _is_model_object(model):
        raise UserError(f"model should be a HookedTransformer, HookedSAETransformer, TransformerBridge, a ModelView "
                        f"or a model name, got {type(model).__name__}")
    if config.model.model_name == EMBEDDED:
        config.model.model_name = str(getattr(model.cfg, "model_name", None) or type(model).__name__)
    config.model.weights = detect_weights(model)
    config.model.model_class = "bridge" if type(model).__name__ == "TransformerBridge" else "hooked"
    return model


def _sae_sources(model: Any, saes: Iterable[Any]) -> tuple[dict[str, SaeSource], list[str]]:
    """In-memory SAEs (attached to the model, or passed) by spec, and path/registry specs passed as strings."""
    objects: dict[str, SaeSource] = {}
    specs: list[str] = []
    attached = list(getattr(model, "acts_to_saes", {}).values()) if model is not None else []
    for sae in [*attached, *saes]:
        if isinstance(sae, (str, os.PathLike)):
            specs.append(str(sae))
            continue
        source = sae if isinstance(sae, SaeSource) else SaeSource.from_sae(sae)
        objects[source.object_spec()] = source
    return objects, specs


@contextmanager
def _saes_detached(model: Any) -> Iterator[None]:
    """Detach the SAEs attached to a HookedSAETransformer for the run; re-attach them as they were."""
    wrappers = dict(getattr(model, "_acts_to_saes", {}) or {}) if model is not None else {}
    if not wrappers or not hasattr(model, "reset_saes"):
        yield
        return
    model.reset_saes()
    try:
        yield
    finally:
        for wrapper in wrappers.values():
            sae = getattr(wrapper, "sae", wrapper)
            kwargs = {}
            if hasattr(wrapper, "use_error_term"):
                kwargs["use_error_term"] = wrapper.use_error_term
            if hasattr(wrapper, "exclude_special_tokens"):
                kwargs["exclude_special_tokens"] = wrapper.exclude_special_tokens
            model.add_sae(sae, **kwargs)


def _corpus_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(os.environ.get("SAE_LENS_CTX_CACHE", os.path.join(base, "sae-lens-ctx"))) / "corpora"


def _apply_corpus(corpus: Any, config: RunConfig) -> None:
    """A name or path goes into `corpus.dataset_path`; documents given as Python data are written once to a
    content-addressed JSONL file (the same documents always give the same path, so fingerprints hold)."""
    if corpus is None:
        return
    if isinstance(corpus, (str, os.PathLike)):
        config.corpus.dataset_path = str(corpus)
        return
    if not isinstance(corpus, Iterable):
        raise UserError(f"corpus should be a name, a path or a list of documents, got {type(corpus).__name__}")
    key = config.corpus.text_field
    texts = []
    for doc in corpus:
        if isinstance(doc, str):
            texts.append(doc)
        elif isinstance(doc, Mapping) and isinstance(doc.get(key), str):
            texts.append(doc[key])
        else:
            raise UserError(f"corpus documents should be strings or mappings with a '{key}' string "
                            f"(corpus.text_field), got {type(doc).__name__}")
    if not texts:
        raise UserError("the corpus given is empty: pass a list of documents")
    body = "".join(json.dumps({key: t}, ensure_ascii=False) + "\n" for t in texts)
    path = _corpus_cache_dir() / f"documents-{hashlib.sha256(body.encode()).hexdigest()[:16]}.jsonl"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(body, encoding="utf-8")
        os.replace(tmp, path)
    config.corpus.dataset_path = str(path)


def _apply_overrides(config: RunConfig, overrides: Mapping[str, Any] | None, section: str | None = None,
                     options: Mapping[str, Any] | None = None) -> None:
    """Dotted overrides (`{"discover.top_k": 2}`, as on the command line) and a stage's own options."""
    valid = set(field_paths())
    items = [(k, v) for k, v in (overrides or {}).items()]
    items += [(f"{section}.{k}", v) for k, v in (options or {}).items()]
    for key, value in items:
        if key not in valid:
            raise UserError(f"unknown config key '{key}'{did_you_mean(key, valid)}")
        *parents, leaf = key.split(".")
        target = config
        for p in parents:
            target = getattr(target, p)
        setattr(target, leaf, copy.deepcopy(value))


def _base_config(config: RunConfig | str | Path | None, prior: _Session | None) -> RunConfig:
    if isinstance(config, (str, os.PathLike)):
        return RunConfig.from_yaml(config)
    if config is not None:
        if not isinstance(config, RunConfig):
            raise UserError(f"config should be a RunConfig or a YAML path, got {type(config).__name__}")
        return copy.deepcopy(config)
    return copy.deepcopy(prior.config) if prior else RunConfig()


def _session_of(*candidates: Any) -> _Session | None:
    for c in candidates:
        s = getattr(c, "_session", None)
        if isinstance(s, _Session):
            return s
    return None


def _unit_ids(units: Any) -> list[str] | None:
    """Unit ids from Python data (ids, `UnitRecord`s, dicts); None for a result object or nothing."""
    if units is None or isinstance(units, (Records, RunResult)):
        return None
    if isinstance(units, str):
        units = [units]
    ids = []
    for u in units:
        uid = u if isinstance(u, str) else getattr(u, "unit_id", None)
        if uid is None and isinstance(u, Mapping):
            uid = u.get("unit_id")
        if not isinstance(uid, str):
            raise UserError(f"units should be unit ids (L27N1093, my-sae:17), UnitRecords or a Units result, "
                            f"got {type(u).__name__}")
        ids.append(uid)
    return ids


def _execute(until: str, *, model: Any, corpus: Any, config: Any, out: str | Path | None, saes: Iterable[Any],
             prior: _Session | None, overwrite: bool, force: bool, overrides: Mapping[str, Any] | None = None,
             section: str | None = None, options: Mapping[str, Any] | None = None,
             unit_ids: list[str] | None = None, neurons: bool | None = None) -> _Session:
    """Resolve the inputs into a config + objects and run the pipeline up to `until` in one run directory."""
    cfg = _base_config(config, prior)
    if model is None and prior is not None:
        model = prior.model
    model_obj = _apply_model(model, cfg)
    _apply_corpus(corpus, cfg)
    objects, specs = _sae_sources(model_obj, saes)
    if prior is not None:
        objects = {**{k: v for k, v in prior.saes.items() if k in cfg.discover.saes}, **objects}
    if objects or specs:
        kept = [s for s in cfg.discover.saes if not s.startswith(OBJECT_PREFIX) or s in objects]
        cfg.discover.saes = list(dict.fromkeys([*kept, *specs, *objects]))
    if neurons is not None:
        cfg.discover.neurons = neurons
    if unit_ids is not None:
        cfg.discover.unit_ids = unit_ids
    _apply_overrides(cfg, overrides, section, options)
    missing = [s for s in cfg.discover.saes if s.startswith(OBJECT_PREFIX) and s not in objects]
    if missing:
        raise UserError(f"SAE '{missing[0]}' was passed as a Python object to an earlier call: pass it again (saes=)")
    if out is None:
        out = prior.out if prior is not None else _temp_out()
    with _saes_detached(model_obj):
        results = run_pipeline(cfg, out, overwrite=overwrite, force=force, model=model_obj, saes=objects,
                               until=None if until == list(STAGES)[-1] else until)
    return _Session(Path(out), cfg, model_obj, objects, list(results))


# -- the API ------------------------------------------------------------------------------------------


def run(model: Any = None, corpus: Any = None, config: RunConfig | str | Path | None = None,
        out: str | Path | None = None, *, saes: Iterable[Any] = (), overrides: Mapping[str, Any] | None = None,
        overwrite: bool = False, force: bool = False) -> RunResult:
    """Run the whole pipeline (load → discover → mine → attribute → explain → score → report), as
    `sae-lens-ctx run` does, and return its results.

    Args:
        model: a `HookedTransformer`, `HookedSAETransformer` (its attached SAEs become units) or
            `TransformerBridge` object, a `ModelView`, or a model name/path as `--model` takes;
            None: `config.model`.
        corpus: a name or path as `--corpus` takes, or the documents themselves (a list of strings);
            None: `config.corpus`.
        config: a `RunConfig` (the CLI's config; not modified) or a YAML path; None: the defaults.
        out: the run directory; None: a temporary one, removed when the interpreter exits.
        saes: SAE-Lens `SAE` objects (used in memory), SAE directories or `release:sae_id` strings.
        overrides: dotted config keys, as on the command line: `{"discover.top_k": 2}`.
        overwrite, force: as the CLI's `--overwrite` and `--force`.

    >>> r = run(config=RunConfig(), overrides={"discover.topk": 2})
    Traceback (most recent call last):
    ...
    sae_lens_ctx.errors.UserError: unknown config key 'discover.topk' (did you mean 'discover.top_k'?)
    """
    s = _execute(list(STAGES)[-1], model=model, corpus=corpus, config=config, out=out, saes=saes, prior=None,
                 overwrite=overwrite, force=force, overrides=overrides)
    return RunResult(s.out, s.stages, s)


def _split(model: Any, data: Any) -> tuple[Any, Any]:
    """`stage(result)` as well as `stage(model, result)`: a result given in the model's place is the input."""
    if data is None and isinstance(model, (Records, RunResult)):
        return None, model
    return model, data


def find_next_token_units(model: Any = None, *, layers: Sequence[int] | None = None, saes: Iterable[Any] = (),
                          neurons: bool | None = None, corpus: Any = None, config: RunConfig | str | Path | None = None,
                          out: str | Path | None = None, overwrite: bool = False, force: bool = False,
                          **options: Any) -> Units:
    """Next-token units by congruence (the `discover` stage, after `load`).

    `layers`: layers whose MLP neurons are candidates (default: `discover.n_last_layers`); `saes`: SAEs whose
    latents are candidates, besides those attached to the model; `neurons`: consider neurons too (default:
    True without SAEs, False with them); `options`: any `discover.*` field (`top_k=2`, `controls=False`).

    >>> find_next_token_units(config=RunConfig(), topk=2)
    Traceback (most recent call last):
    ...
    sae_lens_ctx.errors.UserError: unknown config key 'discover.topk' (did you mean 'discover.top_k'?)
    """
    saes = list(saes)
    if layers is not None:
        options["layers"] = list(layers)
    if neurons is None and (saes or getattr(model, "acts_to_saes", None)):
        neurons = False
    s = _execute("discover", model=model, corpus=corpus, config=config, out=out, saes=saes, prior=None,
                 overwrite=overwrite, force=force, section="discover", options=options, neurons=neurons)
    return Units(s.out, s)


def mine_contexts(model: Any = None, units: Units | Sequence[Any] | None = None, corpus: Any = None, *,
                  saes: Iterable[Any] = (), config: RunConfig | str | Path | None = None,
                  out: str | Path | None = None, overwrite: bool = False, force: bool = False,
                  **options: Any) -> Contexts:
    """Top-activating train contexts and held-out test prompts per unit (the `mine` stage).

    `units`: a `Units` result (mining continues in its run directory), or unit ids / `UnitRecord`s (run as
    `discover.unit_ids` in a new run directory); `options`: any `mine.*` field (`top_k=8`)."""
    model, units = _split(model, units)
    prior = _session_of(units)
    s = _execute("mine", model=model, corpus=corpus, config=config, out=out, saes=saes, prior=prior,
                 overwrite=overwrite, force=force, section="mine", options=options, unit_ids=_unit_ids(units))
    return Contexts(s.out, s)


def attribute_heads(model: Any = None, contexts: Contexts | None = None, *, units: Any = None, corpus: Any = None,
                    saes: Iterable[Any] = (), config: RunConfig | str | Path | None = None,
                    out: str | Path | None = None, overwrite: bool = False, force: bool = False,
                    **options: Any) -> Heads:
    """Direct attribution of each unit to its upstream heads, the active-head rule, the relevance band and the
    ablation check (the `attribute` stage). `contexts`: a `Contexts` result (continues in its run directory);
    or `units` as for `mine_contexts`; `options`: any `attribute.*` field (`rule="top3"`)."""
    model, contexts = _split(model, contexts)
    prior = _session_of(contexts, units)
    s = _execute("attribute", model=model, corpus=corpus, config=config, out=out, saes=saes, prior=prior,
                 overwrite=overwrite, force=force, section="attribute", options=options, unit_ids=_unit_ids(units))
    return Heads(s.out, s)


def explain_units(heads: Heads | None = None, *, transformer: Any = None,
                  config: RunConfig | str | Path | None = None, out: str | Path | None = None,
                  saes: Iterable[Any] = (), overwrite: bool = False, force: bool = False, **options: Any) -> Explanations:
    """LLM explanations of every unit and of each of its relevant (unit, head) pairs (the `explain` stage).

    `heads`: a `Heads` result (continues in its run directory, with its model object); `transformer`: the
    TransformerLens model when there is no such result; `options`: any `explain.*` field
    (`backend="openai", model="gpt-4o-mini"`: `model` here is the explainer LLM)."""
    s = _execute("explain", model=transformer, corpus=None, config=config, out=out, saes=saes,
                 prior=_session_of(heads), overwrite=overwrite, force=force, section="explain", options=options)
    return Explanations(s.out, s)


def score_explanations(explanations: Explanations | None = None, *, transformer: Any = None,
                       config: RunConfig | str | Path | None = None, out: str | Path | None = None,
                       saes: Iterable[Any] = (), overwrite: bool = False, force: bool = False,
                       **options: Any) -> Scores:
    """Judge explanations on held-out prompts: E, AUROC, simulate-and-score, controls with CIs (the `score`
    stage). `explanations`: an `Explanations` result (continues in its run directory); `options`: any
    `score.*` field (`n_prompts=5`)."""
    s = _execute("score", model=transformer, corpus=None, config=config, out=out, saes=saes,
                 prior=_session_of(explanations), overwrite=overwrite, force=force, section="score", options=options)
    return Scores(s.out, s)
