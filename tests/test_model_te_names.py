"""The registry's TE-spec names agree with the parameters Megatron's own TE layer spec creates.

Transformer Engine cannot be installed here, so the TE layer spec is built from megatron-core's
`get_gpt_layer_with_transformer_engine_spec()` against a stub `transformer_engine` package (any
attribute is a stub module or class): this yields the module tree and the Megatron TE wrapper at
each position. The parameter names each TE module registers are recorded in
tests/fixtures/te_layer_param_names.json (with the sources), and the fused norm names are
cross-checked against Megatron's own TRT-LLM export table. Nothing is taken from our mapping.
"""
import contextlib
import dataclasses
import functools
import importlib
import importlib.abc
import importlib.machinery
import json
import sys
import types
from pathlib import Path

import pytest
import torch

from masa_megatron.compat import apply_cpu_compat
from masa_megatron.model.registry import family_for

FIXTURE = json.loads((Path(__file__).parent / "fixtures" / "te_layer_param_names.json")
                     .read_text())
FAMILIES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3"}


class _StubModule(types.ModuleType):
    """Capitalised attributes are fresh nn.Module subclasses, others nested stub modules."""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        if name[:1].isupper():
            value = type(name, (torch.nn.Module,), {"__module__": self.__name__})
        else:
            value = importlib.import_module(f"{self.__name__}.{name}")
        setattr(self, name, value)
        return value


class _StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".")[0] == "transformer_engine":
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = _StubModule(spec.name)
        module.__path__, module.__version__ = [], "2.9.0"
        return module

    def exec_module(self, module):
        pass


_RELOADED = ("megatron.core.models.gpt", "megatron.core.extensions",
             "megatron.core.models.backends")


@contextlib.contextmanager
def stub_transformer_engine():
    """Import Megatron's spec modules afresh against a stub TE; restore everything after."""
    apply_cpu_compat()
    import megatron.core.models.gpt.gpt_layer_specs  # noqa: F401  (the real modules, to restore)

    saved = dict(sys.modules)
    finder = _StubFinder()
    for name in [n for n in sys.modules if n.startswith(_RELOADED)]:
        del sys.modules[name]
    sys.meta_path.insert(0, finder)
    try:
        yield importlib.import_module("megatron.core.models.gpt.gpt_layer_specs")
    finally:
        sys.meta_path.remove(finder)
        for name in [n for n in sys.modules if n not in saved]:
            del sys.modules[name]
        sys.modules.update(saved)
        for name, module in saved.items():
            if name.startswith(_RELOADED):
                parent, _, child = name.rpartition(".")
                if parent in sys.modules:
                    setattr(sys.modules[parent], child, module)


def _module_tree(spec, prefix=""):
    """(path, class) of every module a layer spec builds."""
    from megatron.core.transformer.spec_utils import ModuleSpec

    submodules = getattr(spec, "submodules", None)
    if isinstance(spec, functools.partial):  # 0.19: partial(MLP.as_mlp_submodule, submodules=)
        submodules = spec.keywords.get("submodules")
        spec = getattr(spec.func, "__self__", spec.func)
    module = spec.module if isinstance(spec, ModuleSpec) else spec
    if isinstance(module, type):
        yield prefix, module
    if submodules is not None and dataclasses.is_dataclass(submodules):
        for f in dataclasses.fields(submodules):
            yield from _module_tree(getattr(submodules, f.name),
                                    f"{prefix}.{f.name}" if prefix else f.name)


def te_spec_parameter_names(qk_layernorm: bool, qkv_bias: bool) -> set[str]:
    with stub_transformer_engine() as specs:
        assert specs.HAVE_TE, "the stub transformer_engine was not picked up"
        layer = specs.get_gpt_layer_with_transformer_engine_spec(qk_layernorm=qk_layernorm)
        tree = list(_module_tree(layer))
    names = {"embedding.word_embeddings.weight", "decoder.final_layernorm.weight",
             "output_layer.weight"}
    for path, cls in tree:
        params = FIXTURE["wrapper_parameters"].get(cls.__name__)
        if params is None:
            continue
        assert any(base.__module__.startswith("transformer_engine") for base in cls.__mro__) \
            or cls.__name__ == "TENorm", cls
        with_bias = qkv_bias and path == "self_attention.linear_qkv"
        for param in params["always"] + (params["with_bias"] if with_bias else []):
            names.add(f"decoder.layers.{{i}}.{path}.{param}")
    return names


@pytest.mark.parametrize("arch", list(FAMILIES))
def test_registry_te_names_match_megatron_te_spec(arch):
    family = family_for({"architectures": [arch]})
    expected = te_spec_parameter_names(family.qk_norm, family.qkv_bias)
    assert {rule.megatron_name("te") for rule in family.weights} == expected


def test_fused_norm_names_are_megatrons_own():
    from megatron.core.export.trtllm.model_to_trllm_mapping.default_conversion_dict import (
        DEFAULT_CONVERSION_DICT)

    fused = {n for n in te_spec_parameter_names(False, False) if n.endswith("layer_norm_weight")}
    assert fused == {"decoder.layers.{i}.self_attention.linear_qkv.layer_norm_weight",
                     "decoder.layers.{i}.mlp.linear_fc1.layer_norm_weight"}
    for name in fused:
        assert name.replace("{i}.", "") in DEFAULT_CONVERSION_DICT


def test_stub_leaves_the_real_spec_modules_in_place():
    import megatron.core.models.gpt.gpt_layer_specs as before

    te_spec_parameter_names(True, False)
    import megatron.core.models.gpt.gpt_layer_specs as after

    assert after is before and "transformer_engine" not in sys.modules


@pytest.mark.parametrize("arch", list(FAMILIES))
def test_registry_local_names_match_a_built_model(arch, tmp_path, parallel_per_test):
    from masa_megatron.config import ModelConfig
    from masa_megatron.model import build_gpt_model
    from masa_megatron.model.tiny import tiny_hf_config

    config = tiny_hf_config(FAMILIES[arch]).to_dict()
    model = build_gpt_model(config, ModelConfig(hf_path=str(tmp_path)))
    built = {n if not n.startswith("decoder.layers.") else
             "decoder.layers.{i}." + n.split(".", 3)[3] for n, _ in model.named_parameters()}
    family = family_for(config)
    assert {rule.megatron_name("local") for rule in family.weights} == built
