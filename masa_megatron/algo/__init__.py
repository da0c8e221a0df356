"""RL algorithm maths as pure torch functions of tensors (no model, no distributed state).

- `advantages.grpo_advantages`: group-normalised outcome advantages (GRPO / Dr.GRPO).
- `losses.policy_loss`: PPO clipped surrogate with clip-higher, dual clip, truncated importance
  sampling against rollout log-probs, optional KL to a reference, three aggregation modes and
  caller-supplied global normalisers for exact micro-batch / data-parallel accumulation.
- `losses.kl_penalty`: per-token k1 / k3 KL estimators.
- `losses.summarize_policy_metrics`: turns (all-reduced) metric sums into logged means.
"""
