"""Shared fixtures: the planted models (tests/support/planted.py) and the embedded SmolLM2, all offline."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing in the suite may reach a hub
# W&B is on by default (logging.log_to_wandb); tests that are not about W&B run without it, so that
# determinism and crash tests stay about the run directory. W&B tests set WANDB_MODE themselves.
os.environ["WANDB_MODE"] = "disabled"

import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

_TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(_TESTS / "support"))  # planted models, servers, harnesses, shared test helpers

import offline_llm  # noqa: E402,F401  (registers the offline-test-llm backend)
from planted import make_planted_gpt2, make_planted_llama  # noqa: E402


class _CurrentStderr:
    """A stream that writes to whatever `sys.stderr` is now. transformers' logging handler keeps the stderr of
    the moment it was created; tests that run the CLI in-process swap stderr (capsys) between calls, so its
    warnings would go to a closed stream ("--- Logging error ---")."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def _transformers_logs_to_the_current_stderr() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.get_logger("transformers")  # creates the library's handler once
    handler = hf_logging._default_handler
    handler.setStream(_CurrentStderr())
    handler.flush = _CurrentStderr().flush


_transformers_logs_to_the_current_stderr()


@pytest.fixture(scope="session")
def planted_gpt2(tmp_path_factory):
    return make_planted_gpt2(tmp_path_factory.mktemp("planted-gpt2"))


@pytest.fixture(scope="session")
def planted_llama(tmp_path_factory):
    return make_planted_llama(tmp_path_factory.mktemp("planted-llama"))


@pytest.fixture(scope="session", params=["gpt2", "llama"])
def planted(request, planted_gpt2, planted_llama):
    """Each planted model in turn."""
    return {"gpt2": planted_gpt2, "llama": planted_llama}[request.param]


@pytest.fixture(scope="session")
def embedded_view():
    """The embedded SmolLM2 as the default run loads it (TransformerBridge, folded weights)."""
    from sae_lens_ctx.core.config import ModelConfig
    from sae_lens_ctx.inputs.model import load_model

    return load_model(ModelConfig())
