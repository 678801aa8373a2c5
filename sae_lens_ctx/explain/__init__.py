"""Forwarding package, kept for one release: `sae_lens_ctx.explain.prompts` and `python -m sae_lens_ctx.explain.serve`
moved to `sae_lens_ctx.core.prompts` and `sae_lens_ctx.clients.serve`; the explain stage is `sae_lens_ctx.stages.explain`."""
