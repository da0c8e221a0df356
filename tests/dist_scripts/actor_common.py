"""Shared by the actor tests and the scripts they launch with torchrun.

A tiny random Qwen3-like model (tied embeddings, q/k norm, GQA, SwiGLU; vocab 250 padded to 256
so the last TP rank holds padding columns) built with the project's builder from a config dict,
and a batch whose rows have very different lengths.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from masa_megatron.config import GRPOConfig, ModelConfig, OptimizerConfig, ParallelConfig

VOCAB = 250
HF_CONFIG = {
    "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "vocab_size": VOCAB,
    "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 4,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
    "max_position_embeddings": 256, "rms_norm_eps": 1e-6, "tie_word_embeddings": True,
    "rope_theta": 10000.0, "initializer_range": 0.05,
}
# lr large enough that updates are far above float noise; clipping on (tests the global norm)
SGD = OptimizerConfig(name="sgd", lr=0.5, weight_decay=0.0, clip_grad=1.0, warmup_steps=0)
# Adam's first step is lr * g / (|g| + eps): d(update)/dg <= lr / eps = 1 keeps float noise small
ADAM = OptimizerConfig(name="adam", lr=1e-3, adam_eps=1e-3, weight_decay=0.01, clip_grad=1.0,
                       warmup_steps=0)


def setup_actor(tp: int = 1, pp: int = 1, *, sp: bool = False, opt_cfg: OptimizerConfig = SGD,
                micro_batch_tokens: int = 1 << 20, mini_batches: int = 2, seed: int = 1234,
                temperature: float = 0.9, model_overrides: dict = None, **grpo_overrides):
    """init_parallel + builder + DDP + optimizer -> Actor (and the ParallelLayout).
    `sp`: sequence parallelism; `model_overrides`: ModelConfig fields (e.g. recompute)."""
    from masa_megatron.model import build_gpt_model
    from masa_megatron.parallel import init_parallel
    from masa_megatron.train.actor import Actor
    from masa_megatron.train.optim import build_optimizer, wrap_ddp

    parallel = ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                              sequence_parallel=sp)
    layout = init_parallel(parallel, seed=seed)
    model = build_gpt_model(HF_CONFIG, ModelConfig(hf_path="<dict>", random_init=True,
                                                   **(model_overrides or {})))
    chunks = wrap_ddp([model], parallel, opt_cfg.name)
    optimizer, scheduler = build_optimizer(chunks, opt_cfg, parallel, "fp32", total_steps=10)
    grpo = GRPOConfig(micro_batch_tokens=micro_batch_tokens, mini_batches_per_step=mini_batches,
                      **grpo_overrides)
    return Actor(chunks, optimizer, scheduler, grpo, temperature=temperature), layout


def make_batch(seed: int = 0):
    """16 samples in 4 groups of 4 sharing their group's prompt (as GRPO's do; the actor's
    shared-prefix micro-batches compute it once); prompts 2-30 tokens, responses 1-60 tokens."""
    from masa_megatron.train.batching import TrainBatch

    gen = torch.Generator().manual_seed(seed)
    prompts, responses = [], []
    for i in range(16):
        p = int(torch.randint(2, 31, (1,), generator=gen))
        r = 1 if i == 5 else int(torch.randint(1, 61, (1,), generator=gen))
        prompt = torch.randint(3, VOCAB, (p,), generator=gen).tolist()
        prompts.append(prompt if i % 4 == 0 else prompts[-1])
        responses.append(torch.randint(3, VOCAB, (r,), generator=gen).tolist())
    advantages = torch.randn(16, generator=gen)
    rollout = [torch.randn(len(r), generator=gen) * 0.1 - 5.0 for r in responses]
    return TrainBatch(prompts, responses, advantages, rollout_logprobs=rollout,
                      group_ids=[i // 4 for i in range(16)])


def model_state(actor) -> dict[str, torch.Tensor]:
    """This rank's parameters by name (a copy)."""
    from masa_megatron.train.actor import unwrap_model

    return {n: p.detach().clone() for c in actor.model_chunks
            for n, p in unwrap_model(c).named_parameters()}


def restore_weights(actor, weights: dict[str, torch.Tensor]) -> None:
    """Set this rank's parameters to `weights` and drop the optimizer state (a fresh start)."""
    from masa_megatron.train.actor import unwrap_model

    with torch.no_grad():
        for name, param in unwrap_model(actor.model_chunks[0]).named_parameters():
            param.copy_(weights[name])
    for sub in actor.optimizer.chained_optimizers:
        sub.optimizer.state.clear()


def max_abs_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    return max((a[k] - b[k]).abs().max().item() for k in a)


def save_model(actor, folder: Path) -> None:
    from megatron.core import dist_checkpointing
    from masa_megatron.train.optim import model_sharded_state_dict
    folder.mkdir(parents=True, exist_ok=True)
    dist_checkpointing.save(model_sharded_state_dict(actor.model_chunks), str(folder))


def load_model(actor, folder: Path) -> None:
    from megatron.core import dist_checkpointing
    from masa_megatron.train.optim import model_sharded_state_dict, unwrap_model
    loaded = dist_checkpointing.load(model_sharded_state_dict(actor.model_chunks), str(folder))
    unwrap_model(actor.model_chunks[0]).load_state_dict(loaded["model"])


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def check(condition: bool, message: str) -> None:
    if not condition:
        raise AssertionError(f"[rank {rank()}] {message}")


def finite(x: float) -> bool:
    return math.isfinite(x)
