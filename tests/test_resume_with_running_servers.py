"""A new trainer attempt next to servers that are still running (issue 24, defect 5): the
normal case on a cluster when a training rank dies. The previous attempt was killed inside a
broadcast weight sync, leaving its weight-update group on the server and the server in that
broadcast. The next attempt must abort what still runs, wait for health, join a group under a
name of its own (SGLang refuses a group name it already has) and resync before generating."""
import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from masa_megatron.ports import free_port
from tests.support.timeouts import outlasting

pytest.importorskip("megatron.core")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.sglang_standin import standin_env, start_standin  # noqa: E402


def _attempt(folder, url, out, seed, die_in_broadcast=0):
    cmd = [sys.executable, str(REPO / "tests/dist_scripts/sync_attempt.py"), "--hf-dir",
           str(folder), "--url", url, "--out", str(out), "--seed", str(seed),
           "--die-in-broadcast", str(die_in_broadcast)]
    env = {**os.environ, **standin_env(), "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port()), "RANK": "0", "WORLD_SIZE": "1"}
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
@outlasting(120, 300, 300)     # the stand-in's health wait, then two trainer attempts
def test_next_attempt_resyncs_servers_left_running_by_a_killed_one(tmp_path):
    from masa_megatron.model.tiny import make_tiny_hf_model

    folder = tmp_path / "tiny"
    make_tiny_hf_model(folder, "qwen3", seed=5)
    server = start_standin(str(folder), log_dir=str(tmp_path / "logs"), extra_args=["--record"])
    try:
        killed = _attempt(folder, server.url, tmp_path / "a1.json", seed=1, die_in_broadcast=3)
        assert killed.returncode == 9, killed.stderr[-3000:]
        second = _attempt(folder, server.url, tmp_path / "a2.json", seed=2)
        assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-3000:]
        with urllib.request.urlopen(f"{server.url}/standin/stats", timeout=30) as reply:
            stats = json.load(reply)
    finally:
        server.stop()
    result = json.loads((tmp_path / "a2.json").read_text())
    assert result["equal"], result                      # resynced: served == trainer's weights
    paths = [path for _, path, _ in stats["bodies"]]
    inits = [body["group_name"] for _, path, body in stats["bodies"]
             if path == "/init_weights_update_group"]
    assert len(inits) == 2 and inits[0] != inits[1]     # a group name per attempt
    second_start = paths.index("/init_weights_update_group", paths.index(
        "/init_weights_update_group") + 1)
    # the second attempt aborted what was still running before it synced
    before_sync = stats["bodies"][:second_start]
    assert any(path == "/abort_request" and body.get("abort_all")
               for _, path, body in before_sync[-5:]), before_sync[-5:]
