"""Configs: YAML round trip, strict keys with suggestions, types, ranges, CLI overrides."""

import pytest

from sae_lens_ctx.cli import _config_parser, _parse_config
from sae_lens_ctx.core.config import CorpusConfig, RunConfig, field_paths
from sae_lens_ctx.core.errors import UserError


def test_defaults_validate_and_round_trip_through_yaml(tmp_path):
    cfg = RunConfig()
    cfg.corpus.context_size = 96
    cfg.model.weights = "raw"
    path = tmp_path / "c.yaml"
    path.write_text(cfg.to_yaml())
    assert RunConfig.from_yaml(path) == cfg
    assert RunConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("data, words", [
    ({"corpus": {"context_sise": 3}}, ["corpus.context_sise", "corpus.context_size"]),
    ({"modle": {"model_name": "x"}}, ["modle", "model"]),
    ({"max_tokens": 10}, ["max_tokens", "corpus.max_tokens"]),
    ({"corpus": {"context_size": "big"}}, ["corpus.context_size", "int", "big"]),
    ({"corpus": {"test_fraction": [0.1]}}, ["corpus.test_fraction"]),
    ({"model": "gpt2"}, ["model", "section"]),
    ({"corpus": {"context_size": 0}}, ["corpus.context_size", "positive"]),
    ({"corpus": {"max_tokens": -5}}, ["corpus.max_tokens", "positive"]),
    ({"corpus": {"test_fraction": 1.5}}, ["corpus.test_fraction"]),
    ({"model": {"weights": "crumpled"}}, ["model.weights"]),
])
def test_bad_config_values_name_the_key(data, words):
    with pytest.raises(UserError) as e:
        RunConfig.from_dict(data)
    message = str(e.value)
    assert "\n" not in message
    for word in words:
        assert word in message


def test_invalid_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("corpus:\n  context_size: [1, 2\n")
    with pytest.raises(UserError, match="not valid YAML at line"):
        RunConfig.from_yaml(bad)
    with pytest.raises(UserError, match="does not exist"):
        RunConfig.from_yaml(tmp_path / "nope.yaml")


def test_cli_overrides_win_over_yaml_and_keep_the_rest(tmp_path):
    base = RunConfig(corpus=CorpusConfig(context_size=48, max_tokens=1234))
    parser = _config_parser("t", "t", base)
    ns = _parse_config(parser, ["corpus.context_size=32", "--seed", "5", "--model.weights=raw"])
    assert ns.config.corpus.context_size == 32
    assert ns.config.corpus.max_tokens == 1234  # from the YAML defaults, untouched
    assert ns.config.seed == 5 and ns.config.model.weights == "raw"


SAMPLE_VALUES = {"model.model_class": "hooked", "model.weights": "raw", "model.dtype": "bfloat16",
                 "corpus.txt_documents": "file", "logging.wandb_mode": "disabled", "discover.direction": "suppress",
                 "discover.threshold": "0.5", "discover.layers": ["1", "2"], "discover.unit_ids": ["L1N2"],
                 "discover.saes": ["some/dir"], "attribute.rule": "top3", "attribute.gated_branch": "up",
                 "attribute.ablation": "mean", "explain.backend": "openai", "explain.prompt_ending": "round1",
                 "explain.unit_few_shot": "test", "explain.prices": ["m=1,2"], "explain.base_url": "http://h/v1",
                 "explain.api_key_env": "MY_KEY", "score.judge_prompt": "round1", "score.single_class": "single-rate",
                 "score.simulate": "token-by-token", "mine.scan_precision": "bfloat16",
                 "explain.embedded_precision": "float32"}


def test_every_field_is_settable_from_the_command_line():
    defaults = RunConfig()
    for path in field_paths():
        section, _, key = path.rpartition(".")
        value = getattr(getattr(defaults, section) if section else defaults, key)
        new = SAMPLE_VALUES.get(path) or {bool: "false" if value else "true", int: "7", float: "0.5"}.get(
            type(value), "xyz")
        args = [f"--{path}", *(new if isinstance(new, list) else [new])]
        if path == "discover.neurons":
            args += ["--discover.saes", "some/dir"]  # a run needs some units
        ns = _parse_config(_config_parser("t", "t", RunConfig()), args)
        got = getattr(getattr(ns.config, section) if section else ns.config, key)
        if isinstance(new, list):
            assert [str(g) for g in got] == new, path
        else:
            assert str(got).lower() == new.lower(), path


def test_cli_type_errors_are_user_errors():
    with pytest.raises(UserError, match="corpus.context_size"):
        _parse_config(_config_parser("t", "t", RunConfig()), ["--corpus.context_size", "many"])
