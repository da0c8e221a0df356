"""The actor's batch format, and how a batch is cut into data-parallel shards, mini-batches and
micro-batches. Pure Python / torch: no model, no distributed state.

Layout of one sample (prompt p_0..p_{P-1}, response y_0..y_{R-1}) as a row of the model input:

    input  x = p_0 .. p_{P-1} y_0 .. y_{R-2}           length L = P + R - 1
    labels   = p_1 .. p_{P-1} y_0 .. y_{R-1}           (the next token at every input position)
    loss_mask[t] = True  for  P-1 <= t <= L-1           (positions whose label is a response token)

so the response log-prob log pi(y_j | p, y_<j) sits in column P - 1 + j. The last response token
is never fed to the model (it predicts nothing we use). Rows are right-padded with token 0 to the
micro-batch's longest row, rounded up to the multiple the parallel layout needs (TP with sequence
parallelism: each rank holds s/TP rows of the sequence; with FP8 times Transformer Engine's GEMM
alignment, 16 or 32 for MXFP8: model/shape_check.py states the rule and checks it); causal
attention keeps valid positions blind to the padding after them, and padding never enters a loss
(mask False).

Micro-batch planning: the memory of one forward/backward grows with the padded size
num_rows x padded width, so rows (each counted at its length rounded up to the layout's multiple)
are sorted longest first and packed greedily while num_rows x (longest row) <= token_budget. A
row longer than the budget gets a micro-batch alone.
"""
from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field, fields, replace
from typing import TYPE_CHECKING, Optional, Sequence

import torch
from torch import Tensor

if TYPE_CHECKING:
    from masa_megatron.train.shared_prefix import SharedPrefix

PER_TOKEN_FIELDS = ("old_logprobs", "rollout_logprobs", "ref_logprobs")


@dataclass
class TrainBatch:
    """The samples one actor call works on (one data-parallel rank's share).

    prompt_ids / response_ids: token ids per sample (prompt non-empty). advantages: one value per
    sample. old_logprobs / rollout_logprobs / ref_logprobs: optional, one float per response token
    per sample (old_logprobs is what `Actor.logprobs` returns; rollout_logprobs come from the
    engine and drive truncated importance sampling; ref_logprobs drive a KL penalty).
    group_ids: optional GRPO group of each sample (for `split_for_data_parallel`).
    prompt_targets: optional [N, k] float32 targets of a loss on the final hidden state at each
    sample's last prompt token (`Actor.prompt_state_loss`); NaN where a sample has no target.
    """
    prompt_ids: list[list[int]]
    response_ids: list[list[int]]
    advantages: Tensor | Sequence[float] = ()
    old_logprobs: Optional[list[Tensor]] = None
    rollout_logprobs: Optional[list[Tensor]] = None
    ref_logprobs: Optional[list[Tensor]] = None
    group_ids: Optional[list[int]] = None
    prompt_targets: Optional[Tensor] = None

    def __post_init__(self) -> None:
        n = len(self.prompt_ids)
        if len(self.response_ids) != n:
            raise ValueError(f"{n} prompts but {len(self.response_ids)} responses")
        if len(self.advantages) == 0:
            self.advantages = torch.zeros(n)
        self.advantages = torch.as_tensor(self.advantages, dtype=torch.float32).reshape(-1)
        if self.advantages.numel() != n:
            raise ValueError(f"{n} samples but {self.advantages.numel()} advantages")
        for i, prompt in enumerate(self.prompt_ids):
            if len(prompt) == 0:
                raise ValueError(f"sample {i}: empty prompt (the first response token needs one)")
        for name in PER_TOKEN_FIELDS:
            values = getattr(self, name)
            if values is None:
                continue
            if len(values) != n:
                raise ValueError(f"{name}: {len(values)} entries for {n} samples")
            for i, (v, r) in enumerate(zip(values, self.response_ids)):
                if len(v) != len(r):
                    raise ValueError(f"{name}[{i}] has {len(v)} values for {len(r)} tokens")
        if self.group_ids is not None and len(self.group_ids) != n:
            raise ValueError(f"group_ids: {len(self.group_ids)} entries for {n} samples")
        if self.prompt_targets is not None:
            self.prompt_targets = torch.as_tensor(self.prompt_targets, dtype=torch.float32)
            if self.prompt_targets.dim() != 2 or self.prompt_targets.shape[0] != n:
                raise ValueError(f"prompt_targets: shape {tuple(self.prompt_targets.shape)} "
                                 f"for {n} samples (want [{n}, k])")

    def __len__(self) -> int:
        return len(self.prompt_ids)

    def row_lengths(self) -> list[int]:
        """Model input length per sample: P + R - 1 (at least 1)."""
        return [max(len(p) + len(r) - 1, 1) for p, r in zip(self.prompt_ids, self.response_ids)]

    def response_token_count(self) -> int:
        return sum(len(r) for r in self.response_ids)

    def subset(self, indices: Sequence[int]) -> "TrainBatch":
        """A new batch of the samples at `indices` (in that order)."""
        def pick(values):
            return None if values is None else [values[i] for i in indices]
        return TrainBatch(
            prompt_ids=pick(self.prompt_ids), response_ids=pick(self.response_ids),
            advantages=self.advantages[list(indices)] if len(indices) else torch.zeros(0),
            old_logprobs=pick(self.old_logprobs), rollout_logprobs=pick(self.rollout_logprobs),
            ref_logprobs=pick(self.ref_logprobs), group_ids=pick(self.group_ids),
            prompt_targets=None if self.prompt_targets is None
            else self.prompt_targets[list(indices)])


@dataclass
class MicroBatch:
    """Padded [b, T] tensors of some samples of a TrainBatch (see the module docstring)."""
    sample_index: list[int]          # row -> index in the TrainBatch
    tokens: Tensor                   # [b, T] int64
    position_ids: Tensor             # [b, T] int64
    labels: Tensor                   # [b, T] int64, next token (0 at padding)
    loss_mask: Tensor                # [b, T] bool
    advantages: Tensor               # [b] float32
    response_start: list[int]        # column of each row's first response log-prob (P - 1)
    response_len: list[int]          # R per row
    per_token: dict[str, Tensor] = field(default_factory=dict)  # [b, T] float32 each
    prompt_targets: Optional[Tensor] = None  # [b, k] float32 (NaN: no target), see TrainBatch
    # set: rows are response segments after a shared prompt prefix (train/shared_prefix.py)
    prefix: Optional["SharedPrefix"] = None

    @property
    def num_rows(self) -> int:
        return self.tokens.shape[0]

    @property
    def input_positions(self) -> int:
        """Positions the model computes, padding included (the prefix rows too, if any)."""
        return self.tokens.numel() + (0 if self.prefix is None else self.prefix.tokens.numel())

    @property
    def valid_tokens(self) -> int:
        """Input positions that hold a sample's token (P + R - 1 per row, or the prefix's P - 1
        once per prompt plus R per segment); the rest is padding."""
        rows = sum(s + n for s, n in zip(self.response_start, self.response_len))
        return rows + (0 if self.prefix is None else int(self.prefix.lengths.sum()))

    @property
    def is_padding_only(self) -> bool:
        """A stand-in micro-batch for a rank with no samples (no valid token, no sample)."""
        return len(self.sample_index) == 0

    def to(self, device: torch.device | str) -> "MicroBatch":
        """The same micro-batch with its tensors on `device`."""
        move = {f.name: getattr(self, f.name).to(device) for f in fields(self)
                if isinstance(getattr(self, f.name), Tensor)}
        per_token = {k: v.to(device) for k, v in self.per_token.items()}
        prefix = None if self.prefix is None else self.prefix.to(device)
        return replace(self, per_token=per_token, prefix=prefix, **move)

    def unpack(self, values: Tensor) -> list[Tensor]:
        """Per-row response values out of a [b, T] tensor (row order = sample_index)."""
        return [values[row, s:s + n] for row, (s, n)
                in enumerate(zip(self.response_start, self.response_len))]


def zero_rows(batch: TrainBatch, rows: int, width: int
              ) -> tuple[Tensor, Tensor, Tensor, dict[str, Tensor]]:
    """Zeroed [rows, width] tokens and labels (int64), loss mask (bool) and the batch's per-token
    fields (float32): what a micro-batch packer fills in."""
    per_token = {name: torch.zeros(rows, width) for name in PER_TOKEN_FIELDS
                 if getattr(batch, name) is not None}
    return (torch.zeros(rows, width, dtype=torch.long), torch.zeros(rows, width, dtype=torch.long),
            torch.zeros(rows, width, dtype=torch.bool), per_token)


def pack_micro_batch(batch: TrainBatch, indices: Sequence[int],
                     pad_to: Optional[int] = None, multiple_of: int = 1) -> MicroBatch:
    """Pad the samples `indices` of `batch` into one MicroBatch (width max length, or `pad_to`,
    rounded up to a multiple of `multiple_of`).

    With no indices, returns a one-row micro-batch with nothing valid in it: a rank without
    samples still takes part in the collective forward/backward with it.
    """
    indices = list(indices)
    targets = batch.prompt_targets
    if multiple_of < 1:
        raise ValueError(f"multiple_of={multiple_of}: must be >= 1")
    if not indices:
        zeros = torch.zeros(1, multiple_of, dtype=torch.long)
        return MicroBatch([], zeros, zeros.clone(), zeros.clone(),
                          torch.zeros(1, multiple_of, dtype=torch.bool), torch.zeros(1), [0], [0],
                          {name: torch.zeros(1, multiple_of) for name in PER_TOKEN_FIELDS
                           if getattr(batch, name) is not None},
                          None if targets is None else torch.full((1, targets.shape[1]), math.nan))
    lengths = [max(len(batch.prompt_ids[i]) + len(batch.response_ids[i]) - 1, 1) for i in indices]
    width = max(lengths) if pad_to is None else pad_to
    if width < max(lengths):
        raise ValueError(f"pad_to={pad_to} is shorter than the longest row ({max(lengths)})")
    width = -(-width // multiple_of) * multiple_of
    b = len(indices)
    tokens, labels, loss_mask, per_token = zero_rows(batch, b, width)
    starts, counts = [], []
    for row, i in enumerate(indices):
        prompt, response = batch.prompt_ids[i], batch.response_ids[i]
        seq = torch.as_tensor(list(prompt) + list(response), dtype=torch.long)
        n_in = max(len(seq) - 1, 1)
        tokens[row, :n_in] = seq[:n_in]
        labels[row, :len(seq) - 1] = seq[1:]
        start, count = len(prompt) - 1, len(response)
        loss_mask[row, start:start + count] = True
        for name, out in per_token.items():
            out[row, start:start + count] = torch.as_tensor(
                getattr(batch, name)[i], dtype=torch.float32)
        starts.append(start)
        counts.append(count)
    position_ids = torch.arange(width, dtype=torch.long).unsqueeze(0).expand(b, -1).contiguous()
    return MicroBatch(indices, tokens, position_ids, labels, loss_mask,
                      batch.advantages[indices].clone(), starts, counts, per_token,
                      None if targets is None else targets[indices].clone())


def plan_micro_batches(lengths: Sequence[int], token_budget: int,
                       multiple_of: int = 1) -> list[list[int]]:
    """Group indices 0..n-1 so that each group's rows x (longest row) <= token_budget, a row
    counted at its length rounded up to `multiple_of` (the width `pack_micro_batch` pads to).

    Longest rows first, greedy: a group keeps taking the next-longest row while the padded size
    stays within budget (its first row is its longest, so the test is (k + 1) * first <= budget).
    A row longer than the budget is a group by itself. Returns [] for no rows.
    """
    if token_budget < 1:
        raise ValueError(f"token_budget={token_budget}: must be >= 1")
    if multiple_of < 1:
        raise ValueError(f"multiple_of={multiple_of}: must be >= 1")
    lengths = [-(-n // multiple_of) * multiple_of for n in lengths]
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    groups: list[list[int]] = []
    for i in order:
        if groups and (len(groups[-1]) + 1) * lengths[groups[-1][0]] <= token_budget:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def split_for_data_parallel(samples: TrainBatch | Sequence[int], group_ids: Sequence[int],
                            dp_size: int) -> list[list[int]]:
    """Assign samples to `dp_size` ranks: every group whole on one rank, tokens balanced.

    `samples` is a TrainBatch (a sample weighs its row length P + R - 1) or the weight per sample.
    Groups are placed largest first on the currently lightest rank (LPT scheduling: the heaviest
    rank is at most 4/3 of the optimum). Returns the sample indices of each rank, in input order.
    """
    weights = samples.row_lengths() if isinstance(samples, TrainBatch) else list(samples)
    if len(group_ids) != len(weights):
        raise ValueError(f"{len(group_ids)} group ids for {len(weights)} samples")
    if dp_size < 1:
        raise ValueError(f"dp_size={dp_size}: must be >= 1")
    members: dict[int, list[int]] = {}
    for i, g in enumerate(group_ids):
        members.setdefault(g, []).append(i)
    group_weight = {g: sum(weights[i] for i in idx) for g, idx in members.items()}
    heap = [(0, rank) for rank in range(dp_size)]
    ranks: list[list[int]] = [[] for _ in range(dp_size)]
    for g in sorted(members, key=lambda g: (-group_weight[g], members[g][0])):
        load, rank = heapq.heappop(heap)
        ranks[rank].extend(members[g])
        heapq.heappush(heap, (load + group_weight[g], rank))
    return [sorted(r) for r in ranks]


def split_mini_batches(num_samples: int, num_mini_batches: int) -> list[list[int]]:
    """Consecutive index chunks of near-equal size (the first ones one larger); some may be
    empty when there are fewer samples than mini-batches."""
    if num_mini_batches < 1:
        raise ValueError(f"num_mini_batches={num_mini_batches}: must be >= 1")
    base, extra = divmod(num_samples, num_mini_batches)
    chunks, start = [], 0
    for k in range(num_mini_batches):
        size = base + (1 if k < extra else 0)
        chunks.append(list(range(start, start + size)))
        start += size
    return chunks


def sequence_mini_batches(counts: Sequence[int], size: int) -> list[tuple[list[list[int]],
                                                                       list[float]]]:
    """Mini-batches of `size` sequences over all data-parallel ranks (the reference's
    ppo_mini_batch_size x n with verl's dynamic batch size).

    counts[r] = the samples of DP rank r. Each rank cuts its samples, in order, into consecutive
    chunks of size / DP (the last one shorter); mini-batch k is the k-th chunk of every rank, and
    its loss is scaled by its share of a full one: scale_k = (sequences in it over all ranks) /
    size. So 3,072 sequences give 2,048 (scale 1) + 1,024 (scale 0.5), 4,096 two full ones.
    Every rank gets the same number of mini-batches (some chunks empty when ranks differ).
    Returns, per rank, (chunks of its sample indices, scales).
    """
    dp = len(counts)
    if size < 1 or size % dp:
        raise ValueError(f"mini-batch size {size} is not divisible by the {dp} data-parallel "
                         f"ranks")
    local = size // dp
    num = max(1, max(math.ceil(n / local) for n in counts))
    bounds = [(k * local, (k + 1) * local) for k in range(num)]
    scales = [sum(max(0, min(b, n) - a) for n in counts) / size for a, b in bounds]
    return [([list(range(min(a, n), min(b, n))) for a, b in bounds], list(scales))
            for n in counts]


def balanced_partition(weights: Sequence[int], num_parts: int) -> list[list[int]]:
    """Indices 0..n-1 in `num_parts` parts of equal count (the first n mod k one larger) with
    near-equal weight sums, each part in index order (the reference balances sequence lengths
    across DP ranks this way before mini-batching; verl uses Karmarkar-Karp, this is greedy:
    heaviest first into the lightest part that has room)."""
    if num_parts < 1:
        raise ValueError(f"num_parts={num_parts}: must be >= 1")
    base, extra = divmod(len(weights), num_parts)
    room = [base + (1 if p < extra else 0) for p in range(num_parts)]
    heap = [(0, p) for p in range(num_parts) if room[p]]
    parts: list[list[int]] = [[] for _ in range(num_parts)]
    for i in sorted(range(len(weights)), key=lambda i: (-weights[i], i)):
        load, p = heapq.heappop(heap)
        parts[p].append(i)
        if len(parts[p]) < room[p]:
            heapq.heappush(heap, (load + weights[i], p))
    return [sorted(part) for part in parts]


__all__ = [
    "TrainBatch", "MicroBatch", "pack_micro_batch", "plan_micro_batches", "balanced_partition",
    "sequence_mini_batches", "split_for_data_parallel", "split_mini_batches", "PER_TOKEN_FIELDS"]
