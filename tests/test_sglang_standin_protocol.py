"""The stand-in server's SGLang behaviours, each driven over HTTP against a real stand-in process
and asserted as SGLang 0.5.23 behaves (python/sglang/srt/managers/scheduler_components/
weight_updater.py, managers/scheduler.py, managers/tp_worker.py, entrypoints/http_server.py):
weight-update sessions, memory release/resume and its tags, the scheduler crashes on a busy
release or a resume of an unreleased tag, poisoned weights after a resume, /flush_cache while
busy, and TP 2 (per-rank tensor entries, one full checksum per rank).

Requests go through urllib, not the project's HTTPClient: that one retries HTTP 5xx, and a
crashing server must be seen answering exactly one 500."""
import json
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("aiohttp")
torch = pytest.importorskip("torch")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # for tests.sglang_standin

from tests.sglang_standin import start_standin  # noqa: E402

ALL_TAGS = ["cuda_graph", "kv_cache", "weights"]
PROMPT = [5, 17, 30]


def call(url: str, path: str, body=None, method: str = "POST", timeout_s: float = 60.0):
    """(HTTP status, JSON body or text) of one request, no retries."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url + path, data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            status, raw = resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        status, raw = err.code, err.read().decode()
    try:
        return status, json.loads(raw)
    except json.JSONDecodeError:
        return status, raw


def stats(server) -> dict:
    return call(server.url, "/standin/stats", method="GET")[1]


def greedy(server, max_new_tokens: int = 8):
    return call(server.url, "/generate", {"input_ids": PROMPT, "sampling_params": {
        "max_new_tokens": max_new_tokens, "temperature": 0.0, "ignore_eos": True}})


def generate_in_background(server) -> threading.Thread:
    """A long /generate (8 samples x 240 tokens on the model backend: about a second here),
    returned once the server counts it in flight."""
    body = {"input_ids": PROMPT, "sampling_params": {"max_new_tokens": 240, "n": 8,
                                                     "temperature": 1.0, "ignore_eos": True}}
    def run() -> None:
        try:
            call(server.url, "/generate", body)
        except OSError:         # the server may die with the request open (the crash tests)
            pass

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while stats(server)["generate_inflight"] == 0:
        assert time.monotonic() < deadline, "the /generate never arrived"
        time.sleep(0.005)
    return thread


def wait_exit(server, timeout_s: float = 10.0) -> int:
    deadline = time.monotonic() + timeout_s
    while server.alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    return server.popen.poll()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    from masa_megatron.model.tiny import make_tiny_hf_model

    folder = tmp_path_factory.mktemp("protocol_hf")
    make_tiny_hf_model(folder, "qwen3", seed=5)
    return folder


@pytest.fixture(scope="module")
def model_tp2(tiny, tmp_path_factory):
    server = start_standin(str(tiny), extra_args=["--tp-size", "2"],
                           log_dir=str(tmp_path_factory.mktemp("tp2_logs")))
    yield server
    server.stop()


# ---------------------------------------------------------------- weight-update sessions

def test_tensor_and_distributed_updates_outside_a_session_fail_naming_it(echo):
    tensor = call(echo.url, "/update_weights_from_tensor",
                  {"serialized_named_tensors": ["unused"], "load_format": None})
    distributed = call(echo.url, "/update_weights_from_distributed",
                       {"names": ["w"], "dtypes": ["float32"], "shapes": [[1]]})
    for (status, body), route in ((tensor, "update_weights_from_tensor"),
                                  (distributed, "update_weights_from_distributed")):
        assert status == 400 and body["success"] is False
        assert body["message"] == (f"{route} must run between begin_weight_update() and "
                                   f"end_weight_update()")


def test_begin_twice_and_end_without_begin_fail(echo):
    assert call(echo.url, "/begin_weight_update", {}) == (200, {"success": True,
                                                                "message": "Success"})
    status, again = call(echo.url, "/begin_weight_update", {})
    assert status == 400 and again["success"] is False and "already open" in again["message"]
    assert call(echo.url, "/end_weight_update", {})[0] == 200
    status, stray = call(echo.url, "/end_weight_update", {})
    assert status == 400 and stray["success"] is False
    assert "no weight-update session is open" in stray["message"]


# ---------------------------------------------------------------- memory release / resume

def test_release_and_resume_without_tags_take_all_three(echo):
    assert call(echo.url, "/release_memory_occupation", {}) == (200, None)
    assert stats(echo)["released"] == ALL_TAGS
    assert call(echo.url, "/resume_memory_occupation", {}) == (200, None)
    assert stats(echo)["released"] == []
    assert call(echo.url, "/release_memory_occupation", {"tags": ["kv_cache"]})[0] == 200
    assert stats(echo)["released"] == ["kv_cache"]
    assert call(echo.url, "/resume_memory_occupation", {"tags": ["kv_cache"]})[0] == 200
    assert stats(echo)["released"] == []


def test_an_unknown_memory_tag_is_refused_where_sglang_would_ignore_it(echo):
    """Deliberately stricter than SGLang 0.5.23, which validates no tag (it adds an unknown one
    to offload_tags, pauses nothing and answers 200): a misspelt tag in our client would then
    release nothing, silently, so the stand-in answers 400 and releases nothing."""
    status, body = call(echo.url, "/release_memory_occupation", {"tags": ["activations"]})
    assert status == 400 and "unknown memory tags ['activations']" in body["error"]["message"]
    assert stats(echo)["released"] == []


def test_resuming_a_tag_that_was_not_released_crashes_the_server(tmp_path):
    server = start_standin("/nonexistent-model", backend="echo", log_dir=str(tmp_path))
    try:
        status, body = call(server.url, "/resume_memory_occupation", {"tags": ["weights"]})
        assert status == 500 and "KeyError" in body["error"]["message"]
        assert wait_exit(server) == 1
    finally:
        server.stop()


def test_releasing_while_a_generate_runs_crashes_the_server(tiny, tmp_path):
    server = start_standin(str(tiny), log_dir=str(tmp_path))
    try:
        generate_in_background(server)
        status, body = call(server.url, "/release_memory_occupation", {})
        assert status == 500
        assert "release_memory_occupation should be called only when server is idle" in \
            body["error"]["message"]
        assert wait_exit(server) == 1
    finally:
        server.stop()


# ---------------------------------------------------------------- model backend, TP 2

def test_tp2_server_reports_tp_size_and_every_rank_holds_the_checkpoint(model_tp2, tiny):
    from tests.sglang_standin.weights import hf_checksum, load_hf_folder

    assert call(model_tp2.url, "/get_server_info", method="GET")[1]["tp_size"] == 2
    status, sums = call(model_tp2.url, "/standin/checksums", method="GET")
    assert status == 200 and sums == [hf_checksum(load_hf_folder(str(tiny)))] * 2


def test_flush_cache_fails_while_a_generate_runs_and_succeeds_when_idle(model_tp2):
    running = generate_in_background(model_tp2)
    status, text = call(model_tp2.url, "/flush_cache")
    assert status == 400 and "Flush cache failed" in text
    running.join(timeout=60)
    assert stats(model_tp2)["generate_inflight"] == 0
    status, text = call(model_tp2.url, "/flush_cache")
    assert status == 200 and text.startswith("Cache flushed")


def test_resumed_weights_fail_generation_until_a_disk_sync(model_tp2, tiny):
    from tests.sglang_standin.weights import hf_checksum, load_hf_folder

    status, before = greedy(model_tp2)
    assert status == 200
    assert call(model_tp2.url, "/release_memory_occupation", {})[0] == 200
    assert call(model_tp2.url, "/resume_memory_occupation", {})[0] == 200
    status, stale = greedy(model_tp2)
    names = load_hf_folder(str(tiny))
    message = stale["error"]["message"]
    assert status == 400 and "released weights" in message
    assert any(f"(e.g. {name})" in message for name in names)
    status, synced = call(model_tp2.url, "/update_weights_from_disk", {"model_path": str(tiny)})
    assert status == 200 and synced["success"] is True
    status, after = greedy(model_tp2)
    assert status == 200 and after["output_ids"] == before["output_ids"]
    assert call(model_tp2.url, "/standin/checksums", method="GET")[1] == [hf_checksum(names)] * 2


def test_a_tensor_update_with_one_entry_for_two_tp_ranks_crashes_the_server(tiny, tmp_path):
    """SGLang's TP rank 1 indexes serialized_named_tensors[1]; the IndexError is uncaught in its
    scheduler, which takes the server down."""
    from masa_megatron.rollout.weight_sync.tensor import bucket_payload, serialize_for_sglang
    from tests.sglang_standin.weights import load_hf_folder

    server = start_standin(str(tiny), backend="echo", log_dir=str(tmp_path),
                           extra_args=["--tp-size", "2"])
    try:
        norm = load_hf_folder(str(tiny))["model.norm.weight"]
        entry = serialize_for_sglang(bucket_payload([("model.norm.weight", norm)], None))
        assert call(server.url, "/begin_weight_update", {})[0] == 200
        status, body = call(server.url, "/update_weights_from_tensor",
                            {"serialized_named_tensors": [entry], "load_format": None})
        assert status == 500 and "1 entries for 2 TP ranks" in body["error"]["message"]
        assert wait_exit(server) == 1
    finally:
        server.stop()
