"""Load any supported model into a `ModelView` (`inputs/view.py`): TransformerLens names, Hugging Face hub ids and
local directories, GGUF files, the embedded default; names are resolved, and files checked, before anything
loads (a local directory with a model config wins over a hub id of the same name; pickle-only weights are
refused unless `model.allow_pickle`).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch

from ..core.config import EMBEDDED, ModelConfig
from ..core.embedded import EMBEDDED_MODEL_ID, check_gguf_header, embedded_gguf_path, load_gguf
from ..core.errors import UserError, did_you_mean
from .tokens import own_bos_token_id, tokenizer_problem
from .view import (HookFn, MlpRead, ModelView, check_norms, detect_weights, optional_bias, pad_batch,  # noqa: F401
                   pad_id)

log = logging.getLogger(__name__)


def resolve_source(model_name: str) -> tuple[str, Path | str]:
    """Classify a model name: ('embedded-gguf'|'gguf', path), ('hf-directory', path) or ('hub', name).

    An existing directory with a `config.json` wins over a hub id of the same name. A bare name whose
    directory holds no `config.json` (a run directory, `--out gpt2`) is taken as a hub id, never as a
    model; a relative path whose first folder exists here (`models/x`) is a path, never a hub id."""
    if model_name == EMBEDDED:
        return "embedded-gguf", embedded_gguf_path()
    path = Path(model_name).expanduser()
    explicit = model_name.startswith((".", "/", "~")) or model_name.count("/") > 1
    if model_name.endswith(".gguf"):
        if not path.is_file():
            raise UserError(f"GGUF file {model_name} does not exist: check the path")
        return "gguf", path
    if path.is_dir() and (path / "config.json").is_file():
        return "hf-directory", path
    if path.is_dir() and explicit:
        raise UserError(f"{model_name} is not a Hugging Face model directory (no config.json): "
                        "point at a save_pretrained directory or a .gguf file")
    if path.is_file():
        raise UserError(f"{model_name} is a file but not a .gguf: give a GGUF file, a model directory or a hub id")
    if explicit or (not path.exists() and len(path.parts) > 1 and Path(path.parts[0]).is_dir()):
        raise UserError(f"model path {model_name} does not exist: check the path")
    return "hub", model_name


def cached_snapshot(hub_id: str) -> Path | None:
    """The local HF cache's snapshot directory of `hub_id` (its `config.json` there), or None; no network."""
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(hub_id, "config.json")
    except Exception:  # an id the hub library rejects (bad characters) is simply not cached
        return None
    return Path(found).parent if isinstance(found, str) else None


def check_model_name(cfg: ModelConfig) -> None:
    """The cheap checks of a model name: the source exists and a hub name is a plausible one."""
    source, _ = resolve_source(cfg.model_name)
    if source == "hub":
        hub_id(cfg.model_name)


def check_model_files(cfg: ModelConfig) -> None:
    """The checks of `load_model` that load nothing: the name (`check_model_name`); a hub id is, offline,
    in the local HF cache, and no local folder of its name shadows it; a local directory has a tokenizer
    and no pickle-only weights; a GGUF file is whole."""
    check_model_name(cfg)
    source, where = resolve_source(cfg.model_name)
    if source == "hub":
        name = hub_id(cfg.model_name)
        snapshot = cached_snapshot(name)
        if snapshot is None and _offline():
            raise _hub_error(name, None, asked=cfg.model_name)
        if snapshot is None and Path(name).is_dir():  # transformers would read the folder, not the hub
            raise UserError(f"the hub id '{name}' is shadowed by the folder {Path(name).resolve()} (not a model "
                            f"directory) and is not in the local HF cache: run from another folder, or download it "
                            f"first (hf download {name})")
        if snapshot is not None and cfg.model_class == "bridge":
            _check_model_directory(snapshot, cfg.allow_pickle)
    elif source == "hf-directory":
        _check_model_directory(Path(where), cfg.allow_pickle)
    elif source == "gguf":
        check_gguf_header(Path(where))


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model", "tokenizer_config.json")


def _check_model_directory(path: Path, allow_pickle: bool) -> None:
    """A model directory's cheap checks: a tokenizer is saved beside the model, weights are not pickle-only."""
    if not any((path / name).is_file() for name in _TOKENIZER_FILES):
        raise UserError(f"model directory {path} has no tokenizer files ({', '.join(_TOKENIZER_FILES[:3])}): "
                        "save the tokenizer next to the model (tokenizer.save_pretrained)")
    _check_no_pickle(path, allow_pickle)


def model_config_json(cfg: ModelConfig) -> dict | None:
    """The model's Hugging Face `config.json`, read without loading the model (a local directory, or a hub
    model's cached snapshot); None where no readable config file is at hand (a hub model not cached, a GGUF)."""
    source, where = resolve_source(cfg.model_name)
    directory = Path(where) if source == "hf-directory" else None
    if source == "hub" and cfg.model_class == "bridge":
        directory = cached_snapshot(hub_id(cfg.model_name))
    if directory is None:
        return None
    import json

    try:
        data = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def model_max_context(cfg: ModelConfig) -> int | None:
    """The longest context the model's `config.json` states (n_positions / max_position_embeddings), read
    without loading the model; None where no config file is at hand (a hub model not cached, a GGUF)."""
    data = model_config_json(cfg)
    if data is None:
        return None
    for key in ("n_positions", "max_position_embeddings", "n_ctx", "seq_length"):
        if isinstance(data.get(key), int) and data[key] > 0:
            return int(data[key])
    return None


def load_model(cfg: ModelConfig) -> ModelView:
    """Load the configured model into a `ModelView` in the configured weight convention."""
    cfg.validate()
    source, where = resolve_source(cfg.model_name)
    dtype = getattr(torch, cfg.dtype)
    if cfg.model_class == "hooked":
        if source != "hub":
            raise UserError("model.model_class=hooked needs a TransformerLens model name; "
                            "use model.model_class=bridge for local directories and GGUF files")
        model = _load_hooked(cfg.model_name, cfg, dtype)
    elif source in ("gguf", "embedded-gguf"):
        hf, tok = load_gguf(Path(where), dtype)
        label = EMBEDDED_MODEL_ID if source == "embedded-gguf" else Path(where).stem
        model = _boot_bridge(label, cfg, dtype, hf_model=hf, tokenizer=tok)
    elif source == "hf-directory":
        hf, tok = _load_hf_directory(Path(where), dtype, allow_pickle=cfg.allow_pickle)
        model = _boot_bridge(str(where), cfg, dtype, hf_model=hf, tokenizer=tok)
    elif (snapshot := cached_snapshot(hub_id(cfg.model_name))) is not None:
        # from the cache's own directory: a local folder of the same name (a run directory) never shadows it
        hf, tok = _load_hf_directory(snapshot, dtype, allow_pickle=cfg.allow_pickle)
        model = _boot_bridge(str(snapshot), cfg, dtype, hf_model=hf, tokenizer=tok)
    else:
        model = _boot_bridge(hub_id(cfg.model_name), cfg, dtype)
    if cfg.weights == "folded" and hasattr(model, "enable_compatibility_mode"):
        model.enable_compatibility_mode(disable_warnings=True)
    return ModelView(model, name=cfg.model_name, source=source, weights=cfg.weights)


def hub_id(name: str) -> str:
    """TransformerLens aliases ('gpt2-small') to hub ids ('gpt2'); other names pass through."""
    from transformer_lens import loading_from_pretrained as tl_loading

    try:
        return tl_loading.get_official_model_name(name)
    except ValueError:
        if "/" not in name:
            known = list(tl_loading.OFFICIAL_MODEL_NAMES) + list(_tl_aliases())
            raise UserError(f"unknown model name '{name}'{did_you_mean(name, known)}: give a TransformerLens "
                            "model name, an HF hub id (org/name), a local directory or a .gguf path") from None
        return name


def _tl_aliases() -> list[str]:
    from transformer_lens import loading_from_pretrained as tl_loading

    return [a for aliases in tl_loading.MODEL_ALIASES.values() for a in aliases]


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def _hub_error(name: str, e: Exception | None, asked: str | None = None) -> UserError:
    """A hub model that cannot be had: neither an existing path nor (offline) in the local HF cache."""
    asked = asked or name
    if _offline() or e is None:
        why = (f"'{asked}' is neither an existing path (from {Path.cwd()}) nor a hub id in the local HF cache, "
               "and HF_HUB_OFFLINE is set")
    else:
        why = f"'{asked}' is not an existing path, and the hub could not be reached ({type(e).__name__})"
    return UserError(f"cannot load model '{name}': {why}; download it where there is network "
                     f"(hf download {name}) or pass a local directory or .gguf file")


_HUB_ERRORS = (OSError, ConnectionError, TimeoutError)


def _boot_bridge(name: str, cfg: ModelConfig, dtype: torch.dtype, **kwargs: Any) -> Any:
    from transformer_lens.model_bridge import TransformerBridge

    try:
        return TransformerBridge.boot_transformers(name, device=cfg.device, dtype=dtype, **kwargs)
    except _HUB_ERRORS as e:
        raise _hub_error(name, e) from e
    except ValueError as e:
        if "not supported" in str(e).lower() or "architecture" in str(e).lower():
            raise UserError(f"TransformerBridge does not support model '{name}': {str(e).splitlines()[0]}") from e
        raise


def _load_hooked(name: str, cfg: ModelConfig, dtype: torch.dtype) -> Any:
    from transformer_lens import HookedTransformer

    official = hub_id(name)
    kwargs: dict[str, Any] = dict(device=cfg.device, dtype=dtype)
    try:
        if cfg.weights == "folded":
            return HookedTransformer.from_pretrained(official, **kwargs)
        return HookedTransformer.from_pretrained_no_processing(official, **kwargs)
    except _HUB_ERRORS as e:
        raise _hub_error(official, e) from e


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


def _check_no_pickle(path: Path, allow_pickle: bool) -> None:
    """Refuse a directory whose weights exist only as pickle files, unless `model.allow_pickle` is set."""
    names = [p.name for p in path.iterdir() if p.is_file()]
    pickled = sorted(n for n in names if n.endswith(PICKLE_SUFFIXES) and "training_args" not in n)
    if pickled and not any(n.endswith(".safetensors") for n in names) and not allow_pickle:
        raise UserError(f"model directory {path} holds pickle-based weights only ({pickled[0]}), and unpickling can "
                        "run code: convert them to safetensors (model.save_pretrained(dir, safe_serialization=True)), "
                        "or for a checkpoint you trust pass model.allow_pickle=true")


def _check_tokenizer(path: Path, tok: Any) -> None:
    """Refuse a tokenizer that cannot be the model's (`tokens.tokenizer_problem`), before any weights load."""
    import json

    try:
        vocab_size = json.loads((path / "config.json").read_text(encoding="utf-8")).get("vocab_size")
    except (OSError, ValueError):
        vocab_size = None
    problem = tokenizer_problem(tok, vocab_size if isinstance(vocab_size, int) else None)
    if problem:
        names = sorted(p.name for p in path.glob("tokenizer*")) or ["no tokenizer files"]
        raise UserError(f"model directory {path} has no usable tokenizer ({problem}; {', '.join(names)}): "
                        "save the tokenizer next to the model (tokenizer.save_pretrained)")


def _load_hf_directory(path: Path, dtype: torch.dtype, allow_pickle: bool = False) -> tuple[Any, Any]:
    """A `save_pretrained` directory: safetensors weights, or pickle ones (torch.load(weights_only=True),
    transformers' default) when `allow_pickle`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _check_no_pickle(path, allow_pickle)

    try:
        tok = AutoTokenizer.from_pretrained(path)
    except Exception as e:
        raise UserError(f"model directory {path} has no usable tokenizer ({type(e).__name__}): "
                        "save the tokenizer next to the model (tokenizer.save_pretrained)") from e
    _check_tokenizer(path, tok)
    try:
        hf = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_safetensors=None if allow_pickle else True)
    except Exception as e:
        raise UserError(f"model directory {path} could not be loaded ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:120]}): check that its weights are complete") from e
    return hf.eval(), tok
