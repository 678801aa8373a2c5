"""The unit look-up explainer (core/unit_lookups.py): its pattern, negatives and deterministic judge, by hand."""

from __future__ import annotations

import pytest

from sae_lens_ctx.core.unit_lookups import OcclusionRecord, explain_unit, inactive_windows, judge

KW = dict(min_drop=0.25, max_tokens=3, min_support=2, merge=True)


def _rec(rank, tokens, activation=1.0, drops=None, status=None):
    """A train top prompt of context tokens `tokens` (ids; text ' w{id}'), `drops` per earlier position."""
    drops = drops or [0.0] * (len(tokens) - 1)
    entries = [{"position": s, "token_id": t, "token": f" w{t}", "activation": activation - d, "drop": d}
               for s, (t, d) in enumerate(zip(tokens[:-1], drops))]
    status = status or ("inactive" if activation <= 0 else "one_token" if len(tokens) == 1 else "ok")
    return OcclusionRecord(unit_id="U", split="train", rank=rank, n_tokens=len(tokens), offset=1,
                           last_token_id=tokens[-1], last_token=f" w{tokens[-1]}", activation=activation,
                           replacement_id=0, tokens=entries, status=status)


def test_a_trigger_that_matters_anywhere_before_any_last_token_is_the_pattern():
    """Trigger 5 drops the activation wholly wherever it stands; last tokens vary; negatives never hold 5."""
    records = [_rec(0, [5, 8, 9], drops=[1.0, 0.0]), _rec(1, [7, 5, 10], drops=[0.1, 0.9]),
               _rec(2, [5, 11], drops=[0.95]), _rec(3, [5, 12], drops=[1.0])]
    negatives = [[7, 8, 9], [8, 10], [7, 11], [9, 12]]
    text, pattern, error = explain_unit(records, negatives, **KW)
    assert error is None and pattern["last_tokens"] == []
    [ctx] = pattern["context_tokens"]
    assert (ctx["token_ids"], ctx["n_positive"], ctx["n_negative"]) == ([5], 4, 0)
    assert ctx["mean_drop"] == pytest.approx((1.0 + 0.9 + 0.95 + 1.0) / 4)
    assert pattern["train_balanced_accuracy"] == 1.0
    assert text.startswith("The unit fires on any token when the context holds \" w5\"")
    assert judge(pattern, [9, 5, 3]) == (True, 1.0) and judge(pattern, [9, 3]) == (False, 0.0)


def test_a_unit_that_fires_on_one_token_whatever_precedes_it_names_the_last_token():
    records = [_rec(r, [7 + r, 4]) for r in range(4)] + [_rec(4, [4])]
    negatives = [[7, 8], [9, 3], [4, 6], [10, 11], [12]]
    text, pattern, error = explain_unit(records, negatives, **KW)
    [last] = pattern["last_tokens"]
    assert (last["token_ids"], last["n_positive"], last["n_negative"]) == ([4], 5, 0)
    assert pattern["context_tokens"] == [] and pattern["n_one_token"] == 1
    assert text.endswith("whatever precedes it.")
    # the 4 inside [4, 6] is not its last token: no match
    assert judge(pattern, [3, 4]) == (True, 1.0) and judge(pattern, [4, 6]) == (False, 0.0)


def test_the_judge_grades_by_the_product_of_last_and_context_weights():
    pattern = {"last_tokens": [{"token_ids": [4], "weight": 0.5}],
               "context_tokens": [{"token_ids": [5], "weight": 1.0}, {"token_ids": [6], "weight": 0.4}]}
    assert judge(pattern, [6, 5, 4]) == (True, 0.5)
    assert judge(pattern, [6, 4]) == (True, pytest.approx(0.2))
    assert judge(pattern, [5, 3]) == (False, 0.0)  # wrong last token
    assert judge(pattern, [3, 4]) == (False, 0.0)  # no context token
    assert judge(pattern, []) == (False, 0.0) and judge(None, [4]) == (False, 0.0)


def test_bad_input_is_recorded_in_status_and_counts_never_invented():
    # a unit inactive on every top prompt as run
    text, pattern, error = explain_unit([_rec(0, [5, 6], activation=0.0), _rec(1, [5, 7], activation=-0.2)],
                                        [[1, 2]], **KW)
    assert text is None and error.startswith("no_examples") and pattern["n_inactive"] == 2
    # no negatives
    text, pattern, error = explain_unit([_rec(0, [5, 6], drops=[1.0])], [], **KW)
    assert text is None and error.startswith("no_negatives") and pattern["n_positive"] == 1
    # one-token prompts only, each a different token, and nothing separates: no pattern
    text, pattern, error = explain_unit([_rec(r, [10 + r]) for r in range(3)], [[1], [2], [3]], **KW)
    assert text is None and error.startswith("no_pattern") and pattern["n_one_token"] == 3
    assert pattern["last_tokens"] == pattern["context_tokens"] == []


def test_inactive_windows_match_lengths_end_where_the_unit_is_off_and_are_used_once():
    candidates = [([1, 2, 3, 4], [0.0, 0.0, 0.0, 5.0]), ([5, 6, 7], [0.0, 0.05, 0.0])]
    windows = inactive_windows([2, 2, 3, 5], candidates, bound=0.1)
    # 1st (length 2): candidate 0, the latest end at or under the bound is position 2 -> [2, 3];
    # 2nd: candidate 1, end 2 -> [6, 7]; 3rd (length 3): the only ends long enough (0: 2, 1: 2) are used;
    # 4th (length 5): longer than every candidate
    assert windows == [[2, 3], [6, 7]]
    assert inactive_windows([1, 1, 1], candidates, bound=0.1) == [[3], [7], [2]]
