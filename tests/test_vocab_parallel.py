"""train/vocab_parallel.py against a plain full-vocabulary reference (one process, TP 1, fp32):
log-probs and their gradient through the in-place scale/mask and Megatron's cross entropy, and
the chunked entropy whatever the chunk size, with Megatron's padding columns at -inf."""
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("megatron.core")

S, B, V, REAL_VOCAB, T = 7, 3, 40, 33, 0.7   # columns >= REAL_VOCAB are Megatron's padding


@pytest.fixture(scope="module", autouse=True)
def single_process():
    from masa_megatron.config import ParallelConfig
    from masa_megatron.parallel import destroy_parallel, init_parallel

    init_parallel(ParallelConfig())
    yield
    destroy_parallel()


def _inputs():
    gen = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(S, B, V, generator=gen)
    labels = torch.randint(0, REAL_VOCAB, (S, B), generator=gen)
    weights = torch.randn(S, B, generator=gen)
    return logits, labels, weights


def _reference(logits: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits[..., :REAL_VOCAB] / T, dim=-1)


def test_logprobs_and_their_gradient_equal_the_full_vocabulary_reference():
    from masa_megatron.train.vocab_parallel import scaled_vocab_logits, vocab_parallel_logprobs

    logits, labels, weights = _inputs()
    ours = logits.clone().requires_grad_(True)
    # a non-leaf, as the model output is: the scale and mask work in place
    logp = vocab_parallel_logprobs(scaled_vocab_logits(ours.clone(), T, REAL_VOCAB), labels)
    (weights * logp).sum().backward()
    ref = logits.clone().requires_grad_(True)
    ref_logp = _reference(ref).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    (weights * ref_logp).sum().backward()
    assert (logp - ref_logp).abs().max().item() <= 1e-6
    assert (ours.grad - ref.grad).abs().max().item() <= 1e-6
    assert not ours.grad[..., REAL_VOCAB:].any()     # padding columns get no gradient


@pytest.mark.parametrize("chunk_elements", [1, V * 2 + 5, V * S * B, 1 << 24])
def test_chunked_entropy_equals_the_reference_for_any_chunk(chunk_elements):
    from masa_megatron.train.vocab_parallel import scaled_vocab_logits, vocab_parallel_entropy

    logits, _, _ = _inputs()
    z = scaled_vocab_logits(logits.clone(), T, REAL_VOCAB)
    before = z.clone()
    entropy = vocab_parallel_entropy(z, chunk_elements=chunk_elements)
    p = _reference(logits).exp()
    expected = -(p * p.log()).sum(-1)
    assert entropy.shape == (S, B)
    assert (entropy - expected).abs().max().item() <= 1e-5
    assert torch.equal(z, before)   # z is only read: the cross entropy uses it next
