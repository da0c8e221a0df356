"""A stand-in for sglang-router: `python -m tests.sglang_standin.router --worker-urls U1 U2 ...
--host H --port P --policy P` (the flags masa's launcher passes to sglang_router.launch_router).

Forwards POST /generate to the workers round-robin (the real router's policies choose by load or
prefix; any choice is valid for the client) and answers GET /health when every worker is
healthy. GET /standin/stats tells how many requests each worker got.
"""
from __future__ import annotations

import argparse
import itertools

import aiohttp
from aiohttp import web


def build_app(workers: list[str]) -> web.Application:
    turn = itertools.cycle(range(len(workers)))
    counts = {w: 0 for w in workers}
    app = web.Application()

    async def on_startup(app: web.Application) -> None:
        app["session"] = aiohttp.ClientSession()

    async def on_cleanup(app: web.Application) -> None:
        await app["session"].close()

    async def generate(request: web.Request) -> web.Response:
        worker = workers[next(turn)]
        counts[worker] += 1
        async with app["session"].post(worker + "/generate", data=await request.read(),
                                       headers={"Content-Type": "application/json"}) as resp:
            return web.Response(body=await resp.read(), status=resp.status,
                                content_type="application/json")

    async def health(request: web.Request) -> web.Response:
        for worker in workers:
            try:
                async with app["session"].get(worker + "/health",
                                              timeout=aiohttp.ClientTimeout(total=5)) as resp:
                    if resp.status != 200:
                        return web.Response(status=503)
            except (aiohttp.ClientError, TimeoutError):
                return web.Response(status=503)
        return web.Response(text="ok")

    async def stats(request: web.Request) -> web.Response:
        return web.json_response(counts)

    app.router.add_post("/generate", generate)
    app.router.add_get("/health", health)
    app.router.add_get("/standin/stats", stats)
    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker-urls", nargs="+", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=30000)
    parser.add_argument("--policy", default="cache_aware")
    args = parser.parse_args()
    web.run_app(build_app([u.rstrip("/") for u in args.worker_urls]), host=args.host,
                port=args.port, print=None)


if __name__ == "__main__":
    main()
