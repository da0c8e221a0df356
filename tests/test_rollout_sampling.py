"""Sampling maths, request types and the engine registry (pure torch, no Megatron)."""
import pytest

torch = pytest.importorskip("torch")

from masa_megatron.rollout.base import (GenerationRequest, RegistryError, RolloutEngine,  # noqa: E402
                                        SamplingParams, get_engine_class, register_engine)
from masa_megatron.rollout.sampling import RowSampling, sample_next_tokens, token_logprobs  # noqa: E402


def _rows(params, seeds, steps=1):
    return RowSampling.from_params(params, list(seeds), steps)


def _logits(rows=4, vocab=50, seed=0):
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 3


def test_logprob_definition_ignores_truncation():
    logits = _logits()
    params = [SamplingParams(temperature=0.7, top_p=0.5), SamplingParams(temperature=0.0),
              SamplingParams(temperature=1.0, top_k=3), SamplingParams(temperature=1.5)]
    tokens, logp = sample_next_tokens(logits, _rows(params, [1, 2, 3, 4]))
    for i, p in enumerate(params):
        expected = torch.log_softmax(logits[i] / (p.temperature or 1.0), -1)[tokens[i]]
        assert torch.allclose(logp[i], expected)
        assert torch.allclose(token_logprobs(logits[i], tokens[i], p.temperature), expected)
    assert tokens[1] == logits[1].argmax()


def test_truncation_keeps_to_the_head():
    logits = _logits(rows=1, vocab=30).repeat(400, 1)
    top3 = set(logits[0].topk(3).indices.tolist())
    tokens, _ = sample_next_tokens(logits, _rows([SamplingParams(top_k=3)] * 400, range(400)))
    assert set(tokens.tolist()) == top3
    probs = torch.softmax(logits[0], -1)
    order = probs.argsort(descending=True)
    head = int((probs[order].cumsum(0) < 0.6).sum()) + 1    # smallest set with mass >= 0.6
    tokens, _ = sample_next_tokens(logits, _rows([SamplingParams(top_p=0.6)] * 400, range(400)))
    assert set(tokens.tolist()) <= set(order[:head].tolist())
    tiny_p, _ = sample_next_tokens(logits[:5], _rows([SamplingParams(top_p=1e-6)] * 5, range(5)))
    assert (tiny_p == logits[0].argmax()).all()


def test_draws_follow_the_distribution():
    logits = torch.tensor([[0.0, 1.0, 2.0, -1.0]]).repeat(4000, 1)
    tokens, _ = sample_next_tokens(logits, _rows([SamplingParams()] * 4000, range(4000)))
    freq = torch.bincount(tokens, minlength=4).double() / 4000
    assert torch.allclose(freq, torch.softmax(logits[0].double(), -1), atol=0.03)


def test_rows_do_not_depend_on_their_neighbours():
    logits = _logits(rows=3)
    params = [SamplingParams(temperature=0.9, top_p=0.8), SamplingParams(), SamplingParams(top_k=4)]
    together, _ = sample_next_tokens(logits, _rows(params, [7, 8, 9]))
    for i in range(3):
        alone, _ = sample_next_tokens(logits[i:i + 1], _rows([params[i]], [7 + i]))
        assert alone[0] == together[i]
    picked = _rows(params, [7, 8, 9]).select(torch.tensor([2, 0]))
    assert picked.top_k.tolist() == [4, -1] and picked.uniforms.shape == (2, 1)


def _per_row_reference(logits, params, generators):
    """The per-row sampler the batched one replaced: one torch.rand per row per step from the
    row's own generator, rows drawn one at a time."""
    tokens, logps = [], []
    for z, p, g in zip(logits.float(), params, generators):
        logp = torch.log_softmax(z / (1.0 if p.greedy else p.temperature), -1)
        token = int(z.argmax())
        if not p.greedy:
            u = torch.rand(1, generator=g, dtype=torch.float64)
            if p.top_k > 0 or p.top_p < 1.0:
                head_logp, head_ids = logp.sort(descending=True)
                probs = head_logp.exp()
                keep = (probs.cumsum(0) - probs) <= p.top_p
                if p.top_k > 0:
                    keep &= torch.arange(len(probs)) < p.top_k
                keep[0] = True
                cdf = (probs * keep).double().cumsum(0)
                token = int(head_ids[min(int(torch.searchsorted(cdf, u * cdf[-1], right=True)),
                                         len(cdf) - 1)])
            else:
                cdf = logp.exp().double().cumsum(0)
                token = min(int(torch.searchsorted(cdf, u * cdf[-1], right=True)), len(cdf) - 1)
        tokens.append(token)
        logps.append(logp[token])
    return torch.tensor(tokens), torch.stack(logps)


def _mixed_params(rows):
    """Greedy and sampled rows, every temperature x top-p x top-k combination in turn."""
    return [SamplingParams(temperature=[0.0, 0.3, 0.7, 1.0, 1.6][i % 5],
                           top_p=[1.0, 0.95, 0.6, 0.1][(i // 5) % 4], top_k=[-1, 1, 5, 40][i % 4])
            for i in range(rows)]


@pytest.mark.parametrize("params", [
    _mixed_params(16),
    [SamplingParams(temperature=t) for t in (0.5, 1.0, 1.0, 1.3, 2.0, 0.9)],     # plain draws
    [SamplingParams(temperature=1.0, top_p=p, top_k=k)                          # all truncated
     for p, k in ((0.9, -1), (0.5, 3), (1.0, 7), (0.2, -1), (0.99, 50), (0.7, 2))],
], ids=["mixed", "all_plain", "all_truncated"])
def test_batched_sampling_equals_per_row_generators(params):
    """Same seeds, same samples: the batched uniforms and draws reproduce the per-row sampler
    over many seeds and settings, step after step, also after rows leave the batch."""
    rng = torch.Generator().manual_seed(123)
    seeds = [int(torch.randint(0, 2**62, (1,), generator=rng)) * (1 + i % 3)
             for i in range(len(params))]
    steps = 320                                   # crosses MT19937's twist after 312 steps
    rows = _rows(params, seeds, steps)
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    alive = list(range(len(params)))
    for step in range(steps):
        logits = torch.randn(len(alive), 100, generator=rng) * 4
        tokens, logp = sample_next_tokens(logits, rows, step)
        ref_tokens, ref_logp = _per_row_reference(logits, [params[i] for i in alive],
                                                  [generators[i] for i in alive])
        assert torch.equal(tokens, ref_tokens), step
        assert torch.allclose(logp, ref_logp, rtol=0, atol=1e-5)
        if step % 80 == 79:                               # drop every third row
            keep = [j for j in range(len(alive)) if j % 3 != 1]
            alive = [alive[j] for j in keep]
            rows = rows.select(torch.tensor(keep))


def test_sampling_params_validation():
    for bad in (dict(max_new_tokens=0), dict(temperature=-1), dict(top_p=0.0), dict(top_p=1.5),
                dict(n=0)):
        with pytest.raises(ValueError):
            SamplingParams(**bad)
    assert SamplingParams(stop_token_ids=[3, 4]).stop_token_ids == (3, 4)
    assert GenerationRequest([1, 2]).sampling.max_new_tokens == 128


def test_engine_registry():
    assert get_engine_class("embedded").__name__ == "EmbeddedEngine"
    assert get_engine_class("masa_megatron.rollout.embedded.EmbeddedEngine").__name__ == \
        "EmbeddedEngine"
    assert get_engine_class("masa_megatron.rollout.embedded:EmbeddedEngine").__name__ == \
        "EmbeddedEngine"

    @register_engine("test-dummy")
    class Dummy(RolloutEngine):
        def generate(self, requests): return []
        def update_weights(self, model=None, path=None, *, version=None): return 0
        def pause(self): pass
        def resume(self): pass
        def health(self): return True
        def shutdown(self): pass

    assert get_engine_class("test-dummy") is Dummy
    with pytest.raises(RegistryError, match="unknown rollout engine"):
        get_engine_class("no-such-engine")
    with pytest.raises(TypeError):
        get_engine_class("masa_megatron.rollout.base.SamplingParams")
