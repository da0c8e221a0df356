"""Moving the trainer's weights into SGLang servers; one strategy per file.

- disk.py (`disk`): export an HF safetensors folder, then POST /update_weights_from_disk. The
  fallback that always works where the servers can read the folder.
- broadcast.py (`broadcast`): POST /init_weights_update_group once, then per bucket
  /update_weights_from_distributed while one sender per pipeline stage broadcasts the tensors in a
  process group it shares with the servers (NCCL on GPUs, gloo on CPU). For servers on other nodes.
- tensor.py (`tensor`): POST /update_weights_from_tensor with CUDA IPC handles, for servers
  colocated on the trainer's GPUs.

Common to all (`WeightSync.sync`): the transfer is bucketed (buckets.py, `bucket_bytes`), wrapped
in /begin_weight_update ... /end_weight_update when the servers have those routes (probed once; a
404 marks an older server and they are skipped), followed by /flush_cache, and optionally checked:
a few tensors are sampled while they are sent and read back with /get_weights_by_name
(truncate_size rows); any difference beyond the tolerance is an EngineError. `sync` is a
collective: every trainer rank calls it; errors on any rank are raised on every rank.
"""
from __future__ import annotations

import abc
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from masa_megatron.parallel import collective_device
from masa_megatron.rollout.sglang_launch import EngineError
from masa_megatron.rollout.weight_sync.buckets import MiB

log = logging.getLogger(__name__)


@dataclass
class SyncTarget:
    """The servers a sync writes to (never the router) and the HTTP client to reach them."""
    urls: list[str]
    tp_sizes: list[int]
    http: Any                                  # masa_megatron.rollout.sglang.HTTPClient
    begin_end_supported: Optional[bool] = field(default=None)


# ---------------------------------------------------------------- collectives helpers

def world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def barrier() -> None:
    if world()[1] > 1:
        torch.distributed.barrier()


def on_rank0(fn: Callable[[], Any]) -> Any:
    """Run `fn` on global rank 0; its result on every rank, its failure raised on every rank."""
    rank, size = world()
    out, error = None, None
    if rank == 0:
        try:
            out = fn()
        except Exception as err:  # any failure must reach the other ranks, not strand them
            error = str(err) if isinstance(err, EngineError) else f"{type(err).__name__}: {err}"
    if size > 1:
        box = [(out, error)]
        torch.distributed.broadcast_object_list(box, src=0)
        out, error = box[0]
    if error is not None:
        raise EngineError(error)
    return out


def raise_if_any(error: Optional[str]) -> None:
    """Collective: raise EngineError on every rank if any rank reports an error."""
    rank, size = world()
    errors = [error]
    if size > 1:
        errors = [None] * size
        torch.distributed.all_gather_object(errors, error)
    found = [f"rank {r}: {e}" for r, e in enumerate(errors) if e]
    if found:
        raise EngineError("weight sync failed: " + "; ".join(found))


# ---------------------------------------------------------------- checks

def compare_weights(name: str, expected: torch.Tensor, served: Any, *, rtol: float,
                    atol: float) -> Optional[str]:
    """None if `served` (the JSON of /get_weights_by_name) matches `expected`, else why not."""
    try:
        got = torch.tensor(served, dtype=torch.float64).reshape(-1)
    except (TypeError, ValueError, RuntimeError) as err:
        return f"{name}: unreadable answer ({err}): {str(served)[:200]}"
    want = expected.detach().to("cpu", torch.float64).reshape(-1)
    if got.numel() != want.numel():
        return f"{name}: server sent {got.numel()} values, trainer has {want.numel()}"
    diff = (got - want).abs()
    bad = diff > atol + rtol * want.abs()
    if bool(bad.any()):
        return (f"{name}: {int(bad.sum())} of {want.numel()} values differ "
                f"(max abs diff {float(diff.max()):.3g})")
    return None


def check_served_weights(target: SyncTarget, samples: dict[str, torch.Tensor], *, rows: int,
                         rtol: float, atol: float, version: int) -> None:
    """Read each sampled tensor's first `rows` rows back from every server and compare."""
    problems = []
    for name, expected in sorted(samples.items()):
        replies = target.http.call_all(target.urls, "/get_weights_by_name",
                                       {"name": name, "truncate_size": rows})
        for reply in replies:
            reply.check()
            why = compare_weights(name, expected, reply.body, rtol=rtol, atol=atol)
            if why:
                problems.append(f"server {reply.url}: {why}")
    if problems:
        raise EngineError(f"weight check after sync to version {version} failed: "
                          + "; ".join(problems[:8]))


# ---------------------------------------------------------------- the strategy interface

class WeightSync(abc.ABC):
    """One way of moving weights. Subclasses implement `_transfer`; `sync` adds the session,
    cache flush, stats and the optional check."""
    name = ""

    def __init__(self, target: SyncTarget, *, bucket_bytes: int = 512 * MiB,
                 verify: bool = False, verify_rows: int = 2, verify_rtol: float = 1e-6,
                 verify_atol: float = 1e-7, max_verify_tensors: int = 4,
                 sync_dir: Optional[str] = None, source_dir: Optional[str] = None):
        if bucket_bytes < 1:
            raise ValueError(f"bucket_bytes={bucket_bytes}: must be >= 1")
        self.target, self.bucket_bytes = target, int(bucket_bytes)
        self.verify, self.verify_rows = verify, verify_rows
        self.verify_rtol, self.verify_atol = verify_rtol, verify_atol
        self.max_verify_tensors = max_verify_tensors
        self.sync_dir, self.source_dir = sync_dir, source_dir
        self._samples: dict[str, torch.Tensor] = {}

    @abc.abstractmethod
    def _transfer(self, model_chunks: Any, version: int) -> tuple[int, int]:
        """Move the weights; returns (bytes this rank sent, buckets this rank sent)."""

    def sync(self, model_chunks: Any, version: int) -> dict[str, float]:
        """Collective over all trainer ranks. Returns metrics (seconds, bytes, bytes/s)."""
        self._samples = {}
        return self._run(version, lambda: self._transfer(model_chunks, version), self.verify)

    def load_folder(self, path: str, version: int) -> dict[str, float]:
        """Collective: the servers load an HF folder they can read (no check: nothing sampled)."""
        from masa_megatron.rollout.weight_sync.disk import load_from_disk

        def transfer() -> tuple[int, int]:
            load_from_disk(self.target, path, version)
            return 0, 0
        return self._run(version, transfer, verify=False)

    def _run(self, version: int, transfer: Callable[[], tuple[int, int]],
             verify: bool) -> dict[str, float]:
        start = time.perf_counter()
        self._session("/begin_weight_update")
        sent = torch.tensor(transfer(), dtype=torch.float64)
        on_rank0(lambda: [r.check() for r in self.target.http.call_all(
            self.target.urls, "/flush_cache", retries=1)])
        self._session("/end_weight_update")
        if world()[1] > 1:
            sent = sent.to(collective_device())
            torch.distributed.all_reduce(sent)
            sent = sent.cpu()
        seconds = time.perf_counter() - start
        if verify:
            self.check(version)
        return {f"weight_sync/{self.name}/seconds": seconds,
                f"weight_sync/{self.name}/bytes": float(sent[0]),
                f"weight_sync/{self.name}/buckets": float(sent[1]),
                f"weight_sync/{self.name}/bytes_per_s": float(sent[0]) / max(seconds, 1e-9)}

    def record_sample(self, index: int, name: str, tensor: torch.Tensor) -> None:
        """Keep the first rows of every 7th tensor a sender sends (up to max_verify_tensors)."""
        if self.verify and index % 7 == 0 and len(self._samples) < self.max_verify_tensors:
            self._samples[name] = tensor[:self.verify_rows].detach().to(
                "cpu", torch.float32, copy=True)          # a snapshot, not a view of a param

    def check(self, version: int) -> None:
        """Collective: compare the sampled tensors of all ranks with what the servers hold."""
        samples = [self._samples]
        rank, size = world()
        if size > 1:
            samples = [None] * size
            torch.distributed.all_gather_object(samples, self._samples)
        merged = {k: v for part in samples for k, v in part.items()}
        on_rank0(lambda: check_served_weights(self.target, merged, rows=self.verify_rows,
                                              rtol=self.verify_rtol, atol=self.verify_atol,
                                              version=version))

    def _session(self, path: str) -> None:
        """POST /begin_weight_update or /end_weight_update if the servers know it."""
        def call() -> Optional[bool]:
            if self.target.begin_end_supported is False:
                return False
            replies = self.target.http.call_all(self.target.urls, path, {}, retries=1)
            if any(r.status == 404 for r in replies):
                log.info("SGLang servers have no %s (older than the pinned version); skipped", path)
                return False
            for reply in replies:
                reply.check()
            return True
        self.target.begin_end_supported = on_rank0(call)

    def close(self) -> None:  # noqa: B027 - optional hook, nothing to free by default
        """Free what the strategy holds (process groups, temporary folders)."""


def build_weight_sync(name: str, target: SyncTarget, **options: Any) -> WeightSync:
    from masa_megatron.rollout.weight_sync.broadcast import BroadcastSync
    from masa_megatron.rollout.weight_sync.disk import DiskSync
    from masa_megatron.rollout.weight_sync.tensor import TensorSync

    classes = {c.name: c for c in (DiskSync, BroadcastSync, TensorSync)}
    if name not in classes:
        raise EngineError(f"rollout.weight_sync={name!r}: must be one of {', '.join(classes)}")
    return classes[name](target, **options)
