"""The thread policy of the model's forwards (core/threads.py): passive OpenMP waiting set before torch loads,
intra-op threads from OMP_NUM_THREADS or this process's cores over torchrun's local processes."""

import json
import os
import subprocess
import sys
from pathlib import Path

from sae_lens_ctx.core import threads

ROOT = Path(__file__).parents[2]


def test_model_threads_from_the_environment_and_the_cores():
    assert threads.model_threads({"OMP_NUM_THREADS": "3"}, cores=8) == 3
    assert threads.model_threads({}, cores=8) == 8
    assert threads.model_threads({"LOCAL_WORLD_SIZE": "2"}, cores=8) == 4  # torchrun's ranks share the cores
    assert threads.model_threads({"LOCAL_WORLD_SIZE": "4"}, cores=2) == 1  # never 0
    assert threads.model_threads({"OMP_NUM_THREADS": "bad"}, cores=2) == 2
    assert threads.model_threads({}) == len(os.sched_getaffinity(0))


def test_policies_keep_an_explicit_choice_and_stand_back_once_torch_is_loaded():
    import torch  # noqa: F401  (loaded: too late to change the OpenMP runtime or its thread count)

    env: dict = {}
    assert threads.apply_wait_policy(env) is False and env == {}
    assert threads.apply_thread_policy(env) is None and env == {}


def test_a_fresh_process_gets_the_policy_before_torch_loads():
    code = ("import os, sae_lens_ctx; from sae_lens_ctx.core.threads import apply_thread_policy; apply_thread_policy(); "
            "import torch, json; print(json.dumps([os.environ.get('OMP_WAIT_POLICY'), os.environ.get('KMP_BLOCKTIME'), "
            "torch.get_num_threads()]))")
    run = lambda extra: json.loads(subprocess.run(  # noqa: E731
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT,
        env={**{k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY",
                                                                   "KMP_BLOCKTIME", "SAE_LENS_CTX_WAIT_POLICY")},
             "PYTHONPATH": str(ROOT), **extra}).stdout.splitlines()[-1])
    assert run({}) == ["PASSIVE", "0", len(os.sched_getaffinity(0))]
    assert run({"OMP_WAIT_POLICY": "ACTIVE", "OMP_NUM_THREADS": "1"}) == ["ACTIVE", "0", 1]  # the user's own wins
    assert run({"SAE_LENS_CTX_WAIT_POLICY": "default"})[:2] == [None, None]
