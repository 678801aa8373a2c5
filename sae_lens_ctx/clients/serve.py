"""Serve the embedded SmolLM2 GGUF as an OpenAI-compatible server on 127.0.0.1 (llama-cpp-python's server).

    python -m sae_lens_ctx.explain.serve [--port 8000] [--n_ctx 4096] [--logits_all true] [llama_cpp.server options]

Then point the pipeline at it (``explain.backend=openai-compatible explain.base_url=http://127.0.0.1:8000/v1
explain.model=smollm2-135m-instruct``), or neuron-explainer's own `ApiClient` (ecosystem-notes §3.5 c).
This process is replaced by `python -m llama_cpp.server` (needs the optional extra
`pip install "sae-lens-ctx[llama-cpp]"`; without it: a one-line error), with the
embedded model, the model alias, the host and n_ctx filled in unless given. Logprobs need
`--logits_all true`, which makes every call slower.
"""

from __future__ import annotations

import os
import sys

from ..core.embedded import embedded_gguf_path
from .llm import EMBEDDED_LLM

DEFAULTS = {"--host": "127.0.0.1", "--model_alias": EMBEDDED_LLM, "--n_ctx": "4096", "--port": "8000"}


def command(args: list[str]) -> list[str]:
    given = {a.split("=", 1)[0] for a in args if a.startswith("--")}
    cmd = [sys.executable, "-m", "llama_cpp.server"]
    if "--model" not in given:
        cmd += ["--model", str(embedded_gguf_path())]
    for flag, value in DEFAULTS.items():
        if flag not in given:
            cmd += [flag, value]
    return cmd + args


def main(argv: list[str] | None = None) -> None:
    if any(a in ("-h", "--help") for a in (argv or sys.argv[1:])):
        print(__doc__)
        return
    from .llm import LLAMA_CPP_EXTRA

    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        print(f"sae-lens-ctx serve: error: the OpenAI-compatible server needs llama-cpp-python, an optional "
              f"extra: {LLAMA_CPP_EXTRA}", file=sys.stderr)
        sys.exit(2)
    cmd = command(list(sys.argv[1:] if argv is None else argv))
    print("starting:", " ".join(cmd), file=sys.stderr, flush=True)
    os.execv(cmd[0], cmd)


if __name__ == "__main__":
    main()
