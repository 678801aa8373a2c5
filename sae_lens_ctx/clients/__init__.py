"""LLM clients: the OpenAI SDK backends, llama-cpp in-process, the cached call layer (`LLM`), the
neuron-explainer adapter and the OpenAI-compatible server. Importing this package attaches the built-in
backends' factories to the registry in `core.llm`."""

from . import llm  # noqa: F401  (registers the built-in backends)
