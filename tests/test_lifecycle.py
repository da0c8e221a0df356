"""Helper processes end with the process that started them, SIGKILL included."""
import os
import signal
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


def _start_holder(folder, *extra):
    proc = subprocess.Popen([sys.executable, "-m", "tests.support.lock_holder", str(folder),
                             *extra], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def _kill(proc):
    proc.kill()
    proc.wait(timeout=30)


@pytest.mark.parametrize("with_forked_helper", [False, True])
def test_output_folder_lock_refuses_a_second_run_naming_the_holder_until_it_dies(
        tmp_path, with_forked_helper):
    from masa_megatron.errors import UserError
    from masa_megatron.lifecycle import FolderLock

    holder = _start_holder(tmp_path, *(["fork"] if with_forked_helper else []))
    helpers = psutil.Process(holder.pid).children()
    try:
        with pytest.raises(UserError, match=rf"trainer.output_dir {tmp_path}: in use by another "
                                            rf"run \(pid {holder.pid} on host "):
            with FolderLock(tmp_path, "trainer.output_dir"):
                pass
    finally:
        _kill(holder)
    with FolderLock(tmp_path, "trainer.output_dir") as lock:   # released by the OS
        assert lock.holder()["pid"] == os.getpid()
    for helper in helpers:
        helper.kill()


_LAUNCHER = """
import os, subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c",
    "import time; from masa_megatron.lifecycle import end_with_launcher; end_with_launcher(0.1); "
    "print('rank', flush=True); time.sleep(600)"],
    start_new_session=True, env=dict(os.environ, TORCHELASTIC_RUN_ID="test"),
    stdout=subprocess.PIPE, text=True)
assert child.stdout.readline().strip() == "rank"
print(child.pid, flush=True)
time.sleep(600)
"""


def test_rank_ends_when_its_launcher_is_killed():
    """As torchrun: the rank runs in its own session, so killing the launcher's group misses it."""
    launcher = subprocess.Popen([sys.executable, "-c", _LAUNCHER], cwd=REPO,
                                stdout=subprocess.PIPE, text=True, start_new_session=True)
    rank = psutil.Process(int(launcher.stdout.readline()))
    os.killpg(launcher.pid, signal.SIGKILL)
    launcher.wait(timeout=30)
    _, alive = psutil.wait_procs([rank], timeout=10)
    if alive:
        rank.kill()
    assert not alive, "the rank outlived its launcher"
