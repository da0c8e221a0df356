"""grpo_advantages against hand-computed values (expected numbers use plain Python arithmetic)."""

import math

import pytest
import torch

from masa_megatron.algo.advantages import grpo_advantages

EPS = 1e-6


def close(actual, expected, tol=1e-12):
    assert actual.shape == (len(expected),)
    for a, e in zip(actual.tolist(), expected):
        assert a == pytest.approx(e, abs=tol), (actual.tolist(), expected)


def test_single_group_unbiased_std():
    # r = [1, 0, 1, 1]: mean 0.75, deviations (.25, -.75, .25, .25),
    # sum of squares .0625 * 3 + .5625 = .75, unbiased var .75 / 3 = .25, std .5
    adv = grpo_advantages(torch.tensor([1.0, 0.0, 1.0, 1.0], dtype=torch.float64), [0, 0, 0, 0])
    d = 0.5 + EPS
    close(adv, [0.25 / d, -0.75 / d, 0.25 / d, 0.25 / d])


def test_interleaved_groups_stay_separate():
    # A problem's solution group (id 7) and meta group (id 3), interleaved.
    rewards = torch.tensor([1.0, 0.2, 0.0, 0.8, 0.0, 0.5], dtype=torch.float64)
    adv = grpo_advantages(rewards, torch.tensor([7, 3, 7, 3, 7, 3]))
    # group 7: [1, 0, 0], mean 1/3, sum sq 4/9 + 1/9 + 1/9 = 6/9, var 3/9, std sqrt(1/3)
    s7 = math.sqrt(1 / 3) + EPS
    # group 3: [.2, .8, .5], mean .5, sum sq .09 + .09 + 0 = .18, var .09, std .3
    s3 = 0.3 + EPS
    close(adv, [(2 / 3) / s7, -0.3 / s3, (-1 / 3) / s7, 0.3 / s3, (-1 / 3) / s7, 0.0])


def test_one_member_group_gets_zero_and_two_member_group():
    adv = grpo_advantages(torch.tensor([0.9, 0.0, 1.0], dtype=torch.float64), [5, 1, 1])
    # group 1: [0, 1], mean .5, var (.25 + .25) / 1 = .5
    s = math.sqrt(0.5) + EPS
    close(adv, [0.0, -0.5 / s, 0.5 / s])


def test_all_equal_groups_are_exactly_zero():
    # 0.1 * 3 / 3 leaves floating residue in the mean; the result must still be exactly 0.
    rewards = torch.tensor([0.1, 0.1, 0.1, 0.7751, 0.7751, 1.0, 1.0], dtype=torch.float32)
    adv = grpo_advantages(rewards, [0, 0, 0, 1, 1, 2, 2])
    assert torch.equal(adv, torch.zeros(7))
    adv = grpo_advantages(rewards, [0, 0, 0, 1, 1, 2, 2], normalize_std=False)
    assert torch.equal(adv, torch.zeros(7))


def test_eps_is_added_to_std():
    # [0, 1e-6]: mean 5e-7, deviations -/+5e-7, var 2 * 2.5e-13 = 5e-13, std sqrt(5e-13)
    rewards = torch.tensor([0.0, 1e-6], dtype=torch.float64)
    std = math.sqrt(5e-13)
    close(grpo_advantages(rewards, [0, 0]), [-5e-7 / (std + EPS), 5e-7 / (std + EPS)])
    close(grpo_advantages(rewards, [0, 0], eps=0.0), [-5e-7 / std, 5e-7 / std], tol=1e-9)
    close(grpo_advantages(rewards, [0, 0], eps=0.5), [-5e-7 / (std + 0.5), 5e-7 / (std + 0.5)])


def test_mean_only_dr_grpo():
    adv = grpo_advantages(torch.tensor([1.0, 0.0, 0.0, 3.0], dtype=torch.float64), [0, 0, 0, 9],
                          normalize_std=False)
    close(adv, [2 / 3, -1 / 3, -1 / 3, 0.0])


def test_dtypes_lists_and_empty():
    adv = grpo_advantages([True, False], [0, 0])  # bool rewards -> float32
    assert adv.dtype == torch.float32
    s = math.sqrt(0.5) + EPS
    close(adv, [0.5 / s, -0.5 / s], tol=1e-6)
    assert grpo_advantages(torch.tensor([1.0, 0.0]), [0, 0]).dtype == torch.float32
    assert grpo_advantages(torch.tensor([1.0, 0.0], dtype=torch.float64), [0, 0]).dtype == torch.float64
    assert grpo_advantages(torch.zeros(0), []).shape == (0,)


def test_shape_mismatch_raises():
    with pytest.raises(ValueError):
        grpo_advantages(torch.zeros(3), [0, 0])
    with pytest.raises(ValueError):
        grpo_advantages(torch.zeros(2, 2), torch.zeros(2, 2, dtype=torch.int64))
