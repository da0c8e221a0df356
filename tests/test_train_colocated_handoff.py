"""The colocation hand-off, performed by `masa train` itself against the strict SGLang stand-in
(rollout.engine=sglang, rollout.colocate, rollout.offload_train_state; weight sync by tensor
payloads as in the colocated recipes):

- the servers start before the trainer allocates its model;
- the stand-in sees, in order: release everything, resume weights, sync, resume KV cache and
  CUDA graphs, generate; then each step: release everything (idle), resume weights, sync, resume
  the rest, generate (in-loop eval and the next step);
- every phase's memory is logged as memory/<phase>/... metrics.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from masa_megatron.ports import free_port
import yaml

pytest.importorskip("megatron.core")
pytest.importorskip("aiohttp")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.sglang_standin import standin_env, start_standin  # noqa: E402
from tests.support.timeouts import outlasting  # noqa: E402
from tests.support.tiny_run import write_tiny_policy_and_problems  # noqa: E402

PROBLEMS = [f"Compute {a} + {b}." for a in range(1, 4) for b in range(1, 4)]
ALL = ("cuda_graph", "kv_cache", "weights")
CYCLE_PHASES = ("rollout_done", "server_released", "trainer_reloaded", "trained",
                "optimizer_offloaded", "weights_synced", "params_offloaded", "rollout_ready")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("colocated")
    from masa_megatron.data.prompts import PromptConfig

    hf, train = write_tiny_policy_and_problems(   # meta prompts fit: the template in the BPE
        root, PROBLEMS, extra_texts=[PromptConfig().meta_user_template], vocab_size=400,
        max_position_embeddings=1024)
    cfg = {"model": {"hf_path": str(hf)},
           "rollout": {"engine": "sglang", "colocate": True, "offload_train_state": True,
                       "weight_sync": "tensor", "max_response_length": 8,
                       "max_prompt_length": 128},
           "grpo": {"group_size": 2},
           "masa": {"mode": "grpo"},
           "data": {"train_files": [str(train)], "eval_files": [str(train)],
                    "prompt_batch_size": 2, "reward": "tests.support.rewards.text_length_parity"},
           "optimizer": {"lr": 1e-3, "warmup_steps": 0},
           "trainer": {"steps": 2, "eval_every": 1, "eval_subset": 1, "eval_n": 1,
                       "eval_meta_n": 0},
           "checkpoint": {"save_every": 1},
           "logging": {"progress": False}}
    (root / "exp.yaml").write_text(yaml.safe_dump(cfg))
    return root


def _control_calls(bodies: list) -> list:
    """The stand-in's recorded requests as the hand-off's vocabulary: ("release", tags),
    ("resume", tags), "sync" and "generate" (consecutive syncs / generates as one)."""
    calls = []
    for _method, path, body in bodies:
        if path in ("/release_memory_occupation", "/resume_memory_occupation"):
            call = (path[1:].split("_")[0], tuple(sorted((body or {}).get("tags") or ALL)))
        elif path.startswith("/update_weights"):   # session brackets and clean-up apart
            call = "sync"
        elif path == "/generate":
            call = "generate"
        else:
            continue
        if not (calls and calls[-1] == call and isinstance(call, str)):
            calls.append(call)
    return calls


@pytest.mark.parametrize("ranks, method", [
    (1, "grpo"), (1, "masa_head"), pytest.param(2, "grpo", marks=pytest.mark.slow)])
@outlasting(600)
def test_masa_train_performs_the_colocated_hand_off_in_order(workdir, ranks, method):
    """One process with one server, and two data-parallel ranks under torchrun (gloo barriers
    between them) with one server each (tensor sync: a colocated server per trainer GPU).
    masa_head: MASA with the meta-head predictor, whose prompt-only forward runs while the
    trainer's state is offloaded (the hand-off brings the parameters back for it)."""
    import urllib.request

    servers = [start_standin(str(workdir / "policy"), log_dir=str(workdir / f"logs{ranks}_{method}_{i}"),
                             extra_args=["--record"]) for i in range(ranks)]
    out = workdir / f"run{ranks}_{method}"
    extra = ["masa.mode=masa", "masa.predictor=both", "rollout.max_prompt_length=512"] \
        if method == "masa_head" else []
    launcher = [] if ranks == 1 else ["-m", "torch.distributed.run", f"--nproc_per_node={ranks}",
                                      f"--master_port={free_port()}"]
    try:
        log = workdir / f"train{ranks}_{method}.log"
        with open(log, "w") as f:   # a file, not a pipe (torch_shm_manager outlives the run)
            run = subprocess.run(
                [sys.executable, *launcher, "-m", "masa_megatron.cli", "train",
                 str(workdir / "exp.yaml"), f"trainer.output_dir={out}",
                 f"rollout.sglang_urls=[{','.join(s.url for s in servers)}]", *extra],
                cwd=REPO, stdout=f, stderr=subprocess.STDOUT, timeout=600,
                env={**os.environ, **standin_env()})
        assert run.returncode == 0, log.read_text()[-4000:]
        stats = []
        for server in servers:
            with urllib.request.urlopen(f"{server.url}/standin/stats", timeout=30) as reply:
                stats.append(json.loads(reply.read()))
    finally:
        for server in servers:
            server.stop()
    hand_off = [("resume", ("weights",)), "sync", ("resume", ("cuda_graph", "kv_cache")),
                "generate"]
    expected = [("release", ALL), *hand_off]             # start-up
    for _ in range(2):                                    # each step, after its generation
        expected += [("release", ALL), *hand_off]
    calls = [_control_calls(s["bodies"]) for s in stats]
    if ranks == 1:
        assert calls[0] == expected
    for server_calls in calls:   # which server a rank's requests reach varies: order apart
        assert [c for c in server_calls if c != "generate"] == \
            [c for c in expected if c != "generate"]
    assert sum(c.count("generate") for c in calls) >= 3
    assert all(s["released"] == [] for s in stats)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    trained = [r for r in rows if r["step"] > 0]
    assert [r["step"] for r in trained] == [1, 2]
    for row in trained:
        for phase in CYCLE_PHASES:
            assert row[f"memory/{phase}/rss_gb"] > 0, (row["step"], phase)
    assert (out / "checkpoints" / "step_000002").is_dir()


def test_colocated_servers_start_before_the_trainer_allocates(monkeypatch, workdir):
    """rollout.colocate with launched servers: SGLang sizes its KV cache from the free memory at
    its start, so it must start before the trainer's model and optimizer exist."""
    import masa_megatron.model as model_pkg
    from masa_megatron.rollout.sglang_launch import EngineError
    from masa_megatron.train.main import run_training

    events = []
    real_build = model_pkg.build_gpt_model

    def launch(opts, num_servers, **kwargs):
        events.append("launch")
        raise EngineError("launch recorded")

    def build(*args, **kwargs):
        events.append("build")
        return real_build(*args, **kwargs)

    monkeypatch.setattr("masa_megatron.rollout.sglang_placement.launch_servers", launch)
    monkeypatch.setattr(model_pkg, "build_gpt_model", build)
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    with pytest.raises(EngineError, match="launch recorded"):
        run_training(str(workdir / "exp.yaml"), [f"trainer.output_dir={workdir / 'launch'}",
                                                 f"rollout.sglang_python={sys.executable}"],
                     log=lambda m: None)
    assert events == ["launch"]

