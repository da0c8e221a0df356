"""What a rehearsal shrinks: the model, the batch and the lengths; nothing that shapes the run.

Kept from the recipe: TP, PP, SP, the world size (so DP), colocation, the weight-sync strategy,
offload, SGLang's TP and server count, the method, checkpointing, the loss and its options.

The tiny model (`tiny_shape`) is of the real model's family and keeps
- the GQA ratio heads / kv_heads; kv_heads a multiple of lcm(TP, SGLang TP) (at least 2);
- heads x head_dim == hidden exactly where the real model has it (Qwen3 1.7B, 8B), and unequal
  otherwise, at the real ratio (4B: 4096 vs 2560, so 64 vs 40 here);
- tied or untied embeddings as the real one;
- a tokenizer smaller than the model's vocabulary, itself smaller than Megatron's padded one
  (the real Qwen3: 151,669 < 151,936 <= padded), so ids the tokenizer cannot produce exist and
  can be sampled;
- layers a multiple of PP (2 per stage).

Changed because a CPU cannot do otherwise (and said so in the rehearsal's output,
`CPU_CHANGES`): fp32 instead of bf16 (the stand-in servers run the fp32 embedded engine, which
is what makes a 1e-4 log-prob gap a meaningful bound), Megatron's local layer spec instead of
Transformer Engine's, no FP8 (the `_fp8` recipes keep their truncated importance sampling).
Also `grpo.shared_prefix=false`: the recipe's GPU run trains the padded layout
(train/shared_prefix.py is CPU-only for now), so the rehearsal does too.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from masa_megatron.config import ExperimentConfig
from masa_megatron.memory_estimator import ModelArch
from masa_megatron.model.builder import padded_vocab_size

HEAD_DIM = 8
LAYERS_PER_STAGE = 2
RESPONSE_TOKENS = 16          # rollout.max_response_length
GROUP_SIZE = 4                # grpo.group_size (G)
META_GROUP_SIZE = 2           # masa.meta_group_size (M), the least MASA accepts
PROBLEMS_PER_DP_RANK = 1      # data.prompt_batch_size = this x DP
EVAL_SUBSET = 4               # trainer.eval_subset when the recipe evaluates in the loop
EXTRA_MODEL_IDS = 19          # model vocabulary = tokenizer + this (ids no text encodes to)
CPU_CHANGES = ("model.dtype=fp32", "model.layer_spec=local", "model.fp8=null",
               "grpo.shared_prefix=false")


@dataclass(frozen=True)
class TinyShape:
    """The tiny model's config.json numbers (vocab_size is set once the tokenizer exists)."""
    family: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    tied: bool

    def hf_kwargs(self, vocab_size: int, max_positions: int) -> dict:
        """Keyword arguments of model.tiny.make_tiny_hf_model."""
        return dict(vocab_size=vocab_size, hidden_size=self.hidden,
                    num_hidden_layers=self.layers, num_attention_heads=self.heads,
                    num_key_value_heads=self.kv_heads, head_dim=self.head_dim,
                    intermediate_size=self.intermediate, tied=self.tied,
                    max_position_embeddings=max_positions)


def family_of(arch: ModelArch) -> str:
    """"qwen3" from "Qwen3-8B-Base" (the families model.tiny can make)."""
    name = arch.name.lower()
    for family in ("qwen3", "qwen2", "llama"):
        if name.startswith(family):
            return family
    raise ValueError(f"no tiny model family for {arch.name!r} (known: qwen3, qwen2, llama)")


def _round_up(value: float, multiple: int) -> int:
    return max(multiple, int(math.ceil(value / multiple)) * multiple)


def tiny_shape(arch: ModelArch, cfg: ExperimentConfig) -> TinyShape:
    """The tiny stand-in of `arch` under the recipe's layout (see the module docstring)."""
    tp, pp = cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size
    serving_tp = cfg.rollout.sglang_tp if cfg.rollout.engine == "sglang" else 1
    if arch.heads % arch.kv_heads:
        raise ValueError(f"{arch.name}: {arch.heads} heads are not a multiple of "
                         f"{arch.kv_heads} KV heads")
    ratio = arch.heads // arch.kv_heads
    unit = math.lcm(tp, serving_tp)
    kv_heads = _round_up(2, unit)
    heads = kv_heads * ratio
    q_width = heads * HEAD_DIM
    real_q_width = arch.heads * arch.head_dim
    if real_q_width == arch.hidden:
        hidden = q_width
    else:
        hidden = _round_up(q_width * arch.hidden / real_q_width, 8)
        if hidden == q_width:
            hidden += 8
    intermediate = _round_up(hidden * arch.intermediate / arch.hidden, 8 * tp)
    return TinyShape(family_of(arch), hidden, LAYERS_PER_STAGE * pp, heads, kv_heads, HEAD_DIM,
                     intermediate, arch.tie_word_embeddings)


def model_vocab_size(tokenizer_size: int, cfg: ExperimentConfig) -> int:
    """tokenizer < model vocabulary < Megatron's padded vocabulary at the recipe's TP."""
    divisible, tp = cfg.model.make_vocab_size_divisible_by, cfg.parallel.tensor_model_parallel_size
    vocab = tokenizer_size + EXTRA_MODEL_IDS
    while padded_vocab_size(vocab, divisible, tp) == vocab:
        vocab += 1
    return vocab


def data_parallel_size(cfg: ExperimentConfig) -> int:
    p = cfg.parallel
    mp = p.tensor_model_parallel_size * p.pipeline_model_parallel_size * p.context_parallel_size
    return (p.world_size or mp) // mp


def shrink_overrides(cfg: ExperimentConfig, *, prompt_tokens: int, steps: int) -> list[str]:
    """Dotted overrides that shrink the recipe `cfg` to a rehearsal of `steps` RL steps whose
    prompts fit `prompt_tokens` (batch, groups, lengths, step counts; CPU_CHANGES)."""
    dp = data_parallel_size(cfg)
    problems = PROBLEMS_PER_DP_RANK * dp
    longest = prompt_tokens + RESPONSE_TOKENS
    real_longest = cfg.rollout.max_prompt_length + cfg.rollout.max_response_length
    # micro-batches hold as many longest sequences as the recipe's do
    micro_tokens = max(longest, cfg.grpo.micro_batch_tokens * longest // real_longest)
    out = [*CPU_CHANGES,
           f"data.prompt_batch_size={problems}", f"grpo.group_size={GROUP_SIZE}",
           f"rollout.max_prompt_length={prompt_tokens}",
           f"rollout.max_response_length={RESPONSE_TOKENS}",
           f"grpo.micro_batch_tokens={micro_tokens}",
           f"trainer.steps={steps}", f"checkpoint.save_every={steps}",
           "optimizer.warmup_steps=0", "logging.tensorboard=false", "logging.progress=false"]
    if cfg.masa.mode != "grpo":
        out.append(f"masa.meta_group_size={META_GROUP_SIZE}")
    if cfg.masa.mode == "masa_efficient":   # k inside the rehearsal: step 0 plain, then gated
        out.append("masa.efficient_start_step=1")
    if cfg.grpo.mini_batch_sequences:       # the same mini-batches per RL step as the recipe
        per_problem = cfg.grpo.mini_batch_sequences / (cfg.data.prompt_batch_size
                                                       * cfg.grpo.group_size)
        minis = max(dp, int(round(per_problem * problems * GROUP_SIZE)) // dp * dp)
        out.append(f"grpo.mini_batch_sequences={minis}")
    if cfg.trainer.eval_every:
        out += [f"trainer.eval_every={steps}", f"trainer.eval_subset={EVAL_SUBSET}"]
    return out
