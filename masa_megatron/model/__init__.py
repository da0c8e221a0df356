"""Megatron GPTModel from HF configs, HF weight loading/export, distributed checkpoints.

    from masa_megatron.model import build_gpt_model, load_hf_weights, export_hf_checkpoint
"""
from masa_megatron.model.builder import (
    build_gpt_model, llama3_inv_freq, model_provider, padded_vocab_size, resolve_layer_spec,
    transformer_config_from_hf)
from masa_megatron.model.checkpoint_io import (
    load_dist_checkpoint, read_checkpoint_meta, save_dist_checkpoint)
from masa_megatron.model.hf_config import ModelLoadError, decoder_shape, read_hf_config
from masa_megatron.model.hf_io import export_hf_checkpoint, load_hf_weights, unwrap
from masa_megatron.model.registry import family_for, supported_architectures

__all__ = [
    "ModelLoadError", "build_gpt_model", "decoder_shape", "export_hf_checkpoint", "family_for",
    "llama3_inv_freq", "load_dist_checkpoint", "load_hf_weights", "model_provider",
    "padded_vocab_size", "read_checkpoint_meta", "read_hf_config", "resolve_layer_spec",
    "save_dist_checkpoint", "supported_architectures", "transformer_config_from_hf", "unwrap",
]
