"""Qwen2 / Qwen2.5: the Llama layout plus biases on q, k and v (fused as linear_qkv.bias)."""
from masa_megatron.model.families.llama import DENSE_DECODER_WEIGHTS, H, L
from masa_megatron.model.registry import FamilySpec, Split, WeightRule, register, reject_options

QWEN2 = register(FamilySpec(
    name="qwen2",
    architectures=("Qwen2ForCausalLM",),
    weights=DENSE_DECODER_WEIGHTS + (
        WeightRule(L + "self_attention.linear_qkv.bias",
                   (H + "self_attn.q_proj.bias", H + "self_attn.k_proj.bias",
                    H + "self_attn.v_proj.bias"), Split.QKV),
    ),
    qkv_bias=True,
    check_config=lambda cfg: reject_options(cfg, "qwen2", use_sliding_window=True),
))
