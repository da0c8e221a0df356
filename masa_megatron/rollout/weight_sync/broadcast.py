"""Weight sync by torch.distributed broadcast, for servers on other nodes (disaggregated).

Data path
---------
Senders: for each pipeline stage, the rank with TP rank 0 in data-parallel replica 0. The stage's
TP ranks of that replica all-gather each parameter (buckets.stage_hf_tensors); other replicas do
nothing.

Once (first sync): each sender opens a process group of its own,
`masa-weight-sync-pp<stage>-<attempt>` (a fresh suffix per trainer start):
world size 1 + sum of the servers' TP sizes, the sender is rank 0 and hosts the TCP store at
(master_address, a free port), master_address being rollout.weight_sync_master_address or the
source address of this host's route to the servers (`sender_address`); it POSTs
/init_weights_update_group {"master_address", "master_port", "rank_offset", "world_size",
"group_name", "backend"} to every server (server i's
TP ranks become ranks rank_offset + tp_rank, rank_offset = 1 + the TP sizes of servers before
it; one server of TP 1 is the last rank, 1) and joins the group itself while those calls wait.
The group is made the way SGLang makes its side (sglang 0.5.x, python/sglang/srt/utils/common.py
init_custom_process_group: rendezvous over tcp://, PrefixStore(group_name), a new process group
outside the default one), backend NCCL on GPUs and gloo on CPU.

Per bucket (at most `bucket_bytes` of HF tensors, one dtype): the sender POSTs
/update_weights_from_distributed {"names", "dtypes" (e.g. "bfloat16"), "shapes", "group_name",
"flush_cache": false, "weight_version"} to every server and, while the servers wait in their
matching receives, broadcasts from rank 0 either
- each tensor in that order (default; SGLang posts one torch.distributed.broadcast(src=0,
  async_op=True) per empty tensor, waits for them all and calls model.load_weights; the sender
  likewise issues every broadcast before waiting, so there is no round trip per tensor), or
- with `load_format="flattened_bucket"` (added to the body), the bucket's tensors back to back
  as one 1-D tensor: SGLang builds a FlattenedTensorBucket of empty tensors in the listed order,
  receives it with one broadcast and loads the views (ModelRunner
  _update_bucketed_weights_from_distributed). One collective per bucket instead of one per
  tensor, for one bucket-sized copy on the sender; it needs an SGLang whose
  UpdateWeightsFromDistributedReqInput has `load_format` (later 0.5.x releases; older ones
  ignore the field and would wait for per-tensor broadcasts).
Stages take turns, each in its own group, with a barrier between turns: a server runs one
weight update at a time, so concurrent stages could be served in opposite orders by two servers
(a deadlock across the two groups).

Close: POST /destroy_weights_update_group and destroy the local group. Errors on any rank (HTTP
failures, a rejected bucket) are raised on every rank after the stage has been drained, so no
rank is left waiting in a TP gather.
"""
from __future__ import annotations

import logging
import socket
import uuid
from datetime import timedelta
from typing import Any, Optional
from urllib.parse import urlparse

import torch

from masa_megatron.parallel import model_parallel_source
from masa_megatron.ports import free_port
from masa_megatron.rollout.sglang_launch import EngineError
from masa_megatron.rollout.weight_sync import SyncTarget, WeightSync, raise_if_any
from masa_megatron.rollout.weight_sync.buckets import (bucketize, dtype_name, flatten_bucket,
                                                       nbytes, stage_hf_tensors)

log = logging.getLogger(__name__)


def init_custom_process_group(*, backend: str, init_method: str, world_size: int, rank: int,
                              group_name: str, timeout: Optional[timedelta] = None):
    """A process group outside the default one, as SGLang builds its side of the weight-update
    group: a TCP store at `init_method` (tcp://host:port) hosted by rank 0, keys prefixed by
    `group_name`. The store is created explicitly rather than by torch's tcp:// rendezvous,
    which under torchrun (TORCHELASTIC_USE_AGENT_STORE) would make rank 0 a client too."""
    import inspect

    from torch.distributed.distributed_c10d import (Backend, PrefixStore,
                                                    _new_process_group_helper, _world)

    timeout = timeout or timedelta(minutes=10)
    address = urlparse(init_method)
    if address.scheme != "tcp" or not address.hostname or not address.port:
        raise ValueError(f"init_method={init_method!r}: expected tcp://host:port")
    store = torch.distributed.TCPStore(address.hostname, address.port, world_size,
                                       is_master=rank == 0, timeout=timeout,
                                       wait_for_workers=False)
    store = PrefixStore(group_name, store)
    params = inspect.signature(_new_process_group_helper).parameters
    options = "backend_options" if "backend_options" in params else "pg_options"
    group, _ = _new_process_group_helper(world_size, rank, [], Backend(backend), store,
                                         group_name=group_name, timeout=timeout,
                                         **{options: None})
    _world.pg_group_ranks[group] = {i: i for i in range(world_size)}
    return group


def _pipeline_stages() -> int:
    from megatron.core import parallel_state as ps

    if not (torch.distributed.is_initialized() and ps.model_parallel_is_initialized()):
        return 1
    return ps.get_pipeline_model_parallel_world_size()


def _layout() -> tuple[int, int, int, int]:
    """(pp rank, tp rank, dp rank, cp rank) of this rank; zeros without Megatron groups."""
    from megatron.core import parallel_state as ps

    if not (torch.distributed.is_initialized() and ps.model_parallel_is_initialized()):
        return 0, 0, 0, 0
    return (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank(),
            ps.get_data_parallel_rank(), ps.get_context_parallel_rank())


def _route_source(host: str, port: int) -> str:
    """The local address the kernel would send from to reach host:port (a UDP connect sends
    nothing)."""
    family, _, _, _, address = socket.getaddrinfo(host, port, socket.AF_INET,
                                                  socket.SOCK_DGRAM)[0]
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.connect(address)
        return sock.getsockname()[0]


def sender_address(urls: list[str], configured: Optional[str] = None) -> str:
    """The address the servers are told to reach this sender at (the group's TCP store).

    `configured` (rollout.weight_sync_master_address) must be an address of this host. Else it
    is the source address of the route to the servers: every server must be reached from the
    same one (servers behind different interfaces need it configured). Never
    gethostbyname(gethostname()), which is 127.0.1.1 or another interface on many clusters."""
    if configured:
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                sock.bind((configured, 0))
        except OSError as err:
            raise EngineError(f"rollout.weight_sync_master_address={configured!r} is not an "
                              f"address of this host ({socket.gethostname()}): {err}") from None
        return configured
    sources: dict[str, list[str]] = {}
    for url in urls:
        parsed = urlparse(url)
        try:
            source = _route_source(parsed.hostname or "", parsed.port or 80)
        except OSError as err:
            raise EngineError(f"broadcast weight sync: cannot resolve or route to the server "
                              f"{url} ({err}); fix rollout.sglang_urls") from None
        sources.setdefault(source, []).append(url)
    if len(sources) > 1:
        found = "; ".join(f"{a} for {', '.join(u)}" for a, u in sources.items())
        raise EngineError(f"broadcast weight sync: the servers are reached from different local "
                          f"addresses ({found}); set rollout.weight_sync_master_address to the "
                          f"one they can all reach")
    return next(iter(sources))


class BroadcastSync(WeightSync):
    name = "broadcast"

    def __init__(self, target: SyncTarget, *, master_address: Optional[str] = None,
                 backend: Optional[str] = None, group_timeout_s: float = 600.0,
                 load_format: Optional[str] = None, **common: Any):
        super().__init__(target, **common)
        if load_format not in (None, "flattened_bucket"):
            raise ValueError(f"broadcast weight sync: load_format={load_format!r} must be None "
                             f"(one broadcast per tensor) or 'flattened_bucket'")
        self.load_format = load_format
        self.configured_address = master_address or None
        self.master_address: Optional[str] = None    # found by the senders when they open
        self.backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        self.group_timeout = timedelta(seconds=group_timeout_s)
        self.group = None
        self.group_name: Optional[str] = None

    # ------------------------------------------------------------ group set-up
    def _open_group(self, pp_rank: int) -> None:
        # a name per attempt: servers that outlived a killed attempt still hold its group, and
        # SGLang refuses a name it already has
        self.group_name = f"masa-weight-sync-pp{pp_rank}-{uuid.uuid4().hex[:8]}"
        self.master_address = sender_address(self.target.urls, self.configured_address)
        offsets, offset = [], 1
        for tp in self.target.tp_sizes:
            offsets.append(offset)
            offset += tp
        port = free_port()      # its store listens on every interface
        bodies = [{"master_address": self.master_address, "master_port": port, "rank_offset": off,
                   "world_size": offset, "group_name": self.group_name, "backend": self.backend}
                  for off in offsets]
        http = self.target.http
        pending = http.submit(_gather_calls(http, self.target.urls, "/init_weights_update_group",
                                            bodies, self.group_timeout.total_seconds()))
        try:
            self.group = init_custom_process_group(
                backend=self.backend, init_method=f"tcp://{self.master_address}:{port}",
                world_size=offset, rank=0, group_name=self.group_name, timeout=self.group_timeout)
        finally:
            replies = pending.result()
        for reply in replies:
            reply.check()
        log.info("weight-update group %s: %d ranks at %s:%d", self.group_name, offset,
                 self.master_address, port)

    # ------------------------------------------------------------ transfer
    def _transfer(self, model_chunks: Any, version: int) -> tuple[int, int]:
        """The pipeline stages take turns (a barrier on the replica's CPU model-parallel group
        between turns): SGLang runs one weight-update request at a time per server, so stages
        sending at once could be taken in opposite orders by two servers, each then waiting in
        the other stage's collective (the same holds for opening the groups)."""
        pp_rank, tp_rank, dp_rank, cp_rank = _layout()
        if dp_rank != 0 or cp_rank != 0:
            raise_if_any(None)
            return 0, 0
        stages = _pipeline_stages()
        turns = model_parallel_source()[0] if stages > 1 else None
        error: Optional[str] = None
        sent = (0, 0)
        for turn in range(stages):
            if turn == pp_rank:
                sent, error = self._send_stage(model_chunks, pp_rank, tp_rank == 0, version)
            if turns is not None:
                torch.distributed.barrier(group=turns)
        raise_if_any(error)
        return sent

    def _send_stage(self, model_chunks: Any, pp_rank: int, sender: bool,
                    version: int) -> tuple[tuple[int, int], Optional[str]]:
        """This stage's buckets (collective over its TP ranks); (bytes, buckets), error."""
        error: Optional[str] = None
        if sender and self.group is None:
            try:
                self._open_group(pp_rank)
            except Exception as err:  # reported collectively by the caller
                error = f"opening the weight-update group: {err}"
        sent_bytes = sent_buckets = index = 0
        for bucket in bucketize(stage_hf_tensors(model_chunks), self.bucket_bytes):
            if not sender or error is not None:
                continue                      # keep draining: TP peers wait in the gathers
            try:
                self._send_bucket(bucket, version)
            except Exception as err:  # reported collectively by the caller
                error = str(err)
                continue
            sent_buckets += 1
            for name, tensor in bucket:
                sent_bytes += nbytes(tensor)
                self.record_sample(index, name, tensor)
                index += 1
        return (sent_bytes, sent_buckets), error

    def _send_bucket(self, bucket: list, version: int) -> None:
        body = {"names": [n for n, _ in bucket], "dtypes": [dtype_name(t.dtype) for _, t in bucket],
                "shapes": [list(t.shape) for _, t in bucket], "group_name": self.group_name,
                "flush_cache": False, "weight_version": str(version)}
        if self.load_format is not None:
            body["load_format"] = self.load_format
        tensors = [flatten_bucket(bucket)[0]] if self.load_format else [t for _, t in bucket]
        pending = self.target.http.submit_all(self.target.urls, "/update_weights_from_distributed",
                                              body, retries=0,
                                              timeout_s=self.group_timeout.total_seconds())
        try:   # all issued, then all awaited: no round trip per tensor (SGLang receives so too)
            works = [torch.distributed.broadcast(tensor, src=0, group=self.group, async_op=True)
                     for tensor in tensors]
            for work in works:
                work.wait()
        finally:
            replies = pending.result()
        for reply in replies:
            reply.check()

    def close(self) -> None:
        if self.group is None:
            return
        try:
            for reply in self.target.http.call_all(self.target.urls,
                                                   "/destroy_weights_update_group",
                                                   {"group_name": self.group_name}, retries=0,
                                                   timeout_s=30.0):
                if reply.status != 200:
                    log.warning("destroy %s on %s: HTTP %d", self.group_name, reply.url,
                                reply.status)
        except EngineError as err:
            log.warning("destroy %s: %s", self.group_name, err)
        torch.distributed.destroy_process_group(self.group)
        self.group = None


async def _gather_calls(http: Any, urls: list[str], path: str, bodies: list[dict],
                        timeout_s: float) -> list:
    import asyncio

    return list(await asyncio.gather(*(http.request(u, path, b, retries=0, timeout_s=timeout_s)
                                       for u, b in zip(urls, bodies))))
