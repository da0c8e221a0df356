"""train/batching.py: packing layout, micro-batch token budget, DP split, mini-batches."""
import random

import pytest
import torch

from masa_megatron.train.batching import (TrainBatch, balanced_partition, pack_micro_batch,
                                          plan_micro_batches, sequence_mini_batches,
                                          split_for_data_parallel, split_mini_batches)


def test_pack_layout_puts_response_logprob_targets_after_the_prompt():
    batch = TrainBatch([[10, 11, 12], [20]], [[13, 14], [21, 22, 23]], [1.0, -1.0],
                       old_logprobs=[torch.tensor([-1.0, -2.0]), torch.tensor([-3.0, -4.0, -5.0])])
    mb = pack_micro_batch(batch, [0, 1])
    # row 0: input 10 11 12 13 (P + R - 1 = 4), labels 11 12 13 14, response targets at 2..3
    assert mb.tokens.tolist() == [[10, 11, 12, 13], [20, 21, 22, 0]]
    assert mb.labels.tolist() == [[11, 12, 13, 14], [21, 22, 23, 0]]
    assert mb.loss_mask.tolist() == [[False, False, True, True], [True, True, True, False]]
    assert mb.position_ids.tolist() == [[0, 1, 2, 3]] * 2
    assert mb.per_token["old_logprobs"][0, 2:].tolist() == [-1.0, -2.0]
    assert [t.tolist() for t in mb.unpack(mb.per_token["old_logprobs"])] == \
        [[-1.0, -2.0], [-3.0, -4.0, -5.0]]
    assert mb.advantages.tolist() == [1.0, -1.0]


def test_pack_without_samples_is_one_padding_row():
    batch = TrainBatch([[1]], [[2]], [0.5], old_logprobs=[torch.zeros(1)])
    mb = pack_micro_batch(batch, [])
    assert mb.is_padding_only and mb.tokens.shape == (1, 1) and not mb.loss_mask.any()
    assert "old_logprobs" in mb.per_token


@pytest.mark.parametrize("multiple", [2, 16, 32])  # TP 2 with SP; FP8; FP8 with SP at TP 2
def test_pack_pads_the_sequence_to_the_layouts_multiple_with_masked_columns(multiple):
    batch = TrainBatch([[10, 11, 12], [20]], [[13, 14], [21, 22, 23]], [1.0, -1.0],
                       old_logprobs=[torch.tensor([-1.0, -2.0]), torch.tensor([-3.0, -4.0, -5.0])])
    plain = pack_micro_batch(batch, [0, 1])
    padded = pack_micro_batch(batch, [0, 1], multiple_of=multiple)
    width = padded.tokens.shape[1]
    assert width % multiple == 0 and plain.tokens.shape[1] <= width < plain.tokens.shape[1] + multiple
    extra = slice(plain.tokens.shape[1], width)
    assert not padded.loss_mask[:, extra].any()
    assert not padded.tokens[:, extra].any() and not padded.labels[:, extra].any()
    assert not padded.per_token["old_logprobs"][:, extra].any()
    for name in ("tokens", "labels", "loss_mask"):
        assert torch.equal(getattr(padded, name)[:, :plain.tokens.shape[1]], getattr(plain, name))
    assert padded.position_ids[0].tolist() == list(range(width))
    empty = pack_micro_batch(batch, [], multiple_of=multiple)
    assert empty.tokens.shape == (1, multiple) and not empty.loss_mask.any()


def test_batch_validation_names_the_problem():
    with pytest.raises(ValueError, match="empty prompt"):
        TrainBatch([[]], [[1]])
    with pytest.raises(ValueError, match="old_logprobs\\[0\\] has 1 values for 2 tokens"):
        TrainBatch([[1]], [[1, 2]], old_logprobs=[torch.zeros(1)])
    with pytest.raises(ValueError, match="advantages"):
        TrainBatch([[1]], [[1]], [0.0, 1.0])


@pytest.mark.parametrize("seed,multiple", [(s, m) for s in range(5) for m in (1, 16)])
def test_micro_batches_respect_the_token_budget_and_cover_every_row(seed, multiple):
    rng = random.Random(seed)
    lengths = [rng.choice([rng.randint(1, 20), rng.randint(100, 400)]) for _ in range(60)]
    budget = 512
    plan = plan_micro_batches(lengths, budget, multiple_of=multiple)
    assert sorted(i for g in plan for i in g) == list(range(60))
    for group in plan:
        width = -(-max(lengths[i] for i in group) // multiple) * multiple   # pack_micro_batch's
        assert len(group) * width <= budget or len(group) == 1
    # greedy packing is not wasteful: short rows share micro-batches
    assert len(plan) < len(lengths) / 2


def test_a_row_over_budget_gets_its_own_micro_batch():
    assert plan_micro_batches([1000, 10, 10], 100) == [[0], [1, 2]]
    assert plan_micro_batches([], 100) == []
    # rows count at their padded length: 17 -> 32 leaves no room for a 9 -> 16 at budget 40
    assert plan_micro_batches([17, 9, 9], 40) == [[0, 1], [2]]
    assert plan_micro_batches([17, 9, 9], 40, multiple_of=16) == [[0], [1, 2]]
    with pytest.raises(ValueError, match="multiple_of=0"):
        plan_micro_batches([1], 10, multiple_of=0)


@pytest.mark.parametrize("dp", [1, 2, 3, 4])
def test_data_parallel_split_keeps_groups_whole_and_balances_tokens(dp):
    rng = random.Random(dp)
    group_ids = [g for g in range(12) for _ in range(4)]
    lengths = [rng.randint(5, 300) for _ in group_ids]
    ranks = split_for_data_parallel(lengths, group_ids, dp)
    assert sorted(i for r in ranks for i in r) == list(range(len(lengths)))
    owner = {}
    for rank, indices in enumerate(ranks):
        for i in indices:
            assert owner.setdefault(group_ids[i], rank) == rank, "a group was split"
    loads = [sum(lengths[i] for i in r) for r in ranks]
    heaviest_group = max(sum(lengths[i] for i in range(len(lengths)) if group_ids[i] == g)
                         for g in set(group_ids))
    assert max(loads) - min(loads) <= heaviest_group  # LPT bound


def test_data_parallel_split_takes_a_batch():
    batch = TrainBatch([[1] * 5, [1] * 5, [1], [1]], [[2] * 50, [2] * 50, [2], [2]],
                       group_ids=[0, 0, 1, 1])
    ranks = split_for_data_parallel(batch, batch.group_ids, 2)
    assert sorted(ranks) == [[0, 1], [2, 3]]


def test_mini_batches_are_consecutive_and_near_equal():
    assert split_mini_batches(7, 3) == [[0, 1, 2], [3, 4], [5, 6]]
    assert split_mini_batches(1, 2) == [[0], []]
    with pytest.raises(ValueError):
        split_mini_batches(3, 0)


def test_subset_keeps_per_token_fields_aligned():
    batch = TrainBatch([[1], [2], [3]], [[4], [5, 6], [7]], [0.1, 0.2, 0.3],
                       old_logprobs=[torch.zeros(1), torch.ones(2), torch.zeros(1)],
                       group_ids=[0, 1, 2])
    sub = batch.subset([1])
    assert sub.response_ids == [[5, 6]] and sub.old_logprobs[0].tolist() == [1.0, 1.0]
    assert sub.advantages.tolist() == pytest.approx([0.2]) and sub.group_ids == [1]


def test_prompt_targets_follow_their_rows():
    nan = float("nan")
    batch = TrainBatch([[1], [2, 3], [4]], [[5], [6], [7, 8]],
                       prompt_targets=[[0.5, 1.0], [nan, nan], [1.0, nan]])
    assert batch.subset([2, 0]).prompt_targets.tolist()[1] == [0.5, 1.0]
    mb = pack_micro_batch(batch, [2, 0])
    assert mb.prompt_targets[0, 0] == 1.0 and mb.prompt_targets[1].tolist() == [0.5, 1.0]
    assert torch.isnan(pack_micro_batch(batch, []).prompt_targets).all()
    with pytest.raises(ValueError, match="prompt_targets"):
        TrainBatch([[1]], [[2]], prompt_targets=[0.5])


# ----------------------------------------------------------------- mini-batches by sequence count
@pytest.mark.parametrize("counts, size, chunks, scales", [
    # the reference (verl, 128 prompts x n = 2,048 sequences per optimizer step):
    ([3072], 2048, [(0, 2048), (2048, 3072)], [1.0, 0.5]),     # MASA, M = 8: 2,048 + 1,024
    ([4096], 2048, [(0, 2048), (2048, 4096)], [1.0, 1.0]),     # MASA, M = 16: two equal
    ([2048], 2048, [(0, 2048)], [1.0]),                         # GRPO: one
    # 8 data-parallel ranks of 384 (3,072 in all): 256 + 128 on each rank
    ([384] * 8, 2048, [(0, 256), (256, 384)], [1.0, 0.5]),
    # unequal ranks (a gated problem): the global count of each chunk sets its scale
    ([5, 3], 4, [(0, 2), (2, 4), (4, 5)], [1.0, 0.75, 0.25]),
])
def test_mini_batches_by_sequence_count(counts, size, chunks, scales):
    plans = sequence_mini_batches(counts, size)
    for rank, n in enumerate(counts):
        local = [list(range(min(a, n), min(b, n))) for a, b in chunks]
        assert plans[rank][0] == local
        assert plans[rank][1] == pytest.approx(scales)


def test_mini_batch_size_must_divide_over_the_ranks():
    with pytest.raises(ValueError, match="divisible"):
        sequence_mini_batches([3, 3], 5)


def test_balanced_partition_has_equal_counts_and_near_equal_tokens():
    # verl's documented example: [10, 1, 5, 3] into 2 equal-size parts -> [[0, 1], [2, 3]]
    assert balanced_partition([10, 1, 5, 3], 2) == [[0, 1], [2, 3]]
    rng = random.Random(0)
    weights = [rng.randint(1, 8000) for _ in range(3072)]
    parts = balanced_partition(weights, 8)
    assert sorted(i for p in parts for i in p) == list(range(3072))
    assert {len(p) for p in parts} == {384} and all(p == sorted(p) for p in parts)
    loads = [sum(weights[i] for i in p) for p in parts]
    assert max(loads) - min(loads) <= max(weights)
    assert [len(p) for p in balanced_partition([1] * 7, 3)] == [3, 2, 2]
