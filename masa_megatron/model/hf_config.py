"""Reading a Hugging Face `config.json` into the few numbers a dense decoder needs.

Accepts a folder, a config.json path, a dict, or a `transformers.PretrainedConfig`. Both RoPE
layouts are understood: transformers 4.x (`rope_theta` + `rope_scaling`) and 5.x
(`rope_parameters` holding `rope_theta` and the scaling keys).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

from masa_megatron.errors import UserError

HFConfigLike = Union[str, Path, dict, Any]


class ModelLoadError(UserError, RuntimeError):
    """A checkpoint or config that cannot be used; the message names the file and tensor (the
    `masa` command prints it as one line, exit code 2)."""


@dataclass(frozen=True)
class RopeSpec:
    """RoPE: inv_freq_j = theta^(-2j/d); `llama3` rescales the low frequencies (see rope.py)."""
    theta: float = 10000.0
    kind: str = "default"                       # default | llama3
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class DecoderShape:
    """The architecture-independent numbers of a dense decoder-only transformer."""
    architecture: str
    vocab_size: int
    hidden_size: int
    ffn_hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    norm_eps: float
    max_position_embeddings: int
    tie_embeddings: bool
    init_std: float
    rope: RopeSpec
    hidden_act: str

    @property
    def heads_per_group(self) -> int:
        return self.num_heads // self.num_kv_heads


def read_hf_config(source: HFConfigLike) -> dict:
    """A plain dict of the HF config from a folder, a config.json path, a dict or a config object."""
    if isinstance(source, dict):
        return dict(source)
    if isinstance(source, (str, Path)):
        path = Path(source)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise ModelLoadError(f"{path}: no such config file")
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ModelLoadError(f"{path}: not valid JSON ({err})") from None
    if hasattr(source, "to_dict"):
        return source.to_dict()
    raise TypeError(f"cannot read an HF config from {type(source).__name__}")


def architecture_of(cfg: dict) -> str:
    archs = cfg.get("architectures") or []
    if archs:
        return archs[0]
    return str(cfg.get("model_type", "<unknown>"))


def _rope_spec(cfg: dict) -> RopeSpec:
    params: dict = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    theta = float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    kind = params.get("rope_type", params.get("type", "default")) or "default"
    if kind == "default":
        return RopeSpec(theta=theta)
    if kind != "llama3":
        raise ModelLoadError(f"config.json: rope type '{kind}' is not supported "
                             f"(supported: default, llama3)")
    return RopeSpec(
        theta=theta, kind="llama3", factor=float(params["factor"]),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(params.get(
            "original_max_position_embeddings", cfg.get("max_position_embeddings", 8192))))


def decoder_shape(cfg: dict) -> DecoderShape:
    """The decoder's shape from an HF config dict; raises ModelLoadError naming a missing key."""
    try:
        heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        head_dim: Optional[int] = cfg.get("head_dim")
        return DecoderShape(
            architecture=architecture_of(cfg),
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=hidden,
            ffn_hidden_size=int(cfg["intermediate_size"]),
            num_layers=int(cfg["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(head_dim) if head_dim else hidden // heads,
            norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            init_std=float(cfg.get("initializer_range", 0.02)),
            rope=_rope_spec(cfg),
            hidden_act=str(cfg.get("hidden_act", "silu")),
        )
    except KeyError as err:
        raise ModelLoadError(f"config.json: required key {err} is missing") from None


def parallel_layout_problem(shape: DecoderShape, tp: int, pp: int) -> Optional[tuple[str, str]]:
    """(kind, why) when the layout cannot split the model (attention and KV heads over TP,
    layers over PP; kind "tensor" or "pipeline"), else None. Checked before Megatron, which
    would assert on every rank."""
    for name, count, size, kind in (("num_attention_heads", shape.num_heads, tp, "tensor"),
                                    ("num_key_value_heads", shape.num_kv_heads, tp, "tensor"),
                                    ("num_hidden_layers", shape.num_layers, pp, "pipeline")):
        if count % size:
            return kind, f"{name}={count} is not divisible by the {kind}-parallel size {size}"
    return None


def recompute_layout_problem(shape: DecoderShape, pp: int, model_cfg) -> Optional[str]:
    """Why model.recompute_num_layers cannot be used, else None: Megatron's uniform full
    recompute runs layers [i, i + n) per group and indexes past a stage's last layer unless n
    divides the L / PP layers of a stage (block recomputes the first n, any n)."""
    stage_layers = shape.num_layers // pp
    if (model_cfg.recompute == "full" and model_cfg.recompute_method == "uniform"
            and stage_layers % model_cfg.recompute_num_layers):
        return (f"full recompute with method uniform checkpoints groups of "
                f"recompute_num_layers layers, which must divide the {stage_layers} layers of "
                f"each pipeline stage (num_hidden_layers={shape.num_layers} / PP {pp}); or use "
                f"method block")
    return None
