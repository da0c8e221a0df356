"""The SGLang engine's HTTP side against the stand-in server's echo backend (no model, fast):
request/response translation, retries with backoff, errors that name the server and never hang,
bounded concurrency, strict schemas, memory release/resume, weight-update sessions."""
import sys
import time
from pathlib import Path

import pytest

from masa_megatron.ports import free_port

pytest.importorskip("aiohttp")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # for tests.sglang_standin

from masa_megatron.rollout.base import GenerationRequest, SamplingParams  # noqa: E402
from masa_megatron.rollout.sglang import (SGLangEngine, _signed64, generate_payloads,  # noqa: E402
                                          parse_completions)
from masa_megatron.rollout.sglang_launch import EngineError  # noqa: E402
from tests.sglang_standin import STANDIN_MODULE, standin_env  # noqa: E402

REQ = GenerationRequest([1, 2, 3], SamplingParams(max_new_tokens=4, n=2))


@pytest.fixture
def engine(echo):
    """The echo server answers in ms; the 10 s per-call timeout keeps a stall of a loaded
    machine from turning into a retry the tests count."""
    eng = SGLangEngine(urls=[echo.url], request_timeout_s=10.0, max_retries=2,
                       retry_backoff_s=0.01, health_timeout_s=30, max_running_requests=4,
                       colocate=True)
    yield eng
    eng.http.call(echo.url, "/standin/faults", {"fail_next": 0, "delay_next": 0, "drop_next": 0,
                                                "die_next": 0, "paths": ["/generate"]})
    eng.resume()
    eng.shutdown()


def _faults(engine, **plan):
    engine.http.call(engine.server_urls[0], "/standin/faults", plan).check()


def _stats(engine):
    return engine.http.call(engine.server_urls[0], "/standin/stats", method="GET").body


# ---------------------------------------------------------------- pure translation

def test_payloads_unseeded_seeded_and_greedy():
    (one,) = generate_payloads(GenerationRequest([5, 6], SamplingParams(
        max_new_tokens=9, temperature=0.8, top_p=0.9, top_k=0, stop_token_ids=[2], n=4)), "r")
    assert one == {"input_ids": [5, 6], "return_logprob": True, "rid": "r",
                   "sampling_params": {"max_new_tokens": 9, "temperature": 0.8, "top_p": 0.9,
                                       "top_k": -1, "ignore_eos": False, "n": 4,
                                       "stop_token_ids": [2]}}
    seeded = generate_payloads(GenerationRequest([5], SamplingParams(seed=3, n=3)), "r")
    assert [p["rid"] for p in seeded] == ["r-s0", "r-s1", "r-s2"]
    seeds = [p["sampling_params"]["sampling_seed"] for p in seeded]
    assert len(set(seeds)) == 3 and all(-2 ** 63 <= s < 2 ** 63 for s in seeds)
    assert all(p["sampling_params"]["n"] == 1 for p in seeded)
    greedy = generate_payloads(GenerationRequest([5], SamplingParams(temperature=0, seed=3, n=2)),
                               "g")
    assert len(greedy) == 1 and "sampling_seed" not in greedy[0]["sampling_params"]
    assert _signed64(2 ** 64 - 1) == -1 and _signed64(5) == 5


def test_parse_completions():
    body = [{"output_ids": [4, 2], "meta_info": {"finish_reason": {"type": "stop", "matched": 2},
                                                 "output_token_logprobs": [[-0.5, 4, None],
                                                                           [-0.25, 2, None]],
                                                 "weight_version": "3"}},
            {"output_ids": [9], "meta_info": {"finish_reason": {"type": "length", "length": 1},
                                              "output_token_logprobs": [[-1.0, 9, None]],
                                              "weight_version": "3"}}]
    completions, version = parse_completions(body, "srv")
    assert [(c.token_ids, c.logprobs, c.finish_reason) for c in completions] == [
        ([4, 2], [-0.5, -0.25], "stop"), ([9], [-1.0], "length")]
    assert version == 3
    with pytest.raises(EngineError, match="srv: malformed"):
        parse_completions({"output_ids": [1], "meta_info": {"output_token_logprobs": [[0, 2]]}},
                          "srv")


# ---------------------------------------------------------------- against the echo server

def test_generate_and_n_samples(engine):
    seeded = GenerationRequest([7], SamplingParams(max_new_tokens=3, seed=5, n=3), "mine")
    res = engine.generate([REQ, seeded])
    assert [c.token_ids for c in res[0].completions] == [[4, 5, 6, 7]] * 2
    assert len(res[1].completions) == 3 and res[1].request_id == "mine"
    assert res[0].prompt_tokens == 3 and res[0].completions[0].finish_reason == "length"


def test_retries_transient_500_then_succeeds(engine):
    _faults(engine, fail_next=2)
    engine.generate([REQ])
    assert engine.http.stats["retries"] == 2


def test_persistent_500_is_an_error_naming_the_server(engine, echo):
    _faults(engine, fail_next=-1)
    with pytest.raises(EngineError, match=rf"{echo.url}: POST /generate failed after 3 "
                                          r"attempt\(s\): HTTP 500"):
        engine.generate([REQ])


def test_dropped_connection_is_retried(engine):
    _faults(engine, drop_next=1)
    assert len(engine.generate([REQ])[0].completions) == 2
    assert engine.http.stats["retries"] >= 1


def test_slow_server_times_out_instead_of_hanging(engine, echo):
    _faults(engine, delay_next=-1, delay_s=30.0)
    engine.http.timeout_s = 1.0                # each attempt's limit (request_timeout_s)
    start = time.monotonic()
    with pytest.raises(EngineError, match=rf"{echo.url}.*timeout"):
        engine.generate([REQ])
    assert time.monotonic() - start < 15      # 3 attempts x 1 s + backoff


def test_concurrency_is_bounded(engine, echo):
    _faults(engine, delay_next=-1, delay_s=0.1)
    before = _stats(engine)["max_generate_inflight"]
    requests = [GenerationRequest([i + 1], SamplingParams(max_new_tokens=2)) for i in range(12)]
    engine.generate(requests)
    assert before <= 4 and _stats(engine)["max_generate_inflight"] <= 4


def test_unknown_fields_are_rejected_like_sglang(engine, echo):
    bad_top = engine.http.call(echo.url, "/generate", {"input_ids": [1], "sampling": {}})
    assert bad_top.status == 400 and "sampling" in bad_top.message()
    bad_param = engine.http.call(echo.url, "/generate", {"input_ids": [1], "sampling_params":
                                                         {"max_tokens": 3}})
    assert bad_param.status == 400 and "max_tokens" in bad_param.message()


def test_prompt_beyond_context_is_an_abort(engine):
    long = GenerationRequest(list(range(1, 4000)), SamplingParams(max_new_tokens=200, n=2))
    res = engine.generate([long, REQ])
    assert [c.finish_reason for c in res[0].completions] == ["abort", "abort"]
    assert res[1].completions[0].finish_reason == "length"


def test_pause_resume_and_update_order(engine, tmp_path):
    engine.pause()
    assert _stats(engine)["released"] == ["cuda_graph", "kv_cache", "weights"]
    with pytest.raises(EngineError, match="released"):
        engine.generate([REQ])
    engine.update_weights(path=str(tmp_path))          # resumes the weights first
    assert _stats(engine)["released"] == ["cuda_graph", "kv_cache"]
    engine.resume()
    assert _stats(engine)["released"] == []
    assert engine.weight_version == 1 and engine.generate([REQ])[0].weight_version == 1


def test_release_and_resume_take_sglang_tags_and_skip_what_is_already_done(engine):
    engine.release(["kv_cache", "cuda_graph"])
    engine.release(["kv_cache", "cuda_graph", "weights"])   # only weights goes out
    assert _stats(engine)["released"] == ["cuda_graph", "kv_cache", "weights"]
    engine.resume(["weights"])
    assert _stats(engine)["released"] == ["cuda_graph", "kv_cache"]
    engine.resume(["weights", "kv_cache", "cuda_graph"])    # weights is not sent twice
    assert _stats(engine)["released"] == []
    assert len(engine.generate([REQ])[0].completions) == 2


def test_release_is_refused_while_requests_of_this_process_are_in_flight(engine):
    engine._inflight.add((engine.server_urls[0], "masa-busy"))
    try:
        with pytest.raises(EngineError, match="in flight.*masa-busy"):
            engine.release()
    finally:
        engine._inflight.clear()
    assert _stats(engine)["released"] == []


def test_abort_all_reaches_the_server(engine):
    engine.abort()
    assert _stats(engine)["aborted"][-1] == "*"


def test_weight_session_probe_and_dead_server(tmp_path):
    """An older server (no /begin_weight_update) is tolerated; a server that dies mid-request
    gives an error naming it, quickly."""
    eng = SGLangEngine("/nonexistent-model", server_module=STANDIN_MODULE,
                       launch_env=standin_env(), extra_server_args=["--backend", "echo",
                                                                    "--no-begin-end"],
                       base_port=free_port(), health_timeout_s=60, request_timeout_s=2.0,
                       max_retries=2, retry_backoff_s=0.05, log_dir=str(tmp_path))
    try:
        eng.update_weights(path=str(tmp_path))
        assert eng.weight_sync.target.begin_end_supported is False
        _faults(eng, die_next=1)
        start = time.monotonic()
        with pytest.raises(EngineError, match=rf"{eng.server_urls[0]}: POST /generate failed"):
            eng.generate([REQ])
        assert time.monotonic() - start < 15
        assert not eng.health()
    finally:
        eng.shutdown()
    assert eng.processes == []


def test_two_launched_servers_behind_a_router(tmp_path):
    """launch: two servers on consecutive ports and GPU blocks, a router in front; generation
    goes through the router, control calls go to every server; shutdown stops all three."""
    eng = SGLangEngine("/nonexistent-model", num_servers=2, tp=1, router=True,
                       router_port=free_port(), base_port=free_port(count=2),
                       server_module=STANDIN_MODULE, router_module="tests.sglang_standin.router",
                       launch_env=standin_env(), extra_server_args=["--backend", "echo"],
                       health_timeout_s=60, log_dir=str(tmp_path))
    try:
        assert len(eng.server_urls) == 2 and eng.router_url not in eng.server_urls
        assert [p.cmd[p.cmd.index("--base-gpu-id") + 1] for p in eng.processes[:2]] == ["0", "1"]
        requests = [GenerationRequest([i + 1], SamplingParams(max_new_tokens=2)) for i in range(6)]
        assert len(eng.generate(requests)) == 6
        per_worker = eng.http.call(eng.router_url, "/standin/stats", method="GET").body
        assert sorted(per_worker.values()) == [3, 3]
        eng.update_weights(path=str(tmp_path))
        for url in eng.server_urls:
            assert "/update_weights_from_disk" in eng.http.call(
                url, "/standin/stats", method="GET").body["updates"]
        assert eng.health()
        procs = list(eng.processes)
    finally:
        eng.shutdown()
    assert all(p.popen.poll() is not None for p in procs)


def test_from_config_attaches_to_configured_urls(echo, tmp_path):
    from masa_megatron.config import ExperimentConfig

    cfg = ExperimentConfig()
    cfg.model.hf_path = "/nonexistent-model"
    cfg.trainer.output_dir = str(tmp_path)
    cfg.rollout.engine, cfg.rollout.sglang_urls = "sglang", [echo.url]
    cfg.rollout.sglang_concurrency, cfg.rollout.sglang_max_running_requests = 7, 5
    eng = SGLangEngine.from_config(None, cfg)
    try:
        assert eng.server_urls == [echo.url] and eng.concurrency == 7 and not eng.processes
        assert eng.weight_sync.name == "disk"
        assert eng.weight_sync.sync_dir == f"{tmp_path}/weight_sync"
        assert len(eng.generate([REQ])[0].completions) == 2
        assert eng._slots.shares == [5]
    finally:
        eng.shutdown()
    from masa_megatron.rollout.base import get_engine_class
    assert get_engine_class("sglang") is SGLangEngine


def test_flattened_broadcast_is_a_config_choice(echo, tmp_path):
    from masa_megatron.config import ExperimentConfig

    cfg = ExperimentConfig()
    cfg.trainer.output_dir = str(tmp_path)
    cfg.rollout.engine, cfg.rollout.sglang_urls = "sglang", [echo.url]
    cfg.rollout.weight_sync, cfg.rollout.weight_sync_flattened_broadcast = "broadcast", True
    eng = SGLangEngine.from_config(None, cfg)
    try:
        assert eng.weight_sync.name == "broadcast"
        assert eng.weight_sync.load_format == "flattened_bucket"
    finally:
        eng.shutdown()
    with pytest.raises(ValueError, match="load_format='zip'"):
        SGLangEngine(None, urls=[echo.url], weight_sync="broadcast",
                     sync_options={"load_format": "zip"})


def test_from_config_launches_deterministic_servers_when_configured(monkeypatch, tmp_path):
    """rollout.sglang_deterministic reaches the servers' command line
    (--enable-deterministic-inference): without it per-request sampling seeds are ignored."""
    from masa_megatron.config import ExperimentConfig
    from masa_megatron.rollout.sglang_launch import server_command

    launched = []

    def record_and_stop(opts, num_servers, **kwargs):
        launched.append(server_command(opts))
        raise EngineError("launch recorded")

    monkeypatch.setattr("masa_megatron.rollout.sglang_placement.launch_servers", record_and_stop)
    cfg = ExperimentConfig()
    cfg.model.hf_path, cfg.trainer.output_dir = str(tmp_path), str(tmp_path)
    cfg.rollout.engine = "sglang"
    for deterministic in (True, False):
        cfg.rollout.sglang_deterministic = deterministic
        with pytest.raises(EngineError, match="launch recorded"):
            SGLangEngine.from_config(None, cfg)
    assert ["--enable-deterministic-inference" in cmd for cmd in launched] == [True, False]


def test_servers_and_router_start_with_the_configured_sglang_python(monkeypatch, tmp_path):
    """rollout.sglang_python: SGLang in its own interpreter (it pins its own torch; the cluster
    image puts it in /opt/sglang) runs the servers and the router; empty means this one."""
    import sys

    from masa_megatron.config import ExperimentConfig
    from masa_megatron.rollout.sglang_launch import server_command

    launched = []

    def record_servers(opts, num_servers, **kwargs):
        launched.append(server_command(opts))
        return [type("P", (), {"url": f"http://127.0.0.1:{9000 + i}", "stop": lambda s: None})()
                for i in range(num_servers)]

    def record_router(urls, **kwargs):
        launched.append([kwargs.get("python", sys.executable), "router"])   # its default
        raise EngineError("launch recorded")

    monkeypatch.setattr("masa_megatron.rollout.sglang_placement.launch_servers", record_servers)
    monkeypatch.setattr("masa_megatron.rollout.sglang_placement.launch_router", record_router)
    cfg = ExperimentConfig()
    cfg.model.hf_path, cfg.trainer.output_dir = str(tmp_path), str(tmp_path)
    cfg.rollout.engine, cfg.rollout.sglang_router = "sglang", True
    for python in ("/opt/sglang/bin/python", ""):
        cfg.rollout.sglang_python = python
        with pytest.raises(EngineError, match="launch recorded"):
            SGLangEngine.from_config(None, cfg)
    assert [cmd[0] for cmd in launched] == ["/opt/sglang/bin/python", "/opt/sglang/bin/python",
                                            sys.executable, sys.executable]


def test_from_config_passes_extra_flags_and_logs_under_the_output_folder(monkeypatch, tmp_path):
    """rollout.sglang_extra_args reach the servers' command line, and their logs go to
    <output_dir>/sglang_logs/<hostname>/ (shared storage, one folder per node), not to a
    node-local temporary folder (issue 24, defect 6)."""
    import socket

    from masa_megatron.config import ExperimentConfig
    from masa_megatron.rollout.sglang_launch import server_command

    launched = []

    def record_and_stop(opts, num_servers, **kwargs):
        launched.append((server_command(opts), kwargs.get("log_dir")))
        raise EngineError("launch recorded")

    monkeypatch.setattr("masa_megatron.rollout.sglang_placement.launch_servers", record_and_stop)
    cfg = ExperimentConfig()
    cfg.model.hf_path, cfg.trainer.output_dir = str(tmp_path), str(tmp_path / "run")
    cfg.rollout.engine = "sglang"
    cfg.rollout.sglang_extra_args = ["--chunked-prefill-size", "4096", "--disable-radix-cache"]
    cfg.rollout.sglang_server_module = "tests.sglang_standin.server"
    with pytest.raises(EngineError, match="launch recorded"):
        SGLangEngine.from_config(None, cfg)
    (cmd, log_dir), = launched
    assert cmd[1:3] == ["-m", "tests.sglang_standin.server"]
    assert cmd[-3:] == ["--chunked-prefill-size", "4096", "--disable-radix-cache"]
    assert log_dir == str(tmp_path / "run" / "sglang_logs" / socket.gethostname())


def test_attached_servers_use_the_launchs_router_and_never_start_their_own(echo, tmp_path):
    """Disaggregated: the router is started once, by slurm/disaggregated.sbatch, on a rollout
    node. The trainer uses it (rollout.sglang_router_url) for generation and the servers for
    control calls; with rollout.sglang_urls and sglang_router but no router URL it refuses to
    start a router of its own on rank 0's loopback, which other nodes cannot reach
    (issue 24, defect 3)."""
    from tests.sglang_standin import standin_env

    router_port = free_port()
    router = start_router([echo.url], router_port, tmp_path)
    try:
        eng = SGLangEngine(None, urls=[echo.url], router=True,
                           router_url=f"http://127.0.0.1:{router_port}", health_timeout_s=30)
        assert eng.processes == [] and eng.router_url == f"http://127.0.0.1:{router_port}"
        eng.generate([GenerationRequest([3], SamplingParams(max_new_tokens=2))])
        per_worker = eng.http.call(eng.router_url, "/standin/stats", method="GET").body
        assert sum(per_worker.values()) == 1
        eng.shutdown()
    finally:
        router.stop()
    with pytest.raises(EngineError, match="rollout.sglang_router_url"):
        SGLangEngine(None, urls=[echo.url], router=True, launch_env=standin_env())


def start_router(worker_urls, port, log_dir):
    from masa_megatron.rollout.sglang_launch import launch_router
    from tests.sglang_standin import standin_env
    return launch_router(worker_urls, host="127.0.0.1", port=port, health_timeout_s=30,
                         log_dir=str(log_dir), module="tests.sglang_standin.router",
                         env=standin_env())


def test_from_config_passes_the_router_url():
    import masa_megatron.rollout.sglang as sglang_module
    from masa_megatron.config import ExperimentConfig

    cfg = ExperimentConfig()
    cfg.rollout.engine, cfg.rollout.sglang_router = "sglang", True
    cfg.rollout.sglang_urls = ["http://roll0:30000"]
    cfg.rollout.sglang_router_url = "http://roll0:30080"
    seen = {}

    class Recorder(sglang_module.SGLangEngine):
        def __init__(self, model_path=None, **kwargs):
            seen.update(kwargs)

    Recorder.from_config(None, cfg)
    assert seen["router_url"] == "http://roll0:30080" and seen["urls"] == ["http://roll0:30000"]
