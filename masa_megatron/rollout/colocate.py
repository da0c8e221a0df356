"""Colocated training and rollouts on the same GPUs: moving the trainer's state out of the way.

While SGLang generates, the trainer's parameters, gradients and optimizer state can wait in
pinned host memory (`offload_train_state`) and come back before the next update
(`reload_train_state`). The engine's pause/resume do the same on the server side
(/release_memory_occupation, /resume_memory_occupation).

How: Megatron's DDP keeps parameters and gradients in contiguous buffers
(`ParamAndGradBuffer.param_data` / `.grad_data`) and parameters are views into them, so a buffer's
storage is copied to pinned memory and resized to 0 bytes (the views stay valid), later resized
back and refilled. Gradients are not copied, only freed and re-zeroed: they are zero between
steps, which is when rollouts happen. Parameters outside such buffers have their `.data` swapped.
Optimizer state (Adam moments, the fp32 master copies of Megatron's mixed-precision and
distributed optimizers) is swapped tensor by tensor.

Without CUDA both functions do nothing but log. `memory_metrics(phase)` gives the per-phase
metrics: torch.cuda.memory_allocated / max_memory_allocated (GiB) with CUDA, the process RSS
(psutil) otherwise.
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
    """What `offload_train_state` moved, for `reload_train_state` to put back."""
    buffers: list = field(default_factory=list)     # (tensor, pinned copy or None, nbytes)
    params: list = field(default_factory=list)      # (tensor, device)
    optimizer_state: list = field(default_factory=list)  # (state dict, key, device)
    metrics: dict = field(default_factory=dict)


def _ddp_buffers(model_chunks: list) -> list:
    found = []
    for chunk in model_chunks:
        for attr in ("buffers", "expert_parallel_buffers"):
            value = getattr(chunk, attr, None)
            if isinstance(value, (list, tuple)):
                found += list(value)
    return found


def _torch_optimizers(optimizer: Any) -> list:
    if optimizer is None:
        return []
    chained = getattr(optimizer, "chained_optimizers", None) or [optimizer]
    return [getattr(o, "optimizer", o) for o in chained]


def _pinned(tensor: torch.Tensor) -> torch.Tensor:
    out = torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu", pin_memory=True)
    out.copy_(tensor, non_blocking=True)
    return out


def offload_train_state(model_chunks: Any, optimizer: Any = None) -> OffloadedState:
    """Move CUDA parameters, gradients and optimizer state to pinned host memory."""
    chunks = list(model_chunks) if isinstance(model_chunks, (list, tuple)) else [model_chunks]
    state = OffloadedState()
    if not torch.cuda.is_available():
        log.info("offload_train_state: no CUDA, nothing to move")
        state.metrics = memory_metrics("offloaded")
        return state
    buffers = _ddp_buffers(chunks)
    in_buffers = {t.untyped_storage().data_ptr() for b in buffers
                  for t in (getattr(b, "param_data", None), getattr(b, "grad_data", None))
                  if t is not None}
    for opt in _torch_optimizers(optimizer):
        for per_param in opt.state.values():
            for key, value in per_param.items():
                if torch.is_tensor(value) and value.is_cuda:
                    state.optimizer_state.append((per_param, key, value.device))
                    per_param[key] = _pinned(value)
        for group in opt.param_groups:
            for p in group["params"]:
                if p.is_cuda and p.untyped_storage().data_ptr() not in in_buffers:
                    state.params.append((p, p.device))
                    p.data = _pinned(p.data)
    for chunk in chunks:
        for p in chunk.parameters():
            if p.is_cuda and p.untyped_storage().data_ptr() not in in_buffers:
                state.params.append((p, p.device))
                p.data = _pinned(p.data)
    for buf in buffers:
        for name, keep in (("param_data", True), ("grad_data", False)):
            tensor = getattr(buf, name, None)
            if tensor is None or not tensor.is_cuda:
                continue
            storage = tensor.untyped_storage()
            state.buffers.append((tensor, _pinned(tensor) if keep else None, storage.nbytes()))
    torch.cuda.synchronize()
    for tensor, _, _ in state.buffers:
        tensor.untyped_storage().resize_(0)
    torch.cuda.empty_cache()
    state.metrics = memory_metrics("offloaded")
    return state


def reload_train_state(state: Optional[OffloadedState]) -> dict[str, float]:
    """Put back what `offload_train_state` moved (gradients come back zeroed)."""
    if state is None or not torch.cuda.is_available():
        log.info("reload_train_state: no CUDA, nothing to move")
        return memory_metrics("reloaded")
    for tensor, copy, size in state.buffers:
        tensor.untyped_storage().resize_(size)
        if copy is None:
            tensor.zero_()
        else:
            tensor.copy_(copy, non_blocking=True)
    for p, device in state.params:
        p.data = p.data.to(device, non_blocking=True)
    for per_param, key, device in state.optimizer_state:
        per_param[key] = per_param[key].to(device, non_blocking=True)
    torch.cuda.synchronize()
    state.buffers, state.params, state.optimizer_state = [], [], []
    return memory_metrics("reloaded")
