"""The meta-head: it learns a per-problem pass rate and length, and survives checkpoint/export."""
import math

import pytest
import torch

from masa_megatron.masa.meta_head import (MetaHead, MetaHeadTrainer, export_meta_head,
                                          load_meta_head)


def synthetic_problems(n=64, hidden=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(n, hidden, generator=gen)
    true_p = torch.sigmoid(h @ torch.randn(hidden, generator=gen))
    true_len = torch.exp(4.0 + 0.3 * (h @ torch.randn(hidden, generator=gen)))
    # observed statistics of G = 8 rollouts per problem, as the trainer sees them
    observed = torch.binomial(torch.full((n,), 8.0), true_p, generator=gen) / 8
    lengths = [float(v) if p > 0 else None for v, p in zip(true_len.tolist(), observed.tolist())]
    return h, true_p, observed, lengths


def test_head_loss_falls_and_predictions_track_the_pass_rate():
    h, true_p, observed, lengths = synthetic_problems()
    trainer = MetaHeadTrainer(hidden_size=16, lr=5e-2, steps_per_update=10)
    first = trainer.update(h, observed.tolist(), lengths)
    for _ in range(20):
        last = trainer.update(h, observed.tolist(), lengths)
    assert last["head/loss"] < first["head/loss"]
    predicted = torch.tensor([p for p, _ in trainer.predict(h)])
    assert (predicted - true_p).abs().mean() < 0.12
    assert torch.corrcoef(torch.stack([predicted, true_p]))[0, 1] > 0.9
    log_len = torch.tensor([u for _, u in trainer.predict(h)])
    known = torch.tensor([v is not None for v in lengths])
    target = torch.log(torch.tensor([v or 1.0 for v in lengths]))
    assert (log_len[known] - target[known]).abs().mean() < 0.3


def test_length_loss_is_masked_when_no_solution_was_correct():
    head = MetaHead(4)
    h = torch.randn(3, 4)
    loss, metrics = head.loss(h, torch.zeros(3), torch.full((3,), float("nan")))
    assert math.isfinite(loss.item()) and metrics["head/loss_len"] == 0.0


def test_update_without_rows_changes_nothing():
    trainer = MetaHeadTrainer(hidden_size=16)
    before = {k: v.clone() for k, v in trainer.head.state_dict().items()}
    assert trainer.update(None, [], []) == {}
    assert trainer.update(None, [0.5], [3.0]) == {}   # no hidden state: its targets are moot
    assert all(torch.equal(before[k], v) for k, v in trainer.head.state_dict().items())


def test_head_round_trips_through_checkpoint_state_and_export(tmp_path):
    h, _, observed, lengths = synthetic_problems()
    trainer = MetaHeadTrainer(hidden_size=16)
    trainer.update(h, observed.tolist(), lengths)
    restored = MetaHeadTrainer(hidden_size=16)
    restored.load_state_dict(trainer.state_dict())
    assert restored.predict(h) == trainer.predict(h)
    path = export_meta_head(trainer.head, tmp_path)
    assert path.name == "meta_head.safetensors"
    loaded = load_meta_head(tmp_path)
    assert torch.equal(loaded(h)[0], trainer.head(h)[0])


def test_export_of_something_else_is_refused(tmp_path):
    from safetensors.torch import save_file
    save_file({"x": torch.zeros(1)}, str(tmp_path / "meta_head.safetensors"))
    with pytest.raises(ValueError, match="not a masa-meta-head-v1 file"):
        load_meta_head(tmp_path)
