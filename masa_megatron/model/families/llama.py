"""Llama (1/2/3, incl. Llama-3 rope scaling): the dense decoder every other family extends."""
from masa_megatron.model.registry import FamilySpec, Split, WeightRule, register, reject_options

L = "decoder.layers.{i}."
H = "model.layers.{i}."

DENSE_DECODER_WEIGHTS = (
    WeightRule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), Split.VOCAB),
    WeightRule("decoder.final_layernorm.weight", ("model.norm.weight",), Split.REPLICATED),
    WeightRule("output_layer.weight", ("lm_head.weight",), Split.VOCAB),
    WeightRule(L + "input_layernorm.weight", (H + "input_layernorm.weight",), Split.REPLICATED,
               te_megatron=L + "self_attention.linear_qkv.layer_norm_weight"),
    WeightRule(L + "self_attention.linear_qkv.weight",
               (H + "self_attn.q_proj.weight", H + "self_attn.k_proj.weight",
                H + "self_attn.v_proj.weight"), Split.QKV),
    WeightRule(L + "self_attention.linear_proj.weight", (H + "self_attn.o_proj.weight",),
               Split.ROW),
    WeightRule(L + "pre_mlp_layernorm.weight", (H + "post_attention_layernorm.weight",),
               Split.REPLICATED, te_megatron=L + "mlp.linear_fc1.layer_norm_weight"),
    WeightRule(L + "mlp.linear_fc1.weight",
               (H + "mlp.gate_proj.weight", H + "mlp.up_proj.weight"), Split.GATE_UP),
    WeightRule(L + "mlp.linear_fc2.weight", (H + "mlp.down_proj.weight",), Split.ROW),
)

LLAMA = register(FamilySpec(
    name="llama",
    architectures=("LlamaForCausalLM",),
    weights=DENSE_DECODER_WEIGHTS,
    check_config=lambda cfg: reject_options(cfg, "llama", attention_bias=True, mlp_bias=True),
))
