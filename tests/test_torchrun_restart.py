"""torchrun restarts as the launchers configure them (recipes.launch --max-restarts, the sbatch
knob MAX_RESTARTS): after a rank dies, the next attempt's ranks must form their process group
even when they start at different times.

Root cause of the failure this guards against (issue 24): torchrun's c10d rendezvous shares one
TCP store between its agent and the workers (TORCHELASTIC_USE_AGENT_STORE) and keeps that store,
with every key the previous attempt wrote, across restarts; the workers' default group uses the
same keys again (no per-attempt prefix), so a rank that reads a peer's address before the late
peer has rewritten it connects to the dead rank's port: `Gloo connectFullMesh failed ...
Connection refused`."""
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("megatron.core")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from recipes.launch import Topology, shell_words, torchrun_argv  # noqa: E402

SCRIPT = REPO / "tests/dist_scripts/restart_attempt.py"


def launch_line(procs: int, max_restarts: int) -> str:
    """The command a Slurm training node runs, with the test's script instead of `masa train`."""
    words = shell_words(torchrun_argv("tiny_cpu_grpo", [], Topology(1, procs, gpu=False),
                                      max_restarts=max_restarts))
    return " ".join(words[:words.index("-m")] + [str(SCRIPT)])


@pytest.mark.slow
def test_restarted_ranks_form_their_group_when_one_starts_late(tmp_path):
    from masa_megatron.ports import free_port

    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "SLURM_JOB_ID": "24",
           "DIE_RANK": "2", "LATE_RANK": "1", "LATE_S": "6"}
    env.pop("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", None)
    log = tmp_path / "torchrun.log"
    with open(log, "w") as sink:
        proc = subprocess.Popen(["bash", "-c", launch_line(3, max_restarts=1)], env=env,
                                cwd=tmp_path, stdout=sink, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            returncode = proc.wait(timeout=240)
        except subprocess.TimeoutExpired:      # a restarted group may hang instead of failing
            os.killpg(proc.pid, signal.SIGKILL)
            returncode = proc.wait()
    out = log.read_text(errors="replace")
    assert returncode == 0, out[-4000:]
    for rank in range(3):
        assert f"attempt 1 rank {rank} formed its group" in out, out[-4000:]


def test_a_rank_refuses_restarts_on_torchruns_shared_store(monkeypatch):
    """torchrun --max-restarts started without the launchers' RESTART_ENV: the first attempt
    would run and the restart fail at random, so the rank stops at once naming the fix."""
    from masa_megatron.errors import UserError
    from masa_megatron.parallel import _init_process_group
    from recipes.launch import RESTART_ENV

    for key, value in {"RANK": "0", "WORLD_SIZE": "1", "TORCHELASTIC_MAX_RESTARTS": "2",
                       "TORCHELASTIC_USE_AGENT_STORE": "True"}.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(UserError, match="TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1"):
        _init_process_group("gloo", 1)
    assert list(RESTART_ENV) == ["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"]
