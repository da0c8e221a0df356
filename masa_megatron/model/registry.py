"""Declarative HF <-> Megatron weight mappings, one `FamilySpec` per model family.

A family file (masa_megatron/model/families/<name>.py) builds a `FamilySpec` and calls
`register()`; every module in that folder is imported on first look-up, so adding a family is
adding one file.

A `WeightRule` ties one Megatron parameter to one or more HF tensors and says how tensor
parallelism (TP) splits it:

- REPLICATED: every TP rank holds the whole tensor (norms).
- COLUMN: split along dim 0 (output features).
- ROW: split along dim 1 (input features): o_proj -> linear_proj, down_proj -> linear_fc2.
- VOCAB: split along dim 0 after padding the vocabulary to `padded_vocab_size` rows (the padding
  rows are zero on load and dropped on export).
- QKV: q, k, v fused in Megatron's grouped layout. With G = num_kv_heads groups, Q = heads per
  group and head size d, the fused weight is [G, (Q*d | d | d), hidden] flattened to
  [G*(Q+2)*d, hidden]: group g holds its Q query heads, then its key head, then its value head.
  TP rank r holds groups [r*G/tp, (r+1)*G/tp).
- GATE_UP: gate and up fused as linear_fc1; TP rank r holds [gate_r; up_r] (its slice of gate
  stacked on its slice of up), not a contiguous slice of [gate; up].

Names carry `{i}` for the layer index (global on the HF side, global also in the templates here:
a pipeline stage's local index is translated by the loader). `te_megatron` is the name under the
Transformer Engine layer spec when it differs (TE fuses the pre-attention and pre-MLP norms into
linear_qkv and linear_fc1 as `layer_norm_weight`).
"""
from __future__ import annotations

import enum
import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import Callable, Optional

from masa_megatron.model.hf_config import ModelLoadError, architecture_of


class Split(enum.Enum):
    REPLICATED = "replicated"
    COLUMN = "column"
    ROW = "row"
    VOCAB = "vocab"
    QKV = "qkv"
    GATE_UP = "gate_up"


@dataclass(frozen=True)
class WeightRule:
    megatron: str                      # local-spec Megatron name, "{i}" = layer index
    hf: tuple[str, ...]                # HF tensor names; q,k,v or gate,up for fused tensors
    split: Split
    te_megatron: Optional[str] = None  # name under the TE spec when it differs

    def megatron_name(self, layer_spec: str) -> str:
        return self.te_megatron if layer_spec == "te" and self.te_megatron else self.megatron

    @property
    def per_layer(self) -> bool:
        return "{i}" in self.megatron


@dataclass(frozen=True)
class FamilySpec:
    """One model family: which HF architectures it covers, its attention options, its weights."""
    name: str
    architectures: tuple[str, ...]
    weights: tuple[WeightRule, ...]
    qkv_bias: bool = False
    qk_norm: bool = False
    # Raise ModelLoadError for config options the mapping does not express (e.g. sliding window).
    check_config: Callable[[dict], None] = field(default=lambda cfg: None)

    def rule_for(self, megatron_template: str, layer_spec: str) -> Optional[WeightRule]:
        for rule in self.weights:
            if rule.megatron_name(layer_spec) == megatron_template:
                return rule
        return None


_FAMILIES: dict[str, FamilySpec] = {}
_LOADED = False


def register(spec: FamilySpec) -> FamilySpec:
    for arch in spec.architectures:
        _FAMILIES[arch] = spec
    return spec


def _load_family_modules() -> None:
    global _LOADED
    if _LOADED:
        return
    from masa_megatron.model import families

    for info in pkgutil.iter_modules(families.__path__):
        importlib.import_module(f"{families.__name__}.{info.name}")
    _LOADED = True


def supported_architectures() -> list[str]:
    _load_family_modules()
    return sorted(_FAMILIES)


def family_for(hf_config: dict) -> FamilySpec:
    """The family of an HF config dict (by `architectures[0]`, else `model_type`)."""
    _load_family_modules()
    arch = architecture_of(hf_config)
    spec = _FAMILIES.get(arch)
    if spec is None:
        by_type = {s.name: s for s in _FAMILIES.values()}
        spec = by_type.get(str(hf_config.get("model_type")))
    if spec is None:
        raise ModelLoadError(f"config.json: architecture '{arch}' is not supported; supported "
                             f"architectures: {', '.join(supported_architectures())}")
    spec.check_config(hf_config)
    return spec


def reject_options(cfg: dict, family: str, **unsupported) -> None:
    """Raise ModelLoadError if config key `k` equals the given unsupported value."""
    for key, bad in unsupported.items():
        if key in cfg and cfg[key] == bad:
            raise ModelLoadError(f"config.json: {family} with {key}={bad!r} is not supported")
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise ModelLoadError(f"config.json: {family} with hidden_act={act!r} is not supported "
                             f"(only silu)")
