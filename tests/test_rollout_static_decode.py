"""Static-shape decode of the embedded engine (the CUDA-graph path, run eagerly on CPU, fp32)
against the default decode; bucket choice of the graph runner; rollout.cuda_graphs wiring."""
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("megatron.core")
pytest.importorskip("transformers")

from masa_megatron.rollout.base import GenerationRequest, SamplingParams  # noqa: E402

PROMPTS = [[5, 17, 301, 44, 9, 120, 7], [88, 3], [400, 401, 402, 403, 11], [999]]


@pytest.fixture(scope="module", params=["qwen3", "llama"])
def models(request, parallel, tmp_path_factory):
    """(transformers model, Megatron GPTModel) with the same random weights."""
    from masa_megatron.config import ModelConfig
    from masa_megatron.model import build_gpt_model, load_hf_weights
    from masa_megatron.model.tiny import make_tiny_hf_model

    folder = tmp_path_factory.mktemp(request.param)
    hf = make_tiny_hf_model(folder, request.param, seed=3)
    gpt = build_gpt_model(str(folder), ModelConfig(hf_path=str(folder)))
    load_hf_weights(gpt, folder)
    return hf, gpt


@pytest.fixture(scope="module")
def model(models):
    return models[1]


def _engine(model, **kwargs):
    from masa_megatron.rollout.embedded import EmbeddedEngine

    return EmbeddedEngine(model, vocab_size=model.masa_hf_config["vocab_size"],
                          eos_token_ids=[2], **kwargs)


def _assert_same(expected, got):
    for want, have in zip(expected, got, strict=True):
        for a, b in zip(want.completions, have.completions, strict=True):
            assert b.token_ids == a.token_ids
            assert b.finish_reason == a.finish_reason
            assert len(b.logprobs) == len(a.logprobs)
            assert torch.allclose(torch.tensor(b.logprobs), torch.tensor(a.logprobs),
                                  atol=1e-5, rtol=0)


class FakeRunner:
    """Stands in for cuda_graphs.GraphRunner: records the buckets it is asked for and runs
    the step eagerly (so the results stay checkable)."""

    def __init__(self):
        self.keys, self.resets = [], 0

    def __call__(self, key, fn):
        self.keys.append(key)
        return fn()

    def reset(self):
        self.resets += 1


def test_static_greedy_equals_eager_with_stops_lengths_and_samples(model):
    """Mixed prompt lengths, n=2 rows per request, rows ending by max_new and by a stop id at
    different steps; 10 rows with buckets up to 4: an uncaptured start, compaction into
    smaller buckets and padded rows kept in place (9 -> ... -> 3 rows in bucket 4)."""
    eager = _engine(model)
    probe = eager.generate([GenerationRequest(PROMPTS[0], SamplingParams(
        max_new_tokens=10, temperature=0.0, ignore_eos=True))])[0].completions[0].token_ids
    stop = probe[4]
    reqs = [GenerationRequest(p, SamplingParams(max_new_tokens=2 + 3 * i, temperature=0.0, n=2,
                                                ignore_eos=True)) for i, p in enumerate(PROMPTS)]
    reqs.append(GenerationRequest(PROMPTS[0], SamplingParams(
        max_new_tokens=12, temperature=0.0, n=2, stop_token_ids=[stop])))
    expected = eager.generate(reqs)
    assert expected[-1].completions[0].finish_reason == "stop"
    assert len({len(c.token_ids) for r in expected for c in r.completions}) >= 4
    static = _engine(model, decode="static", cuda_graph_max_batch=4)
    _assert_same(expected, static.generate(reqs))
    _assert_same(expected, static.generate(reqs))      # buffers made again by the second call


def test_static_greedy_equals_transformers_generate(models):
    """A mixed-length batch in buckets up to 2 (padded and compacted): transformers' rows."""
    hf, gpt = models
    max_new = 12
    got = _engine(gpt, decode="static", cuda_graph_max_batch=2).generate(
        [GenerationRequest(p, SamplingParams(max_new_tokens=max_new - i, temperature=0.0,
                                             ignore_eos=True)) for i, p in enumerate(PROMPTS)])
    for i, (prompt, res) in enumerate(zip(PROMPTS, got)):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt)),
                              do_sample=False, max_new_tokens=max_new - i,
                              min_new_tokens=max_new - i, pad_token_id=0)
        assert res.completions[0].token_ids == ref[0, len(prompt):].tolist()


def test_unwritten_prefill_cache_slots_never_reach_the_static_step(model, monkeypatch):
    """The prefill cache's slots past the prompts are uninitialised memory (possibly NaN); the
    static buffers must not take them in (0 attention weight x NaN = NaN)."""
    from masa_megatron.rollout.megatron_step import KVCache

    reqs = [GenerationRequest(p, SamplingParams(max_new_tokens=4, temperature=0.0,
                                                ignore_eos=True)) for p in PROMPTS]
    expected = _engine(model).generate(reqs)
    append = KVCache.append

    def nan_filled(cache, layer, key, value, slot, rows):
        if cache.keys[layer] is None:
            shape = (cache.rows, key.size(2), cache.slots, key.size(3))
            cache.keys[layer] = key.new_full(shape, float("nan"))
            cache.values[layer] = value.new_full(shape, float("nan"))
        return append(cache, layer, key, value, slot, rows)

    monkeypatch.setattr(KVCache, "append", nan_filled)
    _assert_same(expected, _engine(model).generate(reqs))
    _assert_same(expected, _engine(model, decode="static").generate(reqs))


def test_static_start_frees_the_prefill_cache_layer_by_layer(model):
    """Loading a prefilled batch into the static buffers releases each layer of the prefill's
    cache as it is copied, so the two never coexist whole (the peak would double the KV memory:
    ~2x eager at the default batch on an 8B model)."""
    engine = _engine(model, decode="static", cuda_graph_max_batch=4)
    reqs = [GenerationRequest(p, SamplingParams(max_new_tokens=3, temperature=0.0))
            for p in PROMPTS]
    rows = engine._batches(engine._expand(reqs)[0])[0]
    live = engine._layout(rows)
    _, cache = engine._prefill(rows, live)
    assert all(t is not None for t in (*cache.keys, *cache.values))
    held, prefill = [], {t.untyped_storage().data_ptr() for t in (*cache.keys, *cache.values)}
    copy, inner = torch.Tensor.copy_, []

    def watched(dst, src, *args, **kwargs):
        """At each copy out of the prefill cache: how many of its layers are still held (once
        per copy: the CPU compat layer calls copy_ again from inside)."""
        if not inner and src.untyped_storage().data_ptr() in prefill:
            held.append(sum(t is not None for t in cache.keys))
        inner.append(1)
        try:
            return copy(dst, src, *args, **kwargs)
        finally:
            inner.pop()

    torch.Tensor.copy_ = watched
    try:
        engine._static.start(live, cache)
    finally:
        torch.Tensor.copy_ = copy
    layers = len(cache.keys)
    assert held == [layers - i for i in range(layers) for _ in ("key", "value")]
    assert all(t is None for t in (*cache.keys, *cache.values))


def test_static_seeded_sampling_equals_eager(model):
    """Temperature 1 (plain, top-p and top-k rows) with per-request seeds: the same samples."""
    reqs = [GenerationRequest(p, SamplingParams(max_new_tokens=6 + i, temperature=1.0, n=3,
                                                seed=40 + i, top_p=(1.0, 0.9)[i % 2],
                                                top_k=(-1, -1, 5, -1)[i]))
            for i, p in enumerate(PROMPTS)]
    expected = _engine(model).generate(reqs)
    _assert_same(expected, _engine(model, decode="static", cuda_graph_max_batch=8).generate(reqs))
    assert len({tuple(c.token_ids) for c in expected[0].completions}) > 1


@pytest.mark.parametrize("rows, max_batch, asked, forwards, padded", [
    # buckets (1, 2): 4 and 3 live rows are uncaptured shapes and run eagerly
    (5, 2, [2, 1], [4, 3, 2, 1], 0),
    # buckets (1, 2, 4, 8): 7, 6, 5 rows stay in bucket 8 and 3 in bucket 4 (padded rows)
    (8, 8, [8, 8, 8, 4, 4, 2, 1], [8, 8, 8, 4, 4, 2, 1], 4),
])
def test_graph_runner_is_asked_only_for_captured_buckets(model, rows, max_batch, asked, forwards,
                                                         padded):
    """Rows ending after 1, 2, ... tokens: one step per live count, each on the smallest
    bucket that holds it; only captured buckets go to the runner, once per step."""
    engine = _engine(model, decode="static", cuda_graph_max_batch=max_batch)
    static = engine._static
    runner = static.runner = FakeRunner()
    seen = []
    run = static._forward
    static._forward = lambda b: seen.append((b, static.rowpos is not None)) or run(b)
    reqs = [GenerationRequest(PROMPTS[i % 4], SamplingParams(max_new_tokens=i + 1,
                                                             temperature=0.0, ignore_eos=True))
            for i in range(rows)]
    got = engine.generate(reqs)
    assert [r.completion_tokens for r in got] == list(range(1, rows + 1))
    assert runner.keys == asked
    assert [b for b, _ in seen] == forwards
    assert sum(kept for _, kept in seen) == padded     # steps with finished rows left in place
    assert static._buf is None and runner.resets >= 1   # buffers and graphs end with the call
    _assert_same(_engine(model).generate(reqs), got)


def test_cuda_graphs_config_reaches_the_engine_and_needs_cuda(model):
    from masa_megatron.config import ExperimentConfig
    from masa_megatron.rollout.embedded import EmbeddedEngine

    cfg = ExperimentConfig()
    vocab = model.masa_hf_config["vocab_size"]
    assert EmbeddedEngine.from_config(model, cfg, vocab_size=vocab)._static is None
    cfg.rollout.cuda_graph_max_batch = 12
    static = EmbeddedEngine.from_config(model, cfg, vocab_size=vocab, decode="static")
    assert static._static.sizes == (1, 2, 4, 8, 12)
    cfg.rollout.cuda_graphs = True
    if torch.cuda.is_available():
        pytest.skip("the refusal is for machines without CUDA")
    with pytest.raises(ValueError, match="rollout.cuda_graphs=True needs the model on a CUDA"):
        EmbeddedEngine.from_config(model, cfg, vocab_size=vocab)
    with pytest.raises(ValueError, match="decode must be eager, static or graphs"):
        _engine(model, decode="graph")


def test_static_decoding_refuses_model_parallel_groups_and_bad_bucket_limits():
    from types import SimpleNamespace

    from masa_megatron.rollout.static_decode import StaticDecoder, bucket_sizes

    with pytest.raises(NotImplementedError, match="tensor and pipeline parallel sizes of 1"):
        StaticDecoder(None, SimpleNamespace(group=object()), 8)
    assert bucket_sizes(1) == (1,) and bucket_sizes(64) == (1, 2, 4, 8, 16, 32, 64)
    with pytest.raises(ValueError, match="rollout.cuda_graph_max_batch must be >= 1"):
        bucket_sizes(0)


def test_cuda_graphs_refuse_moe_models(monkeypatch):
    from types import SimpleNamespace

    from masa_megatron.rollout.cuda_graphs import GraphRunner

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    GraphRunner(torch.device("cuda"), SimpleNamespace(num_moe_experts=None))
    with pytest.raises(NotImplementedError, match="rollout.cuda_graphs=True: MoE layers"):
        GraphRunner(torch.device("cuda"), SimpleNamespace(num_moe_experts=4))


@pytest.mark.parametrize("change, field, words", [
    ({"parallel.tensor_model_parallel_size": 2}, "rollout.cuda_graphs", "TP=2"),
    ({"parallel.pipeline_model_parallel_size": 2}, "rollout.cuda_graphs", "PP=2"),
    ({"rollout.engine": "sglang"}, "rollout.cuda_graphs", "--cuda-graph-max-bs"),
    ({"rollout.cuda_graph_max_batch": 0}, "rollout.cuda_graph_max_batch", ">= 1"),
])
def test_cuda_graphs_config_refusals_name_the_field(change, field, words):
    from masa_megatron.config import ConfigError, ExperimentConfig
    from masa_megatron.config_checks import validate_static

    cfg = ExperimentConfig()
    cfg.rollout.cuda_graphs = True
    validate_static(cfg)
    for dotted, value in change.items():
        section, name = dotted.split(".")
        setattr(getattr(cfg, section), name, value)
    with pytest.raises(ConfigError, match=f"field '{field}'.*{words}"):
        validate_static(cfg)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_decode_equals_eager_on_cuda(model):
    """Graphs replayed per bucket give the eager decode's greedy rows and seeded samples, in
    two calls (each captures its own graphs and frees them at its end)."""
    if next(model.parameters()).device.type != "cuda":
        pytest.skip("the model builder placed the model on the CPU")
    reqs = [GenerationRequest(p, SamplingParams(max_new_tokens=3 + 2 * i, temperature=t, n=2,
                                                seed=7, ignore_eos=True))
            for i, p in enumerate(PROMPTS) for t in (0.0, 1.0)]
    expected = _engine(model).generate(reqs)
    graphs = _engine(model, decode="graphs", cuda_graph_max_batch=8)
    runner = graphs._static.runner
    _assert_same(expected, graphs.generate(reqs))
    first = list(runner.captured)
    assert first and set(first) <= set(graphs._static.sizes) and not runner.graphs
    _assert_same(expected, graphs.generate(reqs))
    assert runner.captured == first + first


def test_graph_runner_protocol_with_a_fake_cuda(monkeypatch):
    """Without a GPU, torch.cuda's graph API replaced by recorders: warm-ups run on a side
    stream before the one capture per key (3 the first time, 1 after a reset), every call
    replays, graphs share one pool, and the captured output is what a call returns."""
    import contextlib

    from masa_megatron.rollout.cuda_graphs import GraphRunner

    log, state = [], {"where": "main"}

    class Graph:
        def replay(self):
            log.append("replay")

    @contextlib.contextmanager
    def on(where, entry):
        log.append(entry)
        before, state["where"] = state["where"], where
        yield
        state["where"] = before

    fakes = {"is_available": lambda: True, "graph_pool_handle": lambda: log.append("pool") or 7,
             "Stream": lambda device: type("S", (), {"wait_stream": lambda s, o: None})(),
             "current_stream": lambda device=None: type(
                 "S", (), {"wait_stream": lambda s, o: log.append("join")})(),
             "stream": lambda s: on("side", "to side"), "CUDAGraph": Graph,
             "graph": lambda g, pool, capture_error_mode: on(
                 "capture", f"capture pool={pool} {capture_error_mode}")}
    for name, fake in fakes.items():
        monkeypatch.setattr(torch.cuda, name, fake)
    runner = GraphRunner(torch.device("cuda"))
    out = torch.zeros(1)

    def step():
        log.append(state["where"])
        return out

    assert runner(4, step) is out
    captured = ["capture pool=7 thread_local", "capture", "replay"]
    assert log == ["pool", "to side", "side", "side", "side", "join", *captured]
    log.clear()
    assert runner(4, step) is out and log == ["replay"]
    runner.reset()
    log.clear()
    runner(4, step)
    assert log == ["pool", "to side", "side", "join", *captured]
    assert runner.captured == [4, 4] and runner.capture_s > 0


def plain_mlp_activation(model, monkeypatch):
    """The op traces below see aten ops. On CUDA the builder turns on Megatron's fused SwiGLU, a
    torch.compile'd function whose kernels may allocate outside the dispatcher (a trace would
    take their outputs for outside memory; not yet seen on a GPU); these tests trace the
    unfused activation, which they were written for, on every device."""
    monkeypatch.setattr(model.config, "bias_activation_fusion", False)


def test_static_step_has_no_host_synchronising_ops(model, monkeypatch):
    """What a graph captures must not read device values on the host (.item(), nonzero, data-
    dependent shapes: a capture fails on them): every aten op of the static steps, recorded."""
    plain_mlp_activation(model, monkeypatch)
    from torch.utils._python_dispatch import TorchDispatchMode

    syncing = {"_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique2",
               "repeat_interleave", "item", "equal", "is_nonzero"}
    seen = set()

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.add(func._schema.name.split("::")[-1])
            return func(*args, **(kwargs or {}))

    engine = _engine(model, decode="static", cuda_graph_max_batch=4)
    run = engine._static._forward

    def recorded(b):
        with Record():
            return run(b)
    engine._static._forward = recorded
    reqs = [GenerationRequest(p, SamplingParams(max_new_tokens=3 + i, temperature=0.0, n=2,
                                                ignore_eos=True)) for i, p in enumerate(PROMPTS)]
    engine.generate(reqs)
    assert {"embedding", "index_select", "index_copy_", "mm"} <= seen      # the model ran
    assert not seen & syncing


def test_steps_of_a_bucket_run_the_same_ops_on_the_same_memory(model, monkeypatch):
    """What replaying one captured graph per bucket assumes: every step of a bucket runs the same
    aten ops with the same shapes and non-tensor arguments, reading the same outside memory
    (static buffers, weights); only the values in that memory change from step to step."""
    plain_mlp_activation(model, monkeypatch)
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    def storage(t):
        return t.untyped_storage().data_ptr()

    class Trace(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops, self.made = [], set()      # storages allocated during this step

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            flat = tree_flatten((args, kwargs))[0]
            inputs = {storage(a) for a in flat if isinstance(a, torch.Tensor)}
            self.ops.append((str(func), tuple(
                (tuple(a.shape), a.dtype, "made" if storage(a) in self.made else storage(a))
                if isinstance(a, torch.Tensor) else repr(a) for a in flat)))
            out = func(*args, **kwargs)
            self.made |= {storage(t) for t in tree_flatten(out)[0]
                          if isinstance(t, torch.Tensor) and storage(t) not in inputs}
            return out

    engine = _engine(model, decode="static", cuda_graph_max_batch=4)
    run, traces = engine._static._forward, {}

    def traced(b):
        with Trace() as trace:
            out = run(b)
        traces.setdefault(b, []).append(trace.ops)
        return out
    engine._static._forward = traced
    engine.generate([GenerationRequest(p, SamplingParams(max_new_tokens=(4, 7)[i % 2],
                                                         temperature=0.0, ignore_eos=True))
                     for i, p in enumerate(PROMPTS)])
    assert sorted((b, len(t)) for b, t in traces.items()) == [(2, 3), (4, 3)]
    for steps in traces.values():
        assert all(ops == steps[0] for ops in steps[1:])
