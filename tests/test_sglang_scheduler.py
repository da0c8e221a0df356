"""Per-server concurrency of the SGLang client (rollout/sglang_scheduler.py) against timed
stand-in servers: limits read from /get_server_info or configured, shared by several senders,
requests on the least-loaded server."""
import asyncio
import sys
import threading
from pathlib import Path

import pytest

pytest.importorskip("aiohttp")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # for tests.sglang_standin

from masa_megatron.rollout.base import GenerationRequest, SamplingParams  # noqa: E402
from masa_megatron.rollout.sglang import SGLangEngine  # noqa: E402
from tests.sglang_standin import start_standin  # noqa: E402

CAP = 6


@pytest.fixture(scope="module")
def timed(tmp_path_factory):
    """Two timed stand-ins, each running at most CAP sequences (2 ms per token)."""
    procs = [start_standin("/nonexistent-model", backend="timed",
                           extra_args=["--max-running-requests", str(CAP),
                                       "--token-time-s", "0.002"],
                           log_dir=str(tmp_path_factory.mktemp(f"timed{i}")))
             for i in range(2)]
    yield procs
    for p in procs:
        p.stop()


def _engine(procs, **kw):
    return SGLangEngine(urls=[p.url for p in procs], health_timeout_s=30, request_timeout_s=30,
                        **kw)


def _stats(engine, url):
    return engine.http.call(url, "/standin/stats", method="GET").body


def _requests(count, tokens=20, n=1):
    return [GenerationRequest([i % 50 + 1], SamplingParams(max_new_tokens=tokens, n=n))
            for i in range(count)]


def test_per_server_limits_hold_with_several_senders(timed):
    """Three senders, two servers of CAP sequences each: no server ever runs more than CAP of
    our sequences (n-sample requests count n), and both are filled to CAP. Each request runs
    200 ms (100 tokens x 2 ms), long next to the client's few ms between an answer and the next
    request, so every slot is held at once even on a loaded machine."""
    engines = [_engine(timed) for _ in range(3)]
    for eng in engines:
        eng.senders = 3
    try:
        before = [_stats(engines[0], p.url)["max_samples_inflight"] for p in timed]
        errors = []

        def send(eng, n):
            try:
                eng.generate(_requests(8, tokens=100, n=n))
            except Exception as err:      # reported below, in the test's thread
                errors.append(err)
        threads = [threading.Thread(target=send, args=(eng, 1 + i % 2))
                   for i, eng in enumerate(engines)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        peaks = [_stats(engines[0], p.url)["max_samples_inflight"] for p in timed]
        assert before == [0, 0]
        assert peaks == [CAP, CAP]
    finally:
        for eng in engines:
            eng.shutdown()


def test_limit_is_read_from_get_server_info_or_configured(timed):
    asked, configured = _engine(timed), _engine(timed, max_running_requests=3)
    asked.senders = 2
    try:
        asked.generate(_requests(2))
        configured.generate(_requests(2))
        assert asked._slots.shares == [CAP // 2, CAP // 2]
        assert configured._slots.shares == [3, 3]
    finally:
        asked.shutdown()
        configured.shutdown()


def test_one_sender_keeps_every_server_full_while_requests_wait(timed):
    """More work than slots: while requests wait in the client, each server holds its limit.
    5 waves of 200 ms: the longest request stays under 0.6 of the phase unless a stall of
    ~1 s hits it."""
    eng = _engine(timed)
    try:
        eng.generate(_requests(60, tokens=100))    # 5 waves of 2 x CAP
        m = eng.rollout_metrics
        assert m["rollout/server0_fill_while_queued"] > 0.9
        assert m["rollout/server1_fill_while_queued"] > 0.9
        assert 0.9 < m["rollout/busy_fraction_mean"] <= 1.0
        assert 0 < m["rollout/longest_request_share"] < 0.6
    finally:
        eng.shutdown()


def test_slots_go_to_the_least_loaded_server_and_first_round_requests_first():
    from masa_megatron.rollout.sglang_scheduler import FIRST_ROUND, FOLLOW_UP, ServerSlots

    async def scenario():
        slots = ServerSlots(["a", "b"], [2, 3])
        placed = [await slots.acquire() for _ in range(5)]
        assert placed == [1, 0, 1, 0, 1] and slots.running == [2, 3]
        follow = asyncio.ensure_future(slots.acquire(priority=FOLLOW_UP))
        first = asyncio.ensure_future(slots.acquire(priority=FIRST_ROUND))
        await asyncio.sleep(0)
        slots.release(0)
        await asyncio.sleep(0)
        assert first.done() and first.result() == 0 and not follow.done()
        slots.release(1)
        assert await follow == 1
        big = await asyncio.wait_for(asyncio.ensure_future(_drain_then(slots, 4)), 1.0)
        assert big in (0, 1)           # larger than a share: runs alone on an idle server
    asyncio.run(scenario())


async def _drain_then(slots, weight):
    for s, count in enumerate(list(slots.running)):
        for _ in range(count):
            slots.release(s)
    return await slots.acquire(weight)


def _chain(eng, stream):
    """Four first requests, one of them long (the batch's tail: 500 tokens x 2 ms = 1 s, the
    others 20 ms); one follow-up each."""
    first = [GenerationRequest([i + 1], SamplingParams(max_new_tokens=500 if i == 0 else 10))
             for i in range(4)]

    def follow(i, result):
        assert result.completions[0].token_ids[0] == i + 2     # echo of request i's prompt
        return [GenerationRequest([100 + i], SamplingParams(max_new_tokens=5))]
    return eng.generate_chained(first, follow, stream=stream)


def test_streamed_follow_ups_start_before_the_slowest_first_request_ends(timed):
    """Streamed, a short request's follow-up is sent as soon as it is answered (a gap of ms);
    in two phases it waits for the 1 s tail (a gap of ~0.98 s). The 0.5 s bound between them
    leaves ~0.5 s of scheduling delay to either side."""
    eng = _engine(timed[:1])
    try:
        times = {}
        for stream in (True, False):
            start = len(_stats(eng, timed[0].url)["generate_times"])
            results = _chain(eng, stream)
            assert [r.completions[0].token_ids[0] for r in results] == [2, 3, 4, 5,
                                                                       101, 102, 103, 104]
            log = _stats(eng, timed[0].url)["generate_times"][start:]
            slowest_end = max(end for rid, _, end in log if rid.endswith("-0"))
            follow_starts = [t for rid, t, _ in log if "f" in rid.rsplit("-", 1)[-1]]
            times[stream] = (slowest_end, follow_starts, eng.rollout_metrics)
        end, starts, metrics = times[True]
        assert len(starts) == 4 and sum(t < end for t in starts) == 3   # all but the tail's own
        end, starts, two_phase = times[False]
        assert all(t >= end for t in starts)
        assert metrics["rollout/meta_to_solution_s_max"] < 0.5 < \
            two_phase["rollout/meta_to_solution_s_max"]
    finally:
        eng.shutdown()


def test_timed_backend_takes_each_samples_length_from_the_prompt(timed):
    """The benchmark's lengths: sample j of a prompt [999, l_0, l_1, ...] answers min(cap, l_j)
    tokens, seeded (one request per sample) or not (one request with n)."""
    eng = _engine(timed[:1])
    try:
        for seed in (11, None):
            req = GenerationRequest([999, 3, 7, 2], SamplingParams(max_new_tokens=5, n=3,
                                                                   seed=seed))
            got = eng.generate([req])[0].completions
            assert [len(c.token_ids) for c in got] == [3, 5, 2]
            assert [c.finish_reason for c in got] == ["stop", "length", "stop"]
    finally:
        eng.shutdown()


def test_waiting_first_round_requests_start_before_follow_ups(timed):
    """Streaming, more first-round requests than slots: a freed slot goes to a waiting
    first-round request (a meta, which may unlock more work) before any follow-up (a solution),
    so every first-round request holds a slot before the first follow-up does (the order the
    client grants its slots in)."""
    from masa_megatron.rollout.sglang_scheduler import FIRST_ROUND, FOLLOW_UP, ServerSlots

    class GrantLog(ServerSlots):
        async def acquire(self, weight: int = 1, priority: int = 0) -> int:
            server = await super().acquire(weight, priority)
            self.granted.append(priority)
            return server

    eng = _engine(timed[:1])
    eng._slots = GrantLog([timed[0].url], [CAP])
    eng._slots.granted = []
    try:
        first = [GenerationRequest([i + 1], SamplingParams(max_new_tokens=10 + 10 * (i % 3)))
                 for i in range(3 * CAP)]
        results = eng.generate_chained(first, lambda i, r: [GenerationRequest(
            [100 + i], SamplingParams(max_new_tokens=5))], stream=True)
        assert len(results) == 6 * CAP
        assert eng._slots.granted == [FIRST_ROUND] * (3 * CAP) + [FOLLOW_UP] * (3 * CAP)
    finally:
        eng.shutdown()
