"""Megatron logits equal transformers' logits, at TP=1 in process and TP=2 / PP=2 under gloo."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "dist_scripts"))

import harness  # noqa: E402
from masa_megatron.model import llama3_inv_freq, padded_vocab_size  # noqa: E402
from masa_megatron.model.hf_config import decoder_shape, read_hf_config  # noqa: E402
from tests.support.timeouts import outlasting  # noqa: E402

TOL = 1e-5


@pytest.mark.parametrize("case", list(harness.CASES))
def test_tp1_logits_match_transformers(case):
    assert harness.tp1_results()[case]["max_logit_diff"] <= TOL


@pytest.mark.slow
@outlasting(900)                            # harness.launch_layout's torchrun
@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)], ids=["tp2", "pp2"])
def test_parallel_logits_match_transformers(tp, pp):
    results, _ = harness.launch_layout(tp, pp)
    diffs = {case: results[case]["max_logit_diff"] for case in harness.CASES}
    assert all(0 <= d <= TOL for d in diffs.values()), diffs


def test_llama3_rope_frequencies_match_transformers():
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    folder = harness.shared_cases() / "llama3_rope"
    from transformers import AutoConfig

    hf_cfg = AutoConfig.from_pretrained(folder)
    want, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_cfg, "cpu")
    shape = decoder_shape(read_hf_config(folder))
    got = llama3_inv_freq(shape.head_dim, shape.rope)
    assert torch.equal(got, want)
    plain = 1.0 / shape.rope.theta ** (torch.arange(0, shape.head_dim, 2).float() / shape.head_dim)
    assert not torch.allclose(got, plain)  # the tiny config does exercise the scaling


def test_padded_vocab_size():
    assert padded_vocab_size(1003, 128, 1) == 1024
    assert padded_vocab_size(1003, 128, 2) == 1024
    assert padded_vocab_size(1100, 128, 2) == 1280
    assert padded_vocab_size(1024, 128, 8) == 1024
    assert padded_vocab_size(151936, 128, 1) == 151936
    assert padded_vocab_size(151936, 128, 4) == 152064


def test_config_reading_handles_both_rope_layouts():
    old = {"architectures": ["LlamaForCausalLM"], "vocab_size": 10, "hidden_size": 8,
           "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
           "rope_theta": 5e5, "rope_scaling": {"rope_type": "llama3", "factor": 8.0,
                                               "original_max_position_embeddings": 8192}}
    shape = decoder_shape(old)
    assert shape.rope.theta == 5e5 and shape.rope.kind == "llama3"
    assert shape.num_kv_heads == 2 and shape.head_dim == 4
    new = dict(old, rope_scaling=None, rope_theta=None,
               rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    assert decoder_shape(new).rope.theta == 1e6 and decoder_shape(new).rope.kind == "default"
