"""Mini-batches by sequence count over two data-parallel ranks (tests/test_actor_parallel.py).

Rank 0 holds samples 0, 1, 2 of actor_common.make_batch(), rank 1 sample 3;
grpo.mini_batch_sequences = 2, so each rank cuts chunks of 2 / 2 = 1: mini-batch 0 = {0, 3}
(2 sequences, scale 1), 1 = {1} and 2 = {2} (1 sequence each, scale 1/2; rank 1 idle). At LR 0
the ratio is 1 and a mini-batch's token-mean loss is -sum_i A_i R_i / sum_i R_i, so by hand
loss = (-(A0 R0 + A3 R3) / (R0 + R3) - A1 / 2 - A2 / 2) / 3 over 3 optimizer steps.
Writes <out>/rank<r>.json with the measured and the hand-computed loss.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from actor_common import make_batch, rank, setup_actor  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    out = Path(parser.parse_args().out)
    actor, _ = setup_actor(1, 1, mini_batches=1, mini_batch_sequences=2)
    for group in actor.optimizer.param_groups:
        group["max_lr"] = group["min_lr"] = 0.0
    full = make_batch()
    mine = full.subset([0, 1, 2] if rank() == 0 else [3])
    mine.old_logprobs = actor.logprobs(mine)
    metrics = actor.update(mine)
    a, r = full.advantages.tolist(), [len(x) for x in full.response_ids]
    by_hand = (-(a[0] * r[0] + a[3] * r[3]) / (r[0] + r[3]) - a[1] / 2 - a[2] / 2) / 3
    (out / f"rank{rank()}.json").write_text(json.dumps({
        "loss": metrics["train/loss"], "by_hand": by_hand,
        "optimizer_steps": metrics["train/optimizer_steps"]}))


if __name__ == "__main__":
    main()
