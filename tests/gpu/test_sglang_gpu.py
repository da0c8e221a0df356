"""The real SGLang path on a GPU (skipped without CUDA and sglang; collected everywhere).

A tiny random Qwen3 checkpoint is served by real `sglang.launch_server` processes started by
the SGLang engine (fp32, torch-native attention, CUDA graphs off, so greedy outputs can be
compared with the trainer's own Megatron model). Checks: greedy generation and log-probs match
the embedded engine; tensor sync (CUDA IPC, colocated on the same GPU) and disk sync make the
server follow the trainer's new weights, with the sampled-weights check on; pause/resume release
and retake GPU memory; broadcast sync over NCCL when a second GPU hosts the server.
"""
import importlib.util

import pytest

try:
    import torch
    HAS_CUDA = torch.cuda.is_available()
except ImportError:  # collected on machines without torch as well
    HAS_CUDA = False
HAS_SGLANG = importlib.util.find_spec("sglang") is not None
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not (HAS_CUDA and HAS_SGLANG), reason="needs CUDA and sglang")]

# fp32 needs a backend that supports it; torch-native kernels keep greedy outputs comparable
SERVER_ARGS = ["--dtype", "float32", "--disable-cuda-graph", "--attention-backend", "torch_native",
               "--sampling-backend", "pytorch"]


def _requests():
    from masa_megatron.rollout.base import GenerationRequest, SamplingParams

    return [GenerationRequest([5, 17, 301, 44, 9], SamplingParams(max_new_tokens=12, temperature=0)),
            GenerationRequest([88, 3], SamplingParams(max_new_tokens=12, temperature=0, n=2))]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from masa_megatron.model.tiny import make_tiny_hf_model

    folder = tmp_path_factory.mktemp("tiny_qwen3")
    make_tiny_hf_model(folder, "qwen3", seed=3)
    return folder


@pytest.fixture(scope="module")
def trainer(tiny):
    from masa_megatron.config import ModelConfig, ParallelConfig
    from masa_megatron.model import build_gpt_model, load_hf_weights
    from masa_megatron.parallel import destroy_parallel, init_parallel
    from masa_megatron.rollout.embedded import EmbeddedEngine

    init_parallel(ParallelConfig())
    model = build_gpt_model(str(tiny), ModelConfig(hf_path=str(tiny), layer_spec="local"))
    load_hf_weights(model, tiny)
    embedded = EmbeddedEngine(model, vocab_size=model.masa_hf_config["vocab_size"],
                              eos_token_ids=[model.masa_hf_config["eos_token_id"]])
    yield model, embedded
    destroy_parallel()


def _engine(tiny, tmp_path, sync, **kwargs):
    from masa_megatron.rollout.sglang import SGLangEngine

    kwargs.setdefault("colocate", True)
    return SGLangEngine(str(tiny), tp=1, mem_fraction=0.2, weight_sync=sync, verify_sync=True,
                        sync_dir=str(tmp_path / "sync"), health_timeout_s=600,
                        extra_server_args=SERVER_ARGS, log_dir=str(tmp_path / "logs"), **kwargs)


def _assert_greedy_equal(got, want):
    for g, w in zip(got, want):
        for a, b in zip(g.completions, w.completions):
            assert a.token_ids == b.token_ids
            assert a.logprobs == pytest.approx(b.logprobs, abs=1e-3)


def _perturb(model, seed):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=gen, device=p.device))


@pytest.mark.parametrize("sync", ["tensor", "disk"])
def test_generation_and_sync_against_real_sglang(tiny, trainer, tmp_path, sync):
    model, embedded = trainer
    engine = _engine(tiny, tmp_path, sync)
    try:
        _assert_greedy_equal(engine.generate(_requests()), embedded.generate(_requests()))
        _perturb(model, seed=1 if sync == "tensor" else 2)
        version = engine.update_weights(model)
        got = engine.generate(_requests())
        assert all(r.weight_version == version for r in got)
        _assert_greedy_equal(got, embedded.generate(_requests()))
    finally:
        engine.shutdown()


def test_pause_and_resume_release_gpu_memory(tiny, tmp_path):
    engine = _engine(tiny, tmp_path, "disk")
    try:
        free_before = torch.cuda.mem_get_info()[0]
        engine.pause()
        free_paused = torch.cuda.mem_get_info()[0]
        engine.resume()
        assert free_paused > free_before + (64 << 20)
        assert len(engine.generate(_requests())) == 2
    finally:
        engine.shutdown()


@pytest.mark.skipif(not HAS_CUDA or torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_broadcast_sync_over_nccl(tiny, trainer, tmp_path):
    model, embedded = trainer
    engine = _engine(tiny, tmp_path, "broadcast", colocate=False,
                     launch_env={"CUDA_VISIBLE_DEVICES": "1"})
    try:
        _perturb(model, seed=3)
        engine.update_weights(model)
        _assert_greedy_equal(engine.generate(_requests()), embedded.generate(_requests()))
    finally:
        engine.shutdown()
