"""torch.distributed + Megatron parallel_state set-up and tear-down from a `ParallelConfig`.

Backend: nccl when CUDA is available (each rank on device LOCAL_RANK), gloo otherwise (and then
the CPU compatibility layer is applied first). Under torchrun the process group comes from the
environment (`env://`); a plain single process gets a private one-rank group on a free port.

CPU groups: beside Megatron's groups, every model-parallel group (TP x PP) gets a gloo twin
(`model_parallel_source`). Work that one rank of the group does for all of them (sending
rollouts to SGLang, grading) is awaited there by its peers, so a peer blocks a CPU thread on a
socket, never a GPU in an NCCL collective (NCCL's 30-minute timeout, a spinning kernel on a GPU
that SGLang decodes on), and the result comes as CPU tensors (`run_on_model_parallel_source`).

Seeding: every rank seeds the CPU default generator with `seed` (Megatron's CPU weight
initialisation draws the full master weight there and keeps its slice, so TP ranks must agree),
and `model_parallel_cuda_manual_seed(seed)` sets up Megatron's tracker: data-parallel state
`seed`, tensor-parallel state `seed + 2718 + tp_rank`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable, Optional, TypeVar

import torch

from masa_megatron.config import ParallelConfig
from masa_megatron.errors import UserError

T = TypeVar("T")
_OWNS_PROCESS_GROUP = False
_MODEL_PARALLEL_CPU_GROUP = None
# Peers wait on the CPU group for a whole generation; a failing source reports its error there,
# and torchrun stops every rank when one dies, so this only bounds a source that hangs.
CPU_GROUP_TIMEOUT = timedelta(hours=6)
_SEQUENCE_PARALLEL = False


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


def _init_process_group(backend: str, timeout_minutes: int) -> None:
    global _OWNS_PROCESS_GROUP
    timeout = timedelta(minutes=timeout_minutes)
    if int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")) > 0 and \
            os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        # the agent keeps its store, and this attempt's keys, for the next attempt, whose ranks
        # would read them as their peers' (recipes/launch.py RESTART_ENV)
        raise UserError("torchrun --max-restarts with its shared rendezvous store: a restarted "
                        "rank would join peers of the failed attempt; start torchrun with "
                        "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (python -m recipes.launch does)")
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        torch.distributed.init_process_group(backend=backend, timeout=timeout)
    else:
        # one process: an in-memory store, no port (one picked here could be a sibling
        # server's, picked by another process of the same launch and not bound yet)
        torch.distributed.init_process_group(
            backend=backend, store=torch.distributed.HashStore(), rank=0, world_size=1,
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
    _create_model_parallel_cpu_groups()
    global _SEQUENCE_PARALLEL
    _SEQUENCE_PARALLEL = bool(parallel.sequence_parallel)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    return current_layout()


def _create_model_parallel_cpu_groups() -> None:
    """A gloo group over the ranks of each of Megatron's model-parallel groups (collective:
    every rank creates every group, in the same order); keeps this rank's."""
    global _MODEL_PARALLEL_CPU_GROUP
    from megatron.core import parallel_state as ps

    dist = torch.distributed
    _MODEL_PARALLEL_CPU_GROUP = None
    mine = torch.tensor(dist.get_process_group_ranks(ps.get_model_parallel_group()),
                        device=collective_device())
    if len(mine) == 1:
        return
    everyone = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(everyone, mine)
    for ranks in sorted({tuple(r.tolist()) for r in everyone}):
        group = dist.new_group(list(ranks), backend="gloo", timeout=CPU_GROUP_TIMEOUT)
        if dist.get_rank() in ranks:
            _MODEL_PARALLEL_CPU_GROUP = group


def model_parallel_source() -> tuple[Optional[object], int, bool]:
    """(the gloo twin of this rank's model-parallel group, its first rank, am I that rank); the
    group is None when there is nothing to share (no torch.distributed or Megatron groups, or a
    group of one)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return None, 0, True
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        return None, torch.distributed.get_rank(), True
    if ps.get_context_parallel_world_size() != 1:
        raise NotImplementedError("work shared in a model-parallel group with context "
                                  "parallelism: the context-parallel ranks would each do it")
    group = _MODEL_PARALLEL_CPU_GROUP
    if group is None:
        if ps.get_model_parallel_group().size() > 1:
            raise RuntimeError("Megatron's model-parallel groups were set up without their CPU "
                               "twins: initialise with masa_megatron.parallel.init_parallel")
        return None, torch.distributed.get_rank(), True
    source = min(torch.distributed.get_process_group_ranks(group))
    return group, source, torch.distributed.get_rank() == source


def run_on_model_parallel_source(compute: Callable[[], T], encode: Callable[[T], list],
                                 decode: Callable[[list], T]) -> T:
    """`compute()` on the first rank of this rank's model-parallel group only; its value (or its
    exception) on every rank of the group. Peers wait on the group's gloo twin; the value travels
    as the 1-D CPU tensors `encode(value)` and peers return `decode(tensors)`, which must equal
    it. Every rank of the group calls this together."""
    group, source, is_source = model_parallel_source()
    if group is None:
        return compute()
    if is_source:
        error = None
        try:
            value = compute()
            tensors = encode(value)
            header = _header(False, tensors)
        except Exception as err:  # peers must learn of it instead of waiting forever
            error, tensors = err, [_pickled(err)]
            header = _header(True, tensors)
        for t in [header, *tensors]:
            if t.numel():
                torch.distributed.broadcast(t.contiguous().view(-1), src=source, group=group)
        if error is not None:
            raise error
        return value
    failed, tensors = _receive(source, group)
    if failed:
        import pickle

        raise pickle.loads(tensors[0].numpy().tobytes())
    return decode(tensors)


def all_gather_rows(rows: torch.Tensor, group) -> torch.Tensor:
    """Every rank's `rows` [n_r, ...] (n_r may differ), concatenated in the group's rank order,
    on every rank of `group` (on rows' device)."""
    dist, device = torch.distributed, collective_device()
    size = dist.get_world_size(group)
    counts = torch.tensor([rows.shape[0]], device=device)
    every_count = [torch.empty_like(counts) for _ in range(size)]
    dist.all_gather(every_count, counts, group=group)
    counts = [int(c) for c in every_count]
    if not max(counts):
        return rows
    padded = rows.new_zeros((max(counts), *rows.shape[1:]), device=device)
    padded[:rows.shape[0]] = rows
    gathered = [torch.empty_like(padded) for _ in range(size)]
    dist.all_gather(gathered, padded, group=group)
    return torch.cat([g[:n] for g, n in zip(gathered, counts)]).to(rows.device)


_DTYPES = (torch.int64, torch.float64, torch.float32, torch.uint8)
_MAX_TENSORS = 8


def _header(failed: bool, tensors: list) -> torch.Tensor:
    """[failed, count, (dtype index, numel) x _MAX_TENSORS]: what peers allocate to receive."""
    if len(tensors) > _MAX_TENSORS:
        raise ValueError(f"{len(tensors)} tensors to send: at most {_MAX_TENSORS}")
    header = torch.zeros(2 + 2 * _MAX_TENSORS, dtype=torch.int64)
    header[0], header[1] = int(failed), len(tensors)
    for i, t in enumerate(tensors):
        header[2 + 2 * i], header[3 + 2 * i] = _DTYPES.index(t.dtype), t.numel()
    return header


def _receive(source: int, group) -> tuple[bool, list]:
    header = torch.empty(2 + 2 * _MAX_TENSORS, dtype=torch.int64)
    torch.distributed.broadcast(header, src=source, group=group)
    tensors = []
    for i in range(int(header[1])):
        t = torch.empty(int(header[3 + 2 * i]), dtype=_DTYPES[int(header[2 + 2 * i])])
        if t.numel():
            torch.distributed.broadcast(t, src=source, group=group)
        tensors.append(t)
    return bool(header[0]), tensors


def _pickled(err: Exception) -> torch.Tensor:
    """`err` pickled into a uint8 tensor (a RuntimeError with its text if it does not pickle)."""
    import pickle

    try:
        data = pickle.dumps(err)
        pickle.loads(data)
    except Exception:  # unpicklable exception types
        data = pickle.dumps(RuntimeError(f"{type(err).__name__}: {err}"))
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).clone()


def sequence_parallel_enabled() -> bool:
    """parallel.sequence_parallel of the layout `init_parallel` set up (Megatron's parallel_state
    does not keep it); the model builder reads it with the TP/PP/CP sizes."""
    return _SEQUENCE_PARALLEL


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
    global _OWNS_PROCESS_GROUP, _MODEL_PARALLEL_CPU_GROUP, _SEQUENCE_PARALLEL
    from megatron.core import parallel_state

    _SEQUENCE_PARALLEL = False
    parallel_state.destroy_model_parallel()
    _MODEL_PARALLEL_CPU_GROUP = None
    if _OWNS_PROCESS_GROUP and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    _OWNS_PROCESS_GROUP = False
