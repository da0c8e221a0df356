"""Log-probs and entropies over a tensor-parallel vocabulary, without gathering it.

For logits z (this TP rank's slice of the vocabulary) and temperature T,
    logp(y) = log_softmax(z / T)[y] = -vocab_parallel_cross_entropy(z / T, y)
with the max and the sum of exponentials all-reduced over TP. Megatron's padding columns (ids >=
the model's vocab_size, from its config.json) are set to -inf first, so the softmax runs over the
vocabulary the rollout engines sample from (which may exceed the tokenizer's).
Entropy per token, also vocab-parallel: with m = max z (all-reduced), e = exp(z - m),
S = sum e (all-reduced):  H = log S - sum(e (z - m)) / S.

Memory per logit element of the micro-batch (this rank's slice): the model's logits (2 bytes in
bf16) and one fp32 copy z (4 bytes) that Megatron's cross entropy turns into the softmax in place
and keeps for backward; the entropy reads z in chunks; backward holds the fp32 gradient (in place
of the softmax) and its bf16 copy for the output layer. Peak: 6 bytes per element in both the
no-grad log-prob pass and the update (benchmarks/vocab_parallel_memory.py).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor


ENTROPY_CHUNK_ELEMENTS = 1 << 24   # logits per temporary of the entropy (64 MiB in fp32)


class _ScaleAndMaskLogits(torch.autograd.Function):
    """z -> z / T with columns >= `pad_from` at -inf, in place (forward and backward): no copy
    of the largest activation, which is consumed only by the cross entropy after it."""

    @staticmethod
    def forward(ctx, z: Tensor, temperature: float, pad_from: int) -> Tensor:
        ctx.temperature, ctx.pad_from = temperature, pad_from
        if temperature != 1.0:
            z.div_(temperature)
        z[..., pad_from:] = float("-inf")
        ctx.mark_dirty(z)
        return z

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad[..., ctx.pad_from:] = 0.0
        if ctx.temperature != 1.0:
            grad.div_(ctx.temperature)
        return grad, None, None


def scaled_vocab_logits(logits: Tensor, temperature: float = 1.0,
                        vocab_size: Optional[int] = None) -> Tensor:
    """fp32 z / T on this TP rank's vocab slice, with columns of ids >= vocab_size at -inf.
    Overwrites fp32 logits (the model output is not used again)."""
    from megatron.core import parallel_state as ps

    z = logits.float()
    part = z.shape[-1]
    start = ps.get_tensor_model_parallel_rank() * part
    pad_from = part if vocab_size is None else min(max(vocab_size - start, 0), part)
    if temperature == 1.0 and pad_from == part:
        return z
    return _ScaleAndMaskLogits.apply(z, float(temperature), pad_from)


def vocab_parallel_logprobs(z: Tensor, labels: Tensor) -> Tensor:
    """log_softmax(z)[label] for vocab-sharded z [..., V/TP]. Overwrites z (Megatron's CE)."""
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy
    return -vocab_parallel_cross_entropy(z, labels)


@torch.no_grad()
def vocab_parallel_entropy(z: Tensor, chunk_elements: int = ENTROPY_CHUNK_ELEMENTS) -> Tensor:
    """Entropy of softmax(z) per position for vocab-sharded z (the module docstring).

    Memory: z itself is only read; the temporaries (z - m and e) exist for `chunk_elements`
    logits at a time, so the peak is z plus O(chunk), not several copies of the vocabulary slice
    (benchmarks/vocab_parallel_memory.py measures it)."""
    from megatron.core import parallel_state as ps

    group = ps.get_tensor_model_parallel_group()
    flat = z.reshape(-1, z.shape[-1])
    m = flat.max(dim=-1).values
    dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
    sums = torch.empty(2, flat.shape[0], dtype=torch.float32, device=z.device)
    rows = max(1, chunk_elements // max(flat.shape[1], 1))
    for start in range(0, flat.shape[0], rows):
        part = slice(start, start + rows)
        shifted = flat[part] - m[part].unsqueeze(-1)
        e = shifted.exp()
        sums[0, part] = e.sum(-1)
        # masked columns: e = 0 and z - m = -inf, whose product would be NaN; it is 0
        sums[1, part] = e.mul_(shifted.nan_to_num_(neginf=0.0)).sum(-1)
    dist.all_reduce(sums, group=group)
    return (sums[0].log() - sums[1] / sums[0]).view(z.shape[:-1])
