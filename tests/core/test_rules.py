"""The active-head rules against the authors' code (fbarez/Interpreting-Context-Look-ups, f97f993), and the
paper's "well explained" threshold (docs/authors-code.md)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sae_lens_ctx.core.config import AttributeConfig, RunConfig
from sae_lens_ctx.core.errors import UserError
from sae_lens_ctx.core.rules import PAPER_WELL_EXPLAINED, ActiveRule, at_least, parse_rule

PRESETS = Path(__file__).resolve().parents[2] / "wandb_configs"
HEADS = ["L0H0", "L0H1", "L0H2", "L0H3"]


def active(rule: str, a: list[list[float]]) -> list[set[str]]:
    mask = parse_rule(rule).mask(torch.tensor(a))
    return [{HEADS[i] for i in row.nonzero().flatten().tolist()} for row in mask]


def authors_top3(a: torch.Tensor) -> list[set[int]]:
    """src/neuron_heads.py at f97f993, verbatim: `_, top_heads = torch.topk(head_attribution, k=3, dim=-1)`."""
    _, top_heads = torch.topk(a, k=3, dim=-1)
    return [set(row) for row in top_heads.tolist()]


def authors_mean_2std(a: torch.Tensor) -> list[set[int]]:
    """The 4_head_attribution notebook at f97f993: `head_attribution > mean + 2 * sigma`, torch's std."""
    sigma, mean = a.std(dim=-1), a.mean(dim=-1)
    return [set(row.nonzero().flatten().tolist()) for row in a > (mean + 2 * sigma).unsqueeze(-1)]


def test_the_issues_example_authors_top3_keeps_a_negative_head_ours_does_not():
    """Issue 30, point 1: a unit of layer 1 on prompt 0 of a random-weight GPT-2 with 4 upstream heads."""
    a = [[-0.00609, -0.03905, 0.02267, 0.00704]]
    assert active("top3", a) == [{"L0H0", "L0H2", "L0H3"}]  # the authors': the 3 largest, whatever the sign
    assert active("topk:3", a) == [{"L0H0", "L0H2", "L0H3"}]
    assert active("top3-positive", a) == [{"L0H2", "L0H3"}]  # ours: L0H0's -0.00609 does not switch it on
    assert active("topk-positive:3", a) == [{"L0H2", "L0H3"}]
    assert [{HEADS[i] for i in s} for s in authors_top3(torch.tensor(a))] == active("top3", a)


def test_authors_rules_equal_their_code_on_random_attributions():
    a = torch.randn(200, 24, generator=torch.Generator().manual_seed(0)) - 0.3
    a[:20] = -a[:20].abs() - 3  # every head negative, one far less so: the only place the -positive rules
    a[:20, 0] = -0.01           # differ from the authors' mean+2std
    ours = parse_rule("top3").mask(a)
    assert [set(r.nonzero().flatten().tolist()) for r in ours] == authors_top3(a)
    ours = parse_rule("mean+2std").mask(a)
    assert [set(r.nonzero().flatten().tolist()) for r in ours] == authors_mean_2std(a)
    # -positive = the authors' set less the heads without a positive attribution
    for rule in ("top3", "mean+2std"):
        theirs, positive = parse_rule(rule).mask(a), parse_rule(rule + "-positive").mask(a)
        assert torch.equal(positive, theirs & (a > 1e-6 * a.abs().amax(dim=1, keepdim=True)))
    assert parse_rule("mean+2std").mask(a[:20])[:, 0].all()  # a negative head passes the authors' threshold
    assert not parse_rule("mean+2std-positive").mask(a[:20]).any()


def test_rule_names_parse_round_trip_and_reject_typos():
    assert parse_rule("top3") == ActiveRule("topk", 3) and parse_rule("top3-positive") == ActiveRule("topk", 3, True)
    assert parse_rule("mean+2std") == ActiveRule("zscore", 2.0)
    assert parse_rule("mean+2std-positive") == ActiveRule("zscore", 2.0, True)
    for text in ("top3", "top3-positive", "mean+2std", "mean+2std-positive", "topk:5", "topk-positive:1",
                 "zscore:1.5", "zscore-positive:0.5"):
        assert parse_rule(text).name == text and parse_rule(parse_rule(text).name) == parse_rule(text)
    assert parse_rule("topk:3").name == "top3" and parse_rule("zscore-positive:2").name == "mean+2std-positive"
    for bad in ("top3positive", "topk-positive:0", "zscore-positive", "positive:3", "top-3-positive"):
        with pytest.raises(UserError, match="unknown active-head rule"):
            parse_rule(bad)


def test_fewer_heads_than_k_and_no_heads():
    assert active("top3", [[1.0, -2.0]]) == [{"L0H0", "L0H1"}]  # k capped (the authors' torch.topk raises)
    assert parse_rule("top3").mask(torch.zeros(2, 0)).shape == (2, 0)
    assert active("mean+2std", [[1.0]]) == [set()]  # one head: no spread, none active (theirs: std is nan)


def test_paper_presets_use_the_authors_rules_and_the_default_keeps_ours():
    assert AttributeConfig().rule == "mean+2std-positive"  # the default's behaviour, named for what it does
    for path in PRESETS.glob("*.yaml"):
        if path.name in ("sweep.yaml", "dashboard.yaml", "embedded.yaml"):
            continue
        cfg = RunConfig.from_yaml(path)
        rule = parse_rule(cfg.attribute.rule)
        if path.stem.endswith("round1"):
            assert rule == ActiveRule("topk", 3), path.name
            assert cfg.logging.well_explained == 0.7
        else:  # round 2, the EMNLP paper's (and the SAE preset's round-2 rules)
            assert rule == ActiveRule("zscore", 2.0), path.name
            if "paper" in cfg.logging.wandb_tags:
                assert at_least(2 / 3, cfg.logging.well_explained) and not at_least(0.66, cfg.logging.well_explained)


def test_two_thirds_is_well_explained_however_it_was_summed():
    """The authors' red bins: the last three of np.linspace(0, 1, 10), so E >= 6/9 and E = 2/3 counts."""
    import numpy as np

    edges = np.linspace(0, 1, 10)
    assert edges[-4] == PAPER_WELL_EXPLAINED
    for e in (2 / 3, (1 / 3 + 1) / 2, (0.7 + 0.6333333333333333) / 2, (0.5 + 0.8333333333333334) / 2, 6 / 9):
        assert at_least(e, PAPER_WELL_EXPLAINED) and at_least(e, 0.6666666667)  # the default and the presets' YAML
        assert not at_least(e, 0.67)  # the old threshold left E = 2/3 out
    assert not at_least(0.6666, PAPER_WELL_EXPLAINED)
    assert at_least(0.7, 0.7) and at_least((0.6 + 0.8) / 2, 0.7)  # round 1's edge, 0.7 however summed
