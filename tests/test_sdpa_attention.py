"""The local spec's fused core attention equals Megatron's DotProductAttention (CPU, fp32)."""
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("megatron.core")


@pytest.fixture(scope="module")
def config():
    from megatron.core.transformer.transformer_config import TransformerConfig

    from masa_megatron.config import ParallelConfig
    from masa_megatron.parallel import destroy_parallel, init_parallel

    init_parallel(ParallelConfig())
    yield TransformerConfig(num_layers=2, hidden_size=64, num_attention_heads=4,
                            num_query_groups=2, kv_channels=16, attention_dropout=0.0,
                            hidden_dropout=0.0, use_cpu_initialization=True)
    destroy_parallel()


def _pair(config):
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    from masa_megatron.model.sdpa_attention import SDPADotProductAttention

    args = dict(config=config, layer_number=2, attn_mask_type=AttnMaskType.causal,
                attention_type="self")
    return DotProductAttention(**args), SDPADotProductAttention(**args)


def _qkv(s=7, b=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, b, heads, 16, generator=gen, requires_grad=True)
            for heads in (4, 2, 2)]                       # [s, b, heads, d], grouped K/V


def test_causal_attention_and_its_gradients_match_megatron(config):
    megatron, fused = _pair(config)
    inputs = _qkv()
    want = megatron(*inputs, None)
    want_grads = torch.autograd.grad(want.square().sum(), inputs)
    inputs = [t.detach().requires_grad_() for t in inputs]
    got = fused(*inputs, None)
    got_grads = torch.autograd.grad(got.square().sum(), inputs)
    assert got.shape == want.shape == (7, 3, 64)
    assert torch.allclose(got, want, atol=1e-5)
    for g, w in zip(got_grads, want_grads):
        assert torch.allclose(g, w, atol=1e-4)


def test_explicit_masks_take_megatrons_path(config):
    """An explicit mask keeps Megatron's semantics (a masked score is -10000, not -inf)."""
    megatron, fused = _pair(config)
    q, k, v = (t.detach() for t in _qkv(seed=1))
    mask = torch.zeros(3, 1, 7, 7, dtype=torch.bool)
    mask[0, :, :, 4:] = True                              # row 0 may not see keys 4.. at all
    assert torch.equal(fused(q, k, v, mask), megatron(q, k, v, mask))
