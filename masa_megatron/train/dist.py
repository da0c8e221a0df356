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

from masa_megatron.masa.scoring import StepTotals, step_totals
from masa_megatron.parallel import collective_device


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

    def any_rank(self, flag: bool) -> bool:
        if self.size == 1:
            return flag
        value = torch.tensor([1.0 if flag else 0.0], device=collective_device())
        dist.all_reduce(value, op=dist.ReduceOp.MAX, group=self.group)
        return bool(value.item())

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
