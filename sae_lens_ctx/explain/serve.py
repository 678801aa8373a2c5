"""Forwarding module, kept for one release: `python -m sae_lens_ctx.explain.serve` runs `sae_lens_ctx.clients.serve`."""

from ..clients.serve import main

if __name__ == "__main__":
    main()
