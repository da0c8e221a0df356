"""The actor in this process (TP=PP=DP=1) on a tiny random Qwen3-like model: log-probs and
entropy against plain full-vocabulary maths, micro-batching that does not change the update, the
in-loop invariants (ratio, NaN skip), sft_step, prompt_last_hidden, the LR schedule.
The multi-process layouts are in test_actor_parallel.py."""
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("megatron.core")
sys.path.insert(0, str(Path(__file__).parent / "dist_scripts"))

from actor_common import (VOCAB, make_batch, max_abs_diff, model_state,  # noqa: E402
                          restore_weights, setup_actor)

from masa_megatron.config import OptimizerConfig  # noqa: E402


@pytest.fixture(scope="module")
def actor():
    from masa_megatron.parallel import destroy_parallel

    actor, _ = setup_actor(1, 1, micro_batch_tokens=1 << 20)
    yield actor
    destroy_parallel()


@pytest.fixture
def fresh(actor):
    """The module's actor back at its initial weights, every test."""
    if not hasattr(actor, "_initial"):
        actor._initial = model_state(actor)
    restore_weights(actor, actor._initial)
    actor.cfg.micro_batch_tokens = 1 << 20
    return actor


def _plain_forward(actor, tokens):
    from masa_megatron.train.actor import unwrap_model
    x = torch.tensor(tokens).unsqueeze(0)
    return unwrap_model(actor.model_chunks[0])(x, torch.arange(x.shape[1]).unsqueeze(0), None)[0]


def test_logprobs_and_entropy_equal_plain_log_softmax(fresh):
    batch = make_batch()
    logp, entropy = fresh.logprobs(batch, with_entropy=True)
    for i, (prompt, response) in enumerate(zip(batch.prompt_ids, batch.response_ids)):
        with torch.no_grad():
            logits = _plain_forward(fresh, prompt + response[:-1])[:, :VOCAB] / fresh.temperature
        plain = torch.log_softmax(logits.float(), dim=-1)[len(prompt) - 1:]
        expected = plain.gather(-1, torch.tensor(response)[:, None]).squeeze(-1)
        assert (logp[i] - expected).abs().max() <= 1e-5
        plain_entropy = -(plain.exp() * plain).sum(-1)
        assert (entropy[i] - plain_entropy).abs().max() <= 1e-4
        assert len(logp[i]) == len(response)


def test_micro_batch_budget_does_not_change_the_update(fresh):
    batch = make_batch()
    batch.old_logprobs = fresh.logprobs(batch)
    start = model_state(fresh)
    one = fresh.update(batch, check_ratio=True)
    single = model_state(fresh)
    restore_weights(fresh, start)
    fresh.cfg.micro_batch_tokens = 100  # rows up to ~90 tokens: many micro-batches
    assert len(fresh._micro_batches(batch, range(8))) > 2
    many = fresh.update(batch, check_ratio=True)
    assert abs(one["train/loss"] - many["train/loss"]) <= 1e-6
    assert max_abs_diff(single, model_state(fresh)) <= 1e-6
    assert max_abs_diff(start, single) > 1e-3  # the update did something
    assert one["train/step0_ratio_dev_max"] <= 1e-5 and one["train/optimizer_steps"] == 2


def test_policy_old_logprobs_give_the_same_update_as_the_recompute(fresh):
    """On-policy (one optimizer step), old_logp = the update's own logp detached: same loss and
    weights as recomputing them in a separate forward first."""
    cfg = fresh.cfg
    saved = cfg.mini_batches_per_step, cfg.ppo_epochs, cfg.old_logprobs
    cfg.mini_batches_per_step, cfg.ppo_epochs, cfg.old_logprobs = 1, 1, "recompute"
    try:
        batch = make_batch()
        batch.old_logprobs = fresh.logprobs(batch)
        start = model_state(fresh)
        recomputed = fresh.update(batch)
        after_recompute = model_state(fresh)
        restore_weights(fresh, start)
        cfg.old_logprobs, batch.old_logprobs = "policy", None
        policy = fresh.update(batch)
        assert abs(recomputed["train/loss"] - policy["train/loss"]) <= 1e-6
        assert max_abs_diff(after_recompute, model_state(fresh)) <= 1e-6
        assert max_abs_diff(start, after_recompute) > 1e-3   # the update did something
        cfg.mini_batches_per_step = 2
        with pytest.raises(ValueError, match="one optimizer step"):
            fresh.update(batch)
    finally:
        cfg.mini_batches_per_step, cfg.ppo_epochs, cfg.old_logprobs = saved


def test_update_raises_logprobs_of_positive_advantages_and_lowers_negative_ones(fresh):
    """The policy-gradient sign: one small on-policy step moves every response's log-prob in the
    direction of its advantage (the largest advantages by magnitude are checked)."""
    cfg = fresh.cfg
    saved = cfg.mini_batches_per_step, cfg.ppo_epochs, cfg.old_logprobs
    cfg.mini_batches_per_step, cfg.ppo_epochs, cfg.old_logprobs = 1, 1, "policy"
    groups = fresh.optimizer.param_groups
    lrs = [(g["max_lr"], g["min_lr"]) for g in groups]
    try:
        batch = make_batch()
        before = torch.stack([lp.sum() for lp in fresh.logprobs(batch)])
        for group in groups:   # a small step, where the first-order sign argument holds
            group["max_lr"] = group["min_lr"] = 1e-3
        fresh.update(batch)
        moved = torch.stack([lp.sum() for lp in fresh.logprobs(batch)]) - before
    finally:
        cfg.mini_batches_per_step, cfg.ppo_epochs, cfg.old_logprobs = saved
        for group, (high, low) in zip(groups, lrs):
            group["max_lr"], group["min_lr"] = high, low
    strong = batch.advantages.abs() > 0.5
    assert int(strong.sum()) >= 6
    assert bool((torch.sign(moved[strong]) == torch.sign(batch.advantages[strong])).all()), \
        list(zip(batch.advantages.tolist(), moved.tolist()))


def test_ratio_invariant_fires_on_stale_old_logprobs(fresh):
    from masa_megatron.train.actor import RatioInvariantError

    batch = make_batch()
    batch.old_logprobs = [x + 1e-3 for x in fresh.logprobs(batch)]
    before = model_state(fresh)
    # 1 - exp(-1e-3) = 9.995e-4, give or take the rounding between the update's micro-batches
    # (other shapes than logprobs' here) in the last digits
    with pytest.raises(RatioInvariantError, match=r"= (9\.99\de-04|1\.00\de-03) exceeds 1\.0e-05"):
        fresh.update(batch, check_ratio=True)
    assert max_abs_diff(before, model_state(fresh)) == 0.0
    fresh.update(batch, check_ratio=False)  # without the check it trains
    assert max_abs_diff(before, model_state(fresh)) > 0.0


def test_sequence_padding_for_the_layout_is_neutral_to_logprobs_and_loss(fresh, monkeypatch):
    from masa_megatron.train.actor import Actor

    batch = make_batch()
    assert fresh.sequence_multiple == 1
    fresh.cfg.micro_batch_tokens = 150   # several micro-batches of different widths
    logp = fresh.logprobs(batch)
    monkeypatch.setattr(fresh.model_config, "fp8", "hybrid")   # FP8: Transformer Engine needs 16
    padded_actor = Actor(fresh.model_chunks, fresh.optimizer, fresh.scheduler, fresh.cfg,
                         temperature=fresh.temperature)
    monkeypatch.setattr(fresh.model_config, "fp8", None)       # the forward itself stays fp32
    assert padded_actor.sequence_multiple == 16
    widths = [mb.tokens.shape[1] for mb in padded_actor._micro_batches(batch, range(len(batch)))]
    plain = [mb.tokens.shape[1] for mb in fresh._micro_batches(batch, range(len(batch)))]
    assert all(w % 16 == 0 for w in widths) and sum(widths) > sum(plain) and len(plain) > 1
    padded = padded_actor.logprobs(batch)
    assert max((a - b).abs().max().item() for a, b in zip(logp, padded)) <= 1e-5
    batch.old_logprobs = logp
    start = model_state(fresh)
    loss = fresh.update(batch)["train/loss"]
    restore_weights(fresh, start)
    assert padded_actor.update(batch)["train/loss"] == pytest.approx(loss, rel=1e-5, abs=1e-7)


def test_every_linear_layer_sees_the_layouts_padded_sequence(fresh, monkeypatch):
    """With FP8 the layout needs 16-token sequences: the linear-input hook of
    model/shape_check.py sees only such inputs in every actor pass (log-probs, update, hidden
    states), and refuses the unpadded micro-batches of an actor that does not pad."""
    from masa_megatron.model.shape_check import (LinearShapeCheck, LinearShapeError,
                                                 sequence_multiple)
    from masa_megatron.train.actor import Actor

    batch = make_batch()
    fresh.cfg.micro_batch_tokens = 150   # several micro-batches of different widths
    monkeypatch.setattr(fresh, "shared_prefix_off", ["the padded layout under test"])
    assert any(n % 16 for n in batch.row_lengths())
    monkeypatch.setattr(fresh.model_config, "fp8", "hybrid")
    multiple = sequence_multiple(fresh.model_config)
    padded = Actor(fresh.model_chunks, fresh.optimizer, fresh.scheduler, fresh.cfg,
                   temperature=fresh.temperature)
    monkeypatch.setattr(fresh.model_config, "fp8", None)       # the forward itself stays fp32
    assert multiple == 16
    with LinearShapeCheck(fresh.model_chunks, multiple, tp=1) as check:
        batch.old_logprobs = padded.logprobs(batch)
        padded.update(batch)
        padded.prompt_last_hidden(batch.prompt_ids)
        with pytest.raises(LinearShapeError, match="linear_qkv.*not a multiple of 16"):
            fresh.logprobs(batch)                               # pads to its longest row only
    assert all(chunk.training for chunk in fresh.model_chunks)  # back to training mode
    layers = {n for n, m in fresh.model_chunks[0].named_modules()
              if type(m).__name__.endswith("ParallelLinear")}
    assert len(layers) == 4 * 4 + 1 and set(check.shapes) == layers
    assert check.calls > 3 * len(layers)


def test_micro_batch_token_budget_holds_after_the_layouts_padding(fresh, monkeypatch):
    """grpo.micro_batch_tokens bounds rows x padded width (what the activations take), so the
    planner must count each row at its padded length (one row longer than the budget excepted)."""
    from masa_megatron.train.actor import Actor

    batch = make_batch()
    monkeypatch.setattr(fresh.model_config, "fp8", "hybrid")   # 16-token sequences
    padded = Actor(fresh.model_chunks, fresh.optimizer, fresh.scheduler, fresh.cfg,
                   temperature=fresh.temperature)
    for budget in (100, 150, 256):
        padded.cfg.micro_batch_tokens = budget
        micro = padded._micro_batches(batch, range(len(batch)))
        assert sorted(i for mb in micro for i in mb.sample_index) == list(range(len(batch)))
        sizes = [mb.tokens.numel() for mb in micro if mb.num_rows > 1]
        assert sizes and max(sizes) <= budget, (budget, sizes)


@pytest.mark.parametrize("recipe,multiple", [("tensorwise", 16), ("delayed", 16),
                                             ("blockwise", 16), ("mxfp8", 32)])
def test_fp8_padding_follows_the_recipes_gemm_alignment(fresh, monkeypatch, recipe, multiple):
    """Transformer Engine's MXFP8 scales blocks of 32 elements, so its GEMMs need a token
    dimension divisible by 32 (Megatron's get_fp8_align_size); the other recipes need 16."""
    from masa_megatron.train.actor import Actor

    monkeypatch.setattr(fresh.model_config, "fp8", "hybrid")
    monkeypatch.setattr(fresh.model_config, "fp8_recipe", recipe)
    padded = Actor(fresh.model_chunks, fresh.optimizer, fresh.scheduler, fresh.cfg,
                   temperature=fresh.temperature)
    assert padded.sequence_multiple == multiple
    widths = [mb.tokens.shape[1] for mb in padded._micro_batches(make_batch(), range(3))]
    assert widths and all(w % multiple == 0 for w in widths)


def test_ratio_tolerance_follows_the_model_dtype_unless_given(fresh, monkeypatch):
    from masa_megatron.train.actor import RATIO_TOLERANCE, Actor

    assert fresh.ratio_tolerance == RATIO_TOLERANCE["fp32"] == 1e-5
    assert RATIO_TOLERANCE["fp32"] < RATIO_TOLERANCE["fp16"] < RATIO_TOLERANCE["bf16"]
    monkeypatch.setattr(fresh.model_config, "params_dtype", torch.bfloat16)
    bf16 = Actor(fresh.model_chunks, fresh.optimizer, fresh.scheduler, fresh.cfg)
    assert bf16.ratio_tolerance == RATIO_TOLERANCE["bf16"]
    given = Actor(fresh.model_chunks, fresh.optimizer, fresh.scheduler, fresh.cfg,
                  ratio_tolerance=3e-3)
    assert given.ratio_tolerance == 3e-3


def test_tis_cap_without_rollout_logprobs_is_an_error(fresh, monkeypatch):
    batch = make_batch()
    batch.rollout_logprobs = None
    batch.old_logprobs = fresh.logprobs(batch)
    monkeypatch.setattr(fresh.cfg, "tis_cap", 2.0)
    with pytest.raises(ValueError, match="grpo.tis_cap"):
        fresh.update(batch)


def test_nan_loss_skips_the_step_and_keeps_weights(fresh):
    batch = make_batch()
    batch.old_logprobs = fresh.logprobs(batch)
    batch.advantages[0] = batch.advantages[-1] = float("nan")
    before = model_state(fresh)
    lr_steps = fresh.scheduler.num_steps
    metrics = fresh.update(batch)
    assert metrics["train/skipped_step"] == 2 and metrics["train/optimizer_steps"] == 0
    assert math.isnan(metrics["train/grad_norm"])
    assert max_abs_diff(before, model_state(fresh)) == 0.0
    assert fresh.scheduler.num_steps == lr_steps  # skipped steps do not consume the schedule
    batch.advantages[0] = batch.advantages[-1] = 0.5
    assert fresh.update(batch)["train/skipped_step"] == 0  # the next good batch trains


def test_sft_step_lowers_the_nll(fresh):
    batch = make_batch()
    pairs = (batch.prompt_ids[:6], batch.response_ids[:6])
    lr_before = fresh.current_lr()
    nll = [fresh.sft_step(*pairs, lr=0.2)["sft/nll"] for _ in range(4)]
    assert nll[-1] < nll[0] - 0.1, nll
    assert fresh.current_lr() == lr_before


def test_prompt_last_hidden_is_the_final_norm_output_at_the_last_prompt_token(fresh):
    from masa_megatron.train.actor import unwrap_model

    prompts = make_batch().prompt_ids[:5]
    hidden = fresh.prompt_last_hidden(prompts)
    seen = []
    norm = unwrap_model(fresh.model_chunks[0]).decoder.final_layernorm
    hook = norm.register_forward_hook(lambda m, a, out: seen.append(out[-1, 0]))
    with torch.no_grad():
        for p in prompts:
            _plain_forward(fresh, p)
    hook.remove()
    assert hidden.shape == (5, 64)
    assert (hidden - torch.stack(seen)).abs().max() <= 1e-5


def test_make_batch_from_samples(fresh):
    samples = [SimpleNamespace(prompt_ids=[1, 2], response_ids=[3, 4], rollout_logprobs=[-1, -2],
                               group_id=7)]
    batch = fresh.make_batch(samples, [0.5])
    assert batch.rollout_logprobs[0].tolist() == [-1.0, -2.0] and batch.group_ids == [7]
    metrics = fresh.compute_old_logprobs(batch)
    assert batch.old_logprobs[0].shape == (2,)
    assert metrics["logprob/rollout_gap_mean"] > 0 and metrics["logprob/entropy_mean"] > 0


def test_lr_schedule_warmup_then_cosine():
    from masa_megatron.train.optim import build_scheduler

    groups = [{"max_lr": 1.0, "min_lr": 0.1}, {"max_lr": 1.0, "min_lr": 0.1, "wd_mult": 0.0}]
    opt = SimpleNamespace(param_groups=groups)
    cfg = OptimizerConfig(lr=1.0, min_lr=0.1, warmup_steps=4, schedule="cosine", weight_decay=0.1)
    scheduler = build_scheduler(opt, cfg, total_steps=12)
    lrs = []
    for _ in range(14):  # the actor advances the scheduler right before each optimizer step
        scheduler.step(1)
        lrs.append(groups[0]["lr"])
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lrs[7] == pytest.approx(0.1 + 0.9 * 0.5)  # step 8 of 12: half way through the decay
    assert lrs[11:] == pytest.approx([0.1] * 3)
    assert groups[0]["weight_decay"] == pytest.approx(0.1) and groups[1]["weight_decay"] == 0.0
    plain = SimpleNamespace(param_groups=[{}])
    constant = build_scheduler(plain, OptimizerConfig(lr=2.0, warmup_steps=0), total_steps=5)
    for _ in range(7):
        constant.step(1)
        assert plain.param_groups[0]["lr"] == 2.0


def test_an_empty_batch_takes_part_without_samples(fresh):
    """A DP rank can end up without samples: every call still runs (collectives) and is empty."""
    from masa_megatron.train.batching import TrainBatch

    empty = TrainBatch([], [])
    assert fresh.logprobs(empty) == [] and fresh.prompt_last_hidden([]).shape == (0, 64)
    fresh.compute_old_logprobs(empty)
    metrics = fresh.update(empty)
    assert metrics["train/token_count"] == 0 and metrics["train/loss"] == 0.0


def test_mini_batches_by_sequence_count_scale_the_short_one_by_its_share(fresh):
    """grpo.mini_batch_sequences=2 on 3 samples: two optimizer steps, on samples {0, 1} and on
    {2} with its loss scaled by 1/2 (the reference's 2,048 + 1,024 case in small). With the LR
    at 0 the weights never move, the ratio is 1 and the token-mean loss of a mini-batch is
    -sum_i A_i R_i / sum_i R_i (R_i response tokens), so by hand:
    loss = (-(A0 R0 + A1 R1) / (R0 + R1) - 0.5 A2) / 2 and the mean gradient norm is
    (|g01| + 0.5 |g2|) / 2, with |g01| and |g2| from updates on {0, 1} and on {2} alone."""
    cfg = fresh.cfg
    saved = cfg.mini_batches_per_step, cfg.mini_batch_sequences, cfg.old_logprobs
    groups = fresh.optimizer.param_groups
    lrs = [(g["max_lr"], g["min_lr"]) for g in groups]
    try:
        for group in groups:
            group["max_lr"] = group["min_lr"] = 0.0
        cfg.mini_batches_per_step, cfg.old_logprobs = 1, "recompute"
        full = make_batch().subset([0, 1, 2])

        def update(batch, size):
            cfg.mini_batch_sequences = size
            batch.old_logprobs = fresh.logprobs(batch)
            return fresh.update(batch)
        out = update(full, 2)
        assert out["train/optimizer_steps"] == 2
        a, r = full.advantages.tolist(), [len(x) for x in full.response_ids]
        by_hand = (-(a[0] * r[0] + a[1] * r[1]) / (r[0] + r[1]) - 0.5 * a[2]) / 2
        assert out["train/loss"] == pytest.approx(by_hand, rel=1e-5, abs=1e-6)
        g01 = update(full.subset([0, 1]), 2)["train/grad_norm"]
        g2 = update(full.subset([2]), 1)["train/grad_norm"]
        assert out["train/grad_norm"] == pytest.approx((g01 + 0.5 * g2) / 2, rel=1e-4)
        cfg.mini_batch_sequences = 0            # the default: today's equal split, unscaled
        cfg.mini_batches_per_step = 2
        full.old_logprobs = fresh.logprobs(full)
        equal = fresh.update(full)
        by_hand = (-(a[0] * r[0] + a[1] * r[1]) / (r[0] + r[1]) - a[2]) / 2
        assert equal["train/loss"] == pytest.approx(by_hand, rel=1e-5, abs=1e-6)
    finally:
        cfg.mini_batches_per_step, cfg.mini_batch_sequences, cfg.old_logprobs = saved
        for group, (high, low) in zip(groups, lrs):
            group["max_lr"], group["min_lr"] = high, low


def test_step_summary_keeps_a_nan_max_as_nan():
    from masa_megatron.train.actor import _summarize_steps
    step = {"ratio_dev_max": float("nan"), "token_count": 4.0, "seq_count": 1.0, "loss": 0.1,
            "grad_norm": 1.0, "skipped_step": 0, "lr": 1e-3}
    later = dict(step, ratio_dev_max=0.5)
    for steps in ([step], [step, later], [later, step]):
        assert math.isnan(_summarize_steps(steps, "train")["train/ratio_dev_max"]), steps
    assert _summarize_steps([later], "train")["train/ratio_dev_max"] == 0.5


def test_update_reports_the_padding_of_its_micro_batches(fresh, monkeypatch):
    """train/padding_fraction = 1 - sample positions / padded positions of the micro-batches
    (one per mini-batch here: rows padded to the mini-batch's longest; the shared-prefix
    layout's count is checked in test_shared_prefix.py)."""
    monkeypatch.setattr(fresh, "shared_prefix_off", ["the padded layout under test"])
    batch = make_batch()
    batch.old_logprobs = fresh.logprobs(batch)
    lengths = [len(p) + len(r) - 1 for p, r in zip(batch.prompt_ids, batch.response_ids)]
    minis, _ = fresh._mini_batches(batch)
    step = fresh.sequence_multiple
    padded = sum(len(idx) * -(-max(lengths[i] for i in idx) // step) * step for idx in minis)
    expected = 1 - sum(lengths) / padded
    assert 0 < expected < 1, "make_batch rows must differ in length"
    assert fresh.update(batch)["train/padding_fraction"] == pytest.approx(expected, abs=1e-12)
