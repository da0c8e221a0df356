"""The embedded engine on tiny random Qwen3 / Llama models (CPU, fp32, one process, TP=PP=1)."""
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("megatron.core")
pytest.importorskip("transformers")

from masa_megatron.rollout.base import GenerationRequest, SamplingParams  # noqa: E402
from masa_megatron.rollout.sampling import token_logprobs  # noqa: E402

PROMPTS = [[5, 17, 301, 44, 9, 120, 7], [88, 3], [400, 401, 402, 403, 11], [999]]


def _build(tmp_path_factory, family):
    from masa_megatron.config import ModelConfig
    from masa_megatron.model import build_gpt_model, load_hf_weights
    from masa_megatron.model.tiny import make_tiny_hf_model

    folder = tmp_path_factory.mktemp(family)
    hf = make_tiny_hf_model(folder, family, seed=3)
    model = build_gpt_model(str(folder), ModelConfig(hf_path=str(folder)))
    load_hf_weights(model, folder)
    return hf, model


@pytest.fixture(scope="module", params=["qwen3", "llama"])
def models(request, parallel, tmp_path_factory):
    return _build(tmp_path_factory, request.param)


@pytest.fixture(scope="module")
def qwen(parallel, tmp_path_factory):
    return _build(tmp_path_factory, "qwen3")


def _engine(model, **kwargs):
    from masa_megatron.rollout.embedded import EmbeddedEngine

    return EmbeddedEngine(model, vocab_size=model.masa_hf_config["vocab_size"], **kwargs)


def _greedy(max_new, **kwargs):
    return SamplingParams(max_new_tokens=max_new, temperature=0.0, **kwargs)


def _sampled(seed, **kwargs):
    return SamplingParams(max_new_tokens=kwargs.pop("max_new_tokens", 8), temperature=1.0,
                          seed=seed, **kwargs)


def _plain_forward_logprobs(model, sequences):
    """Per (prompt, completion, temperature): the completion's log-probs from one plain
    (no KV cache, right-padded, causal) Megatron forward over all sequences."""
    ids = [p + c for p, c, _ in sequences]
    width = max(map(len, ids))
    batch = torch.tensor([row + [0] * (width - len(row)) for row in ids])
    positions = torch.arange(width).unsqueeze(0).expand_as(batch)
    with torch.no_grad():
        logits = model(batch, positions, None)[..., :model.masa_hf_config["vocab_size"]]
    return [token_logprobs(logits[i, len(p) - 1:len(p) + len(c) - 1], torch.tensor(c), t)
            for i, (p, c, t) in enumerate(sequences)]


def test_greedy_matches_transformers_generate(models):
    hf, model = models
    max_new = 12
    results = _engine(model).generate([GenerationRequest(p, _greedy(max_new)) for p in PROMPTS])
    for prompt, res in zip(PROMPTS, results):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt)),
                              do_sample=False, max_new_tokens=max_new, min_new_tokens=max_new,
                              pad_token_id=0)
        assert res.completions[0].token_ids == ref[0, len(prompt):].tolist()
        assert res.completions[0].finish_reason == "length"
        assert res.prompt_tokens == len(prompt) and res.completion_tokens == max_new


def test_seeded_sampling_reproducible_and_seed_dependent(qwen):
    _, model = qwen
    engine = _engine(model)
    batch = [GenerationRequest(p, _sampled(seed=11 + i, n=2)) for i, p in enumerate(PROMPTS)]
    first = engine.generate(batch)
    again = engine.generate(batch)
    tokens = [[c.token_ids for c in r.completions] for r in first]
    assert tokens == [[c.token_ids for c in r.completions] for r in again]
    # the two samples of a request differ, and another seed gives other samples
    assert all(a != b for a, b in tokens)
    other = engine.generate([GenerationRequest(p, _sampled(seed=99 + i, n=2))
                             for i, p in enumerate(PROMPTS)])
    assert tokens != [[c.token_ids for c in r.completions] for r in other]
    # a seeded request samples the same alone as in a batch, with other lengths around it
    alone = engine.generate([batch[2]])[0]
    assert [c.token_ids for c in alone.completions] == tokens[2]
    split = _engine(model, max_batch_size=3).generate(batch)
    assert tokens == [[c.token_ids for c in r.completions] for r in split]
    # unseeded requests differ from call to call
    free = [GenerationRequest(PROMPTS[0], SamplingParams(max_new_tokens=12))]
    assert engine.generate(free)[0].completions[0].token_ids != \
        engine.generate(free)[0].completions[0].token_ids


def test_per_request_lengths_and_stop_ids(qwen):
    _, model = qwen
    engine = _engine(model, eos_token_ids=[2])
    free_run = engine.generate([GenerationRequest(PROMPTS[0], _greedy(10, ignore_eos=True))])
    expected = free_run[0].completions[0].token_ids
    stop_token = expected[3]
    first_stop = expected.index(stop_token)
    reqs = [GenerationRequest(PROMPTS[0], _greedy(10, stop_token_ids=[stop_token]), "stop"),
            GenerationRequest(PROMPTS[1], _greedy(3), "short"),
            GenerationRequest(PROMPTS[2], _greedy(10, ignore_eos=True), "long"),
            GenerationRequest(PROMPTS[0], _greedy(7, ignore_eos=True), "same-prompt")]
    stop, short, long_, same = engine.generate(reqs)
    assert [r.request_id for r in (stop, short, long_, same)] == \
        ["stop", "short", "long", "same-prompt"]
    assert stop.completions[0].token_ids == expected[:first_stop + 1]
    assert stop.completions[0].finish_reason == "stop"
    assert len(short.completions[0].token_ids) <= 3
    if len(short.completions[0].token_ids) == 3 and short.completions[0].token_ids[-1] != 2:
        assert short.completions[0].finish_reason == "length"
    assert long_.completions[0].finish_reason == "length" and long_.completion_tokens == 10
    assert same.completions[0].token_ids == expected[:7]


def test_rollout_logprobs_match_plain_forward(qwen):
    """T=1, T=0.7 with top-p 0.9, greedy, top-k: log_softmax(logits / T) of the sampled token,
    as a plain forward recomputes it (prefill in one-row micro-batches, n=2 shared prefill)."""
    _, model = qwen
    settings = [(1.0, 1.0, -1), (0.7, 0.9, -1), (0.0, 1.0, -1), (1.3, 1.0, 5)]
    reqs = [GenerationRequest(p, SamplingParams(max_new_tokens=10, temperature=t, top_p=top_p,
                                                top_k=top_k, seed=5 + i, n=2))
            for i, (t, top_p, top_k) in enumerate(settings) for p in PROMPTS]
    results = _engine(model, prefill_token_budget=8).generate(reqs)
    sequences = [(list(req.prompt_token_ids), c.token_ids, req.sampling.temperature)
                 for req, res in zip(reqs, results) for c in res.completions]
    logprobs = [c.logprobs for res in results for c in res.completions]
    for seq, got, ref in zip(sequences, logprobs, _plain_forward_logprobs(model, sequences)):
        diff = (torch.tensor(got) - ref).abs().max().item()
        assert diff <= 1e-4, (seq, diff)


def test_model_usable_for_training_after_generation(qwen):
    _, model = qwen
    model.train()
    model.decoder.layers[0].eval()          # a mixed state must come back as it was
    _engine(model).generate([GenerationRequest(PROMPTS[0], _sampled(seed=1, max_new_tokens=4))])
    assert model.training and not model.decoder.layers[0].training
    ids = torch.tensor([PROMPTS[0]])
    loss = model(ids, torch.arange(ids.size(1)).unsqueeze(0), None, labels=ids).mean()
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    model.zero_grad(set_to_none=True)
    model.eval()


def test_lifecycle_and_aborts(qwen):
    _, model = qwen
    engine = _engine(model, max_context_length=16)
    assert engine.health()
    assert engine.update_weights() == 1 and engine.update_weights(version=7) == 7
    too_long = GenerationRequest(list(range(3, 19)), _greedy(4))
    clipped = GenerationRequest(list(range(3, 13)), _greedy(50, ignore_eos=True))
    empty = GenerationRequest([], _greedy(4))
    res = engine.generate([too_long, clipped, empty])
    assert res[0].completions[0].finish_reason == "abort" and not res[0].completions[0].token_ids
    assert res[1].completion_tokens == 6 and res[1].completions[0].finish_reason == "length"
    assert res[2].completions[0].finish_reason == "abort"
    assert all(r.weight_version == 7 for r in res)
    engine.pause()
    with pytest.raises(RuntimeError):
        engine.generate([clipped])
    engine.resume()
    assert engine.generate([clipped])[0].completion_tokens == 6
    engine.shutdown()
    assert not engine.health()


def test_unsupported_layouts_are_refused(qwen):
    _, model = qwen
    model.config.window_size = (16, 0)
    try:
        with pytest.raises(NotImplementedError, match="sliding-window"):
            _engine(model)
    finally:
        model.config.window_size = None
    from masa_megatron.rollout.embedded import EmbeddedEngine

    with pytest.raises(NotImplementedError, match="virtual pipeline"):
        EmbeddedEngine([model, model])


@pytest.mark.parametrize("family", ["qwen3", "llama"])
def test_bf16_model_generates_like_its_plain_forward(family, parallel, tmp_path_factory):
    """A bf16 model (what GPU runs use): every parameter is bf16, and the KV-cached rollout's
    log-probs are the plain forward's up to bf16 rounding (RoPE in the parameters' dtype, as
    Megatron applies it)."""
    from masa_megatron.config import ModelConfig
    from masa_megatron.model import build_gpt_model, load_hf_weights
    from masa_megatron.model.tiny import make_tiny_hf_model

    folder = tmp_path_factory.mktemp(f"{family}_bf16")
    make_tiny_hf_model(folder, family, seed=3)
    model = build_gpt_model(str(folder), ModelConfig(hf_path=str(folder), dtype="bf16"))
    load_hf_weights(model, folder)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    reqs = [GenerationRequest(p, _sampled(seed=i, max_new_tokens=6)) for i, p in enumerate(PROMPTS)]
    results = _engine(model).generate(reqs)
    sequences = [(list(r.prompt_token_ids), c.token_ids, 1.0)
                 for r, res in zip(reqs, results) for c in res.completions]
    logprobs = [c.logprobs for res in results for c in res.completions]
    for seq, got, ref in zip(sequences, logprobs, _plain_forward_logprobs(model, sequences)):
        assert len(got) == 6
        diff = (torch.tensor(got) - ref.float()).abs().max().item()
        assert diff <= 0.05, (seq, diff)


def test_kv_step_runs_the_mlp_activation_the_trainer_runs(qwen, monkeypatch):
    """With bias_activation_fusion (the builder sets it with CUDA) Megatron's MLP computes the
    SwiGLU in one fused function; the engine's KV-cached step must run that same function, not
    its own unfused copy (in bf16 the two round differently)."""
    import megatron.core.transformer.mlp as megatron_mlp

    from masa_megatron.rollout.megatron_step import MegatronStep

    _, model = qwen
    calls = []

    def fused(x, bias, *args):                         # stands in for the torch.compile'd one
        calls.append(x.shape)
        gate, up = torch.chunk(x, 2, dim=-1)
        return torch.nn.functional.silu(gate) * up

    monkeypatch.setattr(megatron_mlp, "bias_swiglu_impl", fused)
    monkeypatch.setattr(model.config, "bias_activation_fusion", True)
    mlp = model.decoder.layers[0].mlp
    hidden = torch.randn(3, 2, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = mlp(hidden)[0]
        calls.clear()
        got = MegatronStep(model)._mlp(mlp, hidden)[0]
    assert calls == [(3, 2, 2 * model.config.ffn_hidden_size)]
    assert torch.equal(got, expected)


def test_small_forwards_run_single_threaded_and_threads_come_back(qwen, monkeypatch):
    """A forward whose matmuls are under MACS_PER_THREAD multiply-adds per thread runs on one
    intra-op thread (the tiny model's prefill and decode steps), so with 2 torch threads the
    samples are those of a 1-thread run; torch's setting is restored afterwards. With a budget
    of 1 MAC per thread every forward may use all of torch's threads, and no more."""
    from masa_megatron.rollout import embedded
    from masa_megatron.rollout.megatron_step import MegatronStep

    _, model = qwen
    seen = []
    step = MegatronStep.__call__

    def recording(self, *args, **kwargs):
        seen.append(torch.get_num_threads())
        return step(self, *args, **kwargs)

    monkeypatch.setattr(MegatronStep, "__call__", recording)
    reqs = [GenerationRequest(p, _sampled(seed=3 + i, n=3)) for i, p in enumerate(PROMPTS)]
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _engine(model).generate(reqs)
        torch.set_num_threads(2)
        seen.clear()
        two = _engine(model).generate(reqs)
        assert seen and set(seen) == {1} and torch.get_num_threads() == 2
        assert [[(c.token_ids, c.logprobs) for c in r.completions] for r in one] == \
            [[(c.token_ids, c.logprobs) for c in r.completions] for r in two]
        monkeypatch.setattr(embedded, "MACS_PER_THREAD", 1)
        seen.clear()
        _engine(model).generate(reqs)
        assert set(seen) == {2} and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
