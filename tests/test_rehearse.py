"""`masa rehearse`: the shrinker keeps what shapes each recipe's run (fast, no processes), the
checks fail on what is wrong, and one real rehearsal of the smallest recipe at its topology."""
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("megatron.core")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))   # for tests.sglang_standin


def test_a_standin_started_by_a_torchrun_rank_runs_its_own_world(tmp_path, monkeypatch):
    """A colocated trainer rank launches the servers, so they inherit torchrun's RANK,
    WORLD_SIZE, MASTER_ADDR/PORT and TORCHELASTIC_USE_AGENT_STORE (with which even a tcp://
    rendezvous waits for torchrun's store); the stand-in (like SGLang) must not join the trainer's
    world with them (it waited there forever) but start on its own."""
    from masa_megatron.model.tiny import make_tiny_hf_model
    from masa_megatron.rollout.sglang_launch import free_port
    from tests.sglang_standin import start_standin

    make_tiny_hf_model(tmp_path / "tiny", "qwen3", seed=1)
    for name, value in (("RANK", "0"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "0"),
                        ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(free_port())),
                        ("TORCHELASTIC_RUN_ID", "none"), ("TORCHELASTIC_USE_AGENT_STORE", "True")):
        monkeypatch.setenv(name, value)
    server = start_standin(str(tmp_path / "tiny"), log_dir=str(tmp_path / "logs"),
                           health_timeout_s=90.0)
    server.stop()
