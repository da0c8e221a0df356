"""Qwen3 (dense): the Llama layout plus per-head RMSNorm on queries and keys before RoPE."""
from masa_megatron.model.families.llama import DENSE_DECODER_WEIGHTS, H, L
from masa_megatron.model.registry import FamilySpec, Split, WeightRule, register, reject_options

QWEN3 = register(FamilySpec(
    name="qwen3",
    architectures=("Qwen3ForCausalLM",),
    weights=DENSE_DECODER_WEIGHTS + (
        WeightRule(L + "self_attention.q_layernorm.weight", (H + "self_attn.q_norm.weight",),
                   Split.REPLICATED),
        WeightRule(L + "self_attention.k_layernorm.weight", (H + "self_attn.k_norm.weight",),
                   Split.REPLICATED),
    ),
    qk_norm=True,
    check_config=lambda cfg: reject_options(cfg, "qwen3", attention_bias=True,
                                            use_sliding_window=True),
))
