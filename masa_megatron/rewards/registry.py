"""Reward functions by name, so that users can plug in their own.

Built in:
- "math": `grade(response, reference, timeout_s=...) -> float`, the solution reward (a batched
  version is attached as `grade.batch`, see `get_batch_reward`);
- "meta": `meta_reward(prediction, scores, lengths, responses, problem, base=...) -> dict`, the
  self-alignment reward of a parsed meta prediction.

A custom reward is either registered (`@register_reward("mine")`) or selected by import path:
`get_reward("my_pkg.rewards:my_reward")` or `get_reward("my_pkg.rewards.my_reward")`.
"""
from __future__ import annotations

from typing import Callable, Sequence

from masa_megatron.registry import Registry
from masa_megatron.rewards.math import grade
from masa_megatron.rewards.meta import meta_reward

REWARDS = Registry("reward")


def register_reward(name: str | None = None, fn: Callable | None = None, *, override: bool = False):
    """Register a reward function (decorator or direct call); see Registry.register."""
    return REWARDS.register(name, fn, override=override)


def get_reward(name_or_path: str) -> Callable:
    """The reward registered as `name_or_path`, else the callable that import path names."""
    reward = REWARDS.get(name_or_path)
    if not callable(reward):
        raise TypeError(f"reward {name_or_path!r} resolved to a non-callable {reward!r}")
    return reward


def get_batch_reward(name_or_path: str) -> Callable[..., list[float]]:
    """A batched solution reward `(responses, references, **kwargs) -> list[float]`: the reward's
    own `.batch` attribute when it has one, else a loop over the per-item function."""
    reward = get_reward(name_or_path)
    batch = getattr(reward, "batch", None)
    if callable(batch):
        return batch

    def looped(responses: Sequence[str], references: Sequence[str], **kwargs) -> list[float]:
        return [float(reward(r, ref, **kwargs)) for r, ref in zip(responses, references, strict=True)]

    return looped


register_reward("math", grade)
register_reward("meta", meta_reward)
