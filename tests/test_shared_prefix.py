"""Shared-prefix micro-batches (train/shared_prefix.py): the same log-probs, entropies, loss and
update as the padded layout, each prompt computed once, the token budget kept, and the padded
layout wherever the model cannot use them."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent / "dist_scripts"))

from actor_common import (VOCAB, max_abs_diff, model_state, restore_weights,  # noqa: E402
                          setup_actor)

from masa_megatron.train.batching import TrainBatch  # noqa: E402
from masa_megatron.train.shared_prefix import (plan_shared_micro_batches,  # noqa: E402
                                               unsupported_reasons)

# (prompt length, samples): a one-token prompt (empty prefix), a lone sample, groups of 3-5
GROUPS = ((1, 3), (5, 4), (17, 1), (30, 5))


@pytest.fixture(scope="module")
def actor():
    from masa_megatron.parallel import destroy_parallel

    actor, _ = setup_actor(1, 1, micro_batch_tokens=1 << 20, mini_batches=1)
    actor._initial = model_state(actor)
    yield actor
    destroy_parallel()


@pytest.fixture
def fresh(actor):
    """The module's actor at its initial weights, no optimizer state, the shared layout on."""
    restore_weights(actor, actor._initial)
    actor.cfg.micro_batch_tokens = 1 << 20
    actor.shared_prefix_off = []
    return actor


def grouped_batch(seed: int = 3) -> TrainBatch:
    """GRPO-like samples of GROUPS, shuffled (a prompt's samples are not adjacent), responses of
    1-40 tokens, random advantages and rollout log-probs."""
    gen = torch.Generator().manual_seed(seed)
    prompts, responses = [], []
    for length, samples in GROUPS:
        prompt = torch.randint(3, VOCAB, (length,), generator=gen).tolist()
        for _ in range(samples):
            prompts.append(prompt)
            size = int(torch.randint(1, 41, (1,), generator=gen))
            responses.append(torch.randint(3, VOCAB, (size,), generator=gen).tolist())
    order = torch.randperm(len(prompts), generator=gen).tolist()
    rollout = [torch.randn(len(responses[i]), generator=gen) * 0.1 - 5.0 for i in order]
    return TrainBatch([prompts[i] for i in order], [responses[i] for i in order],
                      torch.randn(len(order), generator=gen), rollout_logprobs=rollout)


def largest_gap(a, b) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b))


@pytest.mark.parametrize("budget", [1 << 20, 120])
def test_logprobs_and_entropies_equal_the_padded_layouts(fresh, budget):
    batch = grouped_batch()
    fresh.cfg.micro_batch_tokens = budget
    micro = fresh._micro_batches(batch, range(len(batch)))
    assert all(mb.prefix is not None for mb in micro)
    prefixes = sum(len(mb.prefix.lengths) for mb in micro)
    assert prefixes < len(batch)                              # prompts computed once, not per sample
    if budget == 120:
        assert len(micro) > 1 and prefixes > len(GROUPS)      # the 5-sample group is cut in two
    logp, entropy = fresh.logprobs(batch, with_entropy=True)
    fresh.shared_prefix_off = ["the padded layout"]
    assert all(mb.prefix is None for mb in fresh._micro_batches(batch, range(len(batch))))
    padded_logp, padded_entropy = fresh.logprobs(batch, with_entropy=True)
    assert [len(x) for x in logp] == [len(r) for r in batch.response_ids]
    assert largest_gap(logp, padded_logp) <= 1e-5
    assert largest_gap(entropy, padded_entropy) <= 1e-5


@pytest.mark.parametrize("budget", [1 << 20, 120])
def test_the_update_equals_the_padded_layouts(fresh, budget):
    """Same loss and, after one SGD step with clipping, the same weights: a prompt's gradient is
    the sum over its samples in both layouts (also when a group spans micro-batches)."""
    fresh.cfg.micro_batch_tokens = budget
    batch = grouped_batch()
    batch.old_logprobs = [x - 0.05 for x in fresh.logprobs(batch)]   # ratios off 1: clipping acts
    shared = fresh.update(batch)
    after_shared = model_state(fresh)
    restore_weights(fresh, fresh._initial)
    fresh.shared_prefix_off = ["the padded layout"]
    padded = fresh.update(batch)
    assert max_abs_diff(after_shared, fresh._initial) > 1e-3        # the step moved the weights
    assert max_abs_diff(after_shared, model_state(fresh)) <= 1e-6
    assert shared["train/loss"] == pytest.approx(padded["train/loss"], rel=1e-5, abs=1e-7)
    assert shared["train/grad_norm"] == pytest.approx(padded["train/grad_norm"], rel=1e-5)


def test_the_sft_step_equals_the_padded_layouts(fresh):
    batch = grouped_batch()
    shared = fresh.sft_step(batch.prompt_ids, batch.response_ids)
    after_shared = model_state(fresh)
    restore_weights(fresh, fresh._initial)
    fresh.shared_prefix_off = ["the padded layout"]
    padded = fresh.sft_step(batch.prompt_ids, batch.response_ids)
    assert max_abs_diff(after_shared, fresh._initial) > 1e-3
    assert max_abs_diff(after_shared, model_state(fresh)) <= 1e-6
    assert shared["sft/nll"] == pytest.approx(padded["sft/nll"], rel=1e-6)


def test_padding_fraction_counts_each_prompt_once(fresh):
    batch = grouped_batch()
    batch.old_logprobs = fresh.logprobs(batch)
    prefix = sum(length - 1 for length, _ in GROUPS)
    responses = [len(r) for r in batch.response_ids]
    positions = len(GROUPS) * max(length - 1 for length, _ in GROUPS) + \
        len(batch) * max(responses)
    expected = 1 - (prefix + sum(responses)) / positions
    assert fresh.update(batch)["train/padding_fraction"] == pytest.approx(expected, abs=1e-12)


def test_batches_with_prompt_targets_use_the_padded_layout(fresh):
    batch = grouped_batch()
    batch.prompt_targets = torch.zeros(len(batch), 2)
    assert all(mb.prefix is None for mb in fresh._micro_batches(batch, range(len(batch))))


@pytest.mark.parametrize("budget", [40, 100, 250, 10_000])
def test_the_plan_keeps_prompts_together_within_the_token_budget(budget):
    from masa_megatron.train.shared_prefix import pack_shared_micro_batch

    gen = torch.Generator().manual_seed(0)
    prompts, lengths = [], []
    for group in range(12):
        size = 1 if group < 3 else int(torch.randint(2, 40, (1,), generator=gen))
        prompt = [group + 3] * size                 # three one-token prompts (prefix width 1)
        for _ in range(int(torch.randint(1, 9, (1,), generator=gen))):
            prompts.append(prompt)
            lengths.append(int(torch.randint(1, 30, (1,), generator=gen)))
    plan = plan_shared_micro_batches(prompts, lengths, budget)
    assert sorted(i for g in plan for i in g) == list(range(len(prompts)))
    batch = TrainBatch(prompts, [[5] * n for n in lengths])
    for g in plan:                                  # what the packer makes of each group fits
        alone = len(g) == 1
        assert pack_shared_micro_batch(batch, g).input_positions <= budget or alone, (budget, g)
    for prompt in {tuple(p) for p in prompts}:
        members = [i for i, p in enumerate(prompts) if tuple(p) == prompt]
        holding = [g for g in plan if set(g) & set(members)]
        fits = max(len(prompt) - 1, 1) + len(members) * max(lengths[i] for i in members) <= budget
        if fits:
            assert len(holding) == 1                          # never split when it fits
    if budget == 10_000:
        assert len(plan) == 1


def test_the_layout_is_off_where_the_model_cannot_use_it(fresh, monkeypatch):
    from masa_megatron.config import GRPOConfig
    from masa_megatron.train.actor import Actor, unwrap_model

    gpt = unwrap_model(fresh.model_chunks[0])
    assert unsupported_reasons(gpt, 1, 1) == []
    assert unsupported_reasons(gpt, 2, 1) == ["pipeline parallelism"]
    assert unsupported_reasons(gpt, 1, 2) == ["context parallelism"]
    for field, value, reason in [("sequence_parallel", True, "sequence parallelism"),
                                 ("recompute_granularity", "full", "activation recompute"),
                                 ("hidden_dropout", 0.1, "dropout"), ("fp8", "hybrid", "FP8"),
                                 ("no_rope_freq", [1], "layers without RoPE")]:
        with monkeypatch.context() as patch:
            patch.setattr(gpt.config, field, value, raising=False)
            assert unsupported_reasons(gpt, 1, 1) == [reason]
    off = Actor(fresh.model_chunks, fresh.optimizer, fresh.scheduler,
                GRPOConfig(shared_prefix=False))
    assert off.shared_prefix_off == ["grpo.shared_prefix=false"]
    batch = grouped_batch()
    assert all(mb.prefix is None for mb in off._micro_batches(batch, range(len(batch))))


def test_one_token_prompts_count_their_padded_prefix_in_the_budget():
    """A one-token prompt has no prefix token but the packer gives it a (masked) column: four
    of them with 2-token responses are 4 + 8 positions, over a budget of 8 in one micro-batch."""
    from masa_megatron.train.shared_prefix import pack_shared_micro_batch

    batch = TrainBatch([[3], [4], [5], [6]], [[7, 8]] * 4)
    plan = plan_shared_micro_batches(batch.prompt_ids, [2] * 4, token_budget=8)
    assert [pack_shared_micro_batch(batch, g).input_positions for g in plan] == [6, 6]
