"""Fault injection for the stand-in server (set by CLI flags or POST /standin/faults).

Counters apply to requests whose path is in `paths` (default: /generate) and count down as they
fire, in this order: die (os._exit(3) on receipt: the process vanishes mid-request), drop (the
connection is closed without an answer), fail (HTTP 500), delay (sleep `delay_s` before
answering). A count of -1 means "every matching request".
"""
from __future__ import annotations

import asyncio
import os
from dataclasses import asdict, dataclass, field, fields

from aiohttp import web


@dataclass
class FaultPlan:
    fail_next: int = 0
    delay_s: float = 0.0
    delay_next: int = 0
    drop_next: int = 0
    die_next: int = 0
    paths: list = field(default_factory=lambda: ["/generate"])

    def update(self, body: dict) -> None:
        known = {f.name for f in fields(self)}
        unknown = sorted(set(body) - known)
        if unknown:
            raise ValueError(f"unknown fault field(s) {unknown}; known: {sorted(known)}")
        for key, value in body.items():
            setattr(self, key, list(value) if key == "paths" else value)

    def take(self, name: str) -> bool:
        """True (and count down) if fault `name` fires for this request."""
        left = getattr(self, name)
        if left == 0:
            return False
        if left > 0:
            setattr(self, name, left - 1)
        return True

    def as_dict(self) -> dict:
        return asdict(self)


def fault_middleware(plan: FaultPlan, counters: dict):
    @web.middleware
    async def middleware(request: web.Request, handler):
        counters[request.path] = counters.get(request.path, 0) + 1
        if request.path not in plan.paths:
            return await handler(request)
        if plan.take("die_next"):
            await request.read()
            os._exit(3)
        if plan.take("drop_next"):
            await request.read()
            request.transport.close()
            raise asyncio.CancelledError()
        if plan.take("fail_next"):
            return web.json_response({"error": {"message": "injected HTTP 500"}}, status=500)
        if plan.take("delay_next"):
            await asyncio.sleep(plan.delay_s)
        return await handler(request)
    return middleware
