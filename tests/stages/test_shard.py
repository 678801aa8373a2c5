"""Sharded mining equals one process: `--shard i/n` + `merge`, and 2 torchrun processes on gloo.

Byte for byte at the same intra-op thread count; across thread counts the same prompts, ranks and texts with
activations within fp32 round-off (`shards.ROUND_OFF`; see `stages/mine/shards.py`)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from planted import planted_corpus
from sae_lens_ctx import cli
from sae_lens_ctx.stages import mine
from sae_lens_ctx.core.config import CorpusConfig, DiscoverConfig, MineConfig, ModelConfig, RunConfig
from sae_lens_ctx.core.errors import UserError
from sae_lens_ctx.pipeline.engine import run_pipeline
from sae_lens_ctx.stages.mine.shards import ROUND_OFF, load_shard, parse_shard
from sae_lens_ctx.stages.mine.scan import merge_results

# A hang guard, not a timing assertion: many times what the subprocess takes even on a busy 2-core machine
# (where a bare `sae-lens-ctx --help` once took a minute), so only a hang fails the test.
HANG_GUARD_S = 1800

def config(plant, docs):
    # batch_size 4 × window 8 = 32 contexts a window: the train split has several windows, so every shard scans some
    return RunConfig(model=ModelConfig(model_name=str(plant.directory)),
                     corpus=CorpusConfig(dataset_path=str(docs), context_size=16, min_documents=10),
                     discover=DiscoverConfig(n_last_layers=1, top_k=1),
                     mine=MineConfig(top_k=6, n_test_prompts=3, n_random=3, batch_size=4))


def assert_same_mine(a: Path, b: Path, exact: bool = True):
    """The mine stage's files of two layouts agree: byte for byte (`exact`), or with every activation within
    `ROUND_OFF` and everything else (units, prompts, ranks, texts, tokens, counts) identical."""
    if exact:
        assert (a / "contexts.jsonl").read_bytes() == (b / "contexts.jsonl").read_bytes()
        assert (a / "mine.json").read_bytes() == (b / "mine.json").read_bytes()  # timings live in stages.json
    else:
        records = [[json.loads(line) for line in (d / "contexts.jsonl").read_text().splitlines()] for d in (a, b)]
        assert_round_off_equal(*records, "contexts.jsonl")
        assert_round_off_equal(*(json.loads((d / "mine.json").read_text()) for d in (a, b)), "mine.json")
    acts_a, acts_b = load_file(a / "context_acts.safetensors"), load_file(b / "context_acts.safetensors")
    assert acts_a.keys() == acts_b.keys() and len(acts_a) > 0
    for key in acts_a:
        if exact:
            assert torch.equal(acts_a[key], acts_b[key]), key
        else:
            torch.testing.assert_close(acts_a[key], acts_b[key], **ROUND_OFF, equal_nan=True, msg=key)
    ra = json.loads((a / "mine.json").read_text())
    assert all(ra["splits"][name]["n_tokens"] > 0 for name in ("train", "test"))


def assert_round_off_equal(x, y, where: str):
    """JSON values equal, floats within `ROUND_OFF` (ints, strings, keys and lengths exactly)."""
    if isinstance(x, float) or isinstance(y, float):
        assert isinstance(x, (int, float)) and isinstance(y, (int, float)), where
        assert abs(x - y) <= ROUND_OFF["atol"] + ROUND_OFF["rtol"] * abs(y), (where, x, y)
    elif isinstance(x, dict):
        assert isinstance(y, dict) and x.keys() == y.keys(), where
        for k in x:
            assert_round_off_equal(x[k], y[k], f"{where}.{k}")
    elif isinstance(x, list):
        assert isinstance(y, list) and len(x) == len(y), where
        for i, (u, v) in enumerate(zip(x, y)):
            assert_round_off_equal(u, v, f"{where}[{i}]")
    else:
        assert x == y, (where, x, y)


@pytest.fixture(scope="module")
def prepared(planted_gpt2, tmp_path_factory):
    """A run directory after load + discover, and the single-process mine result beside it."""
    root = tmp_path_factory.mktemp("shard")
    docs = root / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": t}) + "\n" for t in planted_corpus(planted_gpt2, n_docs=120)))
    base = root / "base"
    cfg = config(planted_gpt2, docs)
    run_pipeline(cfg, base, until="discover")
    single = root / "single"
    _copy_run(base, single)
    run_pipeline(config(planted_gpt2, docs), single, only="mine")
    return planted_gpt2, docs, base, single


def _copy_run(src: Path, dst: Path):
    import shutil

    shutil.copytree(src, dst)


def test_parse_shard():
    assert parse_shard("0/1") == (0, 1) and parse_shard(" 2 / 3 ") == (2, 3)
    for bad in ("3/3", "1", "-1/2", "a/b", "0/0"):
        with pytest.raises(UserError, match="--shard"):
            parse_shard(bad)


def test_shards_cover_every_context_once_in_the_unsharded_batches():
    from sae_lens_ctx.inputs.corpus import TokenContext

    contexts = [TokenContext(f"d{i}", "train", 0, 0, tuple(range(1 + (i * 7) % 13))) for i in range(200)]
    whole = [idxs for idxs, _ in mine.batches(contexts, 4)]
    for n in (1, 2, 3):
        parts = [[idxs for idxs, _ in mine.batches(contexts, 4, shard=(i, n))] for i in range(n)]
        assert all(parts) and sorted(b for p in parts for b in p) == sorted(whole)  # the very same batches


def test_shard_and_merge_equal_one_process(prepared, tmp_path, capsys):
    plant, docs, base, single = prepared
    out = tmp_path / "sharded"
    _copy_run(base, out)
    n = 3
    for i in range(n):  # through the CLI, as separate jobs would
        assert cli.main(["mine", "--out", str(out), "--shard", f"{i}/{n}"]) == 0
    files = sorted(out.glob("mine.shard*of3.safetensors"))
    assert len(files) == n and not list(out.glob("mine.ckpt*"))
    parts = [load_shard(f)[0] for f in files]
    # each shard scanned only part of the corpus, together all of it
    scanned = [p["train"].tokens_scanned for p in parts]
    assert all(0 < s < parts[0]["train"].n_tokens for s in scanned) and sum(scanned) == parts[0]["train"].n_tokens
    # the merged tracks are exactly the single-process scan's
    merged = merge_results(parts)
    reference = merge_results([load_shard(_one_shard(plant, docs, base, tmp_path))[0]])
    for split in ("train", "test"):
        for key, track in reference[split].tracks.items():
            for field in ("values", "index", "pos", "rows"):
                torch.testing.assert_close(getattr(merged[split].tracks[key], field), getattr(track, field),
                                           rtol=0, atol=0, equal_nan=True)
    assert cli.main(["merge", "--out", str(out)]) == 0
    assert_same_mine(out, single)
    assert not list(out.glob("mine.shard*"))
    manifest = json.loads((out / "stages.json").read_text())
    assert manifest["stages"]["mine"]["fingerprint"] == json.loads((single / "stages.json").read_text())["stages"]["mine"]["fingerprint"]
    # the next stage sees mine as done
    assert "mine" in capsys.readouterr().out


def _one_shard(plant, docs, base, tmp_path) -> Path:
    """The whole scan as shard 0/1 (the unsharded scan, saved in the shard format)."""
    from sae_lens_ctx.pipeline.distributed import run_shard

    out = tmp_path / "one"
    _copy_run(base, out)
    return run_shard(config(plant, docs), out, (0, 1))


def test_merge_refuses_missing_and_foreign_shards(prepared, tmp_path):
    plant, docs, base, _ = prepared
    out = tmp_path / "partial"
    _copy_run(base, out)
    with pytest.raises(UserError, match="no mining shards"):
        cli_merge(out)
    assert cli.main(["mine", "--out", str(out), "--shard", "1/2"]) == 0
    with pytest.raises(UserError, match="shards 0/2 are missing"):
        cli_merge(out)
    # a shard scanned under another mine config is refused
    assert cli.main(["mine", "--out", str(out), "--shard", "0/2", "mine.top_k=5"]) == 0
    with pytest.raises(UserError, match="another config"):
        cli_merge(out)
    assert cli.main(["mine", "--out", str(out), "--shard", "3/2"]) == 2


def cli_merge(out):
    from sae_lens_ctx.pipeline.distributed import merge_run

    return merge_run(out)


def test_two_gloo_processes_under_torchrun_equal_one_process(prepared, tmp_path):
    """Each rank at the single process's thread count: the ranks run the very batches it ran, so the bytes agree."""
    plant, docs, base, single = prepared
    out = tmp_path / "torchrun"
    _copy_run(base, out)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline",
           "OMP_NUM_THREADS": str(torch.get_num_threads()),  # torchrun's own default is 1 (see the next test)
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[2]), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "sae_lens_ctx", "mine", "--out", str(out)],
                          env=env, capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert_same_mine(out, single)
    assert not list(out.glob("mine.ckpt*")) and not list(out.glob("mine.shard*"))
    report = json.loads((out / "mine.json").read_text())
    assert report["splits"]["train"]["n_contexts"] > 64  # several windows: both ranks scanned part of it
    assert json.loads((out / "stages.json").read_text())["stages"]["mine"]


def test_another_thread_count_gives_the_same_prompts_within_round_off(prepared, tmp_path):
    """One thread (what torchrun gives each rank by default) against the fixture's count: the kernels sum in
    another order, so only the last bits of activations may move (a clean clone on 2 cores moved one 'low'
    prompt's activation by 4.5e-8); prompts, ranks and texts are the same."""
    plant, docs, base, single = prepared
    out = tmp_path / "one_thread"
    _copy_run(base, out)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_pipeline(config(plant, docs), out, only="mine")
    finally:
        torch.set_num_threads(before)
    assert_same_mine(out, single, exact=before == 1)
