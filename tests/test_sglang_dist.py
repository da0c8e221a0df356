"""Sharded trainers (TP=2, then PP=2; two processes under torchrun, gloo; one launch) syncing into
a TP-2 stand-in server by disk, by broadcast and by tensor payloads, and generating through the
data-parallel flow: every server TP rank's full weights equal the trainer's, the server's
outputs equal the sharded embedded engine's, only the model-parallel group's first rank sends
requests, every rank receives the same results."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from masa_megatron.ports import free_port

pytest.importorskip("torch")
pytest.importorskip("megatron.core")
pytest.importorskip("aiohttp")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))   # for tests.sglang_standin

from tests.sglang_standin import standin_env, start_standin  # noqa: E402
from tests.support.timeouts import outlasting  # noqa: E402


@pytest.mark.slow
@outlasting(900)
def test_tp2_and_pp2_trainers_sync_into_a_tp2_server(tmp_path):
    from masa_megatron.model.tiny import make_tiny_hf_model

    folder = tmp_path / "tiny"
    make_tiny_hf_model(folder, "qwen3", seed=5)
    server = start_standin(str(folder), log_dir=str(tmp_path / "logs"),
                           extra_args=["--tp-size", "2"])
    try:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
               "--master_port", str(free_port()), str(REPO / "tests/sglang_standin/dist_sync_check.py"),
               "--hf-dir", str(folder), "--url", server.url, "--out", str(tmp_path)]
        # output to a file, not a pipe: the torch_shm_manager daemons that CPU tensor payloads
        # start inherit it and outlive the ranks, so reading a pipe to its end would hang
        log = tmp_path / "torchrun.log"
        with open(log, "w") as out:
            run = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, timeout=900,
                                 env={**os.environ, **standin_env()})
        assert run.returncode == 0, log.read_text()[-4000:]
    finally:
        server.stop()
    results = json.loads((tmp_path / "results.json").read_text())
    for layout in ("tp2", "pp2"):
        for sync in ("disk", "broadcast", "broadcast_flat", "tensor", "tensor_list"):
            r = results[layout][sync]
            assert r["server_checksums_equal_trainer"], (layout, sync)
            assert r["tokens_match"] and r["reasons_match"], (layout, sync, r)
            assert r["max_logprob_diff"] < 1e-5, (layout, sync, r)
            assert r["same_on_all_ranks"], (layout, sync)
            assert r["generate_calls"] == 3, (layout, sync)   # 1 greedy + 2 seeded samples
            assert r["sync_stats"][f"weight_sync/{sync.split('_')[0]}/bytes"] > 0

