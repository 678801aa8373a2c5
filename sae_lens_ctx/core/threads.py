"""How the model's own forwards use the CPU's cores: the OpenMP wait policy and the intra-op thread count.

Why: torch's CPU kernels run on an OpenMP team (libgomp in the pip wheels) whose threads, between two
parallel regions, spin for a while before sleeping (libgomp's default). Two runs side by side on 2 cores
then hold 4 compute threads, each spinning on a core the other run needs: once, two attribute stages side
by side each took 5.2× their time alone, where a fair share of the cores is 2×. A passive wait policy
(`OMP_WAIT_POLICY=PASSIVE`: a waiting thread sleeps at once; `KMP_BLOCKTIME=0` for Intel's runtime) gives
the core back. It costs a quiet machine about 10 % on the model's forwards (457 against 506 tokens/s
measured), and no bounded spin (`GOMP_SPINCOUNT`) both keeps that speed and stays under 2.5× beside a
second run (`sae-lens-ctx bench --contention`, docs/scale.md).

The policy must be in the environment before the OpenMP runtime loads, that is before `import torch`:
`apply_wait_policy` is called where the package is imported (`sae_lens_ctx/__init__.py`, which imports no
torch) and does nothing when torch is already loaded. An explicit `OMP_WAIT_POLICY` / `KMP_BLOCKTIME` in the
environment wins (`SAE_LENS_CTX_WAIT_POLICY=default` leaves both unset).

Threads: the intra-op thread count is `OMP_NUM_THREADS` when set, else the cores this process may run on
(`os.sched_getaffinity`: a container's or `taskset`'s share, where torch would count the machine's cores)
divided among the processes torchrun starts on this machine (`LOCAL_WORLD_SIZE`), at least 1
(`model_threads`). The CLI puts it in `OMP_NUM_THREADS` before torch loads (`apply_thread_policy`); through the
Python API, torch's own setting (`torch.set_num_threads`) stands. It is fixed for a run, never chosen from
the machine's load: the thread count moves fp32 results in their last bits (docs/scale.md), and two runs
of one config must write the same bytes.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping

WAIT_POLICY = {"OMP_WAIT_POLICY": "PASSIVE", "KMP_BLOCKTIME": "0"}
"""The environment the package gives the OpenMP runtime unless told otherwise (see the module doc)."""


SET_HERE: set[str] = set()
"""The `WAIT_POLICY` variables `apply_wait_policy` put in this process's environment (not the user's own);
subprocesses that must choose for themselves (`bench --contention`) drop them."""


def apply_wait_policy(environ=os.environ) -> bool:
    """Set `WAIT_POLICY` where unset, unless torch is already imported or `SAE_LENS_CTX_WAIT_POLICY=default`;
    True if the policy is in effect for the OpenMP runtime torch will load."""
    if environ.get("SAE_LENS_CTX_WAIT_POLICY", "passive").lower() == "default" or "torch" in sys.modules:
        return False
    for key, value in WAIT_POLICY.items():
        if key not in environ:
            environ[key] = value
            if environ is os.environ:
                SET_HERE.add(key)
    return True


def model_threads(environ: Mapping[str, str] = os.environ, cores: int | None = None) -> int:
    """Intra-op threads for the model's forwards: `OMP_NUM_THREADS` if set (a positive integer), else this
    process's cores (`os.sched_getaffinity`) over `LOCAL_WORLD_SIZE` (torchrun's processes on this machine)."""
    explicit = environ.get("OMP_NUM_THREADS", "").strip()
    if explicit.isdigit() and int(explicit) > 0:
        return int(explicit)
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    local = environ.get("LOCAL_WORLD_SIZE", "1").strip()
    return max(1, cores // max(1, int(local) if local.isdigit() else 1))


def apply_thread_policy(environ=os.environ) -> int | None:
    """Put `model_threads()` in `OMP_NUM_THREADS` (unless set, or torch is already imported) and return it."""
    if "torch" in sys.modules or environ.get("OMP_NUM_THREADS", "").strip():
        return None
    n = model_threads(environ)
    environ["OMP_NUM_THREADS"] = str(n)
    return n


def bf16_available(device: "torch.device") -> bool:  # noqa: F821 (torch is imported inside)
    """True where bf16 matmuls are native: a CUDA device that supports bf16, or a CPU with AVX-512 BF16 / AMX
    (oneDNN's check). The bf16 scan (`mine.scan_precision`) and the embedded LLM
    (`explain.embedded_precision`) use bf16 on 'auto' only there."""
    import torch

    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        try:
            return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            return False
    return False
