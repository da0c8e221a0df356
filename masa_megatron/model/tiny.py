"""Tiny random HF checkpoints (for tests, the CPU demo and benchmarks; no model hub needed).

Every parameter is drawn at random (norm weights around 1, biases around 0), so a wrong mapping
of any tensor shows up in the logits.
"""
from __future__ import annotations

from importlib.metadata import version
from pathlib import Path
from typing import Optional

import torch

TINY_DEFAULTS = dict(vocab_size=1003, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                     max_position_embeddings=256, rms_norm_eps=1e-6, bos_token_id=1,
                     eos_token_id=2)
_TRANSFORMERS_MAJOR = int(version("transformers").split(".")[0])
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}


def tiny_hf_config(family: str, *, tied: bool = False, rope_scaling: Optional[dict] = None,
                   rope_theta: float = 10000.0, **overrides):
    """A transformers config of the family ("llama", "qwen2", "qwen3") with tiny sizes."""
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config

    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config}[family]
    kwargs = dict(TINY_DEFAULTS, tie_word_embeddings=tied, **overrides)
    if _TRANSFORMERS_MAJOR >= 5:  # rope_parameters holds theta and the scaling
        rope = dict(rope_scaling or {"rope_type": "default"}, rope_theta=rope_theta)
        config = cls(rope_parameters=rope, **kwargs)
    else:
        config = cls(rope_theta=rope_theta, rope_scaling=rope_scaling, **kwargs)
    config.architectures = [{"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                             "qwen3": "Qwen3ForCausalLM"}[family]]
    return config


def make_tiny_hf_model(folder: str | Path, family: str = "llama", *, seed: int = 0,
                       max_shard_size: Optional[str] = None, dtype: torch.dtype = torch.float32,
                       **config_kwargs):
    """Create, randomise and save_pretrained a tiny model; returns the transformers model."""
    from transformers import AutoModelForCausalLM

    config = tiny_hf_config(family, **config_kwargs)
    torch.manual_seed(seed)
    dtype_kwarg = "dtype" if _TRANSFORMERS_MAJOR >= 5 else "torch_dtype"
    model = AutoModelForCausalLM.from_config(config, **{dtype_kwarg: dtype})
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen, dtype=torch.float32)
            if "norm" in name:
                param.copy_(1.0 + 0.1 * noise)
            elif name.endswith("bias"):
                param.copy_(0.1 * noise)
            else:
                param.copy_(0.05 * noise)
    model.eval()
    save_kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(str(folder), **save_kwargs)
    return model
