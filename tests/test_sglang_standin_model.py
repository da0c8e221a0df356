"""The SGLang engine against the stand-in server backed by a real tiny Megatron model (CPU; on a
CUDA machine both sides run on the GPU and tensor sync passes CUDA IPC handles, which is how
benchmarks/gpu_check.sh runs this file).

One stand-in server for the module; the trainer's model lives in this process (TP=PP=1). Checks:
generation through HTTP equals the embedded engine (greedy and seeded sampling, n > 1), and each
weight sync (disk, tensor in both load formats, broadcast over gloo) makes the server generate
exactly what the trainer's new weights generate, with the sampled-weights check passing; a server
holding other weights fails that check.
"""
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("megatron.core")
pytest.importorskip("aiohttp")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # for tests.sglang_standin

from masa_megatron.rollout.base import GenerationRequest, SamplingParams  # noqa: E402

FAMILY = "qwen3"
REQUESTS = [
    GenerationRequest([5, 17, 301, 44, 9], SamplingParams(max_new_tokens=10, temperature=0.0)),
    GenerationRequest([88, 3], SamplingParams(max_new_tokens=12, temperature=1.0, seed=11, n=3)),
    GenerationRequest([400, 401, 402], SamplingParams(max_new_tokens=8, temperature=0.7, top_k=20,
                                                      top_p=0.9, seed=4, n=2)),
    GenerationRequest([999, 2, 2], SamplingParams(max_new_tokens=6, temperature=0.0,
                                                  stop_token_ids=[7], n=2)),
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from masa_megatron.model.tiny import make_tiny_hf_model

    folder = tmp_path_factory.mktemp("tiny_hf")
    make_tiny_hf_model(folder, FAMILY, seed=3)
    return folder


@pytest.fixture(scope="module")
def stack(tiny, tmp_path_factory):
    """The stand-in server starting in the background while this process builds the trainer."""
    from masa_megatron.config import ModelConfig, ParallelConfig
    from masa_megatron.model import build_gpt_model, load_hf_weights
    from masa_megatron.parallel import destroy_parallel, init_parallel
    from masa_megatron.rollout.embedded import EmbeddedEngine
    from masa_megatron.rollout.sglang_launch import wait_healthy
    from tests.sglang_standin import start_standin

    server = start_standin(str(tiny), log_dir=str(tmp_path_factory.mktemp("standin_logs")),
                           wait=False)
    try:
        init_parallel(ParallelConfig())
        model = build_gpt_model(str(tiny), ModelConfig(hf_path=str(tiny)))
        load_hf_weights(model, tiny)
        engine = EmbeddedEngine(model, vocab_size=model.masa_hf_config["vocab_size"],
                                eos_token_ids=[model.masa_hf_config["eos_token_id"]])
        wait_healthy(server.url, 180.0, process=server)
        yield server, (model, engine)
    finally:
        server.stop()
        destroy_parallel()


@pytest.fixture(scope="module")
def server(stack):
    return stack[0]


@pytest.fixture(scope="module")
def trainer(stack):
    return stack[1]


def _engine(server, tiny, tmp_path, sync="disk", **kwargs):
    from masa_megatron.rollout.sglang import SGLangEngine

    return SGLangEngine(str(tiny), urls=[server.url], weight_sync=sync, health_timeout_s=60,
                        sync_dir=str(tmp_path / "sync"), verify_sync=True, bucket_mb=1,
                        request_timeout_s=120, **kwargs)


def _assert_same(http_results, embedded_results):
    assert len(http_results) == len(embedded_results)
    for got, want in zip(http_results, embedded_results):
        assert len(got.completions) == len(want.completions)
        for a, b in zip(got.completions, want.completions):
            assert a.token_ids == b.token_ids
            assert a.finish_reason == b.finish_reason
            assert a.logprobs == pytest.approx(b.logprobs, abs=1e-5)


def _perturb(model, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=gen).to(p.device))


def test_generate_matches_embedded_engine(server, tiny, trainer, tmp_path):
    model, embedded = trainer
    engine = _engine(server, tiny, tmp_path)
    try:
        _assert_same(engine.generate(REQUESTS), embedded.generate(REQUESTS))
        seeded = [r for r in REQUESTS if r.sampling.seed is not None]
        first = engine.generate(seeded)
        assert [c.token_ids for r in first for c in r.completions] == \
            [c.token_ids for r in engine.generate(seeded) for c in r.completions]
        samples = [c.token_ids for c in first[0].completions]
        assert len({tuple(s) for s in samples}) > 1     # n seeded samples differ
    finally:
        engine.shutdown()


def test_stage_hf_tensors_equal_the_hf_checkpoint(tiny, trainer):
    from safetensors.torch import load_file

    from masa_megatron.rollout.weight_sync.buckets import bucketize, stage_hf_tensors

    model, _ = trainer
    reference = {}
    for path in tiny.glob("*.safetensors"):
        reference.update(load_file(str(path)))
    ours = dict(stage_hf_tensors(model))
    assert set(ours) == set(reference)
    for name, tensor in ours.items():  # staged where the model lives: on the GPU under CUDA
        assert torch.equal(tensor.cpu(), reference[name]), name
    buckets = list(bucketize(stage_hf_tensors(model), 100_000))
    assert [n for b in buckets for n, _ in b] == list(ours)
    assert all(sum(t.numel() * t.element_size() for _, t in b) <= 100_000 or len(b) == 1
               for b in buckets)


@pytest.mark.parametrize("sync,options", [
    ("disk", {}),
    ("tensor", {"load_format": "flattened_bucket"}),
    ("tensor", {"load_format": None}),
    ("broadcast", {}),
    ("broadcast", {"load_format": "flattened_bucket"}),
])
def test_weight_sync_makes_server_follow_trainer(server, tiny, trainer, tmp_path, sync, options):
    model, embedded = trainer
    engine = _engine(server, tiny, tmp_path, sync=sync, sync_options=options)
    try:
        _perturb(model, seed=len(sync) + len(str(options)))
        before = engine.weight_version
        version = engine.update_weights(model)
        assert version == before + 1
        stats = engine.last_sync_stats
        assert stats[f"weight_sync/{sync}/bytes"] > 0
        got = engine.generate(REQUESTS)
        assert all(r.weight_version == version for r in got)
        _assert_same(got, embedded.generate(REQUESTS))
        info = engine.http.call(server.url, "/get_server_info", method="GET").body
        assert info["pending_parts"] == []
    finally:
        engine.shutdown()


def test_weight_check_detects_stale_server(server, tiny, trainer, tmp_path):
    from masa_megatron.rollout.sglang_launch import EngineError

    model, _ = trainer
    engine = _engine(server, tiny, tmp_path, sync="tensor")
    try:
        _perturb(model, seed=99)
        version = engine.update_weights(model)
        engine.update_weights(path=str(tiny), version=version)    # server back to the originals
        with pytest.raises(EngineError, match=rf"{server.url}.*differ"):
            engine.weight_sync.check(version)
    finally:
        engine.shutdown()


def test_streamed_follow_ups_give_the_two_phase_samples(server, tiny, trainer, tmp_path):
    """Seeded first requests whose follow-up prompts are built from their answers: streamed
    (a follow-up sent while longer first requests still run), two-phase through HTTP, and the
    embedded engine's two batches give the same samples."""
    model, embedded = trainer
    first = [GenerationRequest([5 + i, 17, 301], SamplingParams(max_new_tokens=4 + 3 * i,
                                                                temperature=1.0, seed=i, n=2))
             for i in range(4)]

    def follow(i, result):
        prompt = [t % 500 + 1 for t in result.completions[1].token_ids[:3]]
        return [GenerationRequest(prompt, SamplingParams(max_new_tokens=5, temperature=1.0,
                                                         seed=100 + i, n=2))] if i != 2 else []
    engine = _engine(server, tiny, tmp_path)
    try:
        engine.update_weights(model)   # earlier tests of this module may have left others there
        streamed = engine.generate_chained(first, follow, stream=True)
        two_phase = engine.generate_chained(first, follow, stream=False)
    finally:
        engine.shutdown()
    assert len(streamed) == 4 + 3
    _assert_same(streamed, two_phase)
    _assert_same(streamed, embedded.generate_chained(first, follow))
