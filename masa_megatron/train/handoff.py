"""The hand-off between rollouts and training, in one place; the loop calls it at named points.

Colocated servers (rollout.colocate: SGLang on the trainer's GPUs) share the GPU memory with the
trainer, so each side gives it back before the other takes it:

    start-up     servers start (before the trainer allocates: SGLang sizes its KV cache from the
                 memory free at its start) -> `start`: release [weights, kv_cache, cuda_graph]
                 -> trainer builds (and loads a checkpoint) -> `to_rollout`
    to_rollout   [offload optimizer state + gradients] -> resume [weights] -> weight sync from
                 the trainer's parameters -> [offload parameters] -> resume [kv_cache,
                 cuda_graph]; then in-loop eval and the next generation use the servers
    to_training  after generation (every rank's requests answered: servers idle) -> release
                 [kv_cache, cuda_graph, weights] -> [reload trainer state]; then old
                 log-probs, update, head fit, behaviour cloning, checkpoint if due

Bracketed steps happen with rollout.offload_train_state (rollout/colocate.py). Every server
transition (rank 0 sends it) sits between two barriers over all ranks on a gloo group (CPU,
never NCCL: no collective spins on the GPUs SGLang is using): no rank releases a server another
rank still uses, and no rank syncs or generates before the memory it needs is resumed.

The memory of each phase is returned as memory/<phase>/... metrics: rollout_done,
server_released, trainer_reloaded (to_training); trained, optimizer_offloaded, weights_synced,
params_offloaded, rollout_ready (to_rollout); at start-up start_servers_released and
start_<phase>, reported with the first step.

Without colocation `to_training` does nothing and `to_rollout` is the weight sync.
`trainer_params()` brings offloaded parameters back for a forward pass during rollouts (the
meta-head's prompt states) and moves them out again.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Optional

import torch

from masa_megatron.rollout.colocate import (memory_metrics, offload_train_state,
                                            reload_train_state)

ALL_MEMORY = ("kv_cache", "cuda_graph", "weights")   # SGLang's GPU memory types
ROLLOUT_MEMORY = ("kv_cache", "cuda_graph")          # what generation needs beside the weights


def release_cached_blocks() -> None:
    """Give the blocks torch's CUDA allocator keeps cached back to the device (a no-op on CPU),
    so that SGLang resumes its memory beside the trainer's live tensors only."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def gloo_barrier() -> Callable[[], None]:
    """A barrier over every rank on a gloo group (a collective to create: call on all ranks);
    a no-op without torch.distributed."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return lambda: None
    group = dist.new_group(backend="gloo")
    return lambda: dist.barrier(group=group)


class Handoff:
    """Who holds the GPU memory: the servers or the trainer (see the module docstring)."""

    def __init__(self, *, colocate: bool, offload: bool,
                 barrier: Callable[[], None] = lambda: None):
        self.colocate, self.offload, self.barrier = colocate, offload and colocate, barrier
        self.offloaded = None                  # colocate.OffloadedState while on the host
        self.pending: dict[str, float] = {}    # start-up metrics, reported with the first step

    @classmethod
    def from_config(cls, cfg: Any) -> "Handoff":
        colocate = cfg.rollout.colocate
        return cls(colocate=colocate, offload=cfg.rollout.offload_train_state,
                   barrier=gloo_barrier() if colocate else (lambda: None))

    def _phase(self, metrics: dict, phase: str) -> None:
        metrics.update(memory_metrics(phase))

    def _on_servers(self, change: Callable[[], None]) -> None:
        """A server transition (rank 0 sends it) between two barriers: no rank changes the
        servers' state while another still uses it, none goes on before the change is done."""
        self.barrier()
        change()
        self.barrier()

    def start(self, engine: Any) -> None:
        """Servers just started, the trainer has nothing yet: they give their memory back."""
        if self.colocate:
            self._on_servers(lambda: engine.release(ALL_MEMORY))
            self._phase(self.pending, "start_servers_released")

    def to_training(self, engine: Any) -> dict[str, float]:
        """Generation is over on every rank: the servers release, the trainer's state returns."""
        metrics, self.pending = self.pending, {}
        if not self.colocate:
            return metrics
        started = time.perf_counter()
        self._phase(metrics, "rollout_done")
        self._on_servers(lambda: engine.release(ALL_MEMORY))   # every rank's requests answered
        self._phase(metrics, "server_released")
        if self.offloaded is not None:
            reload_train_state(self.offloaded)
            self.offloaded = None
            self._phase(metrics, "trainer_reloaded")
        metrics["time/handoff_to_training"] = time.perf_counter() - started
        return metrics

    def to_rollout(self, engine: Any, actor: Any, version: int,
                   at_start: bool = False) -> dict[str, float]:
        """The update (and checkpoint) is done: the servers take the new weights and their
        memory back; the trainer's state leaves the GPU first where offloading is on.
        `at_start`: the trainer was just built; the metrics wait for the first step's
        (memory/start_<phase>/...)."""
        metrics, started = {}, time.perf_counter()
        if self.colocate:
            self._phase(metrics, "trained")
            if self.offload:
                self.offloaded = offload_train_state(actor.model_chunks, actor.optimizer,
                                                     params=False)
                self._phase(metrics, "optimizer_offloaded")
            release_cached_blocks()   # the update's activations and logits, kept by the allocator
            self._on_servers(lambda: engine.resume(["weights"]))
        sync_started = time.perf_counter()
        engine.update_weights(actor.model_chunks, version=version)
        metrics["time/weight_sync"] = time.perf_counter() - sync_started
        if self.colocate:
            self._phase(metrics, "weights_synced")
            if self.offload:
                offload_train_state(actor.model_chunks, actor.optimizer, state=self.offloaded)
                self._phase(metrics, "params_offloaded")
            # the first barrier: every rank has sent its shards
            self._on_servers(lambda: engine.resume(list(ROLLOUT_MEMORY)))
            self._phase(metrics, "rollout_ready")
        metrics["time/handoff_to_rollout"] = (time.perf_counter() - started
                                              - metrics["time/weight_sync"])
        if at_start:
            self.pending.update({k.replace("memory/", "memory/start_", 1): v
                                 for k, v in metrics.items() if k.startswith("memory/")})
        return metrics

    @contextmanager
    def trainer_params(self) -> Iterator[None]:
        """The trainer's parameters on the device for the duration (a forward pass while the
        servers hold their memory); offloaded again afterwards."""
        state = self.offloaded
        if state is None:
            yield
            return
        reload_train_state(state, last=True)
        try:
            yield
        finally:
            chunks, optimizer = state.owner
            offload_train_state(chunks, optimizer, state=state)

    def wrap(self, fn: Optional[Callable]) -> Optional[Callable]:
        """`fn` run inside `trainer_params()` (None stays None)."""
        if fn is None:
            return None

        def call(*args, **kwargs):
            with self.trainer_params():
                return fn(*args, **kwargs)
        return call
