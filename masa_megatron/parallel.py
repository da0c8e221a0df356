"""torch.distributed + Megatron parallel_state set-up and tear-down from a `ParallelConfig`.

Backend: nccl when CUDA is available (each rank on device LOCAL_RANK), gloo otherwise (and then
the CPU compatibility layer is applied first). Under torchrun the process group comes from the
environment (`env://`); a plain single process gets a private one-rank group on a free port.

Seeding: every rank seeds the CPU default generator with `seed` (Megatron's CPU weight
initialisation draws the full master weight there and keeps its slice, so TP ranks must agree),
and `model_parallel_cuda_manual_seed(seed)` sets up Megatron's tracker: data-parallel state
`seed`, tensor-parallel state `seed + 2718 + tp_rank`.
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Optional

import torch

from masa_megatron.config import ParallelConfig

_OWNS_PROCESS_GROUP = False


@dataclass(frozen=True)
class ParallelLayout:
    """Where this rank sits. DP = world / (TP * PP * CP)."""
    rank: int
    world_size: int
    tp_rank: int
    tp_size: int
    pp_rank: int
    pp_size: int
    dp_rank: int
    dp_size: int
    cp_size: int

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1


def collective_device() -> torch.device:
    """Where a tensor for a torch.distributed collective must live: this rank's GPU under NCCL
    (the backend with CUDA), the CPU under gloo."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def broadcast_from_rank0(obj):
    """Rank 0's `obj` on every rank (itself when torch.distributed is not running)."""
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _init_process_group(backend: str, timeout_minutes: int) -> None:
    global _OWNS_PROCESS_GROUP
    timeout = timedelta(minutes=timeout_minutes)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        torch.distributed.init_process_group(backend=backend, timeout=timeout)
    else:
        torch.distributed.init_process_group(
            backend=backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1,
            timeout=timeout)
    _OWNS_PROCESS_GROUP = True


def init_parallel(parallel: ParallelConfig, *, seed: int = 1234, timeout_minutes: int = 30,
                  backend: Optional[str] = None) -> ParallelLayout:
    """Initialise torch.distributed (if needed) and Megatron's model-parallel groups. Under
    torchrun the rank ends when its launcher dies (lifecycle.end_with_launcher)."""
    from masa_megatron.compat import apply_cpu_compat
    from masa_megatron.lifecycle import end_with_launcher

    end_with_launcher()

    cuda = torch.cuda.is_available()
    if not cuda:
        apply_cpu_compat()
        if parallel.sequence_parallel:
            raise ValueError("field 'parallel.sequence_parallel' = True: not supported without "
                             "CUDA (Megatron's torch-norm fallback rejects it)")
    from megatron.core import parallel_state, tensor_parallel

    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    if not torch.distributed.is_initialized():
        _init_process_group(backend or ("nccl" if cuda else "gloo"), timeout_minutes)
    world = torch.distributed.get_world_size()
    if parallel.world_size is not None and parallel.world_size != world:
        raise ValueError(f"field 'parallel.world_size' = {parallel.world_size}: the launcher "
                         f"started {world} processes")
    model_parallel = (parallel.tensor_model_parallel_size * parallel.pipeline_model_parallel_size
                      * parallel.context_parallel_size)
    if world % model_parallel:
        raise ValueError(f"field 'parallel.tensor_model_parallel_size' = "
                         f"{parallel.tensor_model_parallel_size}: TP x PP x CP = {model_parallel} "
                         f"does not divide the world size {world}")
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        context_parallel_size=parallel.context_parallel_size,
        distributed_timeout_minutes=timeout_minutes,
    )
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    return current_layout()


def current_layout() -> ParallelLayout:
    """This rank's place in the initialised Megatron layout."""
    from megatron.core import parallel_state as ps

    return ParallelLayout(
        rank=torch.distributed.get_rank(), world_size=torch.distributed.get_world_size(),
        tp_rank=ps.get_tensor_model_parallel_rank(), tp_size=ps.get_tensor_model_parallel_world_size(),
        pp_rank=ps.get_pipeline_model_parallel_rank(),
        pp_size=ps.get_pipeline_model_parallel_world_size(),
        dp_rank=ps.get_data_parallel_rank(), dp_size=ps.get_data_parallel_world_size(),
        cp_size=ps.get_context_parallel_world_size(),
    )


def destroy_parallel() -> None:
    """Tear down Megatron's groups, and the process group if `init_parallel` created it."""
    global _OWNS_PROCESS_GROUP
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if _OWNS_PROCESS_GROUP and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    _OWNS_PROCESS_GROUP = False
