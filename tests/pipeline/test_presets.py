"""Every preset in wandb_configs/ runs end to end, with no traceback, on a tiny local model of its family.

The preset is read as a user would (`sae-lens-ctx run PRESET.yaml`), then only what cannot run here is
swapped: the hub model for a tiny random model of the same family built offline (cases/common/make_tiny.py:
GPT-2 → gpt2, Pythia → neox, the embedded SmolLM2 → llama-gqa), pile-10k for a small prose file, the SAE
release for a tiny SAE saved on disk, OpenAI for the offline test LLM (tests/support/offline_llm.py), and sizes
that exceed a 2-layer model or a few thousand tokens (layers, context size, token budget). Everything else
(mine.top_k 30, trimming without BOS, the attribution rule and band, every relevant head explained, the
judge) is the preset's own. W&B logging is turned off: its offline runs are tested in test_track.py.
"""

import shutil
from pathlib import Path

import pytest
import yaml

from sae_lens_ctx.cli import main
from sae_lens_ctx.core.config import RunConfig

PRESETS = Path(__file__).resolve().parents[2] / "wandb_configs"
RUN_PRESETS = sorted(p for p in PRESETS.glob("*.yaml") if p.name not in ("sweep.yaml", "dashboard.yaml"))
from tiny import PROSE  # noqa: E402  (tests/support/tiny.py: the same tiny families as the cases' make_tiny.py)
from tiny import make_tiny as build_tiny  # noqa: E402
TINY_LAYERS = 2
"""make_tiny.py's models have 2 layers, 64-dimensional residual streams and 128 positions."""


def family(preset: RunConfig) -> str:
    name = preset.model.model_name
    return "neox" if "pythia" in name else "llama-gqa" if name == "embedded" else "gpt2"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """make_tiny.py's model of an architecture, built once per module (offline, a few seconds each)."""
    built: dict[str, Path] = {}

    def get(arch: str) -> Path:
        if arch not in built:
            out = tmp_path_factory.mktemp("tiny") / arch
            build_tiny(arch, out)
            built[arch] = out
        return built[arch]
    return get


def tiny_sae(directory: Path, hook_name: str) -> str:
    from sae_lens import StandardSAE, StandardSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    StandardSAE(StandardSAEConfig(d_in=64, d_sae=32, metadata=SAEMetadata(hook_name=hook_name))).save_model(
        str(directory))
    return str(directory)


def small(preset: RunConfig, model: Path, tmp_path: Path, save_saes: bool = True) -> dict:
    """The preset with hub names swapped for local paths and sizes a tiny model and corpus can hold (with
    `save_saes` false, the SAE paths are named but nothing is written)."""
    cfg = preset.to_dict()
    cfg["model"].update(model_name=str(model), model_class="bridge")
    cfg["corpus"].update(dataset_path=str(PROSE), context_size=min(preset.corpus.context_size, 32), max_tokens=4000,
                         min_documents=10)
    if preset.discover.layers:
        cfg["discover"]["layers"] = [TINY_LAYERS - 1]
    cfg["discover"]["n_last_layers"] = min(preset.discover.n_last_layers, TINY_LAYERS)
    cfg["discover"]["top_k"] = min(preset.discover.top_k, 3)
    cfg["discover"]["saes"] = [tiny_sae(tmp_path / f"sae{i}", f"blocks.{TINY_LAYERS - 1}.hook_resid_pre")
                               if save_saes else str(tmp_path / f"sae{i}") for i, _ in enumerate(preset.discover.saes)]
    cfg["explain"].update(backend="offline-test-llm", model="", base_url="", api_key_env="")
    cfg["logging"]["log_to_wandb"] = False
    return cfg


NAMES_ONLY = ("run_name", "wandb_tags", "wandb_project", "wandb_entity")
"""Logging fields that name a run and change nothing it computes."""


def tiny_equivalents() -> dict[Path, list[Path]]:
    """Presets grouped by the run they make on a tiny model: equal `small` configs apart from names (gpt2-small,
    -medium and -large differ only in layers and sizes a 2-layer model clamps). Each group runs once, under its
    first preset; every preset is still read, validated and reduced (`test_every_preset_reduces_to_a_tiny_run`)."""
    groups: dict[str, list[Path]] = {}
    for path in RUN_PRESETS:
        preset = RunConfig.from_yaml(path)
        cfg = small(preset, Path(family(preset)), Path("sae"), save_saes=False)
        for key in NAMES_ONLY:
            cfg["logging"].pop(key, None)
        groups.setdefault(yaml.safe_dump(cfg, sort_keys=True), []).append(path)
    return {paths[0]: paths for paths in groups.values()}


GROUPS = tiny_equivalents()


@pytest.mark.parametrize("path", RUN_PRESETS, ids=lambda p: p.stem)
def test_every_preset_reduces_to_a_tiny_run(path):
    """Every preset parses, validates, and is covered by exactly one end-to-end run below."""
    preset = RunConfig.from_yaml(path)
    preset.validate()
    assert sum(path in members for members in GROUPS.values()) == 1


@pytest.mark.parametrize("path", list(GROUPS), ids=lambda p: "+".join(q.stem for q in GROUPS[p]))
def test_every_preset_runs_end_to_end_on_a_tiny_model_of_its_family(path, tiny, tmp_path, capsys):
    preset = RunConfig.from_yaml(path)
    config = tmp_path / path.name
    config.write_text(yaml.safe_dump(small(preset, tiny(family(preset)), tmp_path), sort_keys=False))
    out = tmp_path / "run"
    code = main(["run", str(config), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 0 and "Traceback" not in err, err[-3000:]
    for name in ("model.json", "units.jsonl", "context_acts.safetensors", "heads.jsonl", "explanations.jsonl",
                 "scores.jsonl", "summary.json", "report/index.html"):
        assert (out / name).exists(), name
    shutil.rmtree(out)
