"""Simulated nodes (tests/support/simulated_nodes.py: one network and hostname namespace per
node) and what runs across them: the broadcast weight sync from a trainer on node0 to a stand-in
SGLang server on node1 (issue 24, defect 1)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import simulated_nodes
from tests.support.timeouts import outlasting

REPO = Path(__file__).resolve().parents[1]
why_not = simulated_nodes.available()
pytestmark = pytest.mark.skipif(why_not is not None, reason=f"simulated nodes: {why_not}")
PY = sys.executable


def test_nodes_are_separate_hosts():
    """Own hostname and loopback per node; nodes reach each other by name; nothing is left."""
    nodes_obj = simulated_nodes.SimulatedNodes(2)
    with nodes_obj as nodes:
        names = [n.run(["hostname"], capture_output=True, text=True).stdout.strip()
                 for n in nodes]
        assert names == ["node0", "node1"]
        server = nodes[1].popen([PY, "-m", "http.server", "--bind", "0.0.0.0", "18080"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        probe = ("import sys, time, urllib.request\n"
                 "for _ in range(100):\n"
                 "    try:\n"
                 "        urllib.request.urlopen(sys.argv[1], timeout=2); print('ok'); break\n"
                 "    except Exception as e:\n"
                 "        err = e; time.sleep(0.1)\n"
                 "else:\n"
                 "    print('fail', err)\n")
        try:
            by_name = nodes[0].run([PY, "-c", probe, "http://node1:18080/"],
                                   capture_output=True, text=True, timeout=60).stdout
            loopback = nodes[0].run([PY, "-c", probe.replace("range(100)", "range(3)"),
                                     "http://127.0.0.1:18080/"],
                                    capture_output=True, text=True, timeout=60).stdout
        finally:
            server.kill()
        assert by_name.startswith("ok") and loopback.startswith("fail")
    assert not Path("/run/netns", nodes_obj.hub).exists()
    assert not any(Path("/run/netns", n.ns).exists() for n in nodes_obj.nodes)


@pytest.mark.slow
@outlasting(600)
def test_broadcast_sync_reaches_a_server_on_another_node(tmp_path):
    """The sender tells the server an address of node0 that node1 can reach (before the fix:
    gethostbyname('node0') = 127.0.1.1, node1's own loopback; the group never formed)."""
    from masa_megatron.model.tiny import make_tiny_hf_model
    from tests.sglang_standin import STANDIN_MODULE, standin_env

    folder = tmp_path / "tiny"
    make_tiny_hf_model(folder, "qwen3", seed=5)
    out = tmp_path / "result.json"
    with simulated_nodes.SimulatedNodes(2) as nodes:
        log = open(tmp_path / "server.log", "w")
        server = nodes[1].popen([PY, "-m", STANDIN_MODULE, "--model-path", str(folder),
                                 "--host", "0.0.0.0", "--port", "30000", "--tp-size", "1",
                                 "--skip-tokenizer-init", "--backend", "model"],
                                env=standin_env(), stdout=log, stderr=subprocess.STDOUT)
        try:
            run = nodes[0].run([PY, str(REPO / "tests/dist_scripts/node_broadcast_sync.py"),
                                "--hf-dir", str(folder), "--url", "http://node1:30000",
                                "--out", str(out)], env=standin_env(),
                               capture_output=True, text=True, timeout=600)
        finally:
            server.kill()
            log.close()
    assert run.returncode == 0 and out.exists(), run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["master_address"] == nodes[0].address, result
    assert result.get("checksums_equal") is True, (result, (tmp_path / "server.log").read_text()
                                                   [-3000:])


def _node_torchrun(node, nodes, overrides, log_path, recipe="tiny_cpu_grpo", nproc=1):
    """`masa train` under torchrun on `node`: one agent per node, c10d rendezvous on node0."""
    from tests.sglang_standin import standin_env

    cmd = [PY, "-m", "torch.distributed.run", f"--nnodes={len(nodes)}",
           f"--nproc-per-node={nproc}", f"--node-rank={nodes.index(node)}",
           "--rdzv-backend=c10d", f"--rdzv-endpoint={nodes[0].name}:29500", "--rdzv-id=masa-test",
           "-m", "masa_megatron.cli", "train", "--recipe", recipe, *overrides]
    out = open(log_path, "w")
    return node.popen(cmd, env={**standin_env(), "OMP_NUM_THREADS": "1"}, cwd=str(REPO),
                      stdout=out, stderr=subprocess.STDOUT), out


@pytest.mark.slow
@outlasting(600)
def test_colocated_across_nodes_starts_servers_beside_the_ranks_of_each_node(tmp_path):
    """Colocated on 2 nodes x 1 rank, tensor sync: each node's local rank 0 starts that node's
    server and the trainer learns every node's address (before the fix rank 0 started both
    servers on node0 at 127.0.0.1, which node1's rank cannot reach; issue 24, defect 2)."""
    from tests.support.tiny_run import write_tiny_policy_and_problems

    problems = [f"What is {a} plus {b}?" for a in range(4) for b in range(3)]
    policy, train = write_tiny_policy_and_problems(tmp_path, problems)
    out_dir = tmp_path / "run"
    overrides = [f"model.hf_path={policy}", f"data.train_files=[{train}]",
                 f"trainer.output_dir={out_dir}", "trainer.steps=1", "data.prompt_batch_size=2",
                 "rollout.engine=sglang", "rollout.colocate=true", "rollout.weight_sync=tensor",
                 "rollout.sglang_num_servers=2", "rollout.sglang_tp=1",
                 "rollout.sglang_server_module=tests.sglang_standin.server",
                 "rollout.sglang_extra_args=[--backend,model]",
                 "rollout.sglang_health_timeout_s=120", "rollout.sglang_request_timeout_s=120",
                 "data.reward=tests.support.rewards.text_length_parity"]
    with simulated_nodes.SimulatedNodes(2) as nodes:
        runs = [_node_torchrun(node, nodes, overrides, tmp_path / f"{node.name}.log")
                for node in nodes]
        try:
            codes = [proc.wait(timeout=600) for proc, _ in runs]
        finally:
            for proc, out in runs:
                proc.kill()
                out.close()
    logs = {n.name: (tmp_path / f"{n.name}.log").read_text()[-3000:] for n in nodes}
    assert codes == [0, 0], logs
    server_logs = sorted(p.parent.name for p in (out_dir / "sglang_logs").glob("*/server-*.log"))
    assert server_logs == ["node0", "node1"], server_logs       # one server on each node
    metrics = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1]
