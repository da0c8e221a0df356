"""Tiny CPU recipes: `tiny_cpu_grpo`, `tiny_cpu_masa`, `tiny_cpu_masa_efficient`.

Two gloo ranks (data parallel 2) under torchrun, fp32, Megatron's local layer spec, the embedded
rollout engine (the trainer's own model generates; no SGLang), small groups and short sequences,
two steps. Used by tests and for trying the launcher on a laptop::

    python -m recipes.launch tiny_cpu_grpo --executor local \\
        model.hf_path=/path/to/tiny-model data.train_files=[/path/to/train.parquet]

The caller provides `model.hf_path`: a Hugging Face folder with config.json and a tokenizer
(weights optional with `model.random_init=true`). It is deliberately left unset (`???`), so
resolving the recipe without it fails with "field 'model.hf_path' is required but not set".
`data.train_files` (verl-style parquet or jsonl) must be given too, e.g. from
`masa_megatron.data.synthetic.write_task_files`.
"""
from __future__ import annotations

from omegaconf import MISSING

from masa_megatron.config import ExperimentConfig

TINY_WORLD_SIZE = 2
METHODS = ("grpo", "masa", "masa_efficient")


def tiny_cpu_recipe(method: str = "grpo") -> ExperimentConfig:
    """A two-rank CPU run of `method` on a tiny model the caller provides."""
    cfg = ExperimentConfig(name=f"tiny_cpu_{method}")
    cfg.model.hf_path = MISSING
    cfg.model.dtype, cfg.model.layer_spec = "fp32", "local"
    cfg.parallel.world_size = TINY_WORLD_SIZE
    cfg.parallel.use_distributed_optimizer = False
    cfg.rollout.engine, cfg.rollout.weight_sync = "embedded", "disk"
    cfg.rollout.max_prompt_length, cfg.rollout.max_response_length = 512, 64
    cfg.grpo.group_size, cfg.grpo.micro_batch_tokens = 4, 1024
    cfg.masa.mode, cfg.masa.meta_group_size = method, 4
    cfg.masa.efficient_start_step = 1          # masa_efficient: step 0 plain, step 1 efficient
    cfg.data.prompt_batch_size = 4
    cfg.optimizer.lr, cfg.optimizer.warmup_steps = 1e-4, 0
    cfg.trainer.steps = 2
    cfg.trainer.output_dir = f"runs/tiny_cpu_{method}"
    cfg.checkpoint.save_every = 0
    return cfg


def tiny_recipes() -> dict[str, tuple]:
    """name -> (factory arguments,) for each method."""
    return {f"tiny_cpu_{method}": (method,) for method in METHODS}
