"""The local layer spec's core attention through torch's scaled_dot_product_attention.

Megatron's local `DotProductAttention` materialises the scores: it repeats grouped K/V heads,
runs baddbmm, a masked softmax (in fp32 for half inputs) and bmm. For the case every training
forward here takes (causal self-attention, no explicit mask, no dropout, no bias, no softmax
offset, no sliding window) this class computes the same function with one fused call:

    context = softmax(scale * Q K^T + causal) V,    scale = Megatron's net softmax scale
              (1/sqrt(d), or softmax_scale; the query-key layer-scaling coefficient cancels)

with grouped KV heads shared by `enable_gqa` instead of copies. It is the attention the embedded
engine already uses for rollouts, so trainer and rollout log-probs come from the same kernel.
Every other case (an explicit mask, dropout in training, bias, packed sequences, offsets,
windows, arguments of newer Megatron releases) runs Megatron's own forward unchanged.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType


class SDPADotProductAttention(DotProductAttention):
    """`DotProductAttention` with the fused path above; same constructor, same outputs."""

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: Optional[torch.Tensor], attn_mask_type: Optional[Any] = None,
                attention_bias: Optional[torch.Tensor] = None, packed_seq_params: Any = None,
                **kwargs: Any) -> torch.Tensor:
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        dropout = self.attention_dropout.p if self.training else 0.0
        if (attention_mask is not None or attention_bias is not None or packed_seq_params is not None
                or kwargs or dropout > 0 or self.softmax_offset is not None
                or getattr(self.scale_mask_softmax, "window_size", None) is not None
                or mask_type not in (AttnMaskType.causal, AttnMaskType.no_mask)
                or query.size(0) != key.size(0)):
            return super().forward(query, key, value, attention_mask, attn_mask_type,
                                   attention_bias, packed_seq_params, **kwargs)
        scale = self.softmax_scale
        if self.config.apply_query_key_layer_scaling:
            scale *= self.layer_number          # FusedScaleMaskSoftmax multiplies it back
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))   # [b, heads, s, d]
        causal = mask_type == AttnMaskType.causal and query.size(0) > 1
        context = F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale,
                                                 enable_gqa=q.size(1) != k.size(1))
        return context.permute(2, 0, 1, 3).reshape(query.size(0), query.size(1),
                                                   self.hidden_size_per_partition)
