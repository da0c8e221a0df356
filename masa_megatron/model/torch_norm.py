"""A torch RMSNorm/LayerNorm for the local layer spec that supports sequence parallelism.

Megatron's `WrappedTorchNorm` (its fallback without apex or Transformer Engine, the only norm that
runs on CPU) refuses `sequence_parallel`. A norm acts on each token alone, so it runs unchanged on
a sequence-sharded input [s/TP, b, h]; what SP changes is its weight gradient: each TP rank sees
only its s/TP tokens, so dL/dw = sum over ranks of the local sums. Megatron's
`finalize_model_grads` all-reduces (SUM over TP) the gradients of parameters that carry
`sequence_parallel = True` when `config.sequence_parallel`, as apex's and TE's norms mark theirs.

`sequence_sharded=False` is for the Q/K norms: their input (after linear_qkv's all-gather) holds
the whole sequence and a TP slice of the heads; Megatron sums their gradients over TP by name
(q_layernorm / k_layernorm) whatever the SP setting.
"""
from __future__ import annotations

import torch

_NORMS = {"RMSNorm": torch.nn.RMSNorm, "LayerNorm": torch.nn.LayerNorm}


class TorchNorm:
    """Builds torch.nn.RMSNorm / LayerNorm (per config.normalization) with weights marked for the
    SP gradient all-reduce; the signature is what Megatron's layer specs call norms with."""

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5,
                persist_layer_norm: bool = False, zero_centered_gamma: bool = False,
                normalization: str = "LayerNorm", sequence_sharded: bool = True):
        if config.normalization not in _NORMS:
            raise ValueError(f"normalization={config.normalization!r}: the local spec's torch "
                             f"norm supports {', '.join(_NORMS)}")
        if config.layernorm_zero_centered_gamma:
            raise ValueError("layernorm_zero_centered_gamma is not supported by torch norms")
        norm = _NORMS[config.normalization](hidden_size, eps=eps)
        for param in norm.parameters():
            param.sequence_parallel = bool(config.sequence_parallel and sequence_sharded)
        return norm
