"""Exact resume and crash safety of `masa train` under torchrun (2 gloo ranks, TP=2).

- a 6-step run vs a run SIGKILLed after step 3 and resumed: identical metrics and bit-identical
  weights at step 6 (compared through `masa convert mcore2hf` of the final checkpoints, which
  also proves the converter reads training checkpoints);
- a run SIGKILLed while writing a checkpoint resumes from the previous complete one, and says so;
- a checkpoint saved at TP=2 resumes at TP=1 and continues training.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest
import yaml

from masa_megatron.ports import free_port
from tests.support.timeouts import outlasting
from tests.support.tiny_run import write_tiny_policy_and_problems

# at most: the module's uninterrupted run (a fixture) and three runs of one test, 600 s each
pytestmark = [pytest.mark.slow, outlasting(600, 600, 600, 600)]
PROBLEMS = [f"Compute {a} + {b}." for a in range(1, 5) for b in range(1, 5)]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    hf, train = write_tiny_policy_and_problems(root, PROBLEMS)
    cfg = {"model": {"hf_path": str(hf)},
           "parallel": {"tensor_model_parallel_size": 2},
           "rollout": {"max_response_length": 12, "max_prompt_length": 128},
           "grpo": {"group_size": 4},
           "masa": {"mode": "grpo"},
           "data": {"train_files": [str(train)], "prompt_batch_size": 2,
                    "reward": "tests.support.rewards.text_length_parity"},
           "optimizer": {"lr": 1e-3, "warmup_steps": 0},
           "trainer": {"steps": 6},
           "checkpoint": {"save_every": 1, "keep_last": 10},
           "logging": {"progress": False}}
    (root / "exp.yaml").write_text(yaml.safe_dump(cfg))
    return root


def train_command(root, out, nproc=2, *extra):
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
            f"--master_port={free_port()}", "-m", "masa_megatron.cli", "train",
            str(root / "exp.yaml"), f"trainer.output_dir={out}", *extra]


def run(cmd, env=None, timeout=600):
    """Run in its own session with output in files, then kill whatever it left behind (a rank
    SIGKILLed mid-save can orphan the checkpoint writer's helper process, which would otherwise
    keep a pipe open)."""
    env = {**os.environ, "PYTHONPATH": os.getcwd(), **(env or {})}
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, text=True,
                                start_new_session=True)
        try:
            proc.wait(timeout=timeout)
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(cmd, proc.returncode, out.read(), err.read())


def logged_steps(out):
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def metrics_by_step(out):
    rows = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        rows[row["step"]] = {k: v for k, v in row.items() if not k.startswith("time/")}
    return rows


def export(ckpt, out):
    result = run([sys.executable, "-m", "masa_megatron.cli", "convert", "mcore2hf",
                  "--ckpt", str(ckpt / "model"), "--out", str(out), "--dtype", "fp32"])
    assert result.returncode == 0, result.stderr[-3000:]
    from safetensors.torch import load_file
    tensors = {}
    for f in sorted(out.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    return tensors


@pytest.fixture(scope="module")
def full_run(workdir):
    """The uninterrupted 6-step run at TP=2, checkpointing every step."""
    full = workdir / "full"
    result = run(train_command(workdir, full))
    assert result.returncode == 0, result.stderr[-3000:]
    return full


def test_killed_and_resumed_run_matches_uninterrupted_run(workdir, full_run):
    full, killed = full_run, workdir / "killed"

    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    proc = subprocess.Popen(train_command(workdir, killed), env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest = killed / "checkpoints" / "latest"
    deadline = time.time() + 600
    while time.time() < deadline and not (latest.is_file() and
                                          latest.read_text().strip() >= "step_000003"):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert latest.read_text().strip() < "step_000006", "the run finished before it was killed"
    resumed = run(train_command(workdir, killed))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout + resumed.stderr

    assert logged_steps(killed) == list(range(1, 7)), "one metrics row per step after a resume"
    a, b = metrics_by_step(full), metrics_by_step(killed)
    for step in (4, 5, 6):
        assert a[step] == b[step], f"step {step} metrics differ"
    wa = export(full / "checkpoints" / "step_000006", workdir / "hf_full")
    wb = export(killed / "checkpoints" / "step_000006", workdir / "hf_killed")
    assert wa.keys() == wb.keys()
    assert all(wa[k].equal(wb[k]) for k in wa)
    w0 = export(full / "checkpoints" / "step_000001", workdir / "hf_step1")
    assert any(not wa[k].equal(w0[k]) for k in wa), "training did not change the weights"


def test_crash_while_saving_resumes_from_previous_checkpoint(workdir):
    out = workdir / "crash"
    crashed = run(train_command(workdir, out), env={"MASA_TEST_CRASH_IN_SAVE": "4"})
    assert crashed.returncode != 0
    assert (out / "checkpoints" / ".tmp-step_000004").is_dir()
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_000003"
    resumed = run(train_command(workdir, out))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    log = resumed.stdout + resumed.stderr
    assert "ignoring incomplete write(s) .tmp-step_000004" in log
    assert "resuming from" in log and "step_000003" in log
    assert (out / "checkpoints" / "step_000006" / "COMPLETE").is_file()
    assert logged_steps(out) == list(range(1, 7)), "step 4 was logged by both runs"


def test_kill_after_a_checkpoint_before_its_metrics_row_loses_no_row(workdir, full_run):
    """A rank killed in the weight sync right after step 3's checkpoint (the loop saves, syncs,
    then logs): the resumed run starts at step 4 and still writes step 3's row, as the
    uninterrupted run did; the same after the last step's checkpoint (step 6 of 6), where the
    resumed run has no step left to train."""
    out = workdir / "killed_in_sync"
    kill_switch = os.path.join(os.getcwd(), "tests", "support", "kill_switch")

    def killed_at(step):
        crashed = run(train_command(workdir, out), env={
            "PYTHONPATH": os.pathsep.join([kill_switch, os.getcwd()]),
            "MASA_TEST_KILL": f"handoff:{step}:0"})
        assert crashed.returncode != 0
        assert f"kill switch: rank 0 exits at handoff {step}" in crashed.stderr
        assert (out / "checkpoints" / "latest").read_text().strip() == f"step_{step:06d}"

    killed_at(3)
    assert logged_steps(out) == [1, 2]
    killed_at(6)
    assert logged_steps(out) == [1, 2, 3, 4, 5]
    resumed = run(train_command(workdir, out))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert logged_steps(out) == list(range(1, 7))
    rows, full = metrics_by_step(out), metrics_by_step(full_run)
    assert rows[3] == full[3] and rows[6] == full[6]


def test_tp2_checkpoint_resumes_at_tp1(workdir, full_run):
    source = full_run / "checkpoints" / "step_000003"
    out = workdir / "tp1"
    result = run(train_command(workdir, out, 1, "parallel.tensor_model_parallel_size=1",
                               f"checkpoint.resume={source}", "trainer.steps=5"))
    assert result.returncode == 0, result.stderr[-3000:]
    rows = metrics_by_step(out)
    assert sorted(rows) == [4, 5]
    assert all(isinstance(rows[s]["train/loss"], float) for s in rows)


def test_damaged_newest_checkpoint_stops_the_resume_unless_fallback_is_allowed(workdir, full_run):
    out = workdir / "damaged"
    shutil.copytree(full_run, out)
    shard = sorted((out / "checkpoints" / "step_000006" / "model").glob("*.distcp"))[-1]
    shard.write_bytes(shard.read_bytes()[:1000])
    refused = run(train_command(workdir, out))
    assert refused.returncode != 0 and "masa: error: checkpoint" in refused.stderr
    assert f"step_000006 is damaged: shard model/{shard.name}" in refused.stderr
    assert "checkpoint.fallback_on_corrupt=true to resume from step_000005" in refused.stderr
    resumed = run(train_command(workdir, out, 2, "checkpoint.fallback_on_corrupt=true"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "falling back to step_000005" in resumed.stdout + resumed.stderr
    assert (out / "checkpoints" / ".damaged-step_000006").is_dir()
    assert (out / "checkpoints" / "step_000006" / "COMPLETE").is_file()
    assert logged_steps(out) == list(range(1, 7))
