"""Qwen3 Base recipes: {1.7B, 4B, 8B, 14B} x {grpo, masa, masa_efficient} x {bf16, fp8, paper}.

One table row per model size (`LAYOUTS`) and one factory (`qwen3_recipe`) make the grid; recipe
names are `qwen3_<size>_<method>_<scale>[_fp8]`, e.g. `qwen3_8b_masa_efficient_1n8g`, where the
scale counts all nodes of 8 x 80 GB GPUs (training plus rollout), and
`qwen3_<size>_<method>_paper_<scale>` for the paper reproduction (`apply_paper_choices`: the
authors' released code's batching, parser, notion rules and in-loop validation, no audit; M = 8
as in the paper, where the released script used 16). docs/reproducing.md lists every choice.

Hyperparameters follow spec/MASA.md section 7: 128 problems per step, G = 16 solution and M = 8
meta rollouts, AdamW lr 1e-6, weight decay 0.1, 20 warm-up steps then constant, grad clip 1.0,
prompts up to 2048 and responses up to 8192 tokens, temperature 1.0, top-p 1.0, no KL, 314 steps
(one DeepScaleR epoch).

Each layout was chosen with `masa_megatron.memory_estimator` (its peak phase is in `masa recipes`
and checked < 80 GiB by tests/test_memory_estimator.py; docs/launching.md's table is
`masa recipes --markdown`):
- 1.7B: one node, SGLang colocated (one engine per GPU), TP 1; logits (151,936-token
  vocabulary) are large, so 12,288 tokens per micro-batch; trainer state offloaded to host while
  SGLang generates (without it the trainer's state and its allocator cache, which is emptied only
  when offloading, sit beside SGLang's pool: over 80 GiB by the phase estimate).
- 4B: one node, colocated, TP 2 with sequence parallelism, trainer state offloaded to host
  while SGLang (TP 2) generates.
- 8B: one node, colocated, TP 4 (activations of a 16k-token micro-batch), offload while
  generating, SGLang TP 2.
- 14B: two nodes, disaggregated: one node trains (TP 8), one node runs four SGLang servers
  (TP 2); weights move by NCCL broadcast.
Activation recomputation stays off (model.recompute = none): every layout fits without it.
Megatron's full recomputation (model.recompute = full, uniform or block) is there for longer
micro-batches; the estimator counts it (selective recomputation saves nothing with flash
attention).
The fp8 variants keep the layout and add FP8 compute (Transformer Engine, "hybrid" = E4M3
forward / E5M2 backward, tensor-wise current scaling) and, since the rollouts stay bf16, truncated
importance sampling against the rollout log-probs (grpo.tis_cap = FP8_TIS_CAP).
The paper variants are bf16 only, as the paper's runs were.

Placeholders to override: `model.hf_path` (default `/models/Qwen3-<size>-Base`, a Hugging Face
checkpoint folder), `data.train_files` (default `/data/deepscaler/train.parquet`) and, in the
paper variants, `data.eval_files` (default `/data/math/test.parquet`, the MATH test set).
"""
from __future__ import annotations

from dataclasses import dataclass

from masa_megatron.config import ExperimentConfig
from masa_megatron.memory_estimator import ModelArch

MODELS_ROOT = "/models"
TRAIN_FILES = ["/data/deepscaler/train.parquet"]
MATH_TEST_FILES = ["/data/math/test.parquet"]
PAPER_EVAL_SUBSET = 500     # in-loop validation sample; 0 = the whole MATH test set (5,000)
METHODS = ("grpo", "masa", "masa_efficient")
GPUS_PER_NODE = 8
# FP8 training against bf16 rollouts: tokens are weighted by min(exp(old_logp - rollout_logp), C)
# (truncated importance sampling, algo/losses.py); C = 2 as Yao et al. 2025 ("Your Efficient RL
# Framework Secretly Brings You Off-Policy RL Training") and verl's default.
FP8_TIS_CAP = 2.0

# Architecture numbers from each model's Hugging Face config.json (Qwen/Qwen3-1.7B-Base,
# Qwen/Qwen3-4B-Base, Qwen/Qwen3-8B-Base, Qwen/Qwen3-14B-Base share them with the post-trained
# Qwen/Qwen3-<size> repos), cross-checked against Megatron-Bridge's Qwen3 providers
# (NVIDIA-NeMo/Megatron-Bridge, src/megatron/bridge/models/qwen/qwen_provider.py:
# Qwen3ModelProvider1P7B/4B/8B/14B). All: head_dim 128, 8 KV heads, vocab 151,936.
ARCHS = {
    "1p7b": ModelArch("Qwen3-1.7B-Base", hidden=2048, layers=28, heads=16, kv_heads=8,
                      head_dim=128, intermediate=6144, vocab=151936, tie_word_embeddings=True),
    "4b": ModelArch("Qwen3-4B-Base", hidden=2560, layers=36, heads=32, kv_heads=8,
                    head_dim=128, intermediate=9728, vocab=151936, tie_word_embeddings=True),
    "8b": ModelArch("Qwen3-8B-Base", hidden=4096, layers=36, heads=32, kv_heads=8,
                    head_dim=128, intermediate=12288, vocab=151936, tie_word_embeddings=False),
    "14b": ModelArch("Qwen3-14B-Base", hidden=5120, layers=40, heads=40, kv_heads=8,
                     head_dim=128, intermediate=17408, vocab=151936, tie_word_embeddings=False),
}


@dataclass(frozen=True)
class Layout:
    """Parallelism, rollout placement and memory settings of one model size."""
    train_nodes: int
    tp: int
    micro_batch_tokens: int
    colocate: bool
    sglang_tp: int
    sglang_mem_fraction: float
    offload_train_state: bool
    rollout_nodes: int = 0
    pp: int = 1
    memory_change: str = ""      # what was raised to fit 80 GiB by the phase estimate (docs table)

    @property
    def scale(self) -> str:
        return f"{self.train_nodes + self.rollout_nodes}n{GPUS_PER_NODE}g"

    @property
    def sglang_num_servers(self) -> int:
        gpus = (self.train_nodes if self.colocate else self.rollout_nodes) * GPUS_PER_NODE
        return gpus // self.sglang_tp


LAYOUTS = {
    "1p7b": Layout(train_nodes=1, tp=1, micro_batch_tokens=12288, colocate=True, sglang_tp=1,
                   sglang_mem_fraction=0.5, offload_train_state=True,
                   memory_change="offload on (off: the trainer's state and allocator cache "
                                 "stayed beside SGLang while generating: over 80 GiB)"),
    "4b": Layout(train_nodes=1, tp=2, micro_batch_tokens=16384, colocate=True, sglang_tp=2,
                 sglang_mem_fraction=0.6, offload_train_state=True),
    "8b": Layout(train_nodes=1, tp=4, micro_batch_tokens=16384, colocate=True, sglang_tp=2,
                 sglang_mem_fraction=0.6, offload_train_state=True),
    "14b": Layout(train_nodes=1, tp=8, micro_batch_tokens=16384, colocate=False, sglang_tp=2,
                  sglang_mem_fraction=0.85, offload_train_state=False, rollout_nodes=1),
}


def recipe_name(size: str, method: str, fp8: bool, paper: bool = False) -> str:
    return (f"qwen3_{size}_{method}{'_paper' if paper else ''}_{LAYOUTS[size].scale}"
            f"{'_fp8' if fp8 else ''}")


def apply_reference_hyperparameters(cfg: ExperimentConfig) -> ExperimentConfig:
    """spec/MASA.md section 7, written out so that a change of defaults cannot move them."""
    cfg.data.prompt_batch_size = 128
    cfg.grpo.group_size, cfg.masa.meta_group_size = 16, 8
    cfg.grpo.kl_coef = 0.0
    o = cfg.optimizer
    o.name, o.lr, o.weight_decay, o.clip_grad = "adam", 1e-6, 0.1, 1.0
    o.warmup_steps, o.schedule = 20, "constant"
    r = cfg.rollout
    r.max_prompt_length, r.max_response_length, r.temperature, r.top_p = 2048, 8192, 1.0, 1.0
    cfg.trainer.steps = 314
    return cfg


def apply_paper_choices(cfg: ExperimentConfig) -> ExperimentConfig:
    """Every behaviour of the authors' released code where it differs from the spec's defaults
    (docs/reproducing.md has the table with sources)."""
    g = cfg.grpo
    g.mini_batch_sequences = 128 * g.group_size       # verl: 128 prompts x n per optimizer step
    g.balance_sequences = True                        # verl's balance_batch across DP ranks
    m = cfg.masa
    m.parser, m.notion_rules, m.audit_fraction = "reference", "reference", 0.0
    cfg.data.eval_files = list(MATH_TEST_FILES)       # in-loop validation as the reference ran it
    t = cfg.trainer
    t.eval_every, t.eval_n, t.eval_meta_n = 5, 1, 0
    t.eval_temperature, t.eval_top_p, t.eval_subset = 1.0, 0.7, PAPER_EVAL_SUBSET
    return cfg


def qwen3_recipe(size: str, method: str, fp8: bool = False, paper: bool = False
                 ) -> ExperimentConfig:
    """The recipe for one Qwen3 Base size, training method and precision; `paper` adds the
    released code's choices (`apply_paper_choices`)."""
    layout, arch = LAYOUTS[size], ARCHS[size]
    name = recipe_name(size, method, fp8, paper)
    cfg = apply_reference_hyperparameters(ExperimentConfig(name=name))
    cfg.masa.mode = method
    cfg.data.train_files = list(TRAIN_FILES)

    m = cfg.model
    m.hf_path = f"{MODELS_ROOT}/{arch.name}"
    m.dtype, m.layer_spec, m.recompute = "bf16", "te", "none"
    if fp8:
        m.fp8, m.fp8_recipe = "hybrid", "tensorwise"
        cfg.grpo.tis_cap = FP8_TIS_CAP

    p = cfg.parallel
    p.tensor_model_parallel_size, p.pipeline_model_parallel_size = layout.tp, layout.pp
    p.sequence_parallel = layout.tp > 1
    p.use_distributed_optimizer = True
    p.world_size = layout.train_nodes * GPUS_PER_NODE

    r = cfg.rollout
    r.engine, r.colocate = "sglang", layout.colocate
    r.weight_sync = "tensor" if layout.colocate else "broadcast"
    r.sglang_tp, r.sglang_num_servers = layout.sglang_tp, layout.sglang_num_servers
    r.sglang_mem_fraction = layout.sglang_mem_fraction
    r.offload_train_state = layout.offload_train_state
    r.sglang_router = not layout.colocate

    cfg.grpo.micro_batch_tokens = layout.micro_batch_tokens
    cfg.trainer.output_dir = f"runs/{name}"
    cfg.logging.tensorboard = True
    return apply_paper_choices(cfg) if paper else cfg


def qwen3_recipes() -> dict[str, tuple]:
    """name -> (factory arguments, architecture, layout) for the whole grid."""
    variants = ((False, False), (True, False), (False, True))    # (fp8, paper)
    return {recipe_name(size, method, fp8, paper): ((size, method, fp8, paper), ARCHS[size],
                                                    LAYOUTS[size])
            for size in LAYOUTS for method in METHODS for fp8, paper in variants}
