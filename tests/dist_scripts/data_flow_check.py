"""How data reaches the ranks of a sharded trainer (see tests/test_distributed_data_flow.py).

    python -m torch.distributed.run --nproc_per_node=2 data_flow_check.py --work DIR

One launch, 2 processes (gloo), the real `masa train` parts (train.main.build_training, the loop's
run_step, save_checkpoint, resume), with Megatron's layout re-initialised between scenarios:

    rewards_tp2  TP=2, GRPO, a grader whose answer depends on the rank that runs it: what each
                 rank trains on (sample rewards, advantages) and how many items it graded.
    results_tp2  TP=2, `generate_in_model_parallel_group` (the SGLang data flow) with a stub
                 generator: what each rank returns, and every torch.distributed call it made
                 (function, backend of its group, whether the group is Megatron's own).
    head_dp2     DP=2, MASA with the meta-head: the head after 2 steps on each rank; then a
                 checkpoint with a different behaviour-cloning buffer per rank, resumed.
    head_pp2     PP=2, MASA with the meta-head (on the last stage): a step, a checkpoint, a
                 resume; the head before and after.

Writes <work>/<scenario>_rank<r>.json with what it saw; the test asserts on them.
"""
from __future__ import annotations

import argparse
import json
import sys
from contextlib import contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

COLLECTIVES = ("broadcast", "all_reduce", "all_gather", "all_gather_into_tensor", "gather",
               "scatter", "send", "recv", "barrier", "broadcast_object_list",
               "all_gather_object", "gather_object", "scatter_object_list")


def rank() -> int:
    return torch.distributed.get_rank()


def build(work: Path, name: str, *overrides: str):
    from masa_megatron.config import load_config
    from masa_megatron.parallel import init_parallel
    from masa_megatron.train.main import build_training

    cfg = load_config(work / "exp.yaml", [f"trainer.output_dir={work / name}", *overrides])
    init_parallel(cfg.parallel, seed=cfg.model.seed)
    return build_training(cfg, log=lambda message: None)[0]


def write(work: Path, scenario: str, record: dict) -> None:
    (work / f"{scenario}_rank{rank()}.json").write_text(json.dumps(record))


def head_state(parts) -> list[float] | None:
    if parts.head is None:
        return None
    return [v for t in parts.head.head.state_dict().values() for v in t.flatten().tolist()]


# ---------------------------------------------------------------------------- rewards_tp2
def rewards_tp2(work: Path) -> None:
    from tests.support import rewards

    parts = build(work, "rewards_tp2", "parallel.tensor_model_parallel_size=2", "masa.mode=grpo",
                  "data.reward=tests.support.rewards.rank_dependent_parity")
    seen: dict = {}
    make_batch, update = parts.actor.make_batch, parts.actor.update

    def spy_make_batch(samples, advantages):
        seen["texts"] = [parts.tokenizer.decode(s.response_ids, skip_special_tokens=True)
                         for s in samples]
        seen["rewards"] = [s.reward for s in samples]
        return make_batch(samples, advantages)

    def spy_update(batch, **kwargs):
        seen["advantages"] = torch.as_tensor(batch.advantages).tolist()
        return update(batch, **kwargs)

    parts.actor.make_batch, parts.actor.update = spy_make_batch, spy_update
    rewards.GRADED.clear()
    from masa_megatron.train.loop import run_step
    run_step(parts, 0)
    write(work, "rewards_tp2", dict(seen, graded_here=len(rewards.GRADED)))


# ---------------------------------------------------------------------------- results_tp2
def stub_results():
    """Results with every field varied: ids (None, non-ASCII), empty and long completions."""
    from masa_megatron.rollout.base import Completion, GenerationResult

    gen = torch.Generator().manual_seed(3)
    results = []
    for i, rid in enumerate(["q0-s", None, "q2-méta", ""]):
        completions = []
        for j in range(i + 1 if i != 3 else 0):
            n = (7 * i + 3 * j) % 11
            ids = torch.randint(0, 151_936, (n,), generator=gen).tolist()
            logps = (-torch.rand(n, generator=gen, dtype=torch.float64) * 5).tolist()
            completions.append(Completion(ids, logps, ("stop", "length", "abort")[(i + j) % 3]))
        results.append(GenerationResult(rid, 10 + i, completions, weight_version=4 + i))
    return results


@contextmanager
def recorded_collectives(calls: list):
    """Record (function, backend, is Megatron's model-parallel group) of every call to a
    torch.distributed collective."""
    from megatron.core import parallel_state as ps

    dist = torch.distributed
    saved = {name: getattr(dist, name) for name in COLLECTIVES}
    megatron_group = ps.get_model_parallel_group()

    def wrap(name, fn):
        def recorded(*args, **kwargs):
            group = kwargs.get("group")
            calls.append({"fn": name, "backend": str(dist.get_backend(group)),
                          "megatron_group": group is megatron_group})
            return fn(*args, **kwargs)
        return recorded

    for name, fn in saved.items():
        setattr(dist, name, wrap(name, fn))
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(dist, name, fn)


def results_tp2(work: Path) -> None:
    from masa_megatron.config import ParallelConfig
    from masa_megatron.parallel import init_parallel
    from masa_megatron.rollout.dp_flow import generate_in_model_parallel_group
    from masa_megatron.rollout.sglang_launch import EngineError

    init_parallel(ParallelConfig(tensor_model_parallel_size=2))
    calls: list = []
    generated_here = []

    def generate(requests):
        generated_here.append(len(requests))
        return stub_results()

    def failing(requests):
        raise EngineError("http://10.0.0.7:30000/generate: connection refused")

    with recorded_collectives(calls):
        got = generate_in_model_parallel_group(generate, ["a request"] * 4)
        try:
            generate_in_model_parallel_group(failing, ["a request"])
            error = None
        except Exception as err:  # noqa: BLE001 - recorded for the test
            error = {"type": type(err).__name__, "message": str(err)}
    write(work, "results_tp2", {"identical": got == stub_results(),
                                "generated_here": generated_here, "calls": calls,
                                "error": error})


# ---------------------------------------------------------------------------- head_dp2
def head_dp2(work: Path) -> None:
    from masa_megatron.train.loop import run_step
    from masa_megatron.train.main import save_checkpoint

    masa = ("masa.mode=masa", "masa.predictor=both", "masa.meta_group_size=2")
    parts = build(work, "head_dp2", *masa)
    initial = head_state(parts)
    for step in range(2):
        run_step(parts, step)
    trained = head_state(parts)
    buffer = [([rank() + 1] * 3, [7, rank()]), ([9], [rank(), rank(), 5])]
    parts.bc_buffer = [(list(p), list(t)) for p, t in buffer]
    save_checkpoint(parts, 2)
    resumed = build(work, "head_dp2", *masa, "checkpoint.resume=auto")
    write(work, "head_dp2", {"initial_head": initial, "trained_head": trained, "saved_buffer": buffer,
                             "resumed_buffer": [list(map(list, e)) for e in resumed.bc_buffer],
                             "resumed_head": head_state(resumed)})


# ---------------------------------------------------------------------------- head_pp2
def head_pp2(work: Path) -> None:
    from masa_megatron.train.loop import run_step
    from masa_megatron.train.main import save_checkpoint

    masa = ("masa.mode=masa", "masa.predictor=both", "masa.meta_group_size=2",
            "parallel.pipeline_model_parallel_size=2")
    parts = build(work, "head_pp2", *masa)
    initial = head_state(parts)
    run_step(parts, 0)
    trained = head_state(parts)
    save_checkpoint(parts, 1)
    resumed = build(work, "head_pp2", *masa, "checkpoint.resume=auto")
    folder = Path(parts.checkpoints.latest())
    write(work, "head_pp2", {"has_head": parts.head is not None, "initial_head": initial,
                             "trained_head": trained, "resumed_head": head_state(resumed),
                             "exported": (folder / "meta_head.safetensors").is_file()})


SCENARIOS = {"rewards_tp2": rewards_tp2, "results_tp2": results_tp2, "head_dp2": head_dp2,
             "head_pp2": head_pp2}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", required=True)
    parser.add_argument("--only", default=",".join(SCENARIOS))
    args = parser.parse_args()
    torch.distributed.init_process_group("gloo")
    torch.set_num_threads(1)
    for name in args.only.split(","):
        SCENARIOS[name](Path(args.work))


if __name__ == "__main__":  # checkpoint saving re-imports __main__ in a helper process
    main()
