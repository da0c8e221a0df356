"""The stand-in server's weights as SGLang's TP ranks hold them, and how updates reach them.

SGLang runs one scheduler process per TP rank; weight updates reach each rank separately, and
each rank loads full HF tensors, slicing its own shard (python/sglang/srt/managers/tp_worker.py,
scheduler_components/weight_updater.py, model_executor/model_runner_components/weight_updater.py
at the pinned version):
- /update_weights_from_tensor: rank r deserializes entry r of `serialized_named_tensors` (from
  the trainer rank on its GPU, s*tp + r in the colocated layout) and only that entry;
- /init_weights_update_group: every rank joins the group at rank `rank_offset + r` with
  `init_custom_process_group` (torch's `rendezvous` on the tcp:// address, PrefixStore(group
  name)); /update_weights_from_distributed: every rank receives every broadcast from rank 0;
- /update_weights_from_disk: every rank loads the folder.

Here rank 0 is the backend's Megatron model (it serves generation) and ranks 1..tp-1 are threads
holding the full HF tensors they received, so a test can prove that every rank got every tensor:
`checksums()` is one hash per rank over all its HF tensors, comparable with `hf_checksum` of the
trainer's export. Released weights are poisoned (NaN) and counted stale until a sync rewrites
them, so generating after a resume without a sync is detected.
"""
from __future__ import annotations

import hashlib
import threading
from pathlib import Path
from typing import Any, Callable, Optional

import torch


class SchedulerCrash(RuntimeError):
    """What kills SGLang's scheduler (an uncaught error in a TP rank): the server goes down."""


def hf_checksum(named: dict) -> str:
    """sha256 over name, dtype, shape and bytes of every tensor, in name order."""
    digest = hashlib.sha256()
    for name in sorted(named):
        tensor = named[name].detach().contiguous().cpu()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def load_hf_folder(folder: str) -> dict:
    """Every tensor of an HF folder's safetensors files (empty without any)."""
    from safetensors.torch import load_file

    named: dict = {}
    for path in sorted(Path(folder).glob("*.safetensors")):
        named.update(load_file(str(path)))
    return named


class _ThreadRankGroup:
    """One rank's gloo group for a TP rank that is a thread: torch registers one process group
    per name and process, so ranks 1.. build theirs by hand, on the very store keys that
    torch's helper uses for SGLang's group (PrefixStore(name), then "name/" and "cpu/")."""

    def __init__(self, store, rank: int, world_size: int, group_name: str, timeout):
        from torch.distributed.distributed_c10d import PrefixStore, ProcessGroupGloo

        keys = PrefixStore("cpu/", PrefixStore(f"{group_name}/", store))
        self.backend = ProcessGroupGloo(keys, rank, world_size, timeout=timeout)

    def broadcast(self, tensor, async_op: bool = False):
        opts = torch.distributed.BroadcastOptions()
        opts.rootRank, opts.rootTensor = 0, 0
        work = self.backend.broadcast([tensor], opts)
        return work if async_op else work.wait()

    def destroy(self) -> None:
        self.backend = None


def join_update_group(*, backend: str, master_address: str, master_port: int, rank: int,
                      world_size: int, group_name: str, thread_rank: bool = False):
    """Join the weight-update group as SGLang's init_custom_process_group does (utils/common.py):
    rendezvous over tcp://, keys under PrefixStore(group_name), a group outside the default one.
    Written here independently of the trainer's side (rollout/weight_sync/broadcast.py)."""
    from datetime import timedelta

    from torch.distributed.distributed_c10d import (Backend, PrefixStore,
                                                    _new_process_group_helper, _world, rendezvous)

    timeout = timedelta(minutes=10)
    store, rank, world_size = next(rendezvous(f"tcp://{master_address}:{master_port}", rank,
                                              world_size, timeout=timeout))
    store.set_timeout(timeout)
    store = PrefixStore(group_name, store)
    if thread_rank:
        if backend != "gloo":
            raise ValueError(f"stand-in TP ranks > 0 are threads and join over gloo only "
                             f"(got backend {backend!r})")
        return _ThreadRankGroup(store, rank, world_size, group_name, timeout)
    group, _ = _new_process_group_helper(world_size, rank, [], Backend(backend), store,
                                         group_name=group_name, timeout=timeout,
                                         backend_options=None)
    _world.pg_group_ranks[group] = {i: i for i in range(world_size)}
    return group


def _broadcast(group, tensor, async_op: bool = False):
    if isinstance(group, _ThreadRankGroup):
        return group.broadcast(tensor, async_op)
    return torch.distributed.broadcast(tensor, src=0, group=group, async_op=async_op)


def receive_bucket(group, names: list, dtypes: list, shapes: list,
                   load_format: Optional[str]) -> list:
    """One /update_weights_from_distributed on one rank: per tensor, all posted then awaited
    (ModelRunner), or one flattened tensor viewed apart in order (FlattenedTensorBucket)."""
    tensors = [torch.empty(s, dtype=getattr(torch, d)) for s, d in zip(shapes, dtypes)]
    if load_format == "flattened_bucket":
        if len({t.dtype for t in tensors}) > 1:
            raise ValueError("a flattened bucket holds one dtype")
        flat = torch.empty(sum(t.numel() for t in tensors), dtype=tensors[0].dtype)
        _broadcast(group, flat)
        views, start = [], 0
        for tensor in tensors:
            views.append(flat[start:start + tensor.numel()].view(tensor.shape))
            start += tensor.numel()
        tensors = views
    elif load_format is None:
        works = [_broadcast(group, t, async_op=True) for t in tensors]
        for work in works:
            work.wait()
    else:
        raise ValueError(f"unsupported load_format {load_format!r}")
    return list(zip(names, tensors))


def on_every_rank(tp: int, fn: Callable[[int], Any]) -> list:
    """fn(r) for every TP rank at once (rank 0 in this thread, the others in threads), as
    SGLang's TP processes each run a collective; the first failure is raised."""
    results: list = [None] * tp
    errors: list = []

    def run(r: int) -> None:
        try:
            results[r] = fn(r)
        except BaseException as err:  # reported to the caller below
            errors.append(err)

    threads = [threading.Thread(target=run, args=(r,), name=f"standin-tp{r}", daemon=True)
               for r in range(1, tp)]
    for thread in threads:
        thread.start()
    run(0)
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return results


class TPRanks:
    """Rank 0 = the backend's model; ranks 1..tp-1 = the HF tensors they hold."""

    def __init__(self, backend: Any, model_path: str, tp: int):
        self.backend, self.tp = backend, tp
        initial = load_hf_folder(model_path) if tp > 1 else {}
        self.replicas = [{k: v.clone() for k, v in initial.items()} for _ in range(tp - 1)]
        self.groups: dict[str, list] = {}
        self.stale: set[str] = set()

    def _apply(self, r: int, named: list) -> None:
        if r == 0:
            self.backend.load_tensors(named)
        else:
            for name, tensor in named:
                self.replicas[r - 1][name] = tensor.detach().clone()
        self.stale.difference_update(name for name, _ in named)

    def load_folder(self, path: str) -> None:
        self.backend.load_from_disk(path)
        for r in range(1, self.tp):
            self.replicas[r - 1] = load_hf_folder(path)
        self.stale.clear()

    def load_payloads(self, entries: list, load_format: Optional[str]) -> int:
        from tests.sglang_standin.payload import decode, named_tensors

        if len(entries) < self.tp:   # SGLang's TP rank indexes entries[tp_rank], uncaught
            raise SchedulerCrash(f"IndexError: serialized_named_tensors has {len(entries)} "
                                 f"entries for {self.tp} TP ranks")
        count = 0
        for r in range(self.tp):            # rank r opens only its own entry
            named = named_tensors(decode(entries[r])[0], load_format)
            self._apply(r, named)
            count = len(named)
        return count

    def join(self, req: Any) -> None:
        if req.group_name in self.groups:
            raise ValueError(f"weight-update group {req.group_name!r} already exists")
        self.groups[req.group_name] = on_every_rank(self.tp, lambda r: join_update_group(
            backend=req.backend, master_address=req.master_address,
            master_port=req.master_port, rank=req.rank_offset + r, world_size=req.world_size,
            group_name=req.group_name, thread_rank=r > 0))

    def receive(self, req: Any) -> int:
        groups = self.groups.get(req.group_name)
        if groups is None:
            raise KeyError(f"Group {req.group_name} not in {sorted(self.groups)}. Please call "
                           f"`init_weights_update_group` first.")
        if not (len(req.names) == len(req.dtypes) == len(req.shapes)):
            raise ValueError("names, dtypes and shapes differ in length")
        received = on_every_rank(self.tp, lambda r: receive_bucket(
            groups[r], req.names, req.dtypes, req.shapes, req.load_format))
        for r, named in enumerate(received):
            self._apply(r, named)
        return len(req.names)

    def destroy(self, group_name: str) -> None:
        groups = self.groups.pop(group_name, None)
        if groups is None:
            raise KeyError(f"no weight-update group {group_name!r}")
        for group in groups:
            if isinstance(group, _ThreadRankGroup):
                group.destroy()
            else:
                torch.distributed.destroy_process_group(group)

    def release(self) -> None:
        """Weights released: their memory is gone, so what comes back on resume is garbage."""
        names = set(self.backend.poison())
        for replica in self.replicas:
            for tensor in replica.values():
                if tensor.is_floating_point():
                    tensor.fill_(float("nan"))
            names |= set(replica)
        self.stale = names

    def checksums(self) -> list[str]:
        return [hf_checksum(self.backend.hf_tensors())] + [hf_checksum(r) for r in self.replicas]
