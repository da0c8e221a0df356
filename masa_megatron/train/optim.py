"""Megatron DDP, optimizer and learning-rate schedule for the actor.

- `wrap_ddp`: Megatron `DistributedDataParallel` around each model chunk. Gradients accumulate
  in a contiguous fp32 buffer (`param.main_grad`) across micro-batches and are reduced over the
  data-parallel group once per step, inside the schedule's `finalize_model_grads`. By default
  Megatron scales them by 1/DP before summing, i.e. it AVERAGES gradients over DP ranks; the
  actor multiplies its losses by DP to turn that into a sum (see actor.py).
- `build_optimizer`: `get_megatron_optimizer` (Adam with decoupled weight decay = AdamW, or SGD)
  with gradient clipping by global norm (`clip_grad`, over all TP/PP shards), fp32 master
  weights for bf16/fp16 parameters, and the distributed optimizer (states sharded over DP) when
  `parallel.use_distributed_optimizer` (at any DP, see `uses_distributed_optimizer`). Biases
  and 1-D parameters (norms) get no weight decay (Megatron's standard override). Megatron's
  distributed optimizer supports Adam only: SGD runs the regular optimizer.
- `save_train_state` / `load_train_state`: model + optimizer (+ LR schedule) through Megatron's
  dist_checkpointing, reshardable to any TP/PP/DP (see OPTIMIZER_CHECKPOINT_FORMAT), with the
  work-arounds megatron-core 0.16.1 needs (see prepare_optimizer_for_load).
- The learning rate at optimizer step k (k = 0, 1, ...) is that of scheduler position k + 1:

      warm-up (k + 1 <= W):  lr_k = lr * (k + 1) / W
      constant           :  lr_k = lr
      cosine             :  lr_k = min_lr + (lr - min_lr) * (1 + cos(pi * (k + 1 - W) / (S - W))) / 2

  with W = warmup_steps and S = total_steps (optimizer steps; after S the rate stays min_lr).
  The actor advances the scheduler right before each optimizer step and takes it back when the
  step is skipped, so a skipped (non-finite) step does not consume the schedule.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from masa_megatron.config import OptimizerConfig, ParallelConfig

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# The distributed optimizer's state in the canonical per-parameter layout (gathered on DP rank 0
# when saving), loadable at any TP/PP/DP. 0.16.1's default ("fully_sharded_model_space") fails
# with "ShardedTensor.flattened_range is not supported".
OPTIMIZER_CHECKPOINT_FORMAT = {"distrib_optim_sharding_type": "fully_reshardable",
                               "chained_optim_avoid_prefix": True}


def _torch_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"dtype={dtype!r}: must be one of {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def uses_distributed_optimizer(parallel_cfg: ParallelConfig, optimizer_name: str) -> bool:
    """parallel.use_distributed_optimizer and Adam (Megatron shards only Adam states).

    Independent of DP on purpose: at DP = 1 it holds the whole state, and its checkpoints keep
    one format, so a run can resume at another DP (0.16.1 cannot load a distributed-optimizer
    checkpoint into the regular optimizer or the reverse)."""
    return bool(parallel_cfg.use_distributed_optimizer) and optimizer_name == "adam"


def wrap_ddp(model_chunks: Sequence[torch.nn.Module], parallel_cfg: ParallelConfig,
             optimizer_name: str = "adam") -> list:
    """Megatron DDP around each chunk (already DDP-wrapped chunks are returned as they are).

    The gradient buffers are laid out for the distributed optimizer when
    `uses_distributed_optimizer(parallel_cfg, optimizer_name)`; `build_optimizer` follows that
    choice. Replicas are made identical by broadcasting parameters from data-parallel rank 0."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=uses_distributed_optimizer(parallel_cfg, optimizer_name),
    )
    wrapped = []
    for i, chunk in enumerate(model_chunks):
        if isinstance(chunk, DistributedDataParallel):
            wrapped.append(chunk)
            continue
        ddp = DistributedDataParallel(config=chunk.config, ddp_config=ddp_config, module=chunk,
                                      disable_bucketing=i > 0)
        ddp.broadcast_params()
        wrapped.append(ddp)
    return wrapped


def megatron_optimizer_config(opt_cfg: OptimizerConfig, dtype: str | torch.dtype,
                              use_distributed_optimizer: bool = False):
    """Our OptimizerConfig -> megatron.core.optimizer.OptimizerConfig."""
    from megatron.core.optimizer import OptimizerConfig as MegatronOptimizerConfig

    dtype = _torch_dtype(dtype)
    return MegatronOptimizerConfig(
        optimizer=opt_cfg.name,
        lr=opt_cfg.lr,
        min_lr=opt_cfg.min_lr,
        weight_decay=opt_cfg.weight_decay,
        adam_beta1=opt_cfg.adam_beta1,
        adam_beta2=opt_cfg.adam_beta2,
        adam_eps=opt_cfg.adam_eps,
        clip_grad=opt_cfg.clip_grad,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        use_distributed_optimizer=use_distributed_optimizer,
    )


def build_scheduler(optimizer, opt_cfg: OptimizerConfig, total_steps: int):
    """OptimizerParamScheduler implementing the schedule of the module docstring."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    warmup = max(int(opt_cfg.warmup_steps), 0)
    decay_steps = max(int(total_steps), warmup + 1)
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if warmup > 0 else opt_cfg.lr,
        max_lr=opt_cfg.lr,
        min_lr=opt_cfg.min_lr,
        lr_warmup_steps=warmup,
        lr_decay_steps=decay_steps,
        lr_decay_style=opt_cfg.schedule,
        start_wd=opt_cfg.weight_decay,
        end_wd=opt_cfg.weight_decay,
        wd_incr_steps=decay_steps,
        wd_incr_style="constant",
        # on resume the config's rates win; only the step count comes from the checkpoint
        use_checkpoint_opt_param_scheduler=False,
        override_opt_param_scheduler=True,
    )


def build_optimizer(model_chunks: Sequence[torch.nn.Module], opt_cfg: OptimizerConfig,
                    parallel_cfg: ParallelConfig, dtype: str | torch.dtype = "fp32",
                    total_steps: int = 1):
    """(optimizer, scheduler) for chunks wrapped by `wrap_ddp` (the distributed optimizer is
    used exactly when their gradient buffers were laid out for it).

    `total_steps` is the number of optimizer steps of the run (RL steps x mini-batches x PPO
    epochs): the length of the cosine decay; ignored by the constant schedule."""
    from megatron.core.distributed import DistributedDataParallel
    from megatron.core.optimizer import get_megatron_optimizer

    if not all(isinstance(c, DistributedDataParallel) for c in model_chunks):
        raise TypeError("build_optimizer needs DDP-wrapped model chunks: call wrap_ddp first")
    distributed = model_chunks[0].ddp_config.use_distributed_optimizer
    if distributed != uses_distributed_optimizer(parallel_cfg, opt_cfg.name):
        raise ValueError(f"the chunks were wrapped {'with' if distributed else 'without'} the "
                         f"distributed optimizer's buffers, but optimizer.name={opt_cfg.name!r} "
                         f"and parallel.use_distributed_optimizer="
                         f"{parallel_cfg.use_distributed_optimizer} ask otherwise: pass "
                         f"optimizer_name=opt_cfg.name to wrap_ddp")
    optimizer = get_megatron_optimizer(
        megatron_optimizer_config(opt_cfg, dtype, distributed), list(model_chunks))
    for sub in getattr(optimizer, "chained_optimizers", [optimizer]):
        if getattr(sub, "init_state_fn", None) is None:
            sub.init_state_fn = _init_sgd_state  # Megatron 0.16 has none for SGD: loading fails
    return optimizer, build_scheduler(optimizer, opt_cfg, total_steps)


def _init_sgd_state(optimizer: torch.optim.Optimizer, config=None) -> None:
    """Zero momentum buffers where there are none (what dist_checkpointing loads into). Same
    update as torch's lazy start: buf = momentum * 0 + g = g on the first step."""
    for group in optimizer.param_groups:
        if not group.get("momentum", 0):
            continue
        for p in group["params"]:
            if len(optimizer.state[p]) == 0:
                optimizer.state[p]["momentum_buffer"] = torch.zeros_like(p.data)


def check_checkpoint_optimizer(optimizer, folder: str) -> None:
    """Raise a clear error when the checkpoint's optimizer kind (distributed or regular) is not
    this optimizer's: megatron-core 0.16.1 cannot convert between the two formats."""
    from megatron.core import dist_checkpointing
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    saved = dist_checkpointing.load_common_state_dict(str(folder)).get("optimizer", {})
    saved_distributed = isinstance(saved, dict) and "param_state_sharding_type" in saved
    distributed = any(isinstance(sub, DistributedOptimizer)
                      for sub in getattr(optimizer, "chained_optimizers", [optimizer]))
    if saved_distributed != distributed:
        kind = {True: "the distributed optimizer", False: "the regular optimizer"}
        raise ValueError(f"checkpoint {folder} holds the state of {kind[saved_distributed]}, this "
                         f"run uses {kind[distributed]}: set parallel.use_distributed_optimizer="
                         f"{str(saved_distributed).lower()} (and optimizer.name as saved) to resume")


def prepare_optimizer_for_load(optimizer) -> None:
    """Make `optimizer` ready to receive a dist_checkpointing load (call before building the
    sharded state dict with is_loading=True).

    Regular optimizers: states are dropped (the load replaces them). Megatron 0.16.1's
    distributed optimizer on torch's Adam (no Transformer Engine / apex, e.g. on CPU) cannot load
    at all as shipped: `state_dict()` needs a "step" in every parameter state, which a fresh
    optimizer lacks, and once present the state setter fails on that "step" key (absent from the
    checkpointed tensors). Here the states are created with step 0 and the setter keeps the keys
    the checkpoint does not carry (the loaded step is set from the param groups); Megatron also
    gives every parameter state the SAME step tensor, which torch's Adam then increments once per
    parameter per step: each state gets its own copy here.
    """
    from megatron.core.optimizer import distrib_optimizer as dopt

    for sub in getattr(optimizer, "chained_optimizers", [optimizer]):
        if not isinstance(sub, dopt.DistributedOptimizer):
            sub.optimizer.state.clear()
            continue
        if dopt.HAVE_APEX_OR_TE:
            continue
        sub.init_state_fn(sub.optimizer, sub.config)
        for state in sub.optimizer.state.values():
            state.setdefault("step", torch.zeros((), dtype=torch.float32))
        if not getattr(sub, "_keeps_unsaved_state_keys", False):
            def set_states(model_param, tensors, sub=sub,
                           original=sub._set_main_param_and_optimizer_states):
                group, order = sub.model_param_group_index_map[model_param]
                state = sub.optimizer.state[sub.optimizer.param_groups[group]["params"][order]]
                if "step" in state:
                    state["step"] = state["step"].clone()
                current = sub._get_main_param_and_optimizer_states(model_param)
                original(model_param, {**current, **tensors})
            sub._set_main_param_and_optimizer_states = set_states
            sub._keeps_unsaved_state_keys = True


def unwrap_model(chunk: torch.nn.Module) -> torch.nn.Module:
    """The GPTModel inside DDP / Float16Module wrappers."""
    while hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk


def model_sharded_state_dict(model_chunks: Sequence[torch.nn.Module]) -> dict:
    """{"model": ...} (one chunk) or {"model0": ..., "model1": ...}, Megatron's naming."""
    chunks = [unwrap_model(c) for c in model_chunks]
    if len(chunks) == 1:
        return {"model": chunks[0].sharded_state_dict()}
    return {f"model{i}": c.sharded_state_dict() for i, c in enumerate(chunks)}


def train_sharded_state_dict(model_chunks, optimizer, scheduler, is_loading: bool = False) -> dict:
    """Model + optimizer sharded state for dist_checkpointing, and the scheduler's plain state
    (saved as common state)."""
    state = model_sharded_state_dict(model_chunks)
    state["optimizer"] = optimizer.sharded_state_dict(
        state, is_loading=is_loading, metadata=OPTIMIZER_CHECKPOINT_FORMAT)
    state["scheduler"] = scheduler.state_dict()
    return state


def save_train_state(folder: str | Path, model_chunks, optimizer, scheduler) -> None:
    """Collective. The calling script needs an `if __name__ == "__main__":` guard (saving
    starts a multiprocessing helper that re-imports __main__)."""
    from megatron.core import dist_checkpointing

    Path(folder).mkdir(parents=True, exist_ok=True)
    dist_checkpointing.save(train_sharded_state_dict(model_chunks, optimizer, scheduler),
                            str(folder))


def load_train_state(folder: str | Path, model_chunks, optimizer, scheduler) -> None:
    """Collective; `folder` may come from another TP/PP/DP layout (same optimizer kind)."""
    from megatron.core import dist_checkpointing

    check_checkpoint_optimizer(optimizer, str(folder))
    prepare_optimizer_for_load(optimizer)
    loaded = dist_checkpointing.load(
        train_sharded_state_dict(model_chunks, optimizer, scheduler, is_loading=True), str(folder))
    chunks = [unwrap_model(c) for c in model_chunks]
    for i, chunk in enumerate(chunks):
        chunk.load_state_dict(loaded["model" if len(chunks) == 1 else f"model{i}"])
    optimizer.load_state_dict(loaded["optimizer"])
    scheduler.num_steps = 0  # Megatron's load adds the saved count to the current one
    scheduler.load_state_dict(loaded["scheduler"])
