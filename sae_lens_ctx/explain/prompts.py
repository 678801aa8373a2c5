"""Forwarding module, kept for one release: the prompts live in `sae_lens_ctx.core.prompts`.

This name is the same module object, so edits such as `prompts.HEAD_TEMPLATE = ...` reach the pipeline."""

import sys

from ..core import prompts as _prompts

sys.modules[__name__] = _prompts
