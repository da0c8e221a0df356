"""Killed training ranks under a real Slurm on simulated nodes (tests/support/slurm_cluster.py,
simulated_nodes.py), restarted by torchrun (MAX_RESTARTS) next to SGLang stand-in servers that
keep running (issue 24, item 3). Recipes are shrunk as `masa rehearse` shrinks them (its plan:
model, batch and lengths; the layout is the recipe's). The kills are test-only
(tests/support/kill_switch, a sitecustomize put on PYTHONPATH)."""
import json
import os
import time
from pathlib import Path

import pytest
import torch

from tests.support import simulated_nodes, slurm_cluster
from tests.support.timeouts import outlasting
from tests.test_multinode_slurm import REPO, job_env

why_not = simulated_nodes.available() or slurm_cluster.available()
pytestmark = [pytest.mark.skipif(why_not is not None, reason=f"Slurm rehearsal: {why_not}"),
              pytest.mark.slow, outlasting(1500)]     # one submit() per test
KILL_SWITCH = REPO / "tests/support/kill_switch"


def final_sync(folder: Path) -> tuple[int, str, dict]:
    """(the last weight version the senders broadcast, the hash of its tensors over all stages,
    what each server reported right after that sync) from the kill switch's records."""
    from tests.sglang_standin.weights import hf_checksum

    last = max(int(f.name[1:].split("-")[0]) for f in folder.glob("v*-rank*.pt"))
    named = {}
    for f in folder.glob(f"v{last}-rank*.pt"):
        named.update(torch.load(f))
    served = json.loads(next(folder.glob(f"served-v{last}-rank*.json")).read_text())
    return last, hf_checksum(named), served


def check_servers(served: dict, checksum: str, attempts: int, tp: int, stages: int = 1) -> None:
    """Every server holds the final sync's weights on each TP rank, saw one weight-update group
    name per trainer attempt and pipeline stage, and had its leftovers aborted by every
    attempt."""
    for url, server in served.items():
        assert server["checksums"] == [checksum] * tp, url
        bodies = server["stats"]["bodies"]
        groups = [b["group_name"] for _, path, b in bodies if path == "/init_weights_update_group"]
        assert len(groups) == len(set(groups)) == attempts * stages, (url, groups)
        for stage in range(stages):
            assert sum(g.startswith(f"masa-weight-sync-pp{stage}-") for g in groups) == attempts
        aborts = [b for _, path, b in bodies if path == "/abort_request" and b.get("abort_all")]
        assert len(aborts) >= attempts, url


def submit(tmp_path: Path, script: str, overrides: list, kills: str, **knobs) -> str:
    """sbatch --wait --nodes=2 slurm/<script> with the kill switch armed (MASA_TEST_KILL=kills,
    MASA_TEST_SENT_DIR=tmp_path/sent) on two simulated nodes under a real Slurm; the job's
    output, after asserting that the job succeeded and that every armed kill happened."""
    (tmp_path / "sent").mkdir()
    env = job_env(MASA_TEST_KILL=kills, MASA_TEST_SENT_DIR=str(tmp_path / "sent"), **knobs)
    env["PYTHONPATH"] = f"{KILL_SWITCH}{os.pathsep}{env.get('PYTHONPATH', REPO)}"
    job_out = tmp_path / "job.out"
    start = time.monotonic()
    with simulated_nodes.SimulatedNodes(2) as nodes, \
            slurm_cluster.SlurmCluster(nodes, tmp_path) as cluster:
        result = cluster.run(["sbatch", "--wait", "--nodes=2", f"--output={job_out}",
                              str(REPO / "slurm" / script), *overrides],
                             env=env, cwd=str(REPO), capture_output=True, text=True,
                             timeout=1500)
        logs = cluster.logs()
    print(f"{script}: job wall time {time.monotonic() - start:.0f} s")
    job = job_out.read_text() if job_out.exists() else ""
    assert result.returncode == 0, f"{result.stderr}\n{job[-6000:]}\n{logs}"
    for kill in kills.split(","):
        point, n, rank = kill.split(":")[:3]
        assert job.count(f"kill switch: rank {rank} exits at {point} {n}") == 1, job[-4000:]
    return job


def check_metrics(out_dir: Path, steps: int) -> None:
    """One row per step, and rollout log-probs equal to the trainer's (fp32 stand-ins)."""
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    assert all(r["logprob/rollout_gap_mean"] < 1e-4 for r in rows), rows


def rehearsal_overrides(recipe: str, root: Path, *extra: str) -> list:
    """The recipe shrunk by `masa rehearse`'s plan, 3 steps, a checkpoint after each."""
    from masa_megatron.rehearsal.run import plan

    return [*plan(recipe, root, steps=3)["overrides"], "checkpoint.save_every=1",
            "rollout.sglang_router_module=tests.sglang_standin.router", *extra]


def test_disaggregated_14b_recipe_survives_killed_ranks_next_to_running_servers(tmp_path):
    """qwen3_14b_grpo_2n8g as submitted (slurm/disaggregated.sbatch): node0 runs the 4 stand-in
    servers (TP 2) and the router, node1 the 8 training ranks (TP 8, broadcast sync). 3 steps,
    a checkpoint after each, MAX_RESTARTS=2: training rank 3 is killed in the middle of step 2
    (Actor.update, attempt 0), then the sender in the middle of attempt 1's first weight sync
    (version 1, resuming from step 1's checkpoint; the servers wait in the broadcast). Each new
    attempt finds the servers running, aborts their leftovers, joins a weight-update group
    under a name of its own and resyncs: the job ends with steps 1..3 logged once each, rollout
    log-probs equal to the trainer's, and every server holding exactly the tensors the final
    sync (version 3) broadcast.

    Not killed here: the sync after a step's checkpoint. The loop saves step N, syncs, then
    logs row N, so a kill in that sync resumes at N+1 and row N is never written."""
    recipe, root = "qwen3_14b_grpo_2n8g", tmp_path / "rehearsal"
    submit(tmp_path, "disaggregated.sbatch", rehearsal_overrides(recipe, root),
           "update:2:3:0,sync_bucket:1:0:1", RECIPE=recipe, GPUS_PER_NODE="8",
           MAX_RESTARTS="2", HEALTH_TIMEOUT_S="300")
    check_metrics(root / "run", steps=3)
    last_version, checksum, served = final_sync(tmp_path / "sent")
    assert last_version == 3
    check_servers(served, checksum, attempts=3, tp=2)


def test_pipeline_stages_each_broadcast_to_two_servers_across_a_restart(tmp_path):
    """The 14B disaggregated recipe at PP = 2 (TP 2, 4 ranks on node1) with 2 stand-in servers
    (TP 2) on node0: both stages' senders broadcast to both servers, taking turns. Rank 2, the
    second stage's sender, is killed in the middle of step 2's update; the restarted ranks
    resume from step 1, resync both stages under new group names and finish: steps 1..3, and
    the servers hold exactly what the two stages sent in the final sync."""
    recipe, root = "qwen3_14b_grpo_2n8g", tmp_path / "rehearsal"
    overrides = rehearsal_overrides(recipe, root, "parallel.world_size=4",
                                    "parallel.tensor_model_parallel_size=2",
                                    "parallel.pipeline_model_parallel_size=2",
                                    "rollout.sglang_num_servers=2")
    submit(tmp_path, "disaggregated.sbatch", overrides, "update:2:2:0", RECIPE=recipe,
           GPUS_PER_NODE="4", MAX_RESTARTS="1", HEALTH_TIMEOUT_S="300")
    check_metrics(root / "run", steps=3)
    last_version, checksum, served = final_sync(tmp_path / "sent")
    assert last_version == 3
    assert len(list((tmp_path / "sent").glob("v3-rank*.pt"))) == 2     # one sender per stage
    assert len(served) == 2
    check_servers(served, checksum, attempts=2, tp=2, stages=2)


def test_colocated_two_nodes_two_ranks_each_survive_a_killed_rank(tmp_path):
    """sbatch --nodes=2 slurm/colocated.sbatch at 2 ranks per node (tensor sync, a stand-in
    server beside every rank, started by each node's local rank 0), 3 steps with a checkpoint
    after each and MAX_RESTARTS=1: rank 3, on the second node, is killed in the middle of step
    2. Both nodes' torchrun agents restart their ranks, which form a new group across the nodes,
    start new servers and resume from step 1's checkpoint: steps 1..3 logged once each, rollout
    log-probs equal to the trainer's."""
    from tests.support.tiny_run import write_tiny_policy_and_problems
    from tests.test_multinode_slurm import STANDIN

    problems = [f"What is {a} plus {b}?" for a in range(4) for b in range(3)]
    policy, train = write_tiny_policy_and_problems(tmp_path, problems)
    out_dir = tmp_path / "run"
    overrides = [f"model.hf_path={policy}", f"data.train_files=[{train}]",
                 f"trainer.output_dir={out_dir}", "data.prompt_batch_size=2",
                 "data.reward=tests.support.rewards.text_length_parity", "trainer.steps=3",
                 "checkpoint.save_every=1", "parallel.world_size=4",
                 "rollout.engine=sglang", "rollout.colocate=true", "rollout.weight_sync=tensor",
                 "rollout.sglang_num_servers=4", *STANDIN]
    submit(tmp_path, "colocated.sbatch", overrides, "update:2:3:0", RECIPE="tiny_cpu_grpo",
           GPUS_PER_NODE="2", MAX_RESTARTS="1")
    check_metrics(out_dir, steps=3)
    servers = sorted(p.parent.name for p in (out_dir / "sglang_logs").glob("*/server-*.log"))
    assert servers == ["node0", "node0", "node1", "node1"]
