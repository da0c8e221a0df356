"""Colocated training and rollouts on the same GPUs: moving the trainer's state out of the way.

While SGLang generates, the trainer's parameters, gradients and optimizer state wait in host
memory (`offload_train_state`) and come back before the next update (`reload_train_state`).
The server side is SGLangEngine.release/resume (/release_memory_occupation,
/resume_memory_occupation); train/handoff.py drives both in the loop.

How (one code path for every device): the tensors the trainer holds (each parameter, its
`.grad` and Megatron's `.main_grad`, DDP's contiguous `param_data` / `grad_data` buffers, the
optimizer's parameters and state) are collected; each distinct storage they use is copied once
to a host copy (pinned when it lives on CUDA) and resized to 0 bytes, which frees it. Every
collected tensor's `.data` is swapped for an empty tensor of its dtype and device, so a read of
an offloaded tensor fails (a shape error) instead of reading freed memory; the tensor objects
themselves stay, so the optimizer's and DDP's references stay valid. Reload resizes each storage
back, refills it from its host copy (gradient storages are zero-filled instead: they are zero
between steps, which is when rollouts happen) and restores every `.data`: bit-exact.

`params=False` moves everything but the parameters (and storages they share), so the weights
can still be synced to the servers; a second call with `state=` moves the rest. Views nobody
collected (e.g. DDP's per-bucket views) keep pointing at the freed storages and must not be
read until reload.

`memory_metrics(phase)` gives the per-phase metrics: torch.cuda.memory_allocated /
max_memory_allocated (GiB) with CUDA, the process RSS (psutil) otherwise.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

log = logging.getLogger(__name__)
GiB = float(1 << 30)


def memory_metrics(phase: str) -> dict[str, float]:
    """Memory in use now, as metrics named memory/<phase>/...; also logged."""
    if torch.cuda.is_available():
        metrics = {f"memory/{phase}/allocated_gb": torch.cuda.memory_allocated() / GiB,
                   f"memory/{phase}/max_allocated_gb": torch.cuda.max_memory_allocated() / GiB}
    else:
        import psutil

        metrics = {f"memory/{phase}/rss_gb": psutil.Process().memory_info().rss / GiB}
    log.info("memory %s: %s", phase, ", ".join(f"{k.rsplit('/', 1)[1]}={v:.3f}"
                                                for k, v in metrics.items()))
    return metrics


@dataclass
class OffloadedState:
    """What `offload_train_state` moved, one stage per call, for `reload_train_state`."""
    stages: list = field(default_factory=list)  # ([(tensor, original .data)],
    #                                             [(storage, host copy or None = zero, nbytes)])
    owner: tuple = (None, None)                 # (model chunks, optimizer)
    metrics: dict = field(default_factory=dict)

    @property
    def moved_bytes(self) -> int:
        return sum(n for _, storages in self.stages for _, _, n in storages)


def _chunks(model_chunks: Any) -> list:
    return list(model_chunks) if isinstance(model_chunks, (list, tuple)) else [model_chunks]


def _torch_optimizers(optimizer: Any) -> list:
    if optimizer is None:
        return []
    chained = getattr(optimizer, "chained_optimizers", None) or [optimizer]
    return [getattr(o, "optimizer", o) for o in chained]


def _collect(chunks: list, optimizer: Any) -> tuple[list, list, list]:
    """(parameter tensors, gradient tensors, optimizer tensors): every tensor object the trainer
    holds, each once, in a fixed order."""
    params, grads, opt_tensors = [], [], []
    for chunk in chunks:
        for attr in ("buffers", "expert_parallel_buffers"):   # Megatron DDP's (a list)
            value = getattr(chunk, attr, None)
            for buf in value if isinstance(value, (list, tuple)) else []:
                params.append(getattr(buf, "param_data", None))
                grads.append(getattr(buf, "grad_data", None))
    model_params = [p for chunk in chunks for p in chunk.parameters()]
    params += model_params
    grads += [getattr(p, "main_grad", None) for p in model_params]
    grads += [p.grad for p in model_params]
    for opt in _torch_optimizers(optimizer):
        for group in opt.param_groups:
            opt_tensors += group["params"]
            grads += [p.grad for p in group["params"]]
        for per_param in opt.state.values():
            opt_tensors += [v for v in per_param.values() if torch.is_tensor(v)]
    seen: set[int] = set()

    def once(tensors: list) -> list:
        out = []
        for t in tensors:
            if torch.is_tensor(t) and id(t) not in seen:
                seen.add(id(t))
                out.append(t)
        return out
    params = once(params)           # a parameter the optimizer steps directly stays a parameter
    return params, once(opt_tensors), once(grads)


def _key(storage: torch.UntypedStorage) -> int:
    """The storage's identity (stable across resize_, unlike its data pointer)."""
    return storage._cdata


def offload_train_state(model_chunks: Any, optimizer: Any = None, *, params: bool = True,
                        state: Optional[OffloadedState] = None) -> OffloadedState:
    """Move the trainer's tensors to host memory and free their device storage (see the module
    docstring). `params=False`: leave the parameters (and storages they share) in place.
    `state`: add to an earlier call's state (tensors already moved are skipped)."""
    state = state or OffloadedState(owner=(model_chunks, optimizer))
    param_ts, opt_ts, grad_ts = _collect(_chunks(model_chunks), optimizer)
    moved = {id(t) for tensors, _ in state.stages for t, _ in tensors}
    kept = set() if params else {_key(t.untyped_storage()) for t in param_ts}
    saved = {_key(s) for _, storages in state.stages for s, _, _ in storages}
    chosen, new_storages = [], {}
    for tensors, keep_values in ((param_ts if params else [], True), (opt_ts, True),
                                 (grad_ts, False)):
        for t in tensors:
            storage = t.untyped_storage()
            key = _key(storage)
            if id(t) in moved or key in kept or (storage.nbytes() == 0 and key not in saved):
                continue
            chosen.append(t)
            if key in saved:
                continue
            old = new_storages.get(key)
            new_storages[key] = (storage, keep_values or (old is not None and old[1]))
    stage: tuple = ([], [])
    state.stages.append(stage)
    for storage, keep_values in new_storages.values():
        host = None
        if keep_values:
            host = torch.UntypedStorage(storage.nbytes(), device="cpu")
            if storage.device.type == "cuda":
                host = host.pin_memory()
            host.copy_(storage, non_blocking=True)
        stage[1].append((storage, host, storage.nbytes()))
    if torch.cuda.is_available():
        torch.cuda.synchronize()               # host copies complete before the storage goes
    for t in chosen:
        stage[0].append((t, t.data))
        t.data = torch.empty(0, dtype=t.dtype, device=t.device)
    for storage, _ in new_storages.values():
        storage.resize_(0)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()               # give the freed blocks back for SGLang
    log.info("offload_train_state: %d tensors, %.3f GiB in %d storages freed", len(chosen),
             state.moved_bytes / GiB, sum(len(st) for _, st in state.stages))
    state.metrics = memory_metrics("offloaded")
    return state


def reload_train_state(state: Optional[OffloadedState], last: bool = False) -> dict[str, float]:
    """Put back what `offload_train_state` moved (`last`: only its latest call's stage): values
    bit-exact, gradients zeroed."""
    stages = [] if state is None else state.stages[-1:] if last else state.stages
    for tensors, storages in reversed(stages):
        for storage, host, nbytes in storages:
            storage.resize_(nbytes)
            if host is None:
                storage.fill_(0)
            else:
                storage.copy_(host, non_blocking=True)
        for tensor, data in reversed(tensors):
            tensor.data = data
    if torch.cuda.is_available():
        torch.cuda.synchronize()               # the host copies may go once the copies landed
    if state is not None:
        del state.stages[len(state.stages) - len(stages):]
    return memory_metrics("reloaded")
