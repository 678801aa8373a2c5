"""The paper's protocol on GPT-2 small (Neo, Cohen & Barez, EMNLP 2024, round 2), from Python.

What it shows
    The whole study with the paper's settings, from the preset `wandb_configs/gpt2-small.yaml` (layers
    9-11, 20 neurons per layer, top-30 documents of NeelNanda/pile-10k trimmed at 0.8, the first 20
    prompts per neuron attributed, active = mean + 2 std (the authors' rule), relevant = active on 25-75 %
    of prompts, GPT-4 explanations with the round-2 prompt structure, a Yes/No judge on 10 held-out prompts,
    balanced accuracy E, "well explained" at E >= 6/9 as the authors' red bins), run on a
    `HookedTransformer` as SAE-Lens users hold it, logged to W&B.
    It prints the headline E with its CI beside the random-unit and shuffled-explanation controls.

    NOT run in CI: it needs the hub (GPT-2 small, pile-10k), an OpenAI key (OPENAI_API_KEY) and a few
    GPU-hours or a long CPU night. CI runs `--check-config`, which builds and validates the config and
    checks it against the paper's settings without loading anything.

Run it
    OPENAI_API_KEY=... python examples/paper_protocol_gpt2_small.py [OUT_DIR]   # default runs/paper-gpt2-small
    python examples/paper_protocol_gpt2_small.py --check-config                  # offline, seconds
"""

import sys
from pathlib import Path

import sae_lens_ctx as slc

PRESET = Path(__file__).resolve().parents[1] / "wandb_configs" / "gpt2-small.yaml"


def paper_config() -> slc.RunConfig:
    config = slc.RunConfig.from_yaml(PRESET)  # validated: unknown keys and wrong types are errors
    config.model.model_class = "hooked"  # HookedTransformer.from_pretrained, as the paper
    config.score = slc.ScoreConfig(n_prompts=10, judge_prompt="round2", single_class="skip", max_tokens=1)
    config.logging.run_name = "paper-gpt2-small"
    return config.validate()


config = paper_config()
if "--check-config" in sys.argv:
    checks = {
        "model": (config.model.model_name, config.model.weights) == ("gpt2-small", "folded"),
        "layers 9-11, K=20": (config.discover.layers, config.discover.top_k) == ([9, 10, 11], 20),
        "top-30 contexts, trim 0.8": (config.mine.top_k, config.mine.trim_ratio) == (30, 0.8),
        "20 prompts, mean+2std": (config.attribute.n_prompts, config.attribute.rule) == (20, "mean+2std"),
        "band 25-75 %": (config.attribute.band_low, config.attribute.band_high) == (0.25, 0.75),
        "round-2 prompt": config.explain.prompt_ending == "round2" and config.score.judge_prompt == "round2",
        "10 held-out prompts": config.score.n_prompts == 10 and config.mine.n_test_prompts >= 10,
        "well explained from 6/9 (E = 2/3 counts)": abs(config.logging.well_explained - 6 / 9) < 1e-9,
        "no secret in the config": "sk-" not in config.to_yaml(),
    }
    for name, ok in checks.items():
        print(f"  {'ok ' if ok else 'BAD'} {name}")
    # the config round-trips through YAML, as `sae-lens-ctx run CONFIG.yaml` would read it
    assert slc.RunConfig.from_dict(__import__("yaml").safe_load(config.to_yaml())) == config
    assert all(checks.values()), [k for k, v in checks.items() if not v]
    print(f"paper_protocol_gpt2_small: OK (config only: {len(config.to_yaml().splitlines())} lines, validated)")
    sys.exit(0)

from transformer_lens import HookedTransformer  # noqa: E402

model = HookedTransformer.from_pretrained("gpt2-small")  # folded weights: fold_ln, centred writes/unembed
out = sys.argv[1] if len(sys.argv) > 1 else "runs/paper-gpt2-small"
result = slc.run(model, config=config, out=out)

e = result.summary["headline"]["E"]
print(f"E (balanced accuracy) of head explanations: {e['real']['mean']:.3f} "
      f"[{e['real']['ci_low']:.3f}, {e['real']['ci_high']:.3f}] (n={e['real']['n']})")
print(f"  shuffled explanations: {e['shuffled_explanations']['mean']}; {e['real_minus_shuffled']['verdict']}")
print(result.head_vs_neuron().query("scorer == 'E'").to_string(index=False))
assert len(result.units) == 60 and len(result.scores) > 0
print(f"paper_protocol_gpt2_small: OK ({result.out})")
