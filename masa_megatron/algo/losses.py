"""PPO-style policy loss for GRPO / MASA, and per-token KL estimators.

All tensors are [B, T] per response-token (B sequences, T positions); `mask` marks the valid
response tokens. Values at masked positions are never used, so padding may hold anything finite
or not: every log-difference is zeroed there before `exp`, which keeps both the loss and its
gradient free of NaN/inf coming from padding.

Distributed use: with token_normalizer / seq_normalizer set to the GLOBAL count (all
micro-batches of the mini-batch, all data-parallel ranks), the returned loss is
sum_local / global_count, so summing the losses (or gradients) over micro-batches and ranks
reproduces the single-process loss exactly. The metric dict holds sums, counts and maxima that
can be all-reduced (SUM, and MAX for keys ending in "_max") before `summarize_policy_metrics`.
"""

from __future__ import annotations

import torch
from torch import Tensor

AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")
KL_TYPES = ("k1", "k3")
# |log ratio| is clamped here before exp (as verl does), so a huge policy drift yields a large
# finite ratio (e^20 ~ 4.9e8, far beyond any clip bound) instead of inf and NaN gradients.
LOG_RATIO_LIMIT = 20.0


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, kind: str = "k1") -> Tensor:
    """Per-token estimate of KL(pi || pi_ref) from samples of pi (Schulman's estimators).

    With d = ref_logprobs - logprobs = log(pi_ref / pi):
        k1 = -d = logp - ref_logp                   (unbiased, can be negative)
        k3 = exp(d) - d - 1                         (unbiased, always >= 0, low variance)
    Elementwise; masking and aggregation are left to the caller.
    """
    return _kl_from_ref_log_ratio(ref_logprobs - logprobs, kind)


def _kl_from_ref_log_ratio(log_ratio_ref: Tensor, kind: str) -> Tensor:
    """k1 / k3 from d = ref_logp - logp (see kl_penalty)."""
    if kind not in KL_TYPES:
        raise ValueError(f"kl kind must be one of {KL_TYPES}, got {kind!r}")
    if kind == "k1":
        return -log_ratio_ref
    return torch.expm1(log_ratio_ref) - log_ratio_ref


def _aggregate(
    per_token: Tensor,
    mask: Tensor,
    agg: str,
    token_normalizer: float | Tensor | None,
    seq_normalizer: float | Tensor | None,
) -> Tensor:
    """Reduce masked per-token values [B, T] to the scalar loss (see policy_loss)."""
    per_token = torch.where(mask, per_token, torch.zeros_like(per_token))
    if agg == "token-mean":
        denom = mask.sum().clamp_min(1) if token_normalizer is None else token_normalizer
        return per_token.sum() / denom
    per_seq = per_token.sum(dim=-1)
    if agg == "seq-mean-token-mean":
        per_seq = per_seq / mask.sum(dim=-1).clamp_min(1)
    denom = max(per_seq.numel(), 1) if seq_normalizer is None else seq_normalizer
    return per_seq.sum() / denom


def policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.28,
    dual_clip: float | None = 10.0,
    agg: str = "token-mean",
    rollout_logprobs: Tensor | None = None,
    tis_cap: float | None = None,
    ref_logprobs: Tensor | None = None,
    kl_coef: float = 0.0,
    kl_type: str = "k1",
    token_normalizer: float | Tensor | None = None,
    seq_normalizer: float | Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped surrogate loss (to minimise) and detached metrics.

    Per valid token, with r = exp(logp - old_logp) and advantage A (a [B] advantage is broadcast
    over the tokens of its sequence):

        pg   = max(-A r, -A clip(r, 1 - clip_low, 1 + clip_high))      (PPO, clip-higher)
        pg   = min(pg, -A c)   where A < 0, if dual_clip = c (> 1)      (dual clip)
        pg  *= w,  w = min(exp(old_logp - rollout_logp), tis_cap)        (TIS; detached; only
                                                                          if both are given)
        loss_t = pg + kl_coef * KL_t,  KL_t = kl_penalty(logp, ref_logp, kl_type)

    Aggregation of loss_t over valid tokens (mask), B sequences, n_b valid tokens in sequence b:
        token-mean          : sum_{b,t} loss_t / N_tok,   N_tok = token_normalizer or sum(mask)
        seq-mean-token-mean : sum_b (sum_t loss_t / n_b) / N_seq,   N_seq = seq_normalizer or B
        seq-mean-token-sum  : sum_b (sum_t loss_t) / N_seq
    Only the normaliser of the chosen mode is used. A sequence with n_b = 0 contributes 0 but
    still counts in N_seq (it is a real sample of the batch; skipping it would make the loss of
    a batch depend on how it is split). An all-masked batch gives loss 0, never NaN.

    Gradient: tokens whose clipped branch is active (A > 0 and r > 1 + clip_high, A < 0 and
    r < 1 - clip_low, A < 0 and r > c) get zero policy-gradient.

    Metrics (float64, detached; SUM-reducible, "_max" keys MAX-reducible):
        token_count, seq_count, pg_sum (surrogate before KL, after TIS),
        clip_low_count / clip_high_count / dual_clip_count (tokens with zero gradient from each
        bound), ratio_sum, ratio_dev_max = max |r - 1|,
        approx_kl_sum = sum of (r - 1 - log r) (k3 estimate of KL(old || new)),
        and when used: kl_sum (to reference), tis_weight_sum, rollout_log_ratio_abs_sum
        (|old_logp - rollout_logp|, the trainer-vs-engine gap).
    """
    if kl_type not in KL_TYPES:
        raise ValueError(f"kl_type must be one of {KL_TYPES}, got {kl_type!r}")
    if agg not in AGGREGATIONS:
        raise ValueError(f"agg must be one of {AGGREGATIONS}, got {agg!r}")
    if clip_low < 0 or clip_high < 0:
        raise ValueError(f"clip_low and clip_high must be >= 0, got {clip_low}, {clip_high}")
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be > 1 (or None), got {dual_clip}")
    if kl_coef != 0.0 and ref_logprobs is None:
        raise ValueError("kl_coef != 0 needs ref_logprobs")
    if tis_cap is not None and tis_cap <= 0:
        raise ValueError(f"tis_cap must be > 0 (or None), got {tis_cap}")
    if logprobs.shape != old_logprobs.shape or logprobs.shape != mask.shape:
        raise ValueError(
            f"logprobs {tuple(logprobs.shape)}, old_logprobs {tuple(old_logprobs.shape)} and "
            f"mask {tuple(mask.shape)} must have the same shape"
        )

    mask = mask.bool()
    zero = torch.zeros((), dtype=logprobs.dtype, device=logprobs.device)

    def masked(x: Tensor) -> Tensor:
        return torch.where(mask, x, zero)

    if advantages.dim() == logprobs.dim() - 1:
        advantages = advantages.unsqueeze(-1)
    advantages = advantages.to(logprobs.dtype).detach().expand_as(logprobs)
    old_logprobs = old_logprobs.detach()

    log_ratio = masked(logprobs - old_logprobs).clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT)
    ratio = torch.exp(log_ratio)
    pg_unclipped = -advantages * ratio
    pg_clipped = -advantages * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    pg = torch.maximum(pg_unclipped, pg_clipped)
    negative = advantages < 0
    if dual_clip is not None:
        pg = torch.where(negative, torch.minimum(pg, -advantages * dual_clip), pg)

    tis_weight = None
    if rollout_logprobs is not None and tis_cap is not None:
        rollout_gap = masked(old_logprobs - rollout_logprobs.detach())
        tis_weight = torch.exp(rollout_gap.clamp(max=LOG_RATIO_LIMIT)).clamp(max=tis_cap)
        pg = pg * tis_weight

    per_token = pg
    kl = None
    if ref_logprobs is not None:
        kl = _kl_from_ref_log_ratio(masked(ref_logprobs.detach() - logprobs), kl_type)
        if kl_coef != 0.0:
            per_token = per_token + kl_coef * kl

    loss = _aggregate(per_token, mask, agg, token_normalizer, seq_normalizer)

    with torch.no_grad():
        f64 = torch.float64

        def count(x: Tensor) -> Tensor:
            return (x & mask).sum().to(f64)

        def total(x: Tensor) -> Tensor:
            return masked(x).to(f64).sum()

        positive = advantages > 0
        metrics = {
            "token_count": mask.sum().to(f64),
            "seq_count": torch.tensor(float(mask.shape[0]), dtype=f64, device=mask.device),
            "pg_sum": total(pg),
            "clip_low_count": count(negative & (ratio < 1.0 - clip_low)),
            "clip_high_count": count(positive & (ratio > 1.0 + clip_high)),
            "dual_clip_count": count(negative & (ratio > dual_clip))
            if dual_clip is not None
            else torch.zeros((), dtype=f64, device=mask.device),
            "ratio_sum": total(ratio),
            "ratio_dev_max": masked((ratio - 1).abs()).max().to(f64)
            if mask.numel()
            else torch.zeros((), dtype=f64, device=mask.device),
            "approx_kl_sum": total(torch.expm1(log_ratio) - log_ratio),
        }
        if kl is not None:
            metrics["kl_sum"] = total(kl)
        if tis_weight is not None:
            metrics["tis_weight_sum"] = total(tis_weight)
        if rollout_logprobs is not None:
            metrics["rollout_log_ratio_abs_sum"] = total((old_logprobs - rollout_logprobs).abs())
    return loss, metrics


def summarize_policy_metrics(metrics: dict[str, Tensor]) -> dict[str, float]:
    """Turn (possibly all-reduced) policy_loss metric sums into per-token means for logging.

    "<name>_count" -> "<name>_frac" (fraction of valid tokens), "<name>_sum" -> "<name>_mean"
    ("approx_kl_sum" -> "approx_kl_mean", ...), "_max" keys and the two totals pass through.
    """
    tokens = max(float(metrics["token_count"]), 1.0)
    out: dict[str, float] = {
        "token_count": float(metrics["token_count"]),
        "seq_count": float(metrics["seq_count"]),
    }
    for key, value in metrics.items():
        if key in out:
            continue
        if key.endswith("_count"):
            out[key[: -len("_count")] + "_frac"] = float(value) / tokens
        elif key.endswith("_sum"):
            out[key[: -len("_sum")] + "_mean"] = float(value) / tokens
        else:
            out[key] = float(value)
    return out
