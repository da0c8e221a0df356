"""Offloading the trainer's state (rollout/colocate.py) on CPU: the storage really goes away
(a read of an offloaded parameter fails), reload is bit-exact with zeroed gradients, and training
after an offload/reload cycle equals training without one."""
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("megatron.core")
sys.path.insert(0, str(Path(__file__).parent / "dist_scripts"))

from actor_common import ADAM, make_batch, model_state, setup_actor  # noqa: E402


def _plain_model_and_adam():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model(torch.randn(3, 4)).square().sum().backward()
    opt.step()
    model(torch.randn(3, 4)).square().sum().backward()    # gradients left to be zeroed
    return model, opt


def test_offloaded_parameters_free_their_storage_and_cannot_be_read():
    from masa_megatron.rollout.colocate import offload_train_state, reload_train_state

    model, opt = _plain_model_and_adam()
    storages = [p.untyped_storage() for p in model.parameters()]
    moments = [s["exp_avg"].untyped_storage() for s in opt.state.values()]
    sizes = [s.nbytes() for s in storages]
    state = offload_train_state([model], opt)
    assert all(s.nbytes() == 0 for s in storages + moments)
    with pytest.raises(RuntimeError):
        model(torch.randn(3, 4))
    reload_train_state(state)
    assert [s.nbytes() for s in storages] == sizes


def test_reload_is_bit_exact_and_zeroes_gradients():
    from masa_megatron.rollout.colocate import offload_train_state, reload_train_state

    model, opt = _plain_model_and_adam()
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    moments = {(i, k): v.clone() for i, s in enumerate(opt.state.values()) for k, v in s.items()}
    assert any(p.grad.abs().sum() > 0 for p in model.parameters())
    state = offload_train_state([model], opt, params=False)   # optimizer state and gradients
    assert all(p.untyped_storage().nbytes() > 0 for p in model.parameters())
    offload_train_state([model], opt, state=state)             # then the parameters
    reload_train_state(state)
    for name, p in model.named_parameters():
        assert torch.equal(p, params[name]), name
        assert p.grad is not None and not p.grad.any(), name
    for i, s in enumerate(opt.state.values()):
        for k, v in s.items():
            assert torch.equal(v, moments[i, k]), (i, k)


@pytest.fixture(scope="module")
def adam_actor():
    from masa_megatron.parallel import destroy_parallel

    actor, _ = setup_actor(1, 1, opt_cfg=ADAM)
    yield actor
    destroy_parallel()


def _two_updates(actor, cycle):
    """Two RL updates; between them (and before the first), `cycle()` runs as the colocated
    loop runs the hand-off. Returns the losses and the final weights."""
    losses = []
    for step in range(2):
        cycle()
        batch = make_batch(seed=step)
        batch.old_logprobs = actor.logprobs(batch)
        metrics = actor.update(batch, check_ratio=True)
        losses.append((metrics["train/loss"], metrics["train/grad_norm"]))
    return losses, model_state(actor)


def test_training_after_offload_and_reload_equals_training_without_it(adam_actor):
    from masa_megatron.rollout.colocate import offload_train_state, reload_train_state
    from masa_megatron.train.actor import unwrap_model

    actor = adam_actor
    start = model_state(actor)

    def restore():
        with torch.no_grad():
            for name, p in unwrap_model(actor.model_chunks[0]).named_parameters():
                p.copy_(start[name])
        for sub in actor.optimizer.chained_optimizers:
            sub.optimizer.state.clear()

    def offload_and_reload():
        state = offload_train_state(actor.model_chunks, actor.optimizer, params=False)
        offload_train_state(actor.model_chunks, actor.optimizer, state=state)
        assert all(p.untyped_storage().nbytes() == 0 for c in actor.model_chunks
                   for p in c.parameters())
        reload_train_state(state)

    plain_losses, plain_weights = _two_updates(actor, lambda: None)
    restore()
    cycled_losses, cycled_weights = _two_updates(actor, offload_and_reload)
    assert cycled_losses == plain_losses
    for name, value in plain_weights.items():
        assert torch.equal(value, cycled_weights[name]), name
