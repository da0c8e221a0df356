"""Data-parallel flow for engines that live outside the trainer (SGLang).

Under Megatron, the ranks of one model-parallel group (TP x PP x CP) hold one copy of the model
and train on the same data-parallel shard, so they need the same rollouts. Each data-parallel
rank's requests arrive already grouped (the samples of one problem in one request, the requests
of one problem next to each other), and they stay as they are: nothing is split or reordered.

    DP group d:  first rank of its model-parallel group --requests--> engine (HTTP)
                 first rank --broadcast_object_list(results)--> the other TP/PP/CP ranks of d

Every rank of the group calls `generate_in_model_parallel_group` with its own copy of the
requests (only the first rank's are used); all return the same results. Without
torch.distributed or Megatron's groups, it simply calls the engine.
"""
from __future__ import annotations

from typing import Callable, Optional, TypeVar

import torch

R = TypeVar("R")
T = TypeVar("T")


def model_parallel_group() -> tuple[Optional[object], int, bool]:
    """(group, source rank, am I the source) of this rank's model-parallel group; the group is
    None when there is nothing to share (no torch.distributed, no Megatron groups, size 1)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return None, 0, True
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        return None, torch.distributed.get_rank(), True
    if ps.get_context_parallel_world_size() != 1:
        raise NotImplementedError("rollouts from an external engine with context parallelism: "
                                  "the context-parallel ranks of a group would each send")
    group = ps.get_model_parallel_group()
    ranks = torch.distributed.get_process_group_ranks(group)
    source = min(ranks)
    if len(ranks) == 1:
        return None, source, True
    return group, source, torch.distributed.get_rank() == source


def generate_in_model_parallel_group(generate: Callable[[T], R], requests: T) -> R:
    """`generate(requests)` on the group's first rank; its result (or its error) on all ranks."""
    group, source, is_source = model_parallel_group()
    if group is None:
        return generate(requests)
    box: list = [None]
    if is_source:
        try:
            box[0] = ("ok", generate(requests))
        except Exception as err:  # peers must learn of it instead of waiting forever
            box[0] = ("error", _portable(err))
            torch.distributed.broadcast_object_list(box, src=source, group=group)
            raise
    torch.distributed.broadcast_object_list(box, src=source, group=group)
    status, value = box[0]
    if status == "error":
        raise value
    return value


def _portable(err: Exception) -> Exception:
    """`err` if it survives pickling, else a RuntimeError with its text."""
    import pickle

    try:
        pickle.loads(pickle.dumps(err))
        return err
    except Exception:  # unpicklable exception types
        return RuntimeError(f"{type(err).__name__}: {err}")
