"""Checks of an `ExperimentConfig`, and the step sizes derived from it. Two levels:

- `validate_static(cfg)`: types, ranges, choices and impossible layouts. Needs no GPU and no
  Megatron, so it runs on a login node for a GPU recipe (`config.load_config` calls it).
- `validate_environment(cfg)`: what only the job's machine can tell (CUDA present, Transformer
  Engine installed, enough devices). Runs at job start.

Each failure raises `ConfigError` naming the field and the value; the CLI prints it as one line and
exits with code 2.
"""
from __future__ import annotations

import difflib
import importlib.util
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from masa_megatron.errors import UserError

if TYPE_CHECKING:
    from masa_megatron.config import ExperimentConfig, MASAConfig, RolloutConfig


class ConfigError(UserError):
    """A bad configuration value; the message names the field and the value."""


_CHOICES = {
    "model.dtype": ("fp32", "bf16", "fp16"),
    "model.layer_spec": ("auto", "local", "te"),
    "model.fp8": (None, "hybrid", "e4m3"),
    "model.fp8_recipe": ("delayed", "tensorwise", "blockwise", "mxfp8"),
    "model.recompute": ("none", "selective", "full"),
    "model.recompute_method": ("uniform", "block"),
    "rollout.weight_sync": ("disk", "broadcast", "tensor"),
    "grpo.loss_agg": ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum"),
    "grpo.kl_type": ("k1", "k3"),
    "grpo.old_logprobs": ("recompute", "policy"),
    "masa.mode": ("grpo", "masa", "masa_efficient"),
    "masa.parser": ("robust", "reference"),
    "masa.notion_rules": ("spec", "reference"),
    "masa.max_source": ("response", "prompt"),
    "optimizer.name": ("adam", "sgd"),
    "optimizer.schedule": ("constant", "cosine"),
}

# field -> (low, high, inclusive-low); None means unbounded on that side
_RANGES = {
    "model.recompute_num_layers": (1, None),
    "parallel.tensor_model_parallel_size": (1, None),
    "parallel.pipeline_model_parallel_size": (1, None),
    "parallel.context_parallel_size": (1, None),
    "rollout.max_prompt_length": (1, None),
    "rollout.max_response_length": (1, None),
    "rollout.temperature": (1e-6, None),
    "rollout.top_p": (1e-6, 1.0),
    "rollout.sglang_num_servers": (1, None),
    "rollout.sglang_tp": (1, None),
    "rollout.sglang_mem_fraction": (0.01, 0.99),
    "rollout.sglang_concurrency": (1, None),
    "rollout.sglang_max_running_requests": (0, None),
    "rollout.weight_sync_bucket_mb": (1, None),
    "rollout.sglang_request_timeout_s": (0.001, None),
    "rollout.sglang_max_retries": (0, None),
    "rollout.sglang_retry_backoff_s": (0.0, None),
    "rollout.cuda_graph_max_batch": (1, None),
    "grpo.clip_low": (0.0, 1.0),
    "grpo.clip_high": (0.0, None),
    "grpo.kl_coef": (0.0, None),
    "grpo.ppo_epochs": (1, None),
    "grpo.mini_batches_per_step": (1, None),
    "grpo.mini_batch_sequences": (0, None),
    "grpo.micro_batch_tokens": (1, None),
    "grpo.dynamic_sampling_max_rounds": (1, None),
    "masa.meta_group_size": (1, None),
    "masa.reward_base": (1e-9, 1.0),
    "masa.efficient_start_step": (0, None),
    "masa.gate_sigma": (0.0, None),
    "masa.gate_min_parsed_fraction": (0.0, 1.0),
    "masa.cutoff_margin": (1.0, None),
    "masa.audit_fraction": (0.0, 1.0),
    "masa.head_gate_threshold": (0.0, 1.0),
    "masa.head_loss_weight": (0.0, None),
    "data.prompt_batch_size": (1, None),
    "optimizer.lr": (0.0, None),
    "optimizer.weight_decay": (0.0, None),
    "optimizer.clip_grad": (0.0, None),
    "optimizer.warmup_steps": (0, None),
    "trainer.steps": (1, None),
    "trainer.max_consecutive_nonfinite": (1, None),
    "trainer.eval_n": (1, None),
    "trainer.eval_meta_n": (0, None),
    "trainer.eval_temperature": (0.0, None),
    "trainer.eval_subset": (0, None),
    "checkpoint.save_every": (0, None),
    "checkpoint.keep_last": (1, None),
    "logging.log_every": (1, None),
}


def _get(cfg: ExperimentConfig, dotted: str) -> Any:
    obj: Any = cfg
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def _fail(name: str, value: Any, why: str) -> None:
    raise ConfigError(f"field '{name}' = {value!r}: {why}")


def _check_predictor(masa: MASAConfig) -> None:
    """`masa.predictor` is a registered name (did-you-mean otherwise) or imports a Predictor."""
    from masa_megatron.masa.predictors import resolve_predictor
    from masa_megatron.registry import RegistryError
    try:
        resolve_predictor(masa)
        return
    except (RegistryError, TypeError) as err:
        why = str(err)
    _fail("masa.predictor", masa.predictor, why)


def sequences_per_step(cfg: ExperimentConfig) -> int:
    """The most sequences one RL step trains: problems x (G + M, or G in grpo mode)."""
    per_problem = cfg.grpo.group_size + (cfg.masa.meta_group_size if cfg.masa.mode != "grpo"
                                         else 0)
    return cfg.data.prompt_batch_size * per_problem


def optimizer_steps_per_rl_step(cfg: ExperimentConfig) -> int:
    """Optimizer steps of a full RL step (fewer when problems are gated or dropped)."""
    g = cfg.grpo
    minis = (-(-sequences_per_step(cfg) // g.mini_batch_sequences) if g.mini_batch_sequences
             else g.mini_batches_per_step)
    return minis * g.ppo_epochs


def _check_sequence_mini_batches(cfg: ExperimentConfig) -> None:
    g = cfg.grpo
    if not g.mini_batch_sequences:
        return
    if g.mini_batches_per_step != 1:
        _fail("grpo.mini_batch_sequences", g.mini_batch_sequences,
              f"set it or grpo.mini_batches_per_step (= {g.mini_batches_per_step}), not both")
    if g.old_logprobs == "policy" and optimizer_steps_per_rl_step(cfg) > 1:
        _fail("grpo.old_logprobs", "policy", f"needs one optimizer step per RL step, but "
              f"{sequences_per_step(cfg)} sequences per step exceed grpo.mini_batch_sequences="
              f"{g.mini_batch_sequences}")
    p = cfg.parallel
    if p.world_size:
        dp = p.world_size // (p.tensor_model_parallel_size * p.pipeline_model_parallel_size
                              * p.context_parallel_size)
        if dp and g.mini_batch_sequences % dp:
            _fail("grpo.mini_batch_sequences", g.mini_batch_sequences,
                  f"not divisible by the data-parallel size {dp}")


def validate_static(cfg: ExperimentConfig) -> None:
    """Checks that need nothing but the config. Raises ConfigError on the first failure."""
    for name, choices in _CHOICES.items():
        value = _get(cfg, name)
        if value not in choices:
            close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            _fail(name, value, f"must be one of {', '.join(map(str, choices))}{hint}")
    for name, (low, high) in _RANGES.items():
        value = _get(cfg, name)
        if low is not None and value < low:
            _fail(name, value, f"must be >= {low}")
        if high is not None and value > high:
            _fail(name, value, f"must be <= {high}")
    _check_predictor(cfg.masa)
    p = cfg.parallel
    if cfg.grpo.group_size < 2:
        _fail("grpo.group_size", cfg.grpo.group_size, "GRPO needs at least 2 rollouts per group")
    if cfg.masa.mode != "grpo" and cfg.masa.meta_group_size < 2:
        _fail("masa.meta_group_size", cfg.masa.meta_group_size,
              "MASA meta rollouts are GRPO groups too and need at least 2")
    if cfg.grpo.old_logprobs == "policy" and (cfg.grpo.ppo_epochs, cfg.grpo.mini_batches_per_step) \
            != (1, 1):
        _fail("grpo.old_logprobs", "policy", "needs grpo.ppo_epochs = 1 and "
              "grpo.mini_batches_per_step = 1 (later optimizer steps need the pre-update log-probs)")
    _check_sequence_mini_batches(cfg)
    if cfg.grpo.kl_coef != 0:
        _fail("grpo.kl_coef", cfg.grpo.kl_coef, "a KL penalty needs a reference model's "
              "log-probs, and no reference model is wired into the loop (the paper's recipe "
              "uses none); set it to 0")
    if cfg.grpo.dual_clip is not None and cfg.grpo.dual_clip <= 1.0:
        _fail("grpo.dual_clip", cfg.grpo.dual_clip, "dual clip constant must be > 1")
    if cfg.grpo.tis_cap is not None and cfg.grpo.tis_cap <= 0:
        _fail("grpo.tis_cap", cfg.grpo.tis_cap, "must be > 0")
    if cfg.trainer.ratio_tolerance is not None and cfg.trainer.ratio_tolerance <= 0:
        _fail("trainer.ratio_tolerance", cfg.trainer.ratio_tolerance, "must be > 0")
    if cfg.optimizer.min_lr > cfg.optimizer.lr:
        _fail("optimizer.min_lr", cfg.optimizer.min_lr, f"exceeds optimizer.lr={cfg.optimizer.lr}")
    model_parallel = p.tensor_model_parallel_size * p.pipeline_model_parallel_size \
        * p.context_parallel_size
    if p.world_size is not None:
        if p.world_size < 1:
            _fail("parallel.world_size", p.world_size, "must be >= 1")
        if p.world_size % model_parallel:
            _fail("parallel.world_size", p.world_size,
                  f"not divisible by TP x PP x CP = {p.tensor_model_parallel_size} x "
                  f"{p.pipeline_model_parallel_size} x {p.context_parallel_size} = {model_parallel}")
    if p.sequence_parallel and p.tensor_model_parallel_size == 1:
        _fail("parallel.sequence_parallel", True, "needs tensor_model_parallel_size > 1")
    if p.sequence_parallel and cfg.rollout.engine == "embedded":
        _fail("parallel.sequence_parallel", True, "the embedded engine cannot generate with a "
              "sequence-parallel model; use rollout.engine=sglang")
    if cfg.model.fp8 is not None and cfg.model.layer_spec == "local":
        _fail("model.fp8", cfg.model.fp8, "FP8 needs the Transformer Engine layer spec "
              "(model.layer_spec=te or auto)")
    if cfg.model.fp8_param and cfg.model.fp8 is None:
        _fail("model.fp8_param", True, "needs model.fp8 set")
    if cfg.rollout.weight_sync != "disk" and cfg.rollout.engine == "embedded":
        _fail("rollout.weight_sync", cfg.rollout.weight_sync,
              "the embedded engine shares the trainer's weights; only 'disk' (a no-op) applies")
    if cfg.rollout.colocate and cfg.rollout.engine == "embedded":
        _fail("rollout.colocate", True, "the embedded engine already shares the trainer's "
              "weights; colocation hands the GPUs to SGLang servers (rollout.engine=sglang)")
    _check_cuda_graphs(cfg)
    if cfg.rollout.offload_train_state and not cfg.rollout.colocate:
        _fail("rollout.offload_train_state", True, "the trainer's state leaves the GPUs only "
              "for colocated servers: set rollout.colocate")
    if cfg.trainer.eval_top_p is not None and not 0 < cfg.trainer.eval_top_p <= 1:
        _fail("trainer.eval_top_p", cfg.trainer.eval_top_p, "must be in (0, 1]")
    if cfg.trainer.eval_every and not cfg.data.eval_files:
        _fail("trainer.eval_every", cfg.trainer.eval_every, "set data.eval_files to evaluate")
    for i, path in enumerate(cfg.data.train_files):
        if not str(path).strip():
            _fail(f"data.train_files[{i}]", path, "empty path")
    _check_sglang_extra_args(cfg.rollout)


def _check_cuda_graphs(cfg: ExperimentConfig) -> None:
    if not cfg.rollout.cuda_graphs:
        return
    p = cfg.parallel
    if cfg.rollout.engine != "embedded":
        _fail("rollout.cuda_graphs", True, f"only the embedded engine captures graphs; "
              f"rollout.engine={cfg.rollout.engine!r} (SGLang captures its own: pass "
              "--cuda-graph-max-bs in rollout.sglang_extra_args)")
    if (p.tensor_model_parallel_size, p.pipeline_model_parallel_size) != (1, 1):
        _fail("rollout.cuda_graphs", True, "needs tensor_model_parallel_size = "
              "pipeline_model_parallel_size = 1 (collectives and pipeline sends are not "
              f"captured); got TP={p.tensor_model_parallel_size}, "
              f"PP={p.pipeline_model_parallel_size}")


# launch_server flags that other fields or the launch set (see sglang_launch.server_flags)
_MANAGED_SGLANG_FLAGS = {
    "--model-path": "model.hf_path", "--tp-size": "rollout.sglang_tp",
    "--tp": "rollout.sglang_tp", "--mem-fraction-static": "rollout.sglang_mem_fraction",
    "--random-seed": "rollout.seed", "--enable-memory-saver": "rollout.colocate",
    "--enable-deterministic-inference": "rollout.sglang_deterministic",
    "--host": "the launch", "--port": "the launch", "--base-gpu-id": "the launch",
    "--skip-tokenizer-init": "the trainer (always on)"}


def _check_sglang_extra_args(rollout: RolloutConfig) -> None:
    for i, arg in enumerate(rollout.sglang_extra_args):
        flag = str(arg).split("=", 1)[0]
        if flag in _MANAGED_SGLANG_FLAGS:
            _fail(f"rollout.sglang_extra_args[{i}]", arg,
                  f"{flag} is set from {_MANAGED_SGLANG_FLAGS[flag]}; change that instead")


def validate_environment(cfg: ExperimentConfig, world_size: Optional[int] = None) -> None:
    """Checks that only the job's machine can answer. Call at job start."""
    import torch

    spec = cfg.model.layer_spec
    has_te = importlib.util.find_spec("transformer_engine") is not None
    if spec == "te" and not has_te:
        _fail("model.layer_spec", spec, "Transformer Engine is not installed "
              "(pip install 'masa-megatron[gpu]' or use an NGC PyTorch container)")
    if cfg.model.fp8 is not None:
        if not torch.cuda.is_available():
            _fail("model.fp8", cfg.model.fp8, "FP8 needs CUDA; none is available here")
        if not has_te:
            _fail("model.fp8", cfg.model.fp8, "FP8 needs Transformer Engine, not installed")
    if cfg.rollout.engine == "sglang" and not cfg.rollout.sglang_urls:
        python = cfg.rollout.sglang_python
        if python and not os.access(python, os.X_OK):
            _fail("rollout.sglang_python", python, "no such executable")
        package = cfg.rollout.sglang_server_module.split(".")[0]
        if not python and importlib.util.find_spec(package) is None:
            _fail("rollout.engine", "sglang", f"{package} (rollout.sglang_server_module="
                  f"{cfg.rollout.sglang_server_module}) is not installed here, no "
                  "rollout.sglang_python names an interpreter that has it, and no "
                  "rollout.sglang_urls were given to attach to")
    if world_size is not None:
        p = cfg.parallel
        mp = p.tensor_model_parallel_size * p.pipeline_model_parallel_size * p.context_parallel_size
        if world_size % mp:
            _fail("parallel.tensor_model_parallel_size", p.tensor_model_parallel_size,
                  f"TP x PP x CP = {mp} does not divide the world size {world_size}")
        if cfg.grpo.mini_batch_sequences % (world_size // mp):
            _fail("grpo.mini_batch_sequences", cfg.grpo.mini_batch_sequences,
                  f"not divisible by the data-parallel size {world_size // mp}")
        if torch.cuda.is_available() and torch.cuda.device_count() < 1:
            _fail("parallel", world_size, "no CUDA devices visible")
    model_path = Path(cfg.model.hf_path)
    if not (model_path / "config.json").is_file():
        _fail("model.hf_path", cfg.model.hf_path, "no config.json in that folder")
    from masa_megatron.model.hf_config import (decoder_shape, parallel_layout_problem,
                                               read_hf_config, recompute_layout_problem)
    p = cfg.parallel
    shape = decoder_shape(read_hf_config(model_path))
    problem = parallel_layout_problem(shape, p.tensor_model_parallel_size,
                                      p.pipeline_model_parallel_size)
    if problem is not None:
        name = f"{problem[0]}_model_parallel_size"
        _fail(f"parallel.{name}", getattr(p, name), f"{model_path / 'config.json'}: {problem[1]}")
    why = recompute_layout_problem(shape, p.pipeline_model_parallel_size, cfg.model)
    if why is not None:
        _fail("model.recompute_num_layers", cfg.model.recompute_num_layers,
              f"{model_path / 'config.json'}: {why}")
    for i, f in enumerate(cfg.data.train_files):
        if not Path(f).is_file():
            _fail(f"data.train_files[{i}]", f, "file does not exist")
