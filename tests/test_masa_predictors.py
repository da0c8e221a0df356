"""Predictor registry: a contract test for every registered predictor and an out-of-tree one.

Contract, in masa_efficient after the start step with head predictions available: the config
validates; `auto` gating and cutoff are the predictor's policies; each problem is gated exactly
when that gate says so on what the problem's prediction holds, and its solution cap is that
cutoff's; the head's outputs reach the prediction iff the predictor uses the head; a gated problem
skips its meta rollouts iff the head decides; no head in `grpo`.
"""
import math

import pytest

from masa_megatron.config_checks import validate_static
from masa_megatron.masa.policies import CUTOFF, GATING, resolve_policies
from masa_megatron.masa.predictors import PREDICTORS, Predictor, head_in_use, resolve_predictor
from tests.test_masa_planner_scoring import make_cfg, plan, tokenizer  # noqa: F401 (fixture)

# (p, log length) per problem: p^4 + (1-p)^4 is 0.961, 0.125, 0.922 -> the head gates P1 and P3
HEAD = [(0.99, math.log(8.0)), (0.5, math.log(8.0)), (0.02, math.log(3.0))]
# what the scripted meta rollouts give (test_masa_planner_scoring): the text path gates P2 only
EXPECTED_GATED = {"text": [False, True, False], "both": [False, True, False],
                  "head": [True, False, True]}

# An out-of-tree predictor: gate on the head, cut off at the text path's predicted lengths.
HEAD_GATE_TEXT_CUTOFF = Predictor(uses_head=True, head_decides=False,
                                  gating="head_agreement", cutoff="margin_mean")


def check_contract(tok, name):
    cfg = make_cfg(mode="masa_efficient", efficient_start_step=0, predictor=name)
    validate_static(cfg)
    predictor = resolve_predictor(cfg.masa)
    gate, cutoff = resolve_policies(cfg.masa)
    assert gate is GATING.get(predictor.gating) and cutoff is CUTOFF.get(predictor.cutoff)
    items, _ = plan(tok, cfg, head=HEAD if predictor.uses_head else None)
    for item, head in zip(items, HEAD):
        assert item.gated == gate(item.prediction, cfg.masa, cfg.grpo.group_size)
        assert item.max_new_tokens == cutoff(item.prediction, cfg.masa, 64)
        seen = (item.prediction.head_pass_rate, item.prediction.head_log_length)
        assert seen == (head if predictor.uses_head else (None, None))
        assert bool(item.metas) == (not (predictor.head_decides and item.gated))
    assert head_in_use(cfg.masa) == predictor.uses_head
    cfg.masa.mode = "grpo"
    assert not head_in_use(cfg.masa)
    return items


@pytest.mark.parametrize("name", PREDICTORS.names())
def test_every_registered_predictor_keeps_the_contract(tokenizer, name):  # noqa: F811
    items = check_contract(tokenizer, name)
    if name in EXPECTED_GATED:
        assert [it.gated for it in items] == EXPECTED_GATED[name]


def test_out_of_tree_predictor_by_dotted_path(tokenizer):  # noqa: F811
    path = f"{__name__}.HEAD_GATE_TEXT_CUTOFF"
    assert PREDICTORS.get(path) is HEAD_GATE_TEXT_CUTOFF
    items = check_contract(tokenizer, path)
    assert [it.gated for it in items] == [True, False, True]
    # margin 2 x mean parsed length: P1 (9, 1) -> 10, P2 (5) -> 10, P3 (6) -> 12
    assert [it.max_new_tokens for it in items] == [10, 10, 12]
    assert all(it.metas for it in items)  # the text path runs first, gated or not


def test_a_predictor_path_must_name_a_predictor():
    with pytest.raises(TypeError, match="not a masa_megatron.masa.predictors.Predictor"):
        resolve_predictor(make_cfg(predictor=f"{__name__}.EXPECTED_GATED").masa)
    with pytest.raises(ValueError, match="must use the head"):
        Predictor(uses_head=False, head_decides=True, gating="x", cutoff="y")
