"""Log-probs and entropies over a tensor-parallel vocabulary, without gathering it.

For logits z (this TP rank's slice of the vocabulary) and temperature T,
    logp(y) = log_softmax(z / T)[y] = -vocab_parallel_cross_entropy(z / T, y)
with the max and the sum of exponentials all-reduced over TP. Megatron's padding columns (ids >=
the model's vocab_size, from its config.json) are set to -inf first, so the softmax runs over the
vocabulary the rollout engines sample from (which may exceed the tokenizer's).
Entropy per token, also vocab-parallel: with m = max z (all-reduced), e = exp(z - m),
S = sum e (all-reduced):  H = log S - sum(e (z - m)) / S.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor


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
def vocab_parallel_entropy(z: Tensor) -> Tensor:
    """Entropy of softmax(z) per position for vocab-sharded z (the module docstring)."""
    from megatron.core import parallel_state as ps

    group = ps.get_tensor_model_parallel_group()
    m = z.max(dim=-1).values
    dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
    shifted = z - m.unsqueeze(-1)
    e = shifted.exp()
    sums = torch.stack([e.sum(-1), torch.where(e > 0, e * shifted, 0.0).sum(-1)])
    dist.all_reduce(sums, group=group)
    return sums[0].log() - sums[1] / sums[0]
