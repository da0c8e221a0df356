"""policy_loss / kl_penalty against hand-computed values (plain Python arithmetic in the test).

Defaults under test: clip_low 0.2, clip_high 0.28, dual clip 10. Ratios are set exactly by
logprobs = log(r), old_logprobs = 0, in float64.
"""

import math

import pytest
import torch

from masa_megatron.algo.advantages import grpo_advantages
from masa_megatron.algo.losses import kl_penalty, policy_loss, summarize_policy_metrics

F64 = torch.float64


def one_token(adv, ratio, **kw):
    """Loss and d loss / d logp for a single valid token."""
    logp = torch.tensor([[math.log(ratio)]], dtype=F64, requires_grad=True)
    loss, metrics = policy_loss(logp, torch.zeros(1, 1, dtype=F64), torch.tensor([adv], dtype=F64),
                                torch.ones(1, 1, dtype=torch.bool), **kw)
    loss.backward()
    return loss.item(), logp.grad.item(), metrics


# (advantage, ratio, dual_clip, expected per-token loss, gradient flows?, clipped-by metric)
CLIP_TABLE = [
    (1.0, 1.0, 10.0, -1.0, True, None),
    (1.0, 1.28, 10.0, -1.28, None, None),        # exactly at 1 + eps_high (value only)
    (1.0, 1.5, 10.0, -1.28, False, "clip_high_count"),
    (1.0, 0.5, 10.0, -0.5, True, None),          # no lower clip for A > 0
    (-1.0, 0.8, 10.0, 0.8, None, None),          # exactly at 1 - eps_low
    (-1.0, 0.5, 10.0, 0.8, False, "clip_low_count"),
    (-1.0, 1.5, 10.0, 1.5, True, None),          # no upper clip for A < 0
    (-1.0, 9.0, 10.0, 9.0, True, None),          # dual clip inactive below c
    (-1.0, 12.0, 10.0, 10.0, False, "dual_clip_count"),
    (-1.0, 12.0, None, 12.0, True, None),        # dual clip off
    (-0.5, 30.0, 10.0, 5.0, False, "dual_clip_count"),
    (2.0, 20.0, 10.0, -2.56, False, "clip_high_count"),  # dual clip only for A < 0
    (0.0, 1.7, 10.0, 0.0, False, None),
]


@pytest.mark.parametrize("adv,ratio,dual,expected,grad_flows,clip_key", CLIP_TABLE)
def test_clip_table(adv, ratio, dual, expected, grad_flows, clip_key):
    loss, grad, metrics = one_token(adv, ratio, dual_clip=dual)
    assert loss == pytest.approx(expected, abs=1e-12)
    if grad_flows is True:
        assert grad == pytest.approx(-adv * ratio, rel=1e-12)  # d(-A r)/dlogp = -A r
    elif grad_flows is False:
        assert grad == 0.0
    for key in ("clip_low_count", "clip_high_count", "dual_clip_count"):
        assert metrics[key].item() == (1.0 if key == clip_key else 0.0)


def batch(dtype=F64):
    """B=2, T=3; seq 0 has 2 valid tokens, seq 1 has 1; padding holds NaN / huge values."""
    logp = torch.tensor([[0.0, math.log(1.5), float("nan")],
                         [math.log(0.5), 50.0, float("inf")]], dtype=dtype)
    old = torch.tensor([[0.0, 0.0, 1000.0], [0.0, -50.0, 0.0]], dtype=dtype)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    return logp.requires_grad_(), old, torch.tensor([1.0, -1.0], dtype=dtype), mask


# per-token losses: seq 0: -1 (r=1), -1.28 (r=1.5 clipped); seq 1: 0.8 (A<0, r=.5 clipped)
AGG_EXPECTED = {
    "token-mean": (-1.0 - 1.28 + 0.8) / 3,
    "seq-mean-token-mean": ((-1.0 - 1.28) / 2 + 0.8) / 2,
    "seq-mean-token-sum": ((-1.0 - 1.28) + 0.8) / 2,
}
# gradient of the only unclipped token (seq 0, t 0): -A r = -1, over the normaliser
AGG_GRAD_00 = {"token-mean": -1 / 3, "seq-mean-token-mean": -1 / 4, "seq-mean-token-sum": -1 / 2}


@pytest.mark.parametrize("agg", list(AGG_EXPECTED))
def test_aggregation_modes_and_padding_is_ignored(agg):
    logp, old, adv, mask = batch()
    loss, metrics = policy_loss(logp, old, adv, mask, agg=agg)
    assert loss.item() == pytest.approx(AGG_EXPECTED[agg], abs=1e-12)
    loss.backward()
    expected_grad = torch.zeros(2, 3, dtype=F64)
    expected_grad[0, 0] = AGG_GRAD_00[agg]
    torch.testing.assert_close(logp.grad, expected_grad, rtol=0, atol=1e-12)
    assert metrics["token_count"].item() == 3 and metrics["seq_count"].item() == 2
    assert metrics["clip_high_count"].item() == 1 and metrics["clip_low_count"].item() == 1


def test_token_advantages_equal_broadcast_sequence_advantages():
    logp, old, adv, mask = batch()
    a, _ = policy_loss(logp, old, adv, mask)
    b, _ = policy_loss(logp, old, adv[:, None].expand(2, 3).clone(), mask)
    assert a.item() == b.item()


@pytest.mark.parametrize("agg", list(AGG_EXPECTED))
def test_zero_length_response(agg):
    logp = torch.tensor([[0.0, math.log(1.1)], [3.0, -3.0]], dtype=F64, requires_grad=True)
    mask = torch.tensor([[1, 1], [0, 0]])
    loss, _ = policy_loss(logp, torch.zeros(2, 2, dtype=F64), torch.tensor([1.0, 1.0], dtype=F64), mask,
                          agg=agg)
    # seq 0 tokens: -1, -1.1; seq 1 is empty: ignored by token-mean, counts as a 0 sequence otherwise
    expected = {"token-mean": -2.1 / 2, "seq-mean-token-mean": (-2.1 / 2 + 0.0) / 2,
                "seq-mean-token-sum": (-2.1 + 0.0) / 2}[agg]
    assert loss.item() == pytest.approx(expected, abs=1e-12)
    # an all-masked batch: loss 0 and zero gradient, never NaN
    loss, metrics = policy_loss(logp, torch.zeros(2, 2, dtype=F64), torch.ones(2, dtype=F64),
                                torch.zeros(2, 2), agg=agg)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(logp.grad, torch.zeros(2, 2, dtype=F64))
    assert summarize_policy_metrics(metrics)["ratio_mean"] == 0.0


def test_all_equal_rewards_give_zero_loss_and_gradient():
    adv = grpo_advantages(torch.tensor([1.0, 1.0, 1.0]), [4, 4, 4])
    logp = torch.tensor([[-0.3, -1.0], [-2.0, 0.0], [-0.1, -0.2]], requires_grad=True)
    loss, _ = policy_loss(logp, torch.full((3, 2), -0.5), adv, torch.ones(3, 2))
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(logp.grad, torch.zeros(3, 2))


def test_truncated_importance_sampling():
    # old = 0; rollout log-probs give w = exp(old - rollout) = 2 (capped to 1.5), 0.5, 1.2
    rollout = torch.tensor([[math.log(0.5), math.log(2.0), math.log(1 / 1.2)]], dtype=F64)
    logp = torch.zeros(1, 3, dtype=F64, requires_grad=True)
    old, adv, mask = torch.zeros(1, 3, dtype=F64), torch.ones(1, dtype=F64), torch.ones(1, 3)
    loss, metrics = policy_loss(logp, old, adv, mask, rollout_logprobs=rollout, tis_cap=1.5)
    assert loss.item() == pytest.approx((-1.5 - 0.5 - 1.2) / 3, abs=1e-12)
    assert metrics["tis_weight_sum"].item() == pytest.approx(3.2, abs=1e-12)
    assert metrics["rollout_log_ratio_abs_sum"].item() == pytest.approx(
        2 * math.log(2) + math.log(1.2), abs=1e-12)
    loss.backward()  # the weight is a constant: d/dlogp = -A r w / 3
    torch.testing.assert_close(logp.grad, torch.tensor([[-0.5, -0.5 / 3, -0.4]], dtype=F64))
    # without a cap, TIS is off (the gap is still reported)
    loss, metrics = policy_loss(logp, old, adv, mask, rollout_logprobs=rollout)
    assert loss.item() == -1.0 and "tis_weight_sum" not in metrics


def test_kl_estimators():
    logp = torch.tensor([math.log(0.5), math.log(0.25)], dtype=F64)
    ref = torch.tensor([math.log(0.25), math.log(0.5)], dtype=F64)
    # d = ref - logp = (-log 2, log 2); k1 = -d; k3 = e^d - d - 1
    k1 = [math.log(2), -math.log(2)]
    k3 = [0.5 + math.log(2) - 1, 2 - math.log(2) - 1]
    torch.testing.assert_close(kl_penalty(logp, ref, "k1"), torch.tensor(k1, dtype=F64))
    torch.testing.assert_close(kl_penalty(logp, ref, "k3"), torch.tensor(k3, dtype=F64))


@pytest.mark.parametrize("kl_type,per_token", [
    ("k1", [math.log(2), -math.log(2)]),
    ("k3", [0.5 + math.log(2) - 1, 2 - math.log(2) - 1]),
])
def test_kl_term_in_loss(kl_type, per_token):
    # A = 0 so the surrogate vanishes; a third, masked token carries a garbage reference.
    logp = torch.tensor([[math.log(0.5), math.log(0.25), 0.0]], dtype=F64)
    ref = torch.tensor([[math.log(0.25), math.log(0.5), float("nan")]], dtype=F64)
    mask = torch.tensor([[1, 1, 0]])
    args = (logp, logp.detach(), torch.zeros(1, dtype=F64), mask)
    loss, metrics = policy_loss(*args, ref_logprobs=ref, kl_coef=0.1, kl_type=kl_type)
    assert loss.item() == pytest.approx(0.1 * sum(per_token) / 2, abs=1e-12)
    assert metrics["kl_sum"].item() == pytest.approx(sum(per_token), abs=1e-12)
    loss, metrics = policy_loss(*args, ref_logprobs=ref, kl_type=kl_type)  # kl_coef 0: metric only
    assert loss.item() == 0.0 and "kl_sum" in metrics


def test_metrics_values_and_summary():
    # tokens: (A=1, r=1.5), (A=-1, r=0.5), (A=-1, r=12), (A=1, r=1); one padded slot
    ratios = [1.5, 0.5, 12.0, 1.0]
    logp = torch.tensor([[math.log(r) for r in ratios] + [7.0]], dtype=F64)
    adv = torch.tensor([[1.0, -1.0, -1.0, 1.0, 1.0]], dtype=F64)
    loss, m = policy_loss(logp, torch.zeros(1, 5, dtype=F64), adv, torch.tensor([[1, 1, 1, 1, 0]]))
    assert loss.item() == pytest.approx((-1.28 + 0.8 + 10.0 - 1.0) / 4, abs=1e-12)
    assert all(v.dtype == F64 and not v.requires_grad for v in m.values())
    assert m["pg_sum"].item() == pytest.approx(-1.28 + 0.8 + 10.0 - 1.0, abs=1e-12)
    assert m["ratio_sum"].item() == pytest.approx(15.0, abs=1e-12)
    assert m["ratio_dev_max"].item() == pytest.approx(11.0, abs=1e-12)
    approx_kl = sum(r - 1 - math.log(r) for r in ratios)
    assert m["approx_kl_sum"].item() == pytest.approx(approx_kl, abs=1e-12)
    s = summarize_policy_metrics(m)
    assert s["clip_high_frac"] == 0.25 and s["clip_low_frac"] == 0.25 and s["dual_clip_frac"] == 0.25
    assert s["ratio_mean"] == pytest.approx(3.75) and s["approx_kl_mean"] == pytest.approx(approx_kl / 4)
    assert s["token_count"] == 4 and s["seq_count"] == 1 and s["ratio_dev_max"] == pytest.approx(11.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("agg", list(AGG_EXPECTED))
def test_global_normaliser_makes_micro_batches_sum_to_full_batch(agg, dtype):
    gen = torch.Generator().manual_seed(0)
    B, T = 5, 7
    logp = (-torch.rand(B, T, generator=gen, dtype=F64) * 2).to(dtype).requires_grad_()
    old = logp.detach() + (torch.rand(B, T, generator=gen, dtype=F64).to(dtype) - 0.5)
    ref = logp.detach() - torch.rand(B, T, generator=gen, dtype=F64).to(dtype)
    rollout = old + 0.1 * (torch.rand(B, T, generator=gen, dtype=F64).to(dtype) - 0.5)
    adv = torch.randn(B, generator=gen, dtype=F64).to(dtype)
    lengths = torch.tensor([7, 3, 0, 5, 1])
    mask = torch.arange(T)[None, :] < lengths[:, None]
    kw = {"agg": agg, "rollout_logprobs": rollout, "tis_cap": 1.02, "ref_logprobs": ref,
          "kl_coef": 0.05, "kl_type": "k3"}

    full, _ = policy_loss(logp, old, adv, mask, **kw)
    (full_grad,) = torch.autograd.grad(full, logp)
    norms = {"token_normalizer": mask.sum(), "seq_normalizer": B}
    total = 0.0
    for rows in (slice(0, 2), slice(2, 5)):  # two micro-batches (or two data-parallel ranks)
        part, _ = policy_loss(logp[rows], old[rows], adv[rows], mask[rows],
                              **{k: (v[rows] if torch.is_tensor(v) else v) for k, v in kw.items()},
                              **norms)
        total = total + part
    (split_grad,) = torch.autograd.grad(total, logp)
    # fp64: 1e-12; fp32: a few ulps (one ulp at |loss| ~ 1.2 is already 1.2e-7)
    tol = 1e-12 if dtype == F64 else 4 * torch.finfo(dtype).eps * max(1.0, abs(full.item()))
    assert abs(total.item() - full.item()) <= tol
    torch.testing.assert_close(split_grad, full_grad, rtol=0, atol=tol)


@pytest.mark.parametrize("kw", [
    {"agg": "sum"}, {"dual_clip": 1.0}, {"kl_coef": 0.1}, {"kl_type": "k2"},
    {"clip_low": -0.1}, {"tis_cap": 0.0},
])
def test_invalid_arguments_raise(kw):
    with pytest.raises(ValueError):
        policy_loss(torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1), torch.ones(1, 2), **kw)
