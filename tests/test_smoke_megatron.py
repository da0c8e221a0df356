"""Smoke test of the Megatron-facing code on whatever megatron-core is installed.

CI runs this file twice: in the main environment (megatron-core 0.16.1, what Python 3.11
resolves) and with megatron-core 0.19.x shadowing it (`make smoke-mcore019`), so a newer API
cannot silently break: build a tiny model from an HF folder, one RL train step, one generation.
"""
import megatron.core
import pytest
import torch

from masa_megatron.config import GRPOConfig, ModelConfig, OptimizerConfig, ParallelConfig
from masa_megatron.model import build_gpt_model, load_hf_weights
from masa_megatron.model.tiny import make_tiny_hf_model
from masa_megatron.parallel import destroy_parallel, init_parallel
from masa_megatron.rollout.base import GenerationRequest, SamplingParams
from masa_megatron.rollout.embedded import EmbeddedEngine
from masa_megatron.train.actor import Actor
from masa_megatron.train.batching import TrainBatch
from masa_megatron.train.optim import build_optimizer, wrap_ddp


@pytest.fixture
def policy(tmp_path):
    make_tiny_hf_model(tmp_path, "qwen3", vocab_size=97, eos_token_id=2)
    layout = init_parallel(ParallelConfig(), seed=7)
    model_cfg = ModelConfig(hf_path=str(tmp_path))
    model = build_gpt_model(str(tmp_path), model_cfg)
    load_hf_weights(model, tmp_path)
    yield model, layout
    destroy_parallel()


def test_tiny_model_trains_one_step_and_generates(policy):
    model, _ = policy
    print("megatron-core", megatron.core.__version__)
    chunks = wrap_ddp([model], ParallelConfig())
    optimizer, scheduler = build_optimizer(chunks, OptimizerConfig(lr=1e-2, warmup_steps=0),
                                           ParallelConfig(), "fp32", total_steps=1)
    actor = Actor(chunks, optimizer, scheduler, GRPOConfig(), vocab_size=97)
    engine = EmbeddedEngine(model, vocab_size=97, eos_token_ids=[2], seed=0)

    requests = [GenerationRequest([5, 6, 7], SamplingParams(max_new_tokens=6, n=4, seed=1)),
                GenerationRequest([9, 10], SamplingParams(max_new_tokens=4, temperature=0))]
    results = engine.generate(requests)
    assert [len(r.completions) for r in results] == [4, 1]
    assert all(1 <= len(c.token_ids) <= 6 for c in results[0].completions)

    prompts = [list(requests[0].prompt_token_ids)] * 4
    responses = [c.token_ids for c in results[0].completions]
    batch = TrainBatch(prompts, responses, torch.tensor([1.0, -1.0, 0.5, -0.5]))
    before = [p.detach().clone() for p in model.parameters()]
    actor.compute_old_logprobs(batch)
    metrics = actor.update(batch, check_ratio=True)
    assert metrics["train/skipped_step"] == 0
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
    # generation still works after training (inference state cleaned up between phases)
    again = engine.generate(requests[1:])
    assert again[0].completions[0].finish_reason in ("stop", "length")
