"""`sae-lens-ctx bench` on the tiny shape: the JSON has every documented field (no timing assertions)."""

import json
import math

from sae_lens_ctx import cli
from sae_lens_ctx.bench import RATIO_KEYS, SHAPES, shape_model


def test_bench_tiny_shape_writes_every_field(tmp_path, capsys):
    out = tmp_path / "bench.json"
    args = ["bench", "--shape", "tiny", "--out", str(out), "--contexts", "8", "--context-len", "32", "--units", "16",
            "--k", "4", "--batch-size", "4", "--repeats", "1", "--prompts", "4", "--trim-prompts", "4",
            "--memory-tokens", "256"]
    assert cli.main(args) == 0
    printed = capsys.readouterr().out
    for key in RATIO_KEYS:
        assert key in printed
    r = json.loads(out.read_text())
    assert set(r["ratios"]) == {"scan_over_forward", "scan_over_tl_cache", "scan_over_paper",
                                "attribution_over_paper", "trim_over_serial", "scan_bf16_over_forward",
                                "scan_bf16_over_scan"}
    for key, value in r["ratios"].items():
        assert isinstance(value, float) and math.isfinite(value) and value > 0, key
    (run,) = r["runs"]
    assert run["model"] == "random:tiny" and run["shape"] == "tiny" and run["n_layers"] == SHAPES["tiny"]["n_layers"]
    assert run["ratios"] == r["ratios"]  # one model: the worst case is that model's
    for method in ("scan", "scan_bf16", "forward", "forward_until_hooks", "run_with_cache_topk", "paper_scan"):
        assert run["tokens_per_s"][method] > 0
    assert run["scan"]["n_contexts"] == 8 and run["scan"]["n_tokens"] > 0
    # attribution: ours and the paper-style full cache agree on the values, not only on timing
    attribution = run["attribution"]
    assert attribution["prompts_per_s"]["ours"] > 0 and attribution["prompts_per_s"]["paper"] > 0
    assert attribution["max_abs_difference"] < 1e-4
    trim = run["trim"]
    assert trim["n_prompts"] == 4 and trim["serial_agrees"] is True and trim["prompts_per_s"]["batched"] > 0
    memory = r["memory"]
    assert {"growth", "tracemalloc_growth", "by_model"} <= set(memory)
    m = memory["by_model"]["random:tiny"]
    assert m["n_tokens"][1] == 10 * m["n_tokens"][0] and all(b > 0 for b in m["peak_rss_bytes"])
    assert memory["growth"] == m["growth"] == round((m["peak_rss_bytes"][1] - m["peak_rss_bytes"][0])
                                                     / m["peak_rss_bytes"][0], 4)
    d = r["discover"]["random:tiny"]
    assert d["n_units"] == SHAPES["tiny"]["d_mlp"] and d["d_vocab"] == SHAPES["tiny"]["d_vocab"]
    assert d["seconds"] > 0 and d["units_per_s"] > 0 and d["peak_rss_bytes"] > 0 and d["finite"]


def test_named_shapes_build_with_their_dimensions():
    view = shape_model("tiny")
    assert (view.n_layers, view.d_model, view.d_mlp, view.d_vocab) == (2, 64, 256, 512)
    assert not view.gated and view.normalization == "LN"
    for name in ("gpt2-small", "gpt2-large", "pythia-160m", "smollm2"):
        assert SHAPES[name]["d_model"] % SHAPES[name].get("n_heads", 1) == 0
    assert SHAPES["smollm2"]["gated_mlp"] and SHAPES["smollm2"]["normalization_type"] == "RMS"


def test_bench_contention_times_each_part_alone_and_beside_a_copy(tmp_path):
    """`bench --contention` on the tiny shape: the fields and their arithmetic (no timing assertion)."""
    from sae_lens_ctx.bench.contention import CONTENTION_GOAL, bench_contention

    r = bench_contention(["scan"], "tiny", n_contexts=8, batch_size=4, log=lambda _: None)
    part = r["parts"]["scan"]
    assert part["alone_s"] > 0 and len(part["beside_s"]) == 2 and all(s > 0 for s in part["beside_s"])
    assert abs(part["ratio"] - sum(part["beside_s"]) / 2 / part["alone_s"]) <= 0.01 * part["ratio"]  # seconds kept to the microsecond, the ratio to 3 digits
    assert r["goal"] == CONTENTION_GOAL and r["shape"] == "tiny"
