"""Broadcast weight sync with PP = 2 and two servers: the stages take turns (issue 24, defect 4).

SGLang applies one weight update at a time per server; if both stages post to every server at
once, two servers can take the stages in opposite orders and each waits in the other stage's
broadcast: a cross-group deadlock until the timeout. With turns, every server sees all of stage
0's buckets, then all of stage 1's, in every sync."""
import json
import os
import subprocess
import sys
from itertools import groupby
from pathlib import Path

import pytest

pytest.importorskip("megatron.core")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.sglang_standin import standin_env, start_standin  # noqa: E402
from tests.support.timeouts import outlasting  # noqa: E402


@pytest.mark.slow
@outlasting(600)
def test_pipeline_stages_broadcast_in_turns_to_every_server(tmp_path):
    from masa_megatron.model.tiny import make_tiny_hf_model
    from masa_megatron.ports import free_port

    folder = tmp_path / "tiny"
    make_tiny_hf_model(folder, "qwen3", seed=5)
    servers = [start_standin(str(folder), log_dir=str(tmp_path / f"logs{i}"),
                             extra_args=["--record"]) for i in range(2)]
    try:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
               "--master_port", str(free_port()),
               str(REPO / "tests/dist_scripts/pp_broadcast_order.py"), "--hf-dir", str(folder),
               "--urls", ",".join(s.url for s in servers), "--out", str(tmp_path)]
        log = tmp_path / "torchrun.log"
        with open(log, "w") as out:
            run = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, timeout=600,
                                 env={**os.environ, **standin_env()})
        assert run.returncode == 0, log.read_text()[-4000:]
    finally:
        for server in servers:
            server.stop()
    results = json.loads((tmp_path / "results.json").read_text())
    runs = []
    for url, r in results.items():
        assert r["equal"], url
        stages = [name.rsplit("-", 1)[0] for name in r["groups"]]   # minus the attempt suffix
        runs.append([name for name, _ in groupby(stages)])
    # two syncs, each: every bucket of stage 0, then every bucket of stage 1; on both servers
    expected = ["masa-weight-sync-pp0", "masa-weight-sync-pp1"] * 2
    assert runs == [expected, expected], runs
