"""MASA planning and scoring with a scripted engine: modes, gating, cutoff, audit, hints, rewards.

Every expected reward below is worked out by hand from spec section 4 (0.01 ** |p - k/8|, strict
length bounds, net notion counts).
"""
import json
import math
import statistics

import pytest

from masa_megatron.algo.advantages import grpo_advantages
from masa_megatron.config import ExperimentConfig
from masa_megatron.data.tiny_tokenizer import make_tiny_tokenizer
from masa_megatron.masa.planner import HINT_PREFIX, RolloutPlanner
from masa_megatron.masa.policies import (CUTOFF, GATING, MetaPrediction, resolve_policies)
from masa_megatron.masa.scoring import (ProblemStats, build_samples, drop_zero_variance_groups,
                                        grade_solutions, relabel_for_cloning, score_metas,
                                        step_totals)
from masa_megatron.rewards.math import grade_batch
from tests.support.scripted_engine import ScriptedEngine

P1, P2, P3 = "What is 2+3?", "What is 7*6?", "Compute 9-4."
PROBLEMS = [("p1", P1, "5"), ("p2", P2, "42"), ("p3", P3, "5")]
LONG = "add " * 30 + "\\boxed{5}"


def meta(notions, pass_rate, length, reasoning="easy"):
    obj = {"math_notion": notions, "pass_rate": pass_rate, "solution_length": length}
    return f"<meta>{reasoning}</meta>" + json.dumps(obj, separators=(",", ":"))


SCRIPT = {
    (P1, "solution"): ["add two and three: \\boxed{5}", "guess \\boxed{4}", "add: \\boxed{5}",
                       "add them all up and so \\boxed{5}"],
    (P1, "meta"): [meta(["add"], 6, 9), meta(["guess"], 8, 1), "no json here",
                   '{"pass_rate": true}'],
    (P2, "solution"): ["multiply \\boxed{42}"],
    (P2, "meta"): [meta(["multiply"], 8, 5)],
    (P3, "solution"): [LONG, "subtract \\boxed{5}", "\\boxed{3}", "subtract \\boxed{5}"],
    (P3, "meta"): [meta(["subtract"], 0, 6), "bad", "bad", "bad"],
}


@pytest.fixture(scope="module")
def tokenizer():
    texts = [t for v in SCRIPT.values() for t in v] + [p for _, p, _ in PROBLEMS]
    return make_tiny_tokenizer(texts * 4, vocab_size=400)


def make_cfg(**masa):
    cfg = ExperimentConfig()
    cfg.model.hf_path = "unused"
    cfg.grpo.group_size, cfg.masa.meta_group_size = 4, 4
    cfg.rollout.max_response_length, cfg.rollout.max_prompt_length = 64, 4096
    cfg.masa.audit_fraction = 0.0
    for key, value in masa.items():
        setattr(cfg.masa, key, value)
    return cfg


def plan(tokenizer, cfg, step=0, head=None):
    engine = ScriptedEngine(tokenizer, SCRIPT)
    planner = RolloutPlanner(cfg, tokenizer, engine, *resolve_policies(cfg.masa))
    return planner.rollout(step, PROBLEMS, head), engine


def score(items, tokenizer, base=0.01):
    stats = grade_solutions(items, tokenizer, lambda r, ref: grade_batch(r, ref, timeout_s=10))
    metas = [score_metas(it, st, base) if st is not None and it.trained and it.metas else None
             for it, st in zip(items, stats)]
    return stats, metas


def test_masa_step_rewards_and_advantages_by_hand(tokenizer):
    items, engine = plan(tokenizer, make_cfg(mode="masa"))
    assert len(engine.requests) == 6  # one call: solution + meta request per problem
    stats, metas = score(items, tokenizer)
    p1 = stats[0]
    assert p1.scores == [1.0, 0.0, 1.0, 1.0]
    lengths = p1.lengths  # generated tokens incl. EOS
    correct = [n for n, s in zip(lengths, p1.scores) if s]
    assert min(correct) < 9 < max(correct), "script assumption: 9 lies strictly inside"
    # m1: notion "add" in the 3 correct texts only -> 1; k=6 -> 0.01**0 = 1; 9 inside -> 1
    # m2: "guess" only in the wrong text -> net -1 -> 0; k=8 -> 0.01**0.25; l=1 outside -> 0
    # m3: unparseable -> 0; m4: pass_rate true is not an int -> nothing parsed -> 0
    expected = [1.0, (0.01 ** 0.25) / 3, 0.0, 0.0]
    assert [m["score"] for m in metas[0]] == pytest.approx(expected, abs=1e-9)
    samples = build_samples(items, stats, metas)
    p1_samples = [s for s in samples if s.group_id in (0, 1)]
    assert [s.kind for s in p1_samples] == ["solution"] * 4 + ["meta"] * 4
    adv = grpo_advantages([s.reward for s in samples], [s.group_id for s in samples]).tolist()
    sol_std = statistics.stdev([1, 0, 1, 1])  # 0.5, unbiased
    assert adv[:4] == pytest.approx([(r - 0.75) / (sol_std + 1e-6) for r in (1, 0, 1, 1)])
    m_mean, m_std = statistics.mean(expected), statistics.stdev(expected)
    assert adv[4:8] == pytest.approx([(r - m_mean) / (m_std + 1e-6) for r in expected])
    # P2's solution group is all-correct: advantage 0 for its solutions
    p2 = [a for a, s in zip(adv, samples) if s.group_id == 2]
    assert p2 == [0.0] * 4
    # of the three groups only P2's carries no signal
    totals = step_totals(items, stats, metas, max_len=64).finalize()
    assert totals["solution/zero_variance_fraction"] == pytest.approx(1 / 3)


def test_grpo_mode_generates_no_meta(tokenizer):
    items, engine = plan(tokenizer, make_cfg(mode="grpo"))
    assert len(engine.requests) == 3 and all(not it.metas for it in items)
    stats, metas = score(items, tokenizer)
    assert {s.kind for s in build_samples(items, stats, metas)} == {"solution"}


def test_efficient_mode_gates_and_cuts_as_the_rules_say(tokenizer):
    cfg = make_cfg(mode="masa_efficient", efficient_start_step=3)
    before, _ = plan(tokenizer, cfg, step=2)
    assert not any(it.gated for it in before)
    items, engine = plan(tokenizer, cfg, step=3)
    # P2: four parsed pass rates 8/8, std 0 < 0.1, round(8 * 1) = 8 -> gated.
    # P3: one parsed prediction < ceil(4 / 2) = 2 needed -> not gated although it says 0.
    # P1: pass rates 6/8 and 8/8 -> consensus round(8 * 0.875) = 7 -> not gated.
    assert [it.gated for it in items] == [False, True, False]
    # cutoff: margin 2 x mean parsed length: P1 (9, 1) -> ceil(2 * 5) = 10; P2 (gated; the cap
    # an audit would use) 2 x 5 = 10; P3 (6) -> 12
    assert [it.max_new_tokens for it in items] == [10, 10, 12]
    solution_requests = [r for r in engine.requests if "<meta>" not in tokenizer.decode(
        list(r.prompt_token_ids))]
    assert sorted(r.sampling.max_new_tokens for r in solution_requests) == [10, 12]
    stats, metas = score(items, tokenizer)
    assert stats[1] is None  # gated: no solutions rolled out
    samples = build_samples(items, stats, metas)
    assert not [s for s in samples if s.group_id in (2, 3)]  # gated problem absent, metas too
    # P3's long solution is cut (length finish), graded (0: no box) and kept in its group
    p3 = [s for s in samples if s.group_id == 4]
    assert len(p3) == 4 and p3[0].reward == 0.0 and len(p3[0].response_ids) == 12
    totals = step_totals(items, stats, metas, max_len=64).finalize()
    assert totals["gating/fraction"] == pytest.approx(1 / 3)
    cut = [(c.finish_reason, r) for j in (0, 2) for c, r in zip(items[j].solutions, stats[j].scores)
           if c.finish_reason == "length"]
    assert len(cut) >= 1 and totals["cutoff/fraction"] == len(cut) / 8
    assert totals["cutoff/accuracy"] == pytest.approx(sum(r for _, r in cut) / len(cut))


def test_audit_rolls_out_gated_problems_without_training_them(tokenizer):
    cfg = make_cfg(mode="masa_efficient", efficient_start_step=0, audit_fraction=1.0)
    items, _ = plan(tokenizer, cfg)
    assert items[1].gated and items[1].audited and items[1].solutions
    stats, metas = score(items, tokenizer)
    assert stats[1].scores == [1.0] * 4  # truly all-correct: the gate was right
    assert not [s for s in build_samples(items, stats, metas) if s.group_id in (2, 3)]
    totals = step_totals(items, stats, metas, max_len=64).finalize()
    assert totals["gating/audited"] == 1 and totals["gating/audit_precision"] == 1.0


def test_head_predictor_gates_before_generation(tokenizer):
    cfg = make_cfg(mode="masa_efficient", efficient_start_step=0, predictor="head")
    # p^4 + (1-p)^4: 0.99 -> 0.961 >= 0.9 gated; 0.5 -> 0.125 kept; 0.02 -> 0.922 gated
    head = [(0.99, math.log(8.0)), (0.5, math.log(8.0)), (0.02, math.log(3.0))]
    items, engine = plan(tokenizer, cfg, head=head)
    assert [it.gated for it in items] == [True, False, True]
    assert items[1].max_new_tokens == 16  # ceil(2 * exp(log 8))
    assert len(engine.requests) == 2  # the kept problem's solutions and metas only


def test_notion_hints_extend_solution_prompts(tokenizer):
    items, engine = plan(tokenizer, make_cfg(mode="masa", notion_hints=True))
    assert items[0].hint == "add"
    prompt = tokenizer.decode(items[0].solution_prompt_ids)
    assert P1 in prompt and HINT_PREFIX.strip() + " add." in prompt
    assert items[1].hint == "multiply" and items[2].hint == "subtract"


def test_dynamic_sampling_removes_exactly_flat_groups(tokenizer):
    items, _ = plan(tokenizer, make_cfg(mode="masa"))
    stats, metas = score(items, tokenizer)
    samples = build_samples(items, stats, metas)
    kept, dropped = drop_zero_variance_groups(samples)
    flat = {g for g in {s.group_id for s in samples}
            if len({s.reward for s in samples if s.group_id == g}) == 1}
    assert flat == {2, 3} and dropped == 2  # P2: all correct, all metas identical
    assert {s.group_id for s in kept} == {s.group_id for s in samples} - flat


def test_behaviour_cloning_relabels_with_observed_statistics(tokenizer):
    items, _ = plan(tokenizer, make_cfg(mode="masa"))
    stats, metas = score(items, tokenizer)
    prompt, text = relabel_for_cloning(items[0], stats[0], metas[0], min_notion=0.2)
    assert prompt == items[0].meta_prompt_ids
    correct = [n for n, s in zip(stats[0].lengths, stats[0].scores) if s]
    assert text == "<meta>easy</meta>\n" + json.dumps(
        {"math_notion": ["add"], "pass_rate": 6, "solution_length": round(sum(correct) / 3)},
        separators=(",", ":"))
    # P3 predicted pass_rate 0; 3 of 4 solutions were correct -> relabelled round(8 * 0.75) = 6
    _, text3 = relabel_for_cloning(items[2], stats[2], metas[2], min_notion=0.2)
    assert json.loads(text3.split("\n")[1])["pass_rate"] == 6
    assert relabel_for_cloning(items[2], stats[2], metas[2], min_notion=1.5) is None


@pytest.mark.parametrize("name", GATING.names())
def test_every_gating_policy_returns_a_bool(name):
    cfg = make_cfg()
    pred = MetaPrediction(4, [1.0] * 4, [10] * 4, [["x"]] * 4, 0.5, 2.0)
    assert isinstance(GATING.get(name)(pred, cfg.masa, 4), bool)
    assert GATING.get(name)(MetaPrediction(), cfg.masa, 4) is False


@pytest.mark.parametrize("name", CUTOFF.names())
def test_every_cutoff_policy_stays_within_the_maximum(name):
    cfg = make_cfg()
    pred = MetaPrediction(4, [1.0] * 4, [10_000] * 4, [], 0.5, 50.0)
    assert 1 <= CUTOFF.get(name)(pred, cfg.masa, 64) <= 64
    assert CUTOFF.get(name)(MetaPrediction(), cfg.masa, 64) == 64


def never_gate(pred, cfg, group_size):
    return False


def test_out_of_tree_gating_policy_by_dotted_path():
    cfg = make_cfg(gating=f"{__name__}.never_gate")
    gate, _ = resolve_policies(cfg.masa)
    assert gate is never_gate


def test_reference_notion_rules_score_against_the_whole_meta_prompt(tokenizer):
    """masa.notion_rules=reference: a notion named in the meta prompt's instructions ("JSON
    object") is dropped; under the spec only the problem's notions are. Texts: correct
    "a JSON object", wrong "nothing" -> spec 1.0 (net +1), reference 0.0 (nothing left)."""
    cfg = make_cfg(mode="masa")
    items, _ = plan(tokenizer, cfg)
    item = items[0]
    assert "JSON object" in item.meta_prompt and item.problem in item.meta_prompt
    item.predictions = [{"math_notion": ["JSON objects"]}]
    stats = ProblemStats([1.0, 0.0], [5, 5], ["a JSON object", "nothing"])
    assert score_metas(item, stats, 0.01)[0]["notion"] == 1.0
    assert score_metas(item, stats, 0.01, "reference")[0]["notion"] == 0.0


def test_audit_tokens_are_reported_apart_from_the_efficiency_totals(tokenizer):
    """P2 (all 4 metas predict 8/8) is gated and audited: its 4 solutions of
    len("multiply \\boxed{42}" tokens) + EOS count in tokens/audit, not in tokens/solution or
    tokens/total; the audited solutions are generated in a call of their own."""
    cfg = make_cfg(mode="masa_efficient", efficient_start_step=0, audit_fraction=1.0)
    engine = ScriptedEngine(tokenizer, SCRIPT)
    planner = RolloutPlanner(cfg, tokenizer, engine, *resolve_policies(cfg.masa))
    items = planner.rollout(0, PROBLEMS, audit=False)
    assert items[1].audited and not items[1].solutions
    calls = len(engine.requests)
    planner.roll_out_audits(0, items)
    assert len(engine.requests) == calls + 1 and len(items[1].solutions) == 4
    stats, metas = score(items, tokenizer)
    totals = step_totals(items, stats, metas, max_len=64).finalize()
    per_audit = len(tokenizer.encode(SCRIPT[(P2, "solution")][0], add_special_tokens=False)) + 1
    kept = sum(len(c.token_ids) for j in (0, 2) for c in items[j].solutions)
    metas_tokens = sum(len(c.token_ids) for it in items for c in it.metas)
    assert totals["tokens/audit"] == 4 * per_audit
    assert totals["tokens/solution"] == kept
    assert totals["tokens/total"] == kept + metas_tokens


class StreamingScripted(ScriptedEngine):
    """Answers the first requests last-to-first and asks for each one's follow-ups as soon as
    it is answered (what a streaming engine may do)."""
    def __init__(self, tokenizer, script):
        super().__init__(tokenizer, script)
        self.streamed: list[bool] = []

    def generate_chained(self, requests, follow, stream=True):
        self.streamed.append(stream)
        first, extra = [None] * len(requests), [[] for _ in requests]
        for i in reversed(range(len(requests))):
            first[i] = self.generate([requests[i]])[0]
            extra[i] = self.generate(list(follow(i, first[i])))
        return first + [r for rs in extra for r in rs]


def _rollout_view(items):
    return [(it.gated, it.audited, it.max_new_tokens, it.hint, list(it.solution_prompt_ids),
             [c.token_ids for c in it.solutions], [c.token_ids for c in it.metas],
             it.predictions) for it in items]


@pytest.mark.parametrize("masa", [dict(mode="masa_efficient", efficient_start_step=0,
                                       audit_fraction=0.5),
                                  dict(mode="masa", notion_hints=True)])
def test_streamed_solutions_match_the_two_phase_rollouts(tokenizer, masa):
    """Each problem's solutions are requested right after its own metas (out of batch order),
    with the same gates, audits, cutoffs, hints and samples as two phases give."""
    cfg = make_cfg(**masa)
    two_phase, _ = plan(tokenizer, cfg)
    engine = StreamingScripted(tokenizer, SCRIPT)
    planner = RolloutPlanner(cfg, tokenizer, engine, *resolve_policies(cfg.masa))
    streamed = planner.rollout(0, PROBLEMS)
    assert engine.streamed == [True]
    assert _rollout_view(streamed) == _rollout_view(two_phase)
    kinds = ["meta" if "<meta>" in tokenizer.decode(list(r.prompt_token_ids)) else "solution"
             for r in engine.requests]
    assert kinds[:2] == ["meta", "solution"]       # P3's solutions before P1's metas
    cfg.masa.stream_solutions = False
    engine = StreamingScripted(tokenizer, SCRIPT)
    RolloutPlanner(cfg, tokenizer, engine, *resolve_policies(cfg.masa)).rollout(0, PROBLEMS)
    assert engine.streamed == [False]
