"""How the step's problems and metrics are shared among data-parallel ranks.

Problems are dealt round-robin to DP ranks at the problem level, so every group (the G solutions
and M metas of a problem) stays on one rank. Ranks of one model-parallel group (TP x PP) see the
same problems and take part in the same generation. Step metrics are additive totals
(`masa.scoring.StepTotals`) merged over the DP group.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from masa_megatron.masa.scoring import StepTotals, step_totals
from masa_megatron.parallel import collective_device
from masa_megatron.train.batching import TrainBatch, balanced_partition


@dataclass
class DataParallelInfo:
    rank: int = 0
    size: int = 1
    group: Any = None          # torch.distributed group of the DP ranks (None: single process)

    @classmethod
    def from_megatron(cls) -> "DataParallelInfo":
        if not (dist.is_available() and dist.is_initialized()):
            return cls()
        from megatron.core import parallel_state as ps
        return cls(ps.get_data_parallel_rank(), ps.get_data_parallel_world_size(),
                   ps.get_data_parallel_group())

    def my_share(self, indices: list[int]) -> list[int]:
        return indices[self.rank::self.size]

    def sum(self, rows: list[list[float]]) -> Tensor:
        """[len(rows), k] float64 on the CPU: `rows` summed element-wise over the DP ranks."""
        out = torch.tensor(rows, dtype=torch.float64, device=collective_device())
        if self.size > 1:
            dist.all_reduce(out, group=self.group)
        return out.cpu()

    def sum_or_max(self, values: Tensor, is_max: Tensor) -> Tensor:
        """`values` summed over the DP ranks, or their maximum where `is_max`; a NaN on any rank
        stays NaN (a MAX all-reduce may drop it)."""
        if self.size == 1:
            return values
        maxed, summed, nan = values.clone(), values.clone(), values.isnan().double()
        dist.all_reduce(summed, group=self.group)
        dist.all_reduce(maxed, op=dist.ReduceOp.MAX, group=self.group)
        dist.all_reduce(nan, op=dist.ReduceOp.MAX, group=self.group)
        return torch.where(is_max, maxed, summed).masked_fill(nan > 0, float("nan"))

    def any_rank(self, flag: bool) -> bool:
        if self.size == 1:
            return flag
        value = torch.tensor([1.0 if flag else 0.0], device=collective_device())
        dist.all_reduce(value, op=dist.ReduceOp.MAX, group=self.group)
        return bool(value.item())

    def balance_sequences(self, batch: TrainBatch) -> TrainBatch:
        """The reference's balance_batch: the step's samples of all DP ranks (rank 0's first, in
        order) re-dealt into equal counts with balanced tokens (P + R - 1 per sample,
        `balanced_partition`), each rank's share in that global order. Call after advantages,
        before old log-probs. Group ids get a per-rank offset so they stay distinct."""
        if batch.old_logprobs is not None or batch.ref_logprobs is not None:
            raise ValueError("balance the samples before computing old/reference log-probs")
        if self.size == 1:
            return batch
        mine = {"prompt_ids": batch.prompt_ids, "response_ids": batch.response_ids,
                "advantages": batch.advantages.tolist(), "group_ids": batch.group_ids,
                "rollout_logprobs": None if batch.rollout_logprobs is None
                else [t.tolist() for t in batch.rollout_logprobs],
                "prompt_targets": None if batch.prompt_targets is None
                else batch.prompt_targets.tolist()}
        gathered: list = [None] * self.size
        dist.all_gather_object(gathered, mine, group=self.group)
        gathered = [g for g in gathered if g["prompt_ids"]]
        whole: dict[str, list] = {key: [] for key in mine}
        offset = 0
        for part in gathered:
            groups = part["group_ids"] or [0] * len(part["prompt_ids"])
            whole["group_ids"] += [g + offset for g in groups]
            offset += max(groups) + 1
            for key in ("prompt_ids", "response_ids", "advantages", "rollout_logprobs",
                        "prompt_targets"):
                whole[key] = None if whole[key] is None or part[key] is None \
                    else whole[key] + part[key]
        merged = TrainBatch(
            whole["prompt_ids"], whole["response_ids"], whole["advantages"],
            rollout_logprobs=None if whole["rollout_logprobs"] is None
            else [torch.tensor(v, dtype=torch.float32) for v in whole["rollout_logprobs"]],
            group_ids=whole["group_ids"],
            prompt_targets=None if whole["prompt_targets"] is None
            else torch.tensor(whole["prompt_targets"], dtype=torch.float32))
        return merged.subset(balanced_partition(merged.row_lengths(), self.size)[self.rank])

    def reduce_step_metrics(self, items, stats, meta_scores, cfg,
                            reference_parse: Optional[Any] = None) -> dict[str, float]:
        totals = step_totals(items, stats, meta_scores, cfg.rollout.max_response_length,
                             reference_parse)
        if self.size > 1:
            gathered: list = [None] * self.size
            dist.all_gather_object(gathered, totals.sums, group=self.group)
            merged = StepTotals()
            for sums in gathered:
                for name, (total, count) in sums.items():
                    merged.add(name, total, count)
            totals = merged
        return totals.finalize()


@dataclass
class PipelineStages:
    """This rank's pipeline: results computed on the last stage are broadcast to the others."""
    size: int = 1
    group: Any = None          # torch.distributed group of this pipeline's stages
    last_rank: int = 0         # global rank of its last stage

    @classmethod
    def from_megatron(cls) -> "PipelineStages":
        from megatron.core import parallel_state as ps
        return cls(ps.get_pipeline_model_parallel_world_size(),
                   ps.get_pipeline_model_parallel_group(),
                   ps.get_pipeline_model_parallel_last_rank())

    def broadcast_object(self, obj: Any) -> Any:
        """A picklable object held on the last stage, returned on every stage."""
        if self.size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=self.last_rank, group=self.group)
        return box[0]

    def broadcast_tensor(self, value: Tensor) -> Tensor:
        """The last stage's `value` (same shape and dtype on every stage), on the CPU."""
        if self.size > 1:
            value = value.to(collective_device())
            dist.broadcast(value, src=self.last_rank, group=self.group)
        return value.cpu()
