"""Before anything is loaded: check every input that can be checked without a model, and name each input
by its content.

`check_inputs` runs before the run directory is touched and before any model, corpus or LLM is loaded,
so bad input (a missing corpus, a model name that is neither a path nor in the HF cache, an explain
backend combined with a model it cannot run, a context longer than the model's config allows) ends in
seconds with the one-line error of `errors.UserError`.

`input_digests` names the inputs by content, never by path or modification time (which a reinstall or a
copy changes): a model directory by its config and tokenizer files and its weights (whole when small,
else each safetensors file's header: names, shapes and dtypes), a GGUF file by its bytes (or its size,
head and tail when large), a local corpus by the bytes of its files, an SAE directory like a model
directory. `pipeline.stage_fingerprints` puts them into the fingerprints of the stages that read them, so
a model or corpus replaced at the same path re-runs those stages and every stage after them.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable
from pathlib import Path

from ..clients.llm import make_client
from ..core.config import EMBEDDED, RunConfig
from ..core.digest import digest
from ..core.errors import UserError
from ..inputs.corpus import EMBEDDED_PACKAGE, check_corpus_source, embedded_corpus_tokens, local_files
from ..inputs.model import (cached_snapshot, check_model_files, hub_id, model_config_json, model_max_context,
                            resolve_source)

log = logging.getLogger(__name__)

WHOLE_FILE_LIMIT = 64 * 2**20
"""Files up to this many bytes are digested whole; larger weights by their header (safetensors) or by
their size, first and last MiB (other formats)."""

_MIB = 2**20


def check_inputs(config: RunConfig, stages: Iterable[str], model_given: bool = False) -> None:
    """Every check that needs no model, corpus or LLM loaded, for a run of `stages` (`UserError` on the first
    problem): the config's values and their combinations; the model's name or files (unless a model object
    is `model_given`) and `corpus.context_size` against the context its config states; the corpus source;
    the SAE directories; and, where explain or score will run, the LLM backend (its name, key, model or
    GGUF file), built but not loaded."""
    config.validate()
    if not model_given:
        check_model_files(config.model)
        n_ctx = model_max_context(config.model)
        if n_ctx is not None and config.corpus.context_size > n_ctx:
            raise UserError(f"corpus.context_size is {config.corpus.context_size} but the model takes at most "
                            f"{n_ctx} tokens: set corpus.context_size to {n_ctx} or less")
    check_corpus_source(config.corpus)
    check_sizes(config, model_given)
    for spec in config.discover.saes:
        path = Path(spec).expanduser()
        if (path.exists() or spec.startswith((".", "/", "~"))) and not (path / "cfg.json").is_file():
            raise UserError(f"SAE directory {spec} does not exist or has no cfg.json: "
                            "point at a directory written by SAE.save_model")
    if {"explain", "score"} & set(stages):
        client = make_client(config.explain)  # raises on a bad name, a missing key or GGUF file; loads nothing
        close = getattr(client, "close", None)
        if callable(close):
            close()


EMBEDDED_SIZES = {"n_layers": 30, "d_mlp": 1536}
"""The embedded SmolLM2-135M's layers and MLP neurons per layer (its GGUF is not read to know them)."""


def model_sizes(config: RunConfig) -> dict[str, int] | None:
    """`n_layers` and `d_mlp` (neurons per layer) from the model's `config.json`, read without loading the model;
    None where no config file is at hand (a hub model not cached, a GGUF other than the embedded one)."""
    if config.model.model_name == EMBEDDED:
        return dict(EMBEDDED_SIZES)
    data = model_config_json(config.model)
    if data is None:
        return None
    layers = next((data[k] for k in ("num_hidden_layers", "n_layer", "n_layers") if isinstance(data.get(k), int)), None)
    width = next((data[k] for k in ("intermediate_size", "n_inner", "d_mlp") if isinstance(data.get(k), int)), None)
    if width is None and isinstance(data.get("n_embd"), int):
        width = 4 * data["n_embd"]  # GPT-2's config leaves n_inner null: 4 × n_embd
    return {"n_layers": layers, "d_mlp": width} if layers and width else None


def check_sizes(config: RunConfig, model_given: bool = False) -> None:
    """Sizes the inputs cannot hold, before any model loads (one-line `UserError` naming what is available):
    more corpus tokens than the embedded corpus has (`corpus.max_tokens`, for the embedded model's tokenizer),
    a layer the model does not have (`discover.layers`; `n_last_layers` beyond the model takes every layer, as
    discover always did), or more neurons per layer (`discover.top_k`, twice that with controls) than a layer
    holds."""
    c, d = config.corpus, config.discover
    if c.dataset_path.strip() == EMBEDDED and config.model.model_name == EMBEDDED:
        have = embedded_corpus_tokens(c.context_size, c.prepend_bos)
        if c.max_tokens > have:
            raise UserError(f"corpus.max_tokens={c.max_tokens:,} but the embedded corpus holds about {have:,} tokens "
                            f"in contexts of {c.context_size} (about {int(0.8 * have):,} on the train side): set "
                            f"corpus.max_tokens to {have:,} or less, or give a larger corpus")
    sizes = None if model_given else model_sizes(config)
    if sizes is None:
        return
    bad = [layer for layer in d.layers if not -sizes["n_layers"] <= layer < sizes["n_layers"]]
    if bad:
        raise UserError(f"discover.layers {bad} do not exist: the model has layers 0..{sizes['n_layers'] - 1}")
    if d.neurons and d.threshold is None and not d.unit_ids:
        per_layer = d.top_k * (2 if d.controls else 1)
        if per_layer > sizes["d_mlp"]:
            most = sizes["d_mlp"] // 2 if d.controls else sizes["d_mlp"]
            raise UserError(f"discover.top_k={d.top_k}{' with as many controls' if d.controls else ''} asks for "
                            f"{per_layer:,} neurons per layer but a layer holds {sizes['d_mlp']:,}: set "
                            f"discover.top_k to {most:,} or less")


def input_digests(config: RunConfig, model_given: bool = False) -> dict[str, str]:
    """Content digests of the run's inputs: {'model': ..., 'corpus': ..., 'saes': ...} (16 hex digits each,
    or a name where the content is not at hand: a hub model not in the cache, a streamed HF dataset)."""
    return {"model": "object" if model_given else _model_digest(config),
            "corpus": _corpus_digest(config),
            "saes": digest([_path_digest(Path(s).expanduser()) if Path(s).expanduser().is_dir() else s
                               for s in config.discover.saes])}


def changed_inputs(before: dict[str, str], now: dict[str, str]) -> list[str]:
    """The inputs whose digest differs from the one recorded by an earlier run (none on a first run)."""
    return [k for k, v in now.items() if k in before and before[k] != v]


def _model_digest(config: RunConfig) -> str:
    source, where = resolve_source(config.model.model_name)
    if source == "hub":
        snapshot = cached_snapshot(hub_id(config.model.model_name))
        return _path_digest(snapshot) if snapshot is not None else f"hub:{config.model.model_name}"
    return _path_digest(Path(where))


def _corpus_digest(config: RunConfig) -> str:
    from importlib.metadata import PackageNotFoundError, version

    spec = config.corpus.dataset_path.strip()
    if spec == EMBEDDED:
        try:
            return f"{EMBEDDED}:{EMBEDDED_PACKAGE}=={version(EMBEDDED_PACKAGE)}"
        except PackageNotFoundError:
            return EMBEDDED
    path = Path(spec).expanduser()
    if not path.exists():
        return f"dataset:{spec}:{config.corpus.dataset_split}"
    if path.is_file():  # its path is in the config already
        return _file_digest(local_files(path)[0], whole=True)
    return digest([f"{f.relative_to(path)}:{_file_digest(f, whole=True)}" for f in local_files(path)])


def _path_digest(path: Path) -> str:
    """A model or SAE directory (every file, by name and content), or one file."""
    if path.is_file():
        return _file_digest(path)
    files = sorted(p for p in path.rglob("*") if p.is_file() and not any(part.startswith(".")
                                                                      for part in p.relative_to(path).parts))
    return digest([f"{f.relative_to(path)}:{_file_digest(f)}" for f in files])


def _file_digest(path: Path, whole: bool = False) -> str:
    size = path.stat().st_size
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if whole or size <= WHOLE_FILE_LIMIT:
            for block in iter(lambda: f.read(_MIB), b""):
                h.update(block)
        elif path.suffix == ".safetensors":  # names, shapes, dtypes and offsets of every tensor
            n = int.from_bytes(f.read(8), "little")
            h.update(f.read(min(n, 100 * _MIB)))
        else:
            h.update(f.read(_MIB))
            f.seek(max(size - _MIB, 0))
            h.update(f.read(_MIB))
    return f"{size}:{h.hexdigest()[:16]}"

