"""Where the SGLang servers run, and what the trainer does to servers it finds running.

Launched (no rollout.sglang_urls): on one node, rank 0 starts every server on 127.0.0.1 (or
rollout.sglang_host). On several nodes (torchrun's WORLD_SIZE > LOCAL_WORLD_SIZE), each node's local
rank 0 starts num_servers / nodes servers on that node's GPUs, listening on every interface and
named by the node's hostname (resolved by each client, as Slurm's node names are); the URLs are
all-gathered in rank order, so server s sits beside global ranks s*tp .. s*tp+tp-1, which is what
tensor sync and the colocation hand-off need. A router the trainer starts (rank 0) is placed and
named the same way.

Attached (rollout.sglang_urls, e.g. from slurm/disaggregated.sbatch): the servers may have
outlived a killed trainer attempt, so before anything else the trainer aborts every request
still running and closes a weight-update session left open (`clear_previous_attempt`); the
caller then resyncs the weights (train/main.py) under a weight-update group name of its own.
"""
from __future__ import annotations

import logging
import os
import socket
from typing import Any, Optional, Sequence
from urllib.parse import urlparse

from masa_megatron.rollout.sglang_launch import (EngineError, ManagedProcess, ServerOptions,
                                                 launch_router, launch_servers)

log = logging.getLogger(__name__)


def node_layout() -> tuple[int, int]:
    """(nodes, local rank) of this torchrun launch; (1, 0) outside torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    return max(1, world // max(1, local_world)), int(os.environ.get("LOCAL_RANK", "0"))


def advertised(url: str) -> str:
    """`url` (a local listener) as other nodes reach it: by this node's hostname."""
    return f"http://{socket.gethostname()}:{urlparse(url).port}"


def launch_by_node(opts: ServerOptions, num_servers: int, *, rank: int, world: int,
                   log_dir: Optional[str],
                   health_timeout_s: float) -> tuple[list[ManagedProcess], list[str]]:
    """Collective: (the servers this rank started, every server's URL in rank order). A failure
    on any node is raised on every rank, after this rank stopped what it started."""
    nodes, local_rank = node_layout()
    if nodes > 1:
        if num_servers % nodes:
            raise EngineError(f"rollout.sglang_num_servers={num_servers}: colocated servers are "
                              f"started per node and {nodes} nodes cannot hold an equal share")
        num_servers //= nodes
        opts.host = "0.0.0.0"
    starts_here = local_rank == 0 if nodes > 1 else rank == 0
    procs, mine, error = [], [], None
    if starts_here:
        try:
            procs = launch_servers(opts, num_servers, log_dir=log_dir,
                                   health_timeout_s=health_timeout_s)
            mine = [advertised(p.url) if nodes > 1 else p.url for p in procs]
        except Exception as err:   # raised on every rank below
            error = f"{socket.gethostname()}: {err}"
    everyone = [(mine, error)]
    if world > 1:
        import torch

        everyone = [None] * world
        torch.distributed.all_gather_object(everyone, (mine, error))
    errors = [e for _, e in everyone if e]
    if errors:
        for proc in procs:
            proc.stop(grace_s=5.0)
        raise EngineError("SGLang servers failed to start: " + "; ".join(errors))
    return procs, [url for urls, _ in everyone for url in urls]


def launch_router_for(urls: Sequence[str], *, host: str, port: int, module: Optional[str],
                      python: str, env: Optional[dict], log_dir: Optional[str],
                      health_timeout_s: float) -> tuple[ManagedProcess, str]:
    """An sglang-router in front of servers the trainer launched (rank 0): (process, URL)."""
    spans_nodes = node_layout()[0] > 1
    extra: dict[str, Any] = {"module": module} if module else {}
    if python:
        extra["python"] = python
    proc = launch_router(urls, host="0.0.0.0" if spans_nodes else host, log_dir=log_dir,
                         env=env, port=port, health_timeout_s=health_timeout_s, **extra)
    return proc, advertised(proc.url) if spans_nodes else proc.url


def clear_previous_attempt(http: Any, urls: Sequence[str]) -> None:
    """Abort every request a killed attempt left running and close a weight-update session it
    left open (a server with none answers 400, one without sessions 404: both are fine)."""
    for reply in http.call_all(list(urls), "/abort_request", {"rid": "", "abort_all": True},
                               retries=1, timeout_s=30.0):
        reply.check()
    for reply in http.call_all(list(urls), "/end_weight_update", {}, retries=1, timeout_s=30.0):
        if reply.status == 200:
            log.warning("SGLang server %s: closed a weight-update session left open by a "
                        "previous trainer attempt", reply.url)
