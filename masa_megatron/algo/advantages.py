"""GRPO outcome advantages, normalised within groups given by an id per sample.

MASA (spec section 5) puts the G solution rollouts of a problem in one group and its M meta
rollouts in another, so the two kinds of reward never share a mean or a std: give them different
ids. The ids need not be contiguous, sorted or small.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def grpo_advantages(
    rewards: Tensor | Sequence[float],
    group_ids: Tensor | Sequence[int],
    eps: float = 1e-6,
    normalize_std: bool = True,
) -> Tensor:
    """Per-sample advantage A_i from scalar rewards, normalised within each sample's group.

    For sample i in group g with n_g members, rewards r_j (j in g):

        mean_g = (1 / n_g) * sum_j r_j
        std_g  = sqrt( sum_j (r_j - mean_g)^2 / (n_g - 1) )          (unbiased, Bessel)
        A_i    = (r_i - mean_g) / (std_g + eps)    if normalize_std   (GRPO)
        A_i    =  r_i - mean_g                     otherwise          (Dr.GRPO, mean only)

    and A_i = 0 exactly when n_g == 1 (no baseline) or when every reward of the group is equal
    (no signal; floating-point residue of the mean is not turned into a tiny nonzero value).

    Args:
        rewards: shape [N], any real dtype (bool/int are promoted to float32).
        group_ids: shape [N], integer id of each sample's group (tensor or list).
        eps: added to std_g in the denominator.
        normalize_std: divide by std_g + eps (True) or only subtract the mean (False).

    Returns:
        Tensor [N] of advantages, floating dtype of `rewards` (float32 for bool/int rewards),
        on the device of `rewards`. Statistics are computed in float64. Broadcast it to the
        response tokens of each sample (policy_loss accepts [B] advantages directly).
    """
    rewards = torch.as_tensor(rewards)
    out_dtype = rewards.dtype if rewards.is_floating_point() else torch.float32
    group_ids = torch.as_tensor(group_ids, dtype=torch.int64, device=rewards.device)
    if rewards.dim() != 1 or group_ids.shape != rewards.shape:
        raise ValueError(
            f"rewards and group_ids must both be 1-D of equal length, got "
            f"{tuple(rewards.shape)} and {tuple(group_ids.shape)}"
        )
    if rewards.numel() == 0:
        return torch.zeros(0, dtype=out_dtype, device=rewards.device)

    r = rewards.to(torch.float64)
    # Map arbitrary ids to 0..G-1, then compute per-group statistics with scatter ops.
    _, group_index = torch.unique(group_ids, return_inverse=True)
    n_groups = int(group_index.max()) + 1
    zeros = torch.zeros(n_groups, dtype=torch.float64, device=r.device)

    count = torch.bincount(group_index, minlength=n_groups).to(torch.float64)
    mean = zeros.index_add(0, group_index, r) / count
    centered = r - mean[group_index]
    if normalize_std:
        sum_sq = zeros.index_add(0, group_index, centered.square())
        std = (sum_sq / (count - 1).clamp_min(1)).sqrt()
        advantages = centered / (std[group_index] + eps)
    else:
        advantages = centered

    group_max = zeros.scatter_reduce(0, group_index, r, reduce="amax", include_self=False)
    group_min = zeros.scatter_reduce(0, group_index, r, reduce="amin", include_self=False)
    no_signal = (count < 2) | (group_max == group_min)
    advantages = advantages.masked_fill(no_signal[group_index], 0.0)
    return advantages.to(out_dtype)
