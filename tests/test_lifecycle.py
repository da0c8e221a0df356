"""Helper processes end with the process that started them, SIGKILL included."""
import subprocess
import sys
from pathlib import Path

import pytest

psutil = pytest.importorskip("psutil")
pytest.importorskip("megatron.core")
REPO = Path(__file__).resolve().parents[1]

_TRAINER = """
import time
from masa_megatron.compat.megatron_versions import use_fork_for_checkpoint_queue
use_fork_for_checkpoint_queue()
print("ready", flush=True)
time.sleep(600)
"""


@pytest.mark.slow
def test_checkpoint_queue_manager_exits_when_the_trainer_is_killed():
    """dist_checkpointing's results-queue manager (a forked server) used to outlive a SIGKILLed
    trainer; it now notices within about a second and exits."""
    proc = subprocess.Popen([sys.executable, "-c", _TRAINER], cwd=REPO, stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        helpers = psutil.Process(proc.pid).children()
        assert helpers, "no manager process was started"
    finally:
        proc.kill()
        proc.wait(timeout=30)
    _, alive = psutil.wait_procs(helpers, timeout=15)
    assert not alive, f"still running after the trainer died: {[p.pid for p in alive]}"
