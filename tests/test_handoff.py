"""train/handoff.py against a recording engine: what is on the device at each call the servers
see (the sync reads resident parameters while the optimizer state is already away; generation
runs with the parameters away), barriers around every server transition, and the parameters
brought back only for the duration of a forward pass."""
from types import SimpleNamespace

import pytest

torch = pytest.importorskip("torch")


def _resident(t: torch.Tensor) -> bool:
    return t.untyped_storage().nbytes() > 0 and t.numel() > 0


class RecordingEngine:
    def __init__(self, trainer):
        self.trainer, self.calls = trainer, []

    def _state(self):
        model, opt = self.trainer
        return {"params": all(_resident(p) for p in model.parameters()),
                "moments": all(_resident(s["exp_avg"]) for s in opt.state.values())}

    def release(self, tags):
        self.calls.append(("release", tuple(tags), self._state()))

    def resume(self, tags):
        self.calls.append(("resume", tuple(tags), self._state()))

    def update_weights(self, chunks, version):
        weights = [p.detach().clone() for c in chunks for p in c.parameters()]  # reads them
        self.calls.append(("sync", version, self._state()))
        return weights


@pytest.fixture
def colocated():
    from masa_megatron.train.handoff import Handoff

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    engine = RecordingEngine((model, opt))
    handoff = Handoff(colocate=True, offload=True,
                      barrier=lambda: engine.calls.append(("barrier", None, None)))
    actor = SimpleNamespace(model_chunks=[model], optimizer=opt)
    return handoff, actor, engine


def test_to_rollout_syncs_resident_parameters_then_moves_them_out(colocated):
    handoff, actor, engine = colocated
    model = actor.model_chunks[0]
    before = [p.detach().clone() for p in model.parameters()]
    metrics = handoff.to_rollout(engine, actor, version=3)
    # every server transition has a barrier on both sides: no rank syncs before the weights
    # are resumed, none generates before the KV cache is
    barrier = ("barrier", None)
    assert [c[:2] for c in engine.calls] == [
        barrier, ("resume", ("weights",)), barrier, ("sync", 3),
        barrier, ("resume", ("kv_cache", "cuda_graph")), barrier]
    calls = [c for c in engine.calls if c[0] != "barrier"]
    assert calls[0][2] == {"params": True, "moments": False}   # optimizer state away
    assert calls[1][2] == {"params": True, "moments": False}   # sync reads the weights
    assert calls[2][2] == {"params": False, "moments": False}  # all away for generation
    for phase in ("trained", "optimizer_offloaded", "weights_synced", "params_offloaded",
                  "rollout_ready"):
        assert any(k.startswith(f"memory/{phase}/") for k in metrics), phase
    with pytest.raises(RuntimeError):
        model(torch.randn(2, 4))
    with handoff.trainer_params():                      # a forward during rollouts
        assert torch.equal(model.weight, before[0])
        assert not _resident(next(iter(actor.optimizer.state.values()))["exp_avg"])
    assert not _resident(model.weight)
    engine.calls.clear()
    handoff.to_training(engine)
    assert [c[:2] for c in engine.calls] == [
        barrier, ("release", ("kv_cache", "cuda_graph", "weights")), barrier]
    assert engine.calls[1][2] == {"params": False, "moments": False}  # released before reload
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert _resident(next(iter(actor.optimizer.state.values()))["exp_avg"])


def test_without_colocation_the_hand_off_is_the_weight_sync():
    from masa_megatron.train.handoff import Handoff

    model = torch.nn.Linear(2, 2)
    actor = SimpleNamespace(model_chunks=[model], optimizer=None)
    engine = RecordingEngine((model, SimpleNamespace(state={})))
    handoff = Handoff(colocate=False, offload=True)
    assert handoff.to_training(engine) == {}
    handoff.to_rollout(engine, actor, version=1)
    assert [c[:2] for c in engine.calls] == [("sync", 1)]
    assert _resident(model.weight)


def test_colocation_needs_servers_and_offload_needs_colocation():
    from masa_megatron.config import ConfigError, ExperimentConfig
    from masa_megatron.config_checks import validate_static

    cfg = ExperimentConfig()
    cfg.data.train_files = ["train.jsonl"]
    cfg.rollout.colocate = True                 # the embedded engine (default)
    with pytest.raises(ConfigError, match="'rollout.colocate'.*rollout.engine=sglang"):
        validate_static(cfg)
    cfg.rollout.colocate, cfg.rollout.offload_train_state = False, True
    with pytest.raises(ConfigError, match="'rollout.offload_train_state'.*rollout.colocate"):
        validate_static(cfg)
    cfg.rollout.engine, cfg.rollout.colocate = "sglang", True
    validate_static(cfg)


def test_the_trainers_cached_blocks_go_back_before_the_servers_resume(monkeypatch):
    """Without offload the trainer's tensors stay, but the blocks its allocator cached for the
    update's activations and logits must be returned to the device before SGLang takes its
    memory back (torch.cuda.empty_cache), or the KV pool resumes beside them."""
    from masa_megatron.train.handoff import Handoff

    model = torch.nn.Linear(2, 2)
    actor = SimpleNamespace(model_chunks=[model], optimizer=None)
    engine = RecordingEngine((model, SimpleNamespace(state={})))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: engine.calls.append(
        ("empty_cache", None, None)))
    monkeypatch.setattr("masa_megatron.train.handoff.memory_metrics", lambda phase: {})
    Handoff(colocate=True, offload=False, barrier=lambda: None).to_rollout(engine, actor, 1)
    names = [c[0] for c in engine.calls]
    assert "empty_cache" in names and names.index("empty_cache") < names.index("resume")
