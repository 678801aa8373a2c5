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
(<class 'sae_lens_ctx.results.RunResult'>, <function run at ...>, <function find_next_token_units at ...>)
"""

from __future__ import annotations

import atexit
import copy
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .core.config import EMBEDDED, RunConfig, field_paths
from .core.errors import UserError, did_you_mean
from .pipeline.engine import STAGES, run_pipeline
from .core.records import OBJECT_PREFIX
from .inputs.sae import SaeSource
from .results import (Contexts, Explanations, Heads, Records, RunResult, Scores, Units, latent_explanations, open_run,
                      to_neuronpedia, _Session)

__all__ = [
    "Contexts", "Explanations", "Heads", "Records", "RunResult", "Scores", "Units", "attribute_heads",
    "explain_units", "find_next_token_units", "latent_explanations", "mine_contexts", "open_run", "run",
    "score_explanations", "to_neuronpedia",
]


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
    from .inputs.view import ModelView, detect_weights

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
        overwrite: as the CLI's `--overwrite`.
        force: as the CLI's `--force`.

    >>> r = run(config=RunConfig(), overrides={"discover.topk": 2})
    Traceback (most recent call last):
    ...
    sae_lens_ctx.core.errors.UserError: unknown config key 'discover.topk' (did you mean 'discover.top_k'?)
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
    sae_lens_ctx.core.errors.UserError: unknown config key 'discover.topk' (did you mean 'discover.top_k'?)
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
