"""HF config -> Megatron `TransformerConfig` + `GPTModel` for the dense families in the registry.

Mapping of the architecture: RMSNorm (eps = rms_norm_eps), SwiGLU MLP (gated_linear_unit, silu;
Megatron's fused SwiGLU with CUDA), no linear biases except Qwen2's q/k/v, Qwen3's q/k RMSNorm
(qk_layernorm), grouped-query attention (num_query_groups = num_key_value_heads, kv_channels =
head_dim), RoPE with rotary_base = rope_theta, tied input/output embeddings per
tie_word_embeddings.

The vocabulary is padded so each TP rank holds an equal slice: padded = the smallest multiple of
`make_vocab_size_divisible_by * TP` that is >= vocab_size.

Layer spec: "local" (Megatron-only modules; the only one that runs on CPU), "te" (Transformer
Engine, needed for FP8), "auto" = te when CUDA and TE are present, else local. Both support
sequence parallelism (parallel.sequence_parallel, as set by `init_parallel`): the hidden states
between the TP-parallel blocks are sharded along the sequence (s/TP rows per rank).

Recomputation (model.recompute): "selective" recomputes core attention (nothing to save with
fused/flash attention, which stores no s x s scores); "full" stores only each layer's input and
recomputes the layer in backward: method "uniform" checkpoints groups of n = recompute_num_layers
layers (n must divide the layers of a pipeline stage), "block" the first n layers of each
stage.
"""
from __future__ import annotations

import importlib.util
import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from masa_megatron.compat.cpu import trim_host_memory
from masa_megatron.config import ModelConfig
from masa_megatron.model.hf_config import (
    HFConfigLike, ModelLoadError, RopeSpec, decoder_shape, parallel_layout_problem, read_hf_config,
    recompute_layout_problem)
from masa_megatron.model.registry import FamilySpec, family_for
from masa_megatron.parallel import sequence_parallel_enabled

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def padded_vocab_size(vocab_size: int, divisible_by: int, tp: int) -> int:
    """Smallest multiple of divisible_by * tp that is >= vocab_size."""
    multiple = max(1, divisible_by) * tp
    return int(math.ceil(vocab_size / multiple) * multiple)


def resolve_layer_spec(choice: str) -> str:
    """'auto' -> 'te' when CUDA and Transformer Engine are available, else 'local'."""
    has_te = importlib.util.find_spec("transformer_engine") is not None
    if choice == "auto":
        return "te" if (torch.cuda.is_available() and has_te) else "local"
    if choice == "te" and not (torch.cuda.is_available() and has_te):
        raise ModelLoadError("model.layer_spec=te needs CUDA and Transformer Engine")
    if choice not in ("local", "te"):
        raise ValueError(f"model.layer_spec={choice!r}: must be auto, local or te")
    return choice


def _parallel_sizes() -> tuple[int, int, int]:
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        return 1, 1, 1
    return (ps.get_tensor_model_parallel_world_size(),
            ps.get_pipeline_model_parallel_world_size(), ps.get_context_parallel_world_size())


def _leave_uninitialised(tensor: torch.Tensor) -> None:
    """Init method for weights about to be loaded: leave the memory as allocated."""


def _init_methods(random_init: bool) -> dict:
    """No-op init methods unless `random_init` (then Megatron's normal(0, init_method_std))."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    if random_init:
        return {}
    names = ("init_method", "output_layer_init_method", "embedding_init_method")
    fields = TransformerConfig.__dataclass_fields__
    return {name: _leave_uninitialised for name in names if name in fields}


def transformer_config_from_hf(hf_config: HFConfigLike, model_cfg: ModelConfig):
    """The Megatron TransformerConfig of an HF decoder; parallel sizes come from parallel_state."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    cfg = read_hf_config(hf_config)
    family = family_for(cfg)
    shape = decoder_shape(cfg)
    tp, pp, cp = _parallel_sizes()
    problem = parallel_layout_problem(shape, tp, pp)
    if problem is not None:
        raise ModelLoadError(f"config.json: {problem[1]}")
    dtype = _DTYPES[model_cfg.dtype]
    cuda = torch.cuda.is_available()
    fp8 = {}
    if model_cfg.fp8 is not None:
        fp8 = dict(fp8=model_cfg.fp8, fp8_recipe=model_cfg.fp8_recipe,
                   fp8_param=model_cfg.fp8_param)
    recompute = {}
    if model_cfg.recompute == "selective":
        recompute = dict(recompute_granularity="selective")
    elif model_cfg.recompute == "full":
        why = recompute_layout_problem(shape, pp, model_cfg)
        if why is not None:
            raise ModelLoadError(f"model.recompute_num_layers={model_cfg.recompute_num_layers}: "
                                 f"config.json: {why}")
        recompute = dict(recompute_granularity="full", recompute_method=model_cfg.recompute_method,
                         recompute_num_layers=model_cfg.recompute_num_layers)
    return TransformerConfig(
        num_layers=shape.num_layers,
        hidden_size=shape.hidden_size,
        ffn_hidden_size=shape.ffn_hidden_size,
        num_attention_heads=shape.num_heads,
        num_query_groups=shape.num_kv_heads,
        kv_channels=shape.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=shape.norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=family.qkv_bias,
        qk_layernorm=family.qk_norm,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=shape.init_std,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        context_parallel_size=cp,
        sequence_parallel=sequence_parallel_enabled(),
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=model_cfg.dtype == "bf16",
        fp16=model_cfg.dtype == "fp16",
        use_cpu_initialization=not cuda,
        perform_initialization=True,  # Megatron sets the TP attributes of weights only there
        **_init_methods(model_cfg.random_init),
        # Megatron's fused SwiGLU keeps only the FC1 output for backward (the unfused GLU also
        # keeps silu(gate) and a copy of the up half: 10f instead of 6f bytes per token per
        # layer, benchmarks/activation_memory.py); it is torch.compile'd, so GPUs only
        bias_activation_fusion=cuda,
        # the other fused kernels need CUDA (and apex/TE); the unfused paths are exact
        masked_softmax_fusion=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        **fp8,
        **recompute,
    )


def _layer_spec(family: FamilySpec, spec_name: str, config, vp_stage: Optional[int]):
    """TE: Megatron's layer spec. Local: a block spec of Megatron's local layers with SDPA core
    attention and torch norms that support sequence parallelism (model/torch_norm.py), the final
    norm included (Megatron would give the block its WrappedTorchNorm)."""
    from megatron.core.models.gpt import gpt_layer_specs

    if spec_name == "te":
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(
            qk_layernorm=family.qk_norm)
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_block import (TransformerBlockSubmodules,
                                                             get_num_layers_to_build)

    from masa_megatron.model.sdpa_attention import SDPADotProductAttention
    from masa_megatron.model.torch_norm import TorchNorm

    spec = gpt_layer_specs.get_gpt_layer_local_spec(
        qk_layernorm=family.qk_norm, normalization="RMSNorm")
    layer, attention = spec.submodules, spec.submodules.self_attention.submodules
    attention.core_attention = SDPADotProductAttention
    layer.input_layernorm = layer.pre_mlp_layernorm = TorchNorm
    if family.qk_norm:
        attention.q_layernorm = attention.k_layernorm = ModuleSpec(
            module=TorchNorm, params={"sequence_sharded": False})
    return TransformerBlockSubmodules(
        layer_specs=[spec] * get_num_layers_to_build(config, vp_stage=vp_stage),
        layer_norm=TorchNorm)


def llama3_inv_freq(head_dim: int, rope: RopeSpec) -> torch.Tensor:
    """Llama-3 scaled RoPE frequencies (as transformers' `_compute_llama3_parameters`).

    f_j = theta^(-2j/d), wavelength w_j = 2*pi/f_j, L = original_max_position_embeddings.
    w_j < L/high_freq_factor: f_j kept; w_j > L/low_freq_factor: f_j/factor; in between
    f_j' = (1-s) f_j/factor + s f_j with s = (L/w_j - low_freq_factor)/(high - low).
    Megatron's RotaryEmbedding only takes `factor` (low/high/L fixed at 1/4/8192), so the builder
    computes the frequencies here and sets them on the model's rotary embedding.
    """
    f = 1.0 / (rope.theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    length = rope.original_max_position_embeddings
    low_wavelen = length / rope.low_freq_factor
    high_wavelen = length / rope.high_freq_factor
    wavelen = 2 * math.pi / f
    scaled = torch.where(wavelen > low_wavelen, f / rope.factor, f)
    smooth = (length / wavelen - rope.low_freq_factor) / (rope.high_freq_factor
                                                          - rope.low_freq_factor)
    smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def build_gpt_model(hf_config: HFConfigLike, model_cfg: ModelConfig, *,
                    pre_process: Optional[bool] = None, post_process: Optional[bool] = None,
                    vp_stage: Optional[int] = None, padded_vocab: Optional[int] = None):
    """This rank's GPTModel (its pipeline stage). Its weights are left uninitialised for
    `load_hf_weights` / `load_dist_checkpoint` unless `model_cfg.random_init`.

    pre_process/post_process default to "this is the first/last pipeline stage". `padded_vocab`
    overrides the padded vocabulary size (to read a checkpoint saved at another TP)."""
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel

    cfg = read_hf_config(hf_config)
    family = family_for(cfg)
    shape = decoder_shape(cfg)
    spec_name = resolve_layer_spec(model_cfg.layer_spec)
    config = transformer_config_from_hf(cfg, model_cfg)
    if pre_process is None:
        pre_process = ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage) \
            if ps.model_parallel_is_initialized() else True
    if post_process is None:
        post_process = ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage) \
            if ps.model_parallel_is_initialized() else True
    vocab = padded_vocab or padded_vocab_size(
        shape.vocab_size, model_cfg.make_vocab_size_divisible_by, config.tensor_model_parallel_size)
    model = GPTModel(
        config=config,
        transformer_layer_spec=_layer_spec(family, spec_name, config, vp_stage),
        vocab_size=vocab,
        max_sequence_length=shape.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=shape.tie_embeddings,
        position_embedding_type="rope",
        rotary_base=shape.rope.theta,
        vp_stage=vp_stage,
    )
    if spec_name == "local":
        # Megatron's local-spec norms ignore params_dtype (its Float16Module casts them in
        # training scripts); cast here so a bf16 model is bf16 throughout, as with the TE spec.
        for param in model.parameters():
            if param.dtype != config.params_dtype:
                param.data = param.data.to(config.params_dtype)
    if torch.cuda.is_available():
        # as Megatron's get_model: modules built outside Megatron's own layers (the local spec's
        # torch norms) start on the CPU; without this only DDP's buffers would move them, and
        # only when it allocates a parameter buffer (the distributed optimizer).
        model.cuda(torch.cuda.current_device())
    if shape.rope.kind == "llama3":
        model.rotary_pos_emb.inv_freq = llama3_inv_freq(shape.head_dim, shape.rope).to(
            model.rotary_pos_emb.inv_freq.device)
    trim_host_memory()  # the CPU initialisation's freed temporaries
    # read by hf_io and checkpoint_io
    model.masa_hf_config = cfg
    model.masa_layer_spec = spec_name
    model.masa_family = family.name
    return model


def model_provider(hf_config: HFConfigLike, model_cfg: ModelConfig,
                   padded_vocab: Optional[int] = None) -> Callable:
    """`provider(pre_process=True, post_process=True, vp_stage=None) -> GPTModel`, the signature
    Megatron's get_model-style code calls."""
    cfg = read_hf_config(hf_config)

    def provider(pre_process: bool = True, post_process: bool = True,
                 vp_stage: Optional[int] = None):
        return build_gpt_model(cfg, model_cfg, pre_process=pre_process,
                               post_process=post_process, vp_stage=vp_stage,
                               padded_vocab=padded_vocab)
    return provider
