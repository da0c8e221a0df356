"""The project's own sbatch scripts under a real Slurm (slurm-wlm) on simulated nodes
(tests/support/slurm_cluster.py, simulated_nodes.py): what a cluster user submits, end to end,
with a tiny model and stand-in SGLang servers (issue 24)."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support import simulated_nodes, slurm_cluster
from tests.support.timeouts import outlasting

REPO = Path(__file__).resolve().parents[1]
why_not = simulated_nodes.available() or slurm_cluster.available()
pytestmark = [pytest.mark.skipif(why_not is not None, reason=f"Slurm rehearsal: {why_not}"),
              pytest.mark.slow]

STANDIN = ["rollout.sglang_server_module=tests.sglang_standin.server",
           "rollout.sglang_extra_args=[--backend,model]", "rollout.sglang_health_timeout_s=180",
           "rollout.sglang_request_timeout_s=180"]


@pytest.fixture
def tiny_inputs(tmp_path):
    from tests.support.tiny_run import write_tiny_policy_and_problems

    problems = [f"What is {a} plus {b}?" for a in range(4) for b in range(3)]
    return write_tiny_policy_and_problems(tmp_path, problems)


def job_env(**extra):
    """What a user's shell passes to sbatch: the environment activated (torchrun on PATH)."""
    from tests.sglang_standin import standin_env
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    return {**standin_env(), "PATH": path, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1",
            **extra}


def metrics_steps(out_dir: Path) -> list:
    rows = (out_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["step"] for line in rows]


@outlasting(900)
def test_colocated_sbatch_on_two_nodes_trains_with_a_server_beside_each_rank(tmp_path,
                                                                              tiny_inputs):
    """sbatch --nodes=2 slurm/colocated.sbatch: one torchrun per node (rendezvous on the first
    node's name), each node's local rank 0 starts its stand-in server, tensor sync, 2 steps."""
    policy, train = tiny_inputs
    out_dir = tmp_path / "run"
    overrides = [f"model.hf_path={policy}", f"data.train_files=[{train}]",
                 f"trainer.output_dir={out_dir}", "data.prompt_batch_size=2",
                 "data.reward=tests.support.rewards.text_length_parity",
                 "rollout.engine=sglang", "rollout.colocate=true", "rollout.weight_sync=tensor",
                 "rollout.sglang_num_servers=2", *STANDIN]
    job_out = tmp_path / "job.out"
    with simulated_nodes.SimulatedNodes(2) as nodes, \
            slurm_cluster.SlurmCluster(nodes, tmp_path) as cluster:
        result = cluster.run(["sbatch", "--wait", "--nodes=2", f"--output={job_out}",
                              str(REPO / "slurm/colocated.sbatch"), *overrides],
                             env=job_env(RECIPE="tiny_cpu_grpo", GPUS_PER_NODE="1"),
                             cwd=str(REPO), capture_output=True, text=True, timeout=900)
        logs = cluster.logs()
    job = job_out.read_text() if job_out.exists() else ""
    assert result.returncode == 0, f"{result.stderr}\n{job[-6000:]}\n{logs}"
    assert metrics_steps(out_dir) == [1, 2]
    servers = sorted(p.parent.name for p in (out_dir / "sglang_logs").glob("*/server-*.log"))
    assert servers == ["node0", "node1"]
    assert "--rdzv-endpoint=${MASTER_ADDR}:${MASTER_PORT}" in job   # expanded on each node


def readme_block(marker: str) -> str:
    text = (REPO / "README.md").read_text()
    start = text.index(f"<!-- cluster-quickstart: {marker} -->")
    fence = text.index("```bash\n", start) + len("```bash\n")
    return text[fence:text.index("```", fence)]


@outlasting(300, 600)          # the submission, then the wait in squeue
def test_readme_cluster_quick_start_runs_as_written(tmp_path, tiny_inputs):
    """The README's cluster quick start: its settings block replaced by a tiny CPU recipe's, its
    run block executed as written on the login node of a real Slurm; the job must train."""
    policy, train = tiny_inputs
    out_dir = tmp_path / "run"
    assert "sbatch" in readme_block("run") and "RECIPE=" in readme_block("settings")
    settings = (f"cd {REPO}\nexport RECIPE=tiny_cpu_grpo GPUS_PER_NODE=2\n"
                f"MODEL={policy}\nDATA={train}\nOUT={out_dir}\n")
    script = tmp_path / "quickstart.sh"
    script.write_text("set -euo pipefail\n" + settings + readme_block("run"))
    with simulated_nodes.SimulatedNodes(1) as nodes, \
            slurm_cluster.SlurmCluster(nodes, tmp_path) as cluster:
        result = cluster.run(["bash", str(script)], env=job_env(), capture_output=True,
                             text=True, timeout=300)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        job_id = result.stdout.split("Submitted batch job ")[1].split()[0]
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and cluster.run(
                ["squeue", "-h", "-j", job_id], capture_output=True, text=True).stdout.strip():
            time.sleep(2)
        logs = cluster.logs()
    job = (out_dir / f"slurm-{job_id}.out")
    assert job.exists(), logs
    assert metrics_steps(out_dir) == [1, 2], job.read_text()[-4000:]


@outlasting(300, 420)          # the submission, then the wait in squeue
def test_nemo_run_slurm_executor_script_trains_on_two_nodes(tmp_path, tiny_inputs):
    """`python -m recipes.launch --executor slurm` on the login node: NeMo-Run renders its sbatch
    script and submits it to the real Slurm; its srun starts one torchrun per node, which must
    find each other (rendezvous on the first node) and train."""
    pytest.importorskip("nemo_run")
    policy, train = tiny_inputs
    out_dir, jobs = tmp_path / "run", tmp_path / "jobs"
    argv = [sys.executable, "-m", "recipes.launch", "tiny_cpu_grpo", "--executor", "slurm",
            "--account", "acct", "--nodes", "2", "--gpus-per-node", "1", "--packager", "none",
            "--job-dir", str(jobs), f"model.hf_path={policy}", f"data.train_files=[{train}]",
            f"trainer.output_dir={out_dir}", "data.prompt_batch_size=2",
            "data.reward=tests.support.rewards.text_length_parity"]
    with simulated_nodes.SimulatedNodes(2) as nodes, \
            slurm_cluster.SlurmCluster(nodes, tmp_path) as cluster:
        env = job_env(NEMORUN_HOME=str(tmp_path / "nemorun"), PYTHONPATH=str(REPO))
        result = cluster.run(argv, env=env, cwd=str(REPO), capture_output=True, text=True,
                             timeout=300, stdin=subprocess.DEVNULL)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        deadline = time.monotonic() + 420       # under the test's timeout: logs get shown
        while time.monotonic() < deadline and cluster.run(
                ["squeue", "-h"], capture_output=True, text=True).stdout.strip():
            time.sleep(2)
        logs = cluster.logs()
    job_logs = "\n".join(f"--- {p}\n{p.read_text(errors='replace')[-4000:]}"
                         for p in sorted(jobs.rglob("*.out")))
    script = next(jobs.rglob("*_sbatch.sh")).read_text()
    assert "#SBATCH --nodes=2" in script
    assert (out_dir / "metrics.jsonl").exists(), f"{job_logs}\n{logs}"
    assert metrics_steps(out_dir) == [1, 2], job_logs


@outlasting(600)
def test_disaggregated_sbatch_runs_one_torchrun_per_training_node(tmp_path, tiny_inputs):
    """In a 2-node allocation (one SGLang node, one training node) the training step must start
    one torchrun, not one per task of the allocation: a second agent on the node joins the same
    rendezvous, waits, and fails the job when the first one ends. torchrun is a stub here that
    says where it runs; the stand-in server is real."""
    policy, train = tiny_inputs
    stub = tmp_path / "bin"
    stub.mkdir()
    (stub / "torchrun").write_text('#!/bin/sh\necho "torchrun agent on $(hostname)"\n')
    (stub / "torchrun").chmod(0o755)
    overrides = [f"model.hf_path={policy}", f"data.train_files=[{train}]",
                 f"trainer.output_dir={tmp_path / 'run'}", "rollout.engine=sglang",
                 "rollout.colocate=false", "rollout.weight_sync=broadcast", *STANDIN]
    env = job_env(RECIPE="tiny_cpu_grpo", GPUS_PER_NODE="2", ROLLOUT_NODES="1",
                  HEALTH_TIMEOUT_S="180")
    env["PATH"] = f"{stub}{os.pathsep}{env['PATH']}"
    job_out = tmp_path / "job.out"
    with simulated_nodes.SimulatedNodes(2) as nodes, \
            slurm_cluster.SlurmCluster(nodes, tmp_path) as cluster:
        result = cluster.run(["sbatch", "--wait", "--nodes=2", f"--output={job_out}",
                              str(REPO / "slurm/disaggregated.sbatch"), *overrides],
                             env=env, cwd=str(REPO), capture_output=True, text=True, timeout=600)
        logs = cluster.logs()
    job = job_out.read_text() if job_out.exists() else ""
    assert result.returncode == 0, f"{result.stderr}\n{job[-6000:]}\n{logs}"
    agents = [line for line in job.splitlines() if line.startswith("torchrun agent on ")]
    assert agents == ["torchrun agent on node1"], job[-3000:]
