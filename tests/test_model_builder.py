"""The builder: TransformerConfig fields from the HF config and ModelConfig, layer-spec choice,
weight initialisation and Megatron's tensor-parallel attributes."""
import pytest
import torch

from masa_megatron.config import ModelConfig, ParallelConfig
from masa_megatron.model import (
    ModelLoadError, build_gpt_model, resolve_layer_spec, transformer_config_from_hf)
from masa_megatron.model.tiny import tiny_hf_config
from masa_megatron.parallel import init_parallel

pytestmark = pytest.mark.usefixtures("parallel_per_test")


def _cfg(**kwargs) -> ModelConfig:
    return ModelConfig(hf_path="unused", **kwargs)


def test_transformer_config_fields():
    config = transformer_config_from_hf(tiny_hf_config("qwen2"), _cfg())
    assert (config.num_layers, config.hidden_size, config.ffn_hidden_size) == (2, 64, 128)
    assert (config.num_attention_heads, config.num_query_groups, config.kv_channels) == (4, 2, 16)
    assert config.normalization == "RMSNorm" and config.gated_linear_unit
    assert config.add_qkv_bias and not config.add_bias_linear and not config.qk_layernorm
    assert transformer_config_from_hf(tiny_hf_config("qwen3"), _cfg()).qk_layernorm


def test_fp8_options_reach_transformer_config():
    config = transformer_config_from_hf(
        tiny_hf_config("llama"), _cfg(fp8="hybrid", fp8_recipe="tensorwise", fp8_param=True))
    assert config.fp8 == "hybrid" and config.fp8_recipe == "tensorwise" and config.fp8_param
    assert transformer_config_from_hf(tiny_hf_config("llama"), _cfg()).fp8 is None


@pytest.mark.parametrize("fields,expected", [
    ({}, (None, None, None)),
    (dict(recompute="selective"), ("selective", None, None)),
    (dict(recompute="full"), ("full", "uniform", 1)),
    (dict(recompute="full", recompute_method="block", recompute_num_layers=2), ("full", "block", 2)),
])
def test_recompute_options_reach_transformer_config(fields, expected):
    config = transformer_config_from_hf(tiny_hf_config("llama"), _cfg(**fields))
    assert (config.recompute_granularity, config.recompute_method,
            config.recompute_num_layers) == expected


def test_megatrons_fused_swiglu_is_used_on_gpus(monkeypatch):
    """Megatron's unfused GLU keeps, besides FC2's input, the FC1 output, silu(gate) and a copy
    of the up half for backward (10f bytes per token per layer at TP 1); its fused SwiGLU keeps
    the FC1 output only (6f with FC2's input), which is what the memory estimator counts
    (benchmarks/activation_memory.py measures both). CPU keeps the unfused path (the fused one
    is torch.compile'd)."""
    assert not transformer_config_from_hf(tiny_hf_config("qwen3"), _cfg()).bias_activation_fusion
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    config = transformer_config_from_hf(tiny_hf_config("qwen3"), _cfg())
    assert config.bias_activation_fusion and config.gated_linear_unit


def test_uniform_recompute_groups_that_do_not_divide_a_stages_layers_are_refused():
    """Megatron's uniform method runs layers [i, i + n) per group and indexes past the stage's
    last layer when n does not divide it (IndexError in the first training forward)."""
    with pytest.raises(ModelLoadError, match=r"model\.recompute_num_layers=3.* 2 layers"):
        transformer_config_from_hf(tiny_hf_config("llama"), _cfg(recompute="full",
                                                                 recompute_num_layers=3))
    config = transformer_config_from_hf(tiny_hf_config("llama"), _cfg(
        recompute="full", recompute_method="block", recompute_num_layers=3))  # the first n: any n
    assert config.recompute_num_layers == 3


@pytest.mark.parametrize("fields,forwards_per_layer", [
    ({}, [1, 1]),
    (dict(recompute="full", recompute_method="uniform", recompute_num_layers=1), [2, 2]),
    (dict(recompute="full", recompute_method="block", recompute_num_layers=1), [2, 1]),
])
def test_full_recompute_reruns_the_chosen_layers_in_backward_with_equal_gradients(
        fields, forwards_per_layer):
    gradients = []
    for model_fields in ({}, fields):
        torch.manual_seed(0)
        model = build_gpt_model(tiny_hf_config("llama"), _cfg(random_init=True, **model_fields))
        calls = [0] * len(model.decoder.layers)
        for i, layer in enumerate(model.decoder.layers):
            layer.register_forward_hook(lambda *a, i=i, c=calls: c.__setitem__(i, c[i] + 1))
        tokens = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(1))
        positions = torch.arange(12).expand(2, -1)
        model(tokens, positions, None, labels=tokens).sum().backward()
        gradients.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert calls == forwards_per_layer
    assert all(torch.allclose(gradients[0][n], g, atol=1e-6) for n, g in gradients[1].items())


def test_sequence_parallel_reaches_transformer_config_and_marks_norm_weights():
    """The local spec's norms (the layers' two and the final one) are marked for the SP
    gradient all-reduce over TP; the Q/K norms, whose input is not sequence-sharded, are not."""
    from masa_megatron.parallel import destroy_parallel

    assert not transformer_config_from_hf(tiny_hf_config("qwen3"), _cfg()).sequence_parallel
    init_parallel(ParallelConfig(sequence_parallel=True))   # TP 1 here: Megatron refuses SP
    try:
        with pytest.raises(ValueError, match="(?i)sequence.?parallel"):
            transformer_config_from_hf(tiny_hf_config("qwen3"), _cfg())
    finally:
        destroy_parallel()
        init_parallel(ParallelConfig())
    model = build_gpt_model(tiny_hf_config("qwen3"), _cfg(random_init=True))
    norms = {n: p for n, p in model.named_parameters() if "layernorm" in n}
    assert any("final_layernorm" in n for n in norms) and any("q_layernorm" in n for n in norms)
    assert all(hasattr(p, "sequence_parallel") for p in norms.values())   # built by TorchNorm
    from masa_megatron.model.torch_norm import TorchNorm
    model.config.sequence_parallel = True  # as at TP > 1 with SP (tests/test_actor_parallel.py)
    assert TorchNorm(model.config, 64, eps=1e-6).weight.sequence_parallel
    assert not TorchNorm(model.config, 16, eps=1e-6, sequence_sharded=False).weight.sequence_parallel


def test_bf16_dtype():
    config = transformer_config_from_hf(tiny_hf_config("llama"), _cfg(dtype="bf16"))
    assert config.bf16 and config.params_dtype == torch.bfloat16


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU behaviour")
def test_layer_spec_choice_on_cpu():
    assert resolve_layer_spec("auto") == "local" and resolve_layer_spec("local") == "local"
    with pytest.raises(ModelLoadError, match="needs CUDA and Transformer Engine"):
        resolve_layer_spec("te")


def test_random_init_and_tensor_parallel_attributes():
    config = tiny_hf_config("llama", num_hidden_layers=1).to_dict()
    model = build_gpt_model(config, _cfg(random_init=True))
    qkv = model.decoder.layers[0].self_attention.linear_qkv.weight
    assert 0.015 < qkv.std().item() < 0.025  # normal(0, initializer_range=0.02)
    loaded = build_gpt_model(config, _cfg())  # weights to be loaded: attributes still set
    layer = loaded.decoder.layers[0]
    for param, dim in ((layer.self_attention.linear_qkv.weight, 0),
                       (layer.self_attention.linear_proj.weight, 1),
                       (layer.mlp.linear_fc1.weight, 0), (layer.mlp.linear_fc2.weight, 1),
                       (loaded.embedding.word_embeddings.weight, 0)):
        assert param.tensor_model_parallel and param.partition_dim == dim
