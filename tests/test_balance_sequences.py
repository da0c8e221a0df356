"""grpo.balance_sequences: the step's samples of every data-parallel rank re-dealt into equal
counts with balanced tokens (the reference's balance_batch), over two gloo processes."""
import json
import os

import pytest

from masa_megatron.ports import free_port

torch = pytest.importorskip("torch")


def _rank_batch(rank: int):
    from masa_megatron.train.batching import TrainBatch
    # rank 0: 3 samples of row lengths 10, 1, 5 (P + R - 1); rank 1: one of length 3
    shapes = [[(2, 9), (1, 1), (3, 3)], [(2, 2)]][rank]
    return TrainBatch([[rank + 1] * p for p, _ in shapes], [[7] * r for _, r in shapes],
                      [float(10 * rank + i) for i in range(len(shapes))],
                      rollout_logprobs=[torch.full((r,), -float(rank)) for _, r in shapes],
                      group_ids=[0] * len(shapes))


def _worker(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    from masa_megatron.train.dist import DataParallelInfo
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        mine = DataParallelInfo(rank, 2, None).balance_sequences(_rank_batch(rank))
        with open(f"{out}.{rank}", "w") as f:
            json.dump({"rows": mine.row_lengths(), "adv": mine.advantages.tolist(),
                       "groups": mine.group_ids,
                       "rollout": [t.tolist() for t in mine.rollout_logprobs]}, f)
    finally:
        dist.destroy_process_group()


def test_samples_are_redealt_into_equal_counts_with_balanced_tokens(tmp_path):
    """Global order: rank 0's (10, 1, 5) then rank 1's (3); equal-count parts of 2 with the
    lightest spread: {10, 1} = 11 and {5, 3} = 8 (verl's own example), each in global order."""
    out = str(tmp_path / "r")
    torch.multiprocessing.spawn(_worker, args=(free_port(), out), nprocs=2)
    got = [json.loads(open(f"{out}.{r}").read()) for r in range(2)]
    assert [g["rows"] for g in got] == [[10, 1], [5, 3]]
    assert [g["adv"] for g in got] == [[0.0, 1.0], [2.0, 10.0]]
    assert [g["groups"] for g in got] == [[0, 0], [0, 1]]       # rank 1's group offset by 1
    assert got[1]["rollout"] == [[-0.0] * 3, [-1.0] * 2]


def test_one_rank_keeps_its_batch_and_logprobs_must_come_after():
    from masa_megatron.train.dist import DataParallelInfo
    batch = _rank_batch(0)
    assert DataParallelInfo().balance_sequences(batch) is batch
    batch.old_logprobs = [torch.zeros(len(r)) for r in batch.response_ids]
    with pytest.raises(ValueError, match="before computing"):
        DataParallelInfo().balance_sequences(batch)
