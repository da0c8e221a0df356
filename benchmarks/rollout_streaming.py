"""Rollout scheduling: streaming vs two-phase masa_efficient, per-server vs per-sender limits.

Servers: --servers stand-in SGLang servers (tests/sglang_standin, `--backend timed`), each in
its own process, each running at most --cap sequences at once. Time model (server.py): a
sequence holds a running slot for its length x --token-time-s seconds, whatever else runs (a
decode step costs the same below the cap); requests beyond the cap wait in the server's queue.
So the benchmark measures scheduling, not a model.

Work (one masa_efficient step after k): --problems problems, M = 8 meta and G = 8 solution
samples each, lengths drawn once per repeat (seeded) from log-normal distributions with the
paper's means scaled by --scale (meta 2,293 tokens, sigma 1.0: long-tailed; solutions 6,251,
sigma 0.5), capped at the response limit 8,192 x scale; a --gated share of the problems is
gated (no solutions). Requests are seeded like the trainer's (one per sample). The sampled
lengths travel in the prompt (backend.TimedBackend).

Configurations, same work in each, run alternately per repeat through one SGLangEngine client:
    two_phase/per_server   every meta, then every solution; slots per server (the cap each
                           server reports in /get_server_info)
    streaming/per_server   a problem's solutions as soon as its own metas are answered
    two_phase/per_sender   the client before issue 26: one pool of --sender-pool requests for
                           all servers, placed round-robin (emulated by a ServerSlots subclass)
    streaming/per_sender

Per run: generation-phase wall time; server utilisation = time-integral of running sequences /
(cap x servers x phase) (server-side counts); the client's fill while queued (time-weighted
in-flight / limit while requests waited in the client), the same seen by the servers
(`server_fill`: their own arrival/answer times over the client's queued spans) and the longest
request's share.
Medians over --repeats. `simulate` runs the same work as an event simulation on ideal slots
(per-server placement), the ratio without HTTP or CPU effects (--simulate-only: just that).

    python benchmarks/rollout_streaming.py [--repeats 5] [--servers 4] [--cap 32]

Writes benchmarks/results/rollout_streaming.json.
"""
from __future__ import annotations

import argparse
import heapq
import itertools
import json
import math
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from masa_megatron.rollout.base import GenerationRequest, SamplingParams  # noqa: E402
from masa_megatron.rollout.sglang import SGLangEngine  # noqa: E402
from masa_megatron.rollout.sglang_scheduler import FIRST_ROUND, FOLLOW_UP, ServerSlots  # noqa: E402,E501
from tests.sglang_standin import start_standin  # noqa: E402
from tests.sglang_standin.backend import TimedBackend  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "rollout_streaming.json"
META_MEAN, SOLUTION_MEAN, RESPONSE_LIMIT = 2293, 6251, 8192
CONFIGS = ("two_phase/per_server", "streaming/per_server", "two_phase/per_sender",
           "streaming/per_sender")


class PerSenderSlots(ServerSlots):
    """The old client: at most `pool` requests in flight from this sender, whatever the
    servers' limits, each sent to the next server in turn. `cap` (the servers' limit) is only
    the reference of the fill metrics."""

    def __init__(self, urls, pool: int, cap: int):
        super().__init__(urls, [cap] * len(urls))
        self.pool, self._turn = pool, 0

    def _place(self, weight: int):
        if sum(self.running) + weight > self.pool:
            return None
        self._turn += 1
        return (self._turn - 1) % len(self.urls)


def lognormal(rng: random.Random, mean: float, sigma: float, cap: int) -> int:
    mu = math.log(mean) - sigma * sigma / 2
    return max(1, min(cap, round(rng.lognormvariate(mu, sigma))))


def workload(seed: int, args) -> dict:
    rng = random.Random(seed)
    cap = round(RESPONSE_LIMIT * args.scale)
    problems = []
    for p in range(args.problems):
        problems.append({
            "metas": [lognormal(rng, META_MEAN * args.scale, 1.0, cap) for _ in range(8)],
            "solutions": [lognormal(rng, SOLUTION_MEAN * args.scale, 0.5, cap)
                          for _ in range(8)],
            "kept": rng.random() >= args.gated, "seed": seed * 1000 + p})
    return {"cap": cap, "problems": problems}


def simulate(work: dict, slots: int, stream: bool) -> float:
    """Phase length, in token times, of the same work on `slots` ideal slots (no HTTP, no CPU):
    one sequence per slot, waiting first-round sequences first, then follow-ups, each in order
    (the client's priorities, rollout/sglang_scheduler.py)."""
    problems, order = work["problems"], itertools.count()
    waiting = []                       # heap of (priority, order, length, problem or -1)
    for i, p in enumerate(problems):
        for length in p["metas"]:
            heapq.heappush(waiting, (FIRST_ROUND, next(order), length, i))
    left = [len(p["metas"]) for p in problems]
    held, running, now = [], [], 0.0
    while waiting or running or held:
        if not waiting and not running:           # two-phase: every meta is done
            for item in held:
                heapq.heappush(waiting, item)
            held = []
        while waiting and len(running) < slots:
            _, _, length, i = heapq.heappop(waiting)
            heapq.heappush(running, (now + length, i))
        now, i = heapq.heappop(running)
        if i >= 0:
            left[i] -= 1
            if left[i] == 0 and problems[i]["kept"]:
                follow = [(FOLLOW_UP, next(order), n, -1) for n in problems[i]["solutions"]]
                if stream:
                    for item in follow:
                        heapq.heappush(waiting, item)
                else:
                    held += follow
    return now


def log_queued_spans(slots: ServerSlots) -> ServerSlots:
    """Make `slots` keep the wall-clock spans during which requests waited in the client
    (`slots.queued_spans`, contiguous spans merged), to compare with the servers' own logs."""
    slots.queued_spans, last, real = [], [time.time()], slots._tick

    def tick():
        now = time.time()
        if slots._waiting:
            spans = slots.queued_spans
            if spans and spans[-1][1] == last[0]:
                spans[-1] = (spans[-1][0], now)
            else:
                spans.append((last[0], now))
        last[0] = now
        real()
    slots._tick = tick
    return slots


def server_fill(logs: list, spans: list, cap: int) -> Optional[float]:
    """The target seen by the servers: over the spans when requests waited in the client, the
    time-integral of requests each server held (arrival to answer, the stand-in's wall-clock
    `generate_times`) / (cap x the spans' length); the least-filled server's value. One
    request is one sequence here: the benchmark's requests are seeded, so the client sends each
    sample as its own /generate (checked in `run_once`)."""
    total = sum(end - start for start, end in spans)
    if total <= 0:
        return None
    return min(sum(max(0.0, min(done, end) - max(came, start))
                   for _, came, done in log for start, end in spans) / (cap * total)
               for log in logs)


def run_once(engine: SGLangEngine, work: dict, config: str, args) -> dict:
    stream, placement = config.split("/")
    urls = engine.server_urls
    engine._slots = log_queued_spans(
        ServerSlots(urls, [args.cap] * len(urls)) if placement == "per_server"
        else PerSenderSlots(urls, args.sender_pool, args.cap))
    marker, cap, problems = TimedBackend.LENGTHS_MARKER, work["cap"], work["problems"]
    requests = [GenerationRequest([marker, *p["metas"]],
                                  SamplingParams(max_new_tokens=cap, n=8, seed=p["seed"]))
                for p in problems]
    assert all(r.sampling.seed is not None for r in requests)   # one sample per /generate

    def follow(i, result):
        p = problems[i]
        return [GenerationRequest([marker, *p["solutions"]], SamplingParams(
            max_new_tokens=cap, n=8, seed=p["seed"] + 500))] if p["kept"] else []

    before = [engine.http.call(u, "/standin/stats", method="GET").body for u in urls]
    start = time.perf_counter()
    results = engine.generate_chained(requests, follow, stream=stream == "streaming")
    wall = time.perf_counter() - start
    after = [engine.http.call(u, "/standin/stats", method="GET").body for u in urls]
    tokens = sum(c.completion_tokens for r in results for c in r.completions)
    expected = sum(sum(p["metas"]) + (sum(p["solutions"]) if p["kept"] else 0)
                   for p in problems)
    assert tokens == expected, (tokens, expected)
    m = engine.rollout_metrics
    running = sum(a["running_s"] - b["running_s"] for a, b in zip(after, before))
    logs = [a["generate_times"][len(b["generate_times"]):] for a, b in zip(after, before)]
    fills = [v for k, v in m.items() if k.endswith("_fill_while_queued")]
    return {"phase_s": wall, "tokens": tokens,
            "server_utilisation": running / (args.cap * len(urls) * wall),
            "client_fill_while_queued": min(fills) if fills else None,
            "server_fill_while_queued": server_fill(logs, engine._slots.queued_spans, args.cap),
            "busy_fraction_mean": m["rollout/busy_fraction_mean"],
            "longest_request_share": m["rollout/longest_request_share"],
            "meta_to_solution_s_mean": m.get("rollout/meta_to_solution_s_mean")}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--servers", type=int, default=4)
    p.add_argument("--cap", type=int, default=32, help="sequences a server runs at once")
    p.add_argument("--sender-pool", type=int, default=64,
                   help="per_sender: requests in flight from the one sender (all servers)")
    p.add_argument("--problems", type=int, default=64)
    p.add_argument("--scale", type=float, default=1 / 32, help="token lengths x this")
    p.add_argument("--token-time-s", type=float, default=0.002)
    p.add_argument("--gated", type=float, default=0.25)
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--simulate-only", action="store_true",
                   help="only the event simulation (no servers): streaming / two-phase ratio")
    args = p.parse_args(argv)
    simulated = statistics.median(
        simulate(w, args.cap * args.servers, True) / simulate(w, args.cap * args.servers, False)
        for w in (workload(r, args) for r in range(args.repeats)))
    print(f"simulated streaming / two-phase phase ratio (median): {simulated:.3f}")
    if args.simulate_only:
        return {"simulated_streaming_phase_ratio": simulated}
    logs = tempfile.mkdtemp(prefix="rollout-streaming-")
    servers = [start_standin("/nonexistent-model", backend="timed", log_dir=f"{logs}/{i}",
                             extra_args=["--max-running-requests", str(args.cap),
                                         "--token-time-s", str(args.token_time_s)])
               for i in range(args.servers)]
    engine = SGLangEngine(urls=[s.url for s in servers], health_timeout_s=60,
                          request_timeout_s=600)
    runs = {c: [] for c in CONFIGS}
    try:
        for r in range(args.repeats):
            work = workload(r, args)
            for config in (CONFIGS if r % 2 == 0 else CONFIGS[::-1]):
                runs[config].append(run_once(engine, work, config, args))
                print(config, r, {k: round(v, 3) for k, v in runs[config][-1].items()
                                  if isinstance(v, float)}, flush=True)
    finally:
        engine.shutdown()
        for s in servers:
            s.stop()
    med = {c: {k: statistics.median(x[k] for x in rs) for k in rs[0]
               if all(x[k] is not None for x in rs)} for c, rs in runs.items()}
    paired = lambda a, b: statistics.median(  # noqa: E731
        x["phase_s"] / y["phase_s"] for x, y in zip(runs[a], runs[b]))
    summary = {
        "simulated_streaming_phase_ratio": simulated,
        "streaming_phase_ratio_per_server": paired("streaming/per_server",
                                                   "two_phase/per_server"),
        "streaming_phase_ratio_per_sender": paired("streaming/per_sender",
                                                   "two_phase/per_sender"),
        "per_server_vs_per_sender_phase_ratio_streaming": paired("streaming/per_server",
                                                                 "streaming/per_sender"),
        "per_server_vs_per_sender_phase_ratio_two_phase": paired("two_phase/per_server",
                                                                 "two_phase/per_sender"),
    }
    out = {"settings": vars(args), "summary": summary, "medians": med, "runs": runs,
           "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                       "load_average_1m": os.getloadavg()[0]}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(json.dumps({"summary": summary, "medians": med}, indent=1))
    return out


if __name__ == "__main__":
    main()
