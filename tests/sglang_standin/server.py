"""A stand-in for an SGLang HTTP server, for CPU tests (SGLang itself cannot run here).

    python -m tests.sglang_standin.server --model-path HF_DIR --port 30000 [--tp-size 2]
        [--backend echo]

It follows the SGLang version pinned in setup.py (its request schemas are recorded from SGLang's
own classes and diffed against them in CI: tests/test_sglang_contract.py). It accepts the flags
our launcher passes to `sglang.launch_server` and serves the routes the trainer uses with
SGLang's request/response schemas (schemas.py; unknown fields are HTTP 400):
/health, /health_generate, /get_model_info, /get_server_info, /generate, /flush_cache,
/abort_request, /update_weights_from_disk, /update_weights_from_tensor,
/init_weights_update_group, /update_weights_from_distributed, /destroy_weights_update_group,
/get_weights_by_name, /release_memory_occupation, /resume_memory_occupation,
/begin_weight_update and /end_weight_update (absent with --no-begin-end, like older servers).
Test-only: POST /standin/faults (faults.py), GET /standin/stats.

Behaviour kept from SGLang (and relied on by our code):
- n > 1 answers a list (rids "<rid>_<i>"), the model's EOS ids stop generation unless ignore_eos,
  temperature < 1e-6 is greedy, prompt + max_new_tokens >= the context length is a 400 naming
  the context length;
- TP > 1: each TP rank gets its own weight updates (weights.py: tensor entry r, its own place
  r in the broadcast group); ranks other than 0 are threads holding the HF tensors they got;
- weight updates run one at a time, in arrival order, serialised with generation (one worker
  thread); /update_weights_from_tensor and /update_weights_from_distributed must run inside a
  /begin_weight_update ... /end_weight_update session (its scheduler refuses them otherwise;
  --no-begin-end serves an older SGLang without sessions);
- memory: /release_memory_occupation takes SGLang's tags (kv_cache, weights, cuda_graph; none
  = all; an unknown tag is a 400 here, where SGLang ignores it). Its scheduler asserts that it
  is idle, and resuming a tag that is not released raises: either kills SGLang's scheduler, as
  does a tensor update with fewer entries than TP ranks, so here it answers 500 and the process
  exits (SGLang's server dies without an answer; our client fails either way). Released
  weights are poisoned: after a resume, /generate fails until a sync has rewritten every
  tensor; /flush_cache fails while requests run.
Generation requests arriving together are run as one batch in a worker thread.

Capacity (SGLang's scheduler): at most --max-running-requests sequences run at once (default
16 here; SGLang derives its own from memory), the rest wait in the server's queue; a request
with n samples is n sequences. GET /get_server_info reports the cap like SGLang 0.5.23 (server
arg `max_running_requests`, scheduler info `max_total_num_tokens`, and one `internal_states`
entry per data-parallel rank with `effective_max_running_requests_per_dp`). /standin/stats
records the sequences in flight (`samples_inflight`, its maximum, and its time integral
`samples_inflight_s`, with `busy_s`, the time with any in flight) and each /generate's
[rid, arrival, answer] wall-clock times (`generate_times`); the timed backend also counts the
sequences holding a running slot (`running`, integral `running_s`).

`--backend timed` (benchmarks): no model; a sequence answers its length in echo tokens after
--prefill-s + length x --token-time-s seconds of its running slot (length: max_new_tokens, or
the one the prompt encodes, backend.TimedBackend). The time model: a
decode step costs the same whatever the number of running sequences (below the cap, decode is
memory-bound), so a server's throughput is cap / token_time tokens per second when full.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from aiohttp import web

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.sglang_standin import schemas  # noqa: E402
from tests.sglang_standin.backend import EchoBackend, Item, TimedBackend  # noqa: E402
from tests.sglang_standin.faults import FaultPlan, fault_middleware  # noqa: E402
from tests.sglang_standin.weights import SchedulerCrash, TPRanks  # noqa: E402

log = logging.getLogger("sglang_standin")


def error(message: str, status: int = 400) -> web.Response:
    return web.json_response({"error": {"message": message}}, status=status)


def result(success: bool, message: str, **extra: Any) -> web.Response:
    return web.json_response({"success": success, "message": message, **extra},
                             status=200 if success else 400)


@dataclass
class _Pending:
    item: Item
    future: asyncio.Future


class StandIn:
    def __init__(self, backend: Any, faults: FaultPlan, begin_end: bool = True,
                 ranks: Optional[TPRanks] = None, max_running: Optional[int] = None):
        self.backend, self.faults, self.begin_end = backend, faults, begin_end
        self.max_running_arg = max_running
        self.capacity = max_running or 16
        self.running: Optional[asyncio.Semaphore] = None     # made on the server's loop
        self.last_change = self.last_running_change = 0.0
        self.ranks = ranks or TPRanks(backend, "", 1)
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="standin-model")
        self.queue: Optional[asyncio.Queue] = None
        self.stats = {"paths": {}, "generate_inflight": 0, "max_generate_inflight": 0,
                      "aborted": [], "updates": [], "sessions": 0, "samples_inflight": 0,
                      "max_samples_inflight": 0, "samples_inflight_s": 0.0, "busy_s": 0.0,
                      "generate_times": [], "running": 0, "running_s": 0.0}
        self.aborted: set[str] = set()
        self.abort_all_before = 0
        self.released: set[str] = set()
        self.session_open = False
        self.weight_version = "default"
        self.seq = 0

    async def run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    # ------------------------------------------------------------ generation
    async def batcher(self) -> None:
        while True:
            batch = [await self.queue.get()]
            await asyncio.sleep(0.005)
            while not self.queue.empty() and len(batch) < self.capacity:
                batch.append(self.queue.get_nowait())
            live = []
            for p in batch:
                if p.item.rid in self.aborted or p.item.seq < self.abort_all_before:
                    p.future.set_result(([], [], {"type": "abort", "message": "Abort request"}))
                else:
                    live.append(p)
            if not live:
                continue
            try:
                outs = await self.run(self.backend.generate, [p.item for p in live])
                for p, out in zip(live, outs):
                    p.future.set_result(out)
            except Exception as err:  # the whole batch fails the same way
                for p in live:
                    if not p.future.done():
                        p.future.set_exception(err)

    def _count(self, samples: int) -> None:
        """Sequences in flight change by `samples`; integrates the time-weighted counts."""
        now, st = time.monotonic(), self.stats
        if self.last_change:
            st["samples_inflight_s"] += (now - self.last_change) * st["samples_inflight"]
            st["busy_s"] += (now - self.last_change) * (st["samples_inflight"] > 0)
        self.last_change = now
        st["samples_inflight"] += samples
        st["max_samples_inflight"] = max(st["max_samples_inflight"], st["samples_inflight"])

    async def generate(self, request: web.Request) -> web.Response:
        self.stats["generate_inflight"] += 1
        self.stats["max_generate_inflight"] = max(self.stats["max_generate_inflight"],
                                                  self.stats["generate_inflight"])
        body, arrived, samples = await request.json(), time.time(), 0
        if isinstance(body, dict) and isinstance(body.get("sampling_params"), dict):
            samples = body["sampling_params"].get("n") or 1
            samples = samples if isinstance(samples, int) else 1
        self._count(samples)
        try:
            return await self._generate(body)
        except schemas.BadRequest as err:
            return error(str(err))
        finally:
            self._count(-samples)
            self.stats["generate_inflight"] -= 1
            rid = body.get("rid") if isinstance(body, dict) else None
            self.stats["generate_times"].append([rid, arrived, time.time()])

    async def _timed(self, item: Item) -> tuple:
        """The timed backend's sequence: wait for a running slot, then 'decode'."""
        async with self.running:
            if item.rid in self.aborted or item.seq < self.abort_all_before:
                return [], [], {"type": "abort", "message": "Abort request"}
            self._count_running(1)
            try:
                n = self.backend.length(item)
                await asyncio.sleep(self.backend.prefill_s + n * self.backend.token_time_s)
            finally:
                self._count_running(-1)
            return self.backend.generate([item])[0]

    def _count_running(self, change: int) -> None:
        """Timed backend: sequences holding a running slot, and their time integral."""
        now, st = time.monotonic(), self.stats
        if self.last_running_change:
            st["running_s"] += (now - self.last_running_change) * st["running"]
        self.last_running_change = now
        st["running"] += change

    async def _generate(self, body: Any) -> web.Response:
        req = schemas.parse(schemas.GenerateReqInput, body)
        schemas.unsupported(req, schemas.GENERATE_IMPLEMENTED, "GenerateReqInput")
        params = schemas.parse(schemas.SamplingParams, req.sampling_params or {}, "sampling_params")
        schemas.unsupported(params, schemas.SAMPLING_IMPLEMENTED, "sampling_params")
        if self.released:
            return error(f"memory is released ({sorted(self.released)}); resume it first")
        if self.ranks.stale:
            return error(f"generating with released weights: {len(self.ranks.stale)} tensors "
                         f"were not re-synced after /resume_memory_occupation (e.g. "
                         f"{sorted(self.ranks.stale)[0]})")
        ids = req.input_ids
        if not ids or not all(isinstance(t, int) for t in ids):
            raise schemas.BadRequest("input_ids must be a non-empty list of token ids")
        total = len(ids) + (params.max_new_tokens or 0)
        if total >= self.backend.context_length:
            raise schemas.BadRequest(
                f"Requested token count exceeds the model's maximum context length of "
                f"{self.backend.context_length} tokens. You requested a total of {total} tokens: "
                f"{len(ids)} tokens from the input messages and {params.max_new_tokens} tokens "
                f"for the completion.")
        if min(ids) < 0 or max(ids) >= self.backend.vocab_size:
            raise schemas.BadRequest(f"input_ids out of the vocabulary (size "
                                     f"{self.backend.vocab_size})")
        rid = req.rid if isinstance(req.rid, str) else f"standin-{self.seq}"
        rids = [rid] if params.n == 1 else [f"{rid}_{i}" for i in range(params.n)]
        params.temperature = 0.0 if params.temperature < 1e-6 else params.temperature
        pending = []
        for j, r in enumerate(rids):
            self.seq += 1
            split = re.search(r"-s(\d+)$", r) if params.n == 1 else None
            item = Item(r, list(ids), params, self.seq, int(split.group(1)) if split else j)
            if isinstance(self.backend, TimedBackend):
                pending.append(_Pending(item, asyncio.ensure_future(self._timed(item))))
                continue
            pending.append(_Pending(item, asyncio.get_running_loop().create_future()))
            await self.queue.put(pending[-1])
        outs = [await p.future for p in pending]
        answers = [self._answer(r, ids, out, bool(req.return_logprob))
                   for r, out in zip(rids, outs)]
        return web.json_response(answers[0] if params.n == 1 else answers)

    def _answer(self, rid: str, ids: list, out: tuple, logprobs: bool) -> dict:
        tokens, lps, reason = out
        meta = {"id": rid, "finish_reason": reason, "prompt_tokens": len(ids),
                "completion_tokens": len(tokens), "cached_tokens": 0,
                "weight_version": self.weight_version}
        if logprobs:
            meta["input_token_logprobs"] = [[None, ids[-1], None]]
            meta["output_token_logprobs"] = [[lp, t, None] for lp, t in zip(lps, tokens)]
        return {"output_ids": tokens, "meta_info": meta}

    # ------------------------------------------------------------ control
    async def abort_request(self, request: web.Request) -> web.Response:
        req = schemas.parse(schemas.AbortReq, await request.json())
        if req.abort_all:
            self.abort_all_before = self.seq + 1
        elif req.rid:
            self.aborted.add(req.rid)
        self.stats["aborted"].append(req.rid or "*")
        return web.Response(status=200)

    def _busy(self) -> bool:
        return self.stats["generate_inflight"] > 0 or (self.queue is not None
                                                       and not self.queue.empty())

    async def _crash(self, message: str) -> web.Response:
        """SGLang's scheduler died on an assertion: answer 500, then the server is gone."""
        log.error("scheduler crashed: %s", message)
        asyncio.get_running_loop().call_later(0.2, os._exit, 1)
        return error(message, status=500)

    async def memory(self, request: web.Request) -> web.Response:
        release = request.path.startswith("/release")
        cls = schemas.ReleaseMemoryOccupationReqInput if release \
            else schemas.ResumeMemoryOccupationReqInput
        try:
            req = schemas.parse(cls, await request.json() if request.body_exists else {})
        except schemas.BadRequest as err:
            return error(str(err))
        tags = set(req.tags or schemas.MEMORY_TAGS)
        if not tags <= set(schemas.MEMORY_TAGS):
            return error(f"unknown memory tags {sorted(tags - set(schemas.MEMORY_TAGS))}")
        if release and self._busy():
            return await self._crash("AssertionError: release_memory_occupation should be "
                                     "called only when server is idle.")
        if not release and not tags <= self.released:
            return await self._crash(f"KeyError: resuming {sorted(tags - self.released)}, "
                                     f"which were not released")
        if release and "weights" in tags and "weights" not in self.released:
            await self.run(self.ranks.release)
        self.released = self.released | tags if release else self.released - tags
        return web.json_response(None)

    async def session(self, request: web.Request) -> web.Response:
        begin = request.path == "/begin_weight_update"
        try:
            schemas.parse(schemas.BeginWeightUpdateReqInput if begin
                          else schemas.EndWeightUpdateReqInput, await request.json()
                          if request.body_exists else {})
        except schemas.BadRequest as err:
            return result(False, str(err))
        if begin and self.session_open:
            return result(False, "a weight-update session is already open; call "
                                 "end_weight_update() first")
        if not begin and not self.session_open:
            return result(False, "no weight-update session is open; call "
                                 "begin_weight_update() first")
        self.session_open = begin
        self.stats["sessions"] += begin
        return result(True, "Success")

    def _weights_ready(self) -> Optional[str]:
        return "weights are released; resume them before updating" \
            if "weights" in self.released else None

    async def update(self, request: web.Request) -> web.Response:
        handlers = {"/update_weights_from_disk": (schemas.UpdateWeightFromDiskReqInput, self._disk),
                    "/update_weights_from_tensor": (schemas.UpdateWeightsFromTensorReqInput,
                                                    self._tensor),
                    "/update_weights_from_distributed": (
                        schemas.UpdateWeightsFromDistributedReqInput, self._distributed),
                    "/init_weights_update_group": (schemas.InitWeightsUpdateGroupReqInput,
                                                   self._init_group),
                    "/destroy_weights_update_group": (schemas.DestroyWeightsUpdateGroupReqInput,
                                                      self._destroy_group)}
        cls, fn = handlers[request.path]
        try:
            req = schemas.parse(cls, await request.json())
        except schemas.BadRequest as err:
            return result(False, str(err))
        problem = self._weights_ready() if request.path.startswith("/update") else None
        if (self.begin_end and not self.session_open
                and request.path in ("/update_weights_from_tensor",
                                     "/update_weights_from_distributed")):
            problem = (f"{request.path.lstrip('/')} must run between begin_weight_update() and "
                       f"end_weight_update()")
        if problem:
            return result(False, problem)
        try:
            message = await self.run(fn, req)
        except SchedulerCrash as err:
            return await self._crash(str(err))
        except Exception as err:  # reported like SGLang: success false, HTTP 400
            return result(False, f"{type(err).__name__}: {err}")
        version = getattr(req, "weight_version", None)
        if version is not None:
            self.weight_version = version
        self.stats["updates"].append(request.path)
        return result(True, message, **({"num_paused_requests": 0}
                                        if request.path.endswith("disk") else {}))

    def _disk(self, req) -> str:
        self.ranks.load_folder(req.model_path)
        return f"Succeeded to update model weights from {req.model_path}."

    def _tensor(self, req) -> str:
        count = self.ranks.load_payloads(req.serialized_named_tensors, req.load_format)
        return f"Success ({count} tensors)"

    def _init_group(self, req) -> str:
        self.ranks.join(req)
        return f"joined {req.group_name} as ranks {req.rank_offset}.." \
               f"{req.rank_offset + self.ranks.tp - 1} of {req.world_size}"

    def _distributed(self, req) -> str:
        count = self.ranks.receive(req)
        return f"Succeeded to update {count} parameters online from distributed."

    def _destroy_group(self, req) -> str:
        self.ranks.destroy(req.group_name)
        return f"destroyed {req.group_name}"

    async def get_weights(self, request: web.Request) -> web.Response:
        try:
            req = schemas.parse(schemas.GetWeightsByNameReqInput, await request.json())
            values = await self.run(self.backend.weights_by_name, req.name, req.truncate_size)
        except (schemas.BadRequest, KeyError) as err:
            return error(f"Get parameter by name failed: {err}")
        return web.json_response(values)

    async def info(self, request: web.Request) -> web.Response:
        return web.json_response({"tp_size": self.ranks.tp, "dp_size": 1,
                                  "max_running_requests": self.max_running_arg,
                                  "max_total_num_tokens": self.capacity
                                  * self.backend.context_length,
                                  "internal_states": [
                                      {"effective_max_running_requests_per_dp": self.capacity}],
                                  "version": f"standin (sglang {schemas.SGLANG_VERSION} API)",
                                  "weight_version": self.weight_version,
                                  "context_length": self.backend.context_length,
                                  "pending_parts": self.backend.missing_parts()})

    async def set_faults(self, request: web.Request) -> web.Response:
        try:
            self.faults.update(await request.json())
        except (ValueError, TypeError) as err:
            return error(str(err))
        return web.json_response(self.faults.as_dict())

    async def checksums(self, request: web.Request) -> web.Response:
        return web.json_response(await self.run(self.ranks.checksums))

    async def flush_cache(self, request: web.Request) -> web.Response:
        if self._busy():        # SGLang does not flush while requests run
            return web.Response(text="Flush cache failed.\n", status=400)
        return web.Response(text="Cache flushed.\n")

    async def get_stats(self, request: web.Request) -> web.Response:
        return web.json_response(dict(self.stats, faults=self.faults.as_dict(),
                                      released=sorted(self.released)))


# path -> (methods, SGLang's request class, StandIn handler); diffed against SGLang's own
# http_server.py by the contract test
ROUTES = {
    "/health": (("GET",), None, "ok"),
    "/health_generate": (("GET",), None, "ok"),
    "/get_model_info": (("GET",), None, "info"),
    "/get_server_info": (("GET",), None, "info"),
    "/generate": (("POST",), "GenerateReqInput", "generate"),
    "/flush_cache": (("GET", "POST"), None, "flush_cache"),
    "/abort_request": (("POST",), "AbortReq", "abort_request"),
    "/update_weights_from_disk": (("POST",), "UpdateWeightFromDiskReqInput", "update"),
    "/update_weights_from_tensor": (("POST",), "UpdateWeightsFromTensorReqInput", "update"),
    "/update_weights_from_distributed": (("POST",), "UpdateWeightsFromDistributedReqInput",
                                         "update"),
    "/init_weights_update_group": (("POST",), "InitWeightsUpdateGroupReqInput", "update"),
    "/destroy_weights_update_group": (("POST",), "DestroyWeightsUpdateGroupReqInput", "update"),
    "/get_weights_by_name": (("GET", "POST"), "GetWeightsByNameReqInput", "get_weights"),
    "/release_memory_occupation": (("GET", "POST"), "ReleaseMemoryOccupationReqInput", "memory"),
    "/resume_memory_occupation": (("GET", "POST"), "ResumeMemoryOccupationReqInput", "memory"),
    "/begin_weight_update": (("POST",), "BeginWeightUpdateReqInput", "session"),
    "/end_weight_update": (("POST",), "EndWeightUpdateReqInput", "session"),
}


def record_middleware(bodies: list):
    """Keeps every request as [method, path, JSON body or None] (the contract test checks them
    against SGLang's own classes)."""
    @web.middleware
    async def middleware(request: web.Request, handler):
        body = await request.json() if request.body_exists else None
        if not request.path.startswith("/standin/"):
            bodies.append([request.method, request.path, body])
        return await handler(request)
    return middleware


def build_app(standin: StandIn, record: bool = False) -> web.Application:
    middlewares = [fault_middleware(standin.faults, standin.stats["paths"])]
    if record:
        standin.stats["bodies"] = []
        middlewares.insert(0, record_middleware(standin.stats["bodies"]))
    app = web.Application(middlewares=middlewares, client_max_size=1 << 30)
    ok = lambda request: web.Response(text="ok")  # noqa: E731
    for path, (methods, _, handler) in ROUTES.items():
        if path in ("/begin_weight_update", "/end_weight_update") and not standin.begin_end:
            continue
        for method in methods:
            app.router.add_route(method, path, ok if handler == "ok" else getattr(standin, handler))
    app.router.add_post("/standin/faults", standin.set_faults)
    app.router.add_get("/standin/stats", standin.get_stats)
    app.router.add_get("/standin/checksums", standin.checksums)

    async def start_batcher(app: web.Application) -> None:
        standin.queue = asyncio.Queue()
        standin.running = asyncio.Semaphore(standin.capacity)
        app["batcher"] = asyncio.create_task(standin.batcher())
    app.on_startup.append(start_batcher)
    return app


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-path", required=True)
    p.add_argument("--tp-size", "--tp", type=int, default=1)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=30000)
    p.add_argument("--random-seed", type=int, default=0)
    p.add_argument("--context-length", type=int, default=None)
    for flag in ("--mem-fraction-static", "--base-gpu-id", "--dtype", "--log-level"):
        p.add_argument(flag, default=None)
    for flag in ("--skip-tokenizer-init", "--enable-memory-saver",
                 "--enable-deterministic-inference"):
        p.add_argument(flag, action="store_true")
    p.add_argument("--max-running-requests", type=int, default=None)
    p.add_argument("--backend", choices=("model", "echo", "timed"), default="model")
    p.add_argument("--token-time-s", type=float, default=0.001, help="timed backend")
    p.add_argument("--prefill-s", type=float, default=0.0, help="timed backend")
    p.add_argument("--no-begin-end", action="store_true", help="no /begin_/end_weight_update")
    p.add_argument("--record", action="store_true",
                   help="keep every request body (GET /standin/stats lists them)")
    for name in ("fail-next", "delay-next", "drop-next", "die-next"):
        p.add_argument(f"--{name}", type=int, default=0)
    p.add_argument("--delay-s", type=float, default=0.0)
    p.add_argument("--fault-paths", nargs="*", default=["/generate"])
    return p.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s standin %(message)s")
    if args.tp_size < 1:
        raise SystemExit(f"--tp-size must be >= 1 (got {args.tp_size})")
    if args.backend in ("echo", "timed"):
        backend = EchoBackend(args.model_path, context_length=args.context_length or 4096)
        if args.backend == "timed":
            backend = TimedBackend(args.model_path, context_length=args.context_length or 4096,
                                   token_time_s=args.token_time_s, prefill_s=args.prefill_s)
    else:
        from tests.sglang_standin.backend import ModelBackend
        backend = ModelBackend(args.model_path, seed=args.random_seed,
                               context_length=args.context_length)
    faults = FaultPlan(fail_next=args.fail_next, delay_s=args.delay_s, delay_next=args.delay_next,
                       drop_next=args.drop_next, die_next=args.die_next,
                       paths=list(args.fault_paths))
    standin = StandIn(backend, faults, begin_end=not args.no_begin_end,
                      ranks=TPRanks(backend, args.model_path, args.tp_size),
                      max_running=args.max_running_requests)
    log.info("serving %s (%s backend) on %s:%d", args.model_path, args.backend, args.host,
             args.port)
    web.run_app(build_app(standin, record=args.record), host=args.host, port=args.port, print=None,
                handle_signals=True, shutdown_timeout=1.0)
    os._exit(0)          # do not wait for a worker thread stuck in a collective


if __name__ == "__main__":
    main()
