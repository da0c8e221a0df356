"""SGLang launcher: the command lines for real SGLang and sglang-router, health waits that end
with an error naming the server, and shutdowns that leave no process of the group behind."""
import os
import signal
import sys
import time

import pytest

from masa_megatron.ports import free_port
from masa_megatron.rollout.sglang_launch import (EngineError, ManagedProcess, ServerOptions,
                                                 router_command, server_command, wait_healthy)

PY = sys.executable


def test_server_command_for_real_sglang():
    opts = ServerOptions(model_path="/models/qwen3-8b", tp=2, mem_fraction=0.6, port=30001,
                         base_gpu_id=2, memory_saver=True, seed=7, dtype="bfloat16",
                         deterministic=True, context_length=12288, python="python")
    assert server_command(opts) == [
        "python", "-m", "sglang.launch_server", "--model-path", "/models/qwen3-8b",
        "--tp-size", "2", "--mem-fraction-static", "0.6", "--host", "127.0.0.1",
        "--port", "30001", "--base-gpu-id", "2", "--random-seed", "7", "--skip-tokenizer-init",
        "--dtype", "bfloat16", "--enable-memory-saver", "--enable-deterministic-inference",
        "--context-length", "12288"]
    assert opts.url == "http://127.0.0.1:30001"
    plain = server_command(ServerOptions(model_path="m", python="python"))
    assert "--enable-memory-saver" not in plain and "--dtype" not in plain
    assert ServerOptions(model_path="m", host="0.0.0.0", port=5).url == "http://127.0.0.1:5"


def test_router_command():
    assert router_command(["http://127.0.0.1:30000", "http://127.0.0.1:30001"], port=30100,
                          python="python") == [
        "python", "-m", "sglang_router.launch_router", "--worker-urls", "http://127.0.0.1:30000",
        "http://127.0.0.1:30001", "--host", "127.0.0.1", "--port", "30100",
        "--policy", "cache_aware"]


def _group_gone(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    return False


def test_stop_kills_the_whole_process_group(tmp_path):
    # the child starts a grandchild, like launch_server starts its scheduler processes
    script = "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', " \
             "'import time; time.sleep(120)']); time.sleep(120)"
    proc = ManagedProcess("parent", [PY, "-c", script], tmp_path / "p.log")
    time.sleep(0.5)
    pgid = os.getpgid(proc.pid)
    assert pgid == proc.pid and pgid != os.getpgid(0)
    proc.stop(grace_s=5.0)
    assert proc.popen.returncode is not None
    assert _group_gone(pgid)


def test_stop_kills_what_ignores_sigterm(tmp_path):
    script = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); " \
             "print('ready', flush=True); time.sleep(120)"
    proc = ManagedProcess("stubborn", [PY, "-c", script], tmp_path / "s.log")
    deadline = time.monotonic() + 20
    while "ready" not in proc.tail() and time.monotonic() < deadline:
        time.sleep(0.05)
    start = time.monotonic()
    proc.stop(grace_s=0.5)
    assert time.monotonic() - start < 10
    assert proc.popen.returncode == -signal.SIGKILL
    assert _group_gone(proc.pid)


def test_health_wait_times_out_naming_the_server(tmp_path):
    port = free_port()
    proc = ManagedProcess("silent", [PY, "-c", "import time; time.sleep(60)"], tmp_path / "h.log")
    try:
        start = time.monotonic()
        with pytest.raises(EngineError, match=rf"http://127.0.0.1:{port}: not healthy after"):
            wait_healthy(f"http://127.0.0.1:{port}", 1.0, process=proc, interval_s=0.1)
        assert time.monotonic() - start < 10
    finally:
        proc.stop(grace_s=1.0)


def test_health_wait_reports_a_server_that_exits(tmp_path):
    proc = ManagedProcess("crashes", [PY, "-c", "print('CUDA out of memory'); raise SystemExit(3)"],
                          tmp_path / "c.log")
    with pytest.raises(EngineError, match=r"(?s)exited with code 3.*CUDA out of memory"):
        wait_healthy(f"http://127.0.0.1:{free_port()}", 30.0, process=proc, interval_s=0.1)


def test_stop_all_at_exit_leaves_no_orphans(tmp_path):
    """A trainer that exits without shutdown(): the atexit hook stops its servers."""
    marker = tmp_path / "pid"
    code = ("import sys, time; from masa_megatron.rollout.sglang_launch import ManagedProcess; "
            f"p = ManagedProcess('server', [sys.executable, '-c', 'import time; time.sleep(120)'],"
            f" {str(tmp_path / 'o.log')!r}); open({str(marker)!r}, 'w').write(str(p.pid)); "
            "time.sleep(0.3)")
    import subprocess

    subprocess.run([PY, "-c", code], check=True, timeout=60)
    pid = int(marker.read_text())
    deadline = time.monotonic() + 10
    while not _group_gone(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _group_gone(pid)


def test_health_wait_says_what_it_waits_for_and_for_how_long(tmp_path):
    port = free_port()
    said = []
    with pytest.raises(EngineError, match="not healthy after"):
        wait_healthy(f"http://127.0.0.1:{port}", 1.0, interval_s=0.05, report_every_s=0.3,
                     say=said.append)
    assert len(said) >= 2, said
    assert all(f"waiting for SGLang server http://127.0.0.1:{port}" in line for line in said)
    assert " s of 1 s (GET /health: " in said[0] and "refused" in said[0].lower()


def test_refused_connection_on_an_attached_url_fails_within_seconds():
    from masa_megatron.rollout.sglang import SGLangEngine
    url = f"http://127.0.0.1:{free_port()}"
    start = time.monotonic()
    with pytest.raises(EngineError, match=rf"SGLang server {url}: connection refused .*"
                                          rf"rollout.sglang_urls"):
        SGLangEngine(urls=[url], health_timeout_s=600.0)
    assert time.monotonic() - start < 15


def test_servers_do_not_inherit_the_ranks_rendezvous_variables(tmp_path, monkeypatch):
    """A server launched from a torchrun rank must not see that rank's RANK / WORLD_SIZE /
    MASTER_ADDR...: anything in it that initialises torch.distributed from the environment
    would join the trainer's rendezvous and hang (the stand-in's model backend did, in the
    2-node colocated rehearsal). Variables the caller passes explicitly still arrive."""
    for key, value in {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "node0",
                       "MASTER_PORT": "29500", "TORCHELASTIC_RUN_ID": "x",
                       "GROUP_RANK": "1", "KEEP_ME": "yes"}.items():
        monkeypatch.setenv(key, value)
    out = tmp_path / "env.txt"
    code = f"import os; open({str(out)!r}, 'w').write(repr(dict(os.environ)))"
    proc = ManagedProcess("env", [sys.executable, "-c", code], tmp_path / "env.log",
                          env={"MASTER_PORT": "31000"})
    proc.popen.wait(timeout=30)
    env = eval(out.read_text())
    assert not {"RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "TORCHELASTIC_RUN_ID",
                "GROUP_RANK"} & set(env)
    assert env["KEEP_ME"] == "yes" and env["MASTER_PORT"] == "31000"
