"""Client-side scheduling of /generate requests over SGLang servers: per-server slots.

Limits. A server runs at most L sequences at once and queues the rest. L comes from the
configured `rollout.sglang_max_running_requests`, or (0) from the server's GET /get_server_info
(SGLang 0.5.23, http_server.get_server_info: the server args, the scheduler info and one
`internal_states` entry per data-parallel rank): L = sum over internal_states of
`effective_max_running_requests_per_dp`, else the server arg `max_running_requests`. With S
senders (data-parallel groups, each its own client) sharing the servers, each sender owns
floor(L / S) slots of every server (at least 1), so the servers never hold more than L of ours
and stay full while every sender has work queued.

Placement. A request carrying n samples takes n slots (SGLang runs n sequences). Waiting requests
are served in priority order (first-round requests before follow-ups, then arrival), each on the
server with the most free slots (least loaded); a request larger than a server's share runs alone
on an idle server. First-round first: a meta that waits delays its problem's solutions, so the
step's critical path (longest meta + longest solution) starts as early as possible, and ready
follow-ups fill the slots the meta tail leaves free. In an event simulation of masa_efficient's
step (benchmarks/rollout_streaming.py) this cut the streaming phase at 64 problems from 0.94 to
0.84 of two-phase; the two orders tie when the metas fit in one or two waves.

Accounting (`ServerSlots.report`), over the span from the first acquire to the last release:
    busy_fraction[s]  = time server s had >= 1 of our sequences / span
    fill_queued[s]    = time-integral of running[s] / share[s] over the time requests waited
                        in the client queue / that waiting time (1.0 = full whenever work waited)
"""
from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

from masa_megatron.rollout.base import FINISH_ABORT, Completion, GenerationResult
from masa_megatron.rollout.sglang_launch import EngineError
from masa_megatron.rollout.sglang_protocol import generate_payloads, parse_completions

log = logging.getLogger(__name__)

__all__ = ["RequestRunner", "ServerSlots", "data_parallel_senders", "server_capacity"]

# how SGLang words a prompt that does not fit its context (rollout/sglang.py docstring)
_CONTEXT_HINTS = ("context length", "longer than", "too long")
# slot priorities (lower is served first): see "Placement" above
FIRST_ROUND, FOLLOW_UP = 0, 1


def server_capacity(info: Any, url: str) -> int:
    """Sequences a server runs at once, from its /get_server_info answer."""
    if not isinstance(info, dict):
        raise EngineError(f"SGLang server {url}: /get_server_info answered {str(info)[:200]}")
    per_dp = [s.get("effective_max_running_requests_per_dp")
              for s in info.get("internal_states") or [] if isinstance(s, dict)]
    if per_dp and all(isinstance(v, int) and v > 0 for v in per_dp):
        return sum(per_dp)
    value = info.get("max_running_requests")
    if isinstance(value, int) and value > 0:
        return value
    raise EngineError(f"SGLang server {url}: /get_server_info reports neither "
                      f"internal_states[*].effective_max_running_requests_per_dp nor "
                      f"max_running_requests; set rollout.sglang_max_running_requests")


@dataclass
class _Meter:
    """Time integrals of one server's load."""
    busy: float = 0.0
    fill_queued: float = 0.0


@dataclass(order=True)
class _Waiter:
    priority: int
    seq: int
    weight: int = field(compare=False)
    future: asyncio.Future = field(compare=False)


class ServerSlots:
    """Slots per server for one sender; use from one event loop."""

    def __init__(self, urls: Sequence[str], shares: Sequence[int]):
        if len(urls) != len(shares) or not urls:
            raise ValueError("ServerSlots: one share per server URL")
        self.urls, self.shares = list(urls), [max(1, int(s)) for s in shares]
        self.running = [0] * len(self.urls)
        self.max_running = [0] * len(self.urls)
        self._waiting: list[_Waiter] = []
        self._seq = itertools.count()
        self.reset()

    @classmethod
    def split(cls, urls: Sequence[str], limits: Sequence[int], senders: int) -> "ServerSlots":
        """This sender's share of each server's limit (see the module docstring)."""
        return cls(urls, [max(1, int(limit) // max(1, senders)) for limit in limits])

    # ------------------------------------------------------------ accounting
    def reset(self) -> None:
        self._meters = [_Meter() for _ in self.urls]
        self._start: Optional[float] = None
        self._last = self._end = 0.0
        self._queued_time = 0.0

    def _tick(self) -> None:
        now = time.monotonic()
        if self._start is None:
            self._start = self._last = now
        dt = now - self._last
        queued = bool(self._waiting)
        for s, meter in enumerate(self._meters):
            meter.busy += dt * (self.running[s] > 0)
            if queued:
                meter.fill_queued += dt * min(1.0, self.running[s] / self.shares[s])
        self._queued_time += dt * queued
        self._last = self._end = now

    def report(self) -> dict[str, float]:
        """Per-server busy fraction and fill while queued since the last `reset`."""
        span = self._end - self._start if self._start is not None else 0.0
        out = {"rollout/phase_s": span}
        for s, meter in enumerate(self._meters):
            out[f"rollout/server{s}_busy_fraction"] = meter.busy / span if span > 0 else 0.0
            if self._queued_time > 0:
                out[f"rollout/server{s}_fill_while_queued"] = meter.fill_queued / self._queued_time
        return out

    # ------------------------------------------------------------ slots
    def _place(self, weight: int) -> Optional[int]:
        free = [self.shares[s] - self.running[s] for s in range(len(self.urls))]
        best = max(range(len(free)), key=lambda s: (free[s], -s))
        if free[best] >= weight or (self.running[best] == 0 and weight > self.shares[best]):
            return best
        return None

    def _take(self, server: int, weight: int) -> int:
        self.running[server] += weight
        self.max_running[server] = max(self.max_running[server], self.running[server])
        return server

    async def acquire(self, weight: int = 1, priority: int = 0) -> int:
        """Wait for `weight` slots; returns the server index holding them."""
        self._tick()
        if not self._waiting:
            server = self._place(weight)
            if server is not None:
                return self._take(server, weight)
        waiter = _Waiter(priority, next(self._seq), weight,
                         asyncio.get_running_loop().create_future())
        heapq.heappush(self._waiting, waiter)
        try:
            return await waiter.future
        except asyncio.CancelledError:
            if waiter.future.done() and not waiter.future.cancelled():
                self.release(waiter.future.result(), weight)
            elif waiter in self._waiting:
                self._waiting.remove(waiter)
                heapq.heapify(self._waiting)
            raise

    def release(self, server: int, weight: int = 1) -> None:
        self._tick()
        self.running[server] -= weight
        while self._waiting:
            head = self._waiting[0]
            if head.future.done():          # cancelled while waiting
                heapq.heappop(self._waiting)
                continue
            target = self._place(head.weight)
            if target is None:
                break
            heapq.heappop(self._waiting)
            head.future.set_result(self._take(target, head.weight))


def data_parallel_senders() -> int:
    """How many clients send to the servers: one per model-parallel group (dp_flow)."""
    import torch

    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return 1
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        return torch.distributed.get_world_size()
    return ps.get_data_parallel_world_size()


class RequestRunner:
    """One generation call of an SGLangEngine: its requests (and their follow-ups) through the
    sender's slots, with the timings behind `metrics`:

        rollout/meta_to_solution_s_{mean,max}: per first-round request with follow-ups, from
            its answer to the moment its first follow-up holds a slot
        rollout/longest_request_share: the longest /generate call (slot to answer) / the phase
    """

    def __init__(self, engine: Any, slots: ServerSlots):
        import uuid

        self.engine, self.slots = engine, slots
        self.batch = uuid.uuid4().hex[:10]
        self.answered: dict[int, float] = {}
        self.follow_sent: dict[int, float] = {}
        self.longest = 0.0
        slots.reset()

    async def run(self, requests: list, follow: Optional[Callable] = None,
                  stream: bool = True) -> list:
        first: list = [None] * len(requests)
        extra: list[list] = [[] for _ in requests]

        async def chain(i: int) -> None:
            first[i] = await self.request(requests[i], str(i), priority=FIRST_ROUND)
            self.answered[i] = time.monotonic()
            if follow is not None and stream:
                extra[i] = await self.follow_ups(i, follow(i, first[i]))

        await self._all([chain(i) for i in range(len(requests))])
        if follow is not None and not stream:
            async def second(i: int) -> None:
                extra[i] = await self.follow_ups(i, follow(i, first[i]))
            await self._all([second(i) for i in range(len(requests))])
        return first + [r for rs in extra for r in rs]

    async def _all(self, coros: list) -> None:
        tasks = [asyncio.ensure_future(c) for c in coros]
        try:
            await asyncio.gather(*tasks)
        except BaseException:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self.engine._abort_inflight()
            raise

    async def follow_ups(self, parent: int, requests: Sequence) -> list:
        return list(await asyncio.gather(*(self.request(r, f"{parent}f{j}", FOLLOW_UP, parent)
                                           for j, r in enumerate(requests))))

    async def request(self, req: Any, tag: str, priority: int, parent: Optional[int] = None):
        rid = f"{req.request_id}-{self.batch}" if req.request_id else f"masa-{self.batch}-{tag}"
        outs = await asyncio.gather(*(self._post(body, priority, parent)
                                      for body in generate_payloads(req, rid)))
        completions, version = [], None
        for got, got_version in outs:
            completions += got
            version = got_version if got_version is not None else version
        if len(completions) != req.sampling.n:
            raise EngineError(f"SGLang returned {len(completions)} samples for a request "
                              f"with n={req.sampling.n}")
        return GenerationResult(req.request_id, len(req.prompt_token_ids), completions,
                                self.engine.weight_version if version is None else version)

    async def _post(self, body: dict, priority: int, parent: Optional[int]):
        weight = body["sampling_params"]["n"]
        server = await self.slots.acquire(weight, priority)
        url, start = self.slots.urls[server], time.monotonic()
        if parent is not None:
            self.follow_sent[parent] = min(self.follow_sent.get(parent, start), start)
        key = (url, body["rid"])
        self.engine._inflight.add(key)
        try:
            reply = await self.engine.http.request(url, "/generate", body)
        finally:
            self.engine._inflight.discard(key)
            self.slots.release(server, weight)
            self.longest = max(self.longest, time.monotonic() - start)
        if reply.status == 400 and any(h in reply.message().lower() for h in _CONTEXT_HINTS):
            log.warning("SGLang server %s rejected a prompt of %d tokens: %s", url,
                        len(body["input_ids"]), reply.message())
            return [Completion([], [], FINISH_ABORT) for _ in range(weight)], None
        reply.check()
        return parse_completions(reply.body, f"SGLang server {url}")

    def metrics(self) -> dict[str, float]:
        out = self.slots.report()
        span = out["rollout/phase_s"]
        busy = [v for k, v in out.items() if k.endswith("_busy_fraction")]
        out["rollout/busy_fraction_mean"] = sum(busy) / len(busy) if busy else 0.0
        out["rollout/longest_request_share"] = self.longest / span if span > 0 else 0.0
        gaps = [self.follow_sent[i] - self.answered[i] for i in self.follow_sent
                if i in self.answered]
        if gaps:
            out["rollout/meta_to_solution_s_mean"] = sum(gaps) / len(gaps)
            out["rollout/meta_to_solution_s_max"] = max(gaps)
        return out
