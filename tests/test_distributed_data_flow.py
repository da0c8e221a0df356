"""Data flow between the ranks of a sharded trainer (issue 23, defects 5, 6 and 8).

One torchrun launch (2 gloo processes) of tests/dist_scripts/data_flow_check.py runs the real
training parts at TP=2, DP=2 and PP=2; the JSON it writes per scenario and rank is checked here.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

torch = pytest.importorskip("torch")
pytest.importorskip("megatron.core")

SCRIPT = Path(__file__).parent / "dist_scripts" / "data_flow_check.py"
sys.path.insert(0, str(SCRIPT.parent))
from tests.support.timeouts import outlasting  # noqa: E402
PROBLEMS = [f"Compute {a} + {b}." for a in range(1, 5) for b in range(1, 5)]
pytestmark = outlasting(600)         # `seen`'s torchrun, run by the first test that uses it


@pytest.fixture(scope="module")
def seen(tmp_path_factory):
    from masa_megatron.data.prompts import PromptConfig
    from masa_megatron.ports import free_port
    from tests.support.tiny_run import write_tiny_policy_and_problems

    work = tmp_path_factory.mktemp("data_flow")
    hf, train = write_tiny_policy_and_problems(
        work, PROBLEMS, extra_texts=[PromptConfig().meta_user_template], vocab_size=400,
        max_position_embeddings=1024)
    cfg = {"model": {"hf_path": str(hf)},
           "rollout": {"max_response_length": 10, "max_prompt_length": 512},
           "grpo": {"group_size": 4},
           "data": {"train_files": [str(train)], "prompt_batch_size": 2,
                    "reward": "tests.support.rewards.text_length_parity"},
           "optimizer": {"lr": 1e-3, "warmup_steps": 0},
           "trainer": {"steps": 4},
           "checkpoint": {"save_every": 0, "resume": "none"},
           "logging": {"progress": False}}
    (work / "exp.yaml").write_text(yaml.safe_dump(cfg))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           f"--master_port={free_port()}", str(SCRIPT), "--work", str(work)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).parents[1]))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return {p.stem: json.loads(p.read_text()) for p in work.glob("*_rank*.json")}


def test_rollout_results_round_trip_through_flat_tensors_exactly():
    from data_flow_check import stub_results

    from masa_megatron.rollout.dp_flow import decode_results, encode_results

    tensors = encode_results(stub_results())
    assert [t.dtype for t in tensors] == [torch.int64, torch.int64, torch.float64, torch.uint8]
    assert all(t.dim() == 1 for t in tensors)
    assert decode_results(tensors) == stub_results()
    assert decode_results(encode_results([])) == []


def test_data_parallel_lists_are_restored_per_rank_and_dealt_again_on_a_new_size(tmp_path):
    from masa_megatron.train.checkpoint import load_data_parallel_list

    (tmp_path / "trainer").mkdir()
    saved = {0: ["a0", "a1", "a2"], 1: ["b0"]}     # DP=2 x TP=2: ranks 2r, 2r+1 hold list r
    for rank in range(4):
        torch.save({"dp_rank": rank // 2, "dp_size": 2, "items": saved[rank // 2]},
                   tmp_path / "trainer" / f"rank_{rank:05d}.pt")
    assert load_data_parallel_list(tmp_path, "items", 0, 2) == saved[0]
    assert load_data_parallel_list(tmp_path, "items", 1, 2) == saved[1]
    assert load_data_parallel_list(tmp_path, "items", 0, 1) == ["a0", "a1", "a2", "b0"]
    assert [load_data_parallel_list(tmp_path, "items", r, 3) for r in range(3)] == \
        [["a0", "b0"], ["a1"], ["a2"]]


def ranks(seen, scenario):
    return seen[f"{scenario}_rank0"], seen[f"{scenario}_rank1"]


@pytest.mark.slow
def test_tensor_parallel_ranks_train_on_the_first_ranks_rewards(seen):
    first, peer = ranks(seen, "rewards_tp2")
    assert first["graded_here"] > 0 and peer["graded_here"] == 0   # graded once per group
    assert peer["texts"] == first["texts"]
    # the grader on rank 0 scores even lengths 1; on rank 1 it would score odd lengths 1
    expected = [float(len(t) % 2 == 0) for t in first["texts"]]
    assert len(set(expected)) == 2
    assert first["rewards"] == expected and peer["rewards"] == expected
    assert peer["advantages"] == first["advantages"]


@pytest.mark.slow
def test_rollout_results_reach_peers_as_tensors_over_a_gloo_group(seen):
    first, peer = ranks(seen, "results_tp2")
    assert first["generated_here"] == [4] and peer["generated_here"] == []
    assert first["identical"] and peer["identical"]
    for record in (first, peer):
        assert record["calls"], "no collective recorded"
        for call in record["calls"]:
            assert "object" not in call["fn"], call        # no pickled Python lists
            assert call["backend"] == "gloo", call         # the wait holds no NCCL collective
            assert not call["megatron_group"], call        # a CPU group beside Megatron's
        assert record["error"] == {"type": "EngineError",
                                   "message": "http://10.0.0.7:30000/generate: connection refused"}


@pytest.mark.slow
def test_meta_head_is_identical_on_data_parallel_ranks(seen):
    first, peer = ranks(seen, "head_dp2")
    assert first["trained_head"] != first["initial_head"]
    assert first["trained_head"] == peer["trained_head"]


@pytest.mark.slow
def test_every_ranks_behaviour_cloning_buffer_round_trips(seen):
    for record in ranks(seen, "head_dp2"):
        assert record["resumed_buffer"] == record["saved_buffer"]
        assert record["resumed_head"] == record["trained_head"]


@pytest.mark.slow
def test_meta_head_survives_resume_under_pipeline_parallelism(seen):
    first_stage, last_stage = ranks(seen, "head_pp2")
    assert not first_stage["has_head"] and last_stage["has_head"]
    assert last_stage["trained_head"] != last_stage["initial_head"]
    assert last_stage["resumed_head"] == last_stage["trained_head"]
    assert last_stage["exported"]
