"""Per-GPU memory estimate of a training layout, used to choose and check the recipes' settings.

`estimate(cfg, arch)` returns GiB by component plus `total`; `format_estimate` prints it. All
numbers are for the busiest rank (an upper bound: the first pipeline stage's weights, activations
and the last stage's logits are added together). Notation: h hidden, L layers, f FFN size,
hq = heads * head_dim, hkv = kv_heads * head_dim, V vocab, t TP, p PP, c CP, d DP.

Weights, gradients, optimizer (Megatron Core "Distributed Optimizer" guide, bytes per parameter:
bf16 params + fp32 grads = 6 + 12/d with the distributed optimizer, 18 without; fp32 params and
grads = 8 + 8/d, 16 without)::

    params_per_rank = (ceil(L / p) * layer_params + V * h * embedding_copies) / t
    weights   = 2 (bf16) or 4 (fp32) bytes per param; FP8 adds 2 bytes per param (TE's cached
                FP8 weight and its transpose)
    gradients = 4 bytes per param (Megatron accumulates bf16 grads in fp32 main_grad buffers)
    optimizer = (fp32 master if params are not fp32: 4) + Adam m and v (8), divided by d when
                parallel.use_distributed_optimizer and d > 1

Activations (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer
Models": s*b*h*(34 + 5*a*s/h) bytes per layer for a GPT layer without recomputation). Re-derived
here for a Qwen3 layer (GQA, QK-norm, SwiGLU, no dropout) with flash attention, which stores no
s x s score matrix, so the 5*a*s/h term drops. Bytes per token per layer in bf16::

    act = 8h / t_sp                                       two norm inputs + QKV and FC1 inputs
        + (2(hq + 2hkv) + 2hq + 2(hq + hkv) + 6f) / t    Q,K,V; attention out; QK-norm inputs;
                                                          FC1 out (gate, up) + SwiGLU out
    with t_sp = t under sequence parallelism, else 1    (Qwen3-8B at t=1: 33.5h, cf. 34h)

The MLP's 6f is Megatron's fused SwiGLU, which the model builder turns on with CUDA (it keeps
the FC1 output only; the unfused GLU also keeps silu(gate) and a copy of the up half, 10f);
benchmarks/activation_memory.py measures the MLP share equal to the formula at TP 1, 2 and
2 with SP on the local spec (the norms there are torch's CPU RMSNorm, which keeps fp32 copies).

Sequence parallelism (parallel.sequence_parallel, applied by the model builder) shards the
norm/residual activations over TP: the 8h/t_sp term. Recomputation (model.recompute, see
masa_megatron/model/builder.py): "selective" recomputes core attention, which with flash/fused
attention stores no s x s scores, so it saves nothing here and the estimate ignores it; "full"
keeps only the bf16 input of each checkpointed unit (2h / t_sp bytes per token) and rebuilds
one unit's activations at a time in backward. With n = model.recompute_num_layers::

    uniform : ceil(L / n) * 2h / t_sp  +  n * act        (groups of n layers, one rebuilt)
    block   : n * 2h / t_sp  +  (L - n) * act  +  act    (the first n layers one by one)

Tokens per rank = grpo.micro_batch_tokens / c. Under 1F1B the first stage holds p micro-batches
of its L/p layers (Korthikanti section 4.2.3), so stored activations ~ L layers of one
micro-batch, whatever p (the recompute formulas above take L likewise).

Logits (last stage, one micro-batch): tokens * V/t * (2 + 4) bytes plus ENTROPY_TEMPORARIES_GIB,
as measured by benchmarks/vocab_parallel_memory.py (6.00 bytes per logit element in both
passes): the forward holds the bf16 output of the output layer and one fp32 copy, which
Megatron's vocab-parallel cross entropy turns into the softmax in place and keeps for backward;
the entropy of the old-log-prob pass reads it in chunks (its temporaries: the fixed term); the
backward holds the fp32 gradient and its bf16 copy, after the bf16 logits are freed.

SGLang on the same GPUs (rollout.colocate): its static pool (weights + KV cache) takes
sglang_mem_fraction of the GPU during generation and is released while training (torch memory
saver keeps ~SGLANG_RELEASED_GIB: CUDA graphs, runtime). Trainer weights/grads/optimizer stay
resident during generation unless rollout.offload_train_state moves them to host, so::

    train phase    = trainer static + activations + logits + SGLANG_RELEASED_GIB
    generate phase = sglang_mem_fraction * GPU + (0 if offload_train_state else trainer static)
    total          = max(train phase, generate phase), each phase including the overhead

Overhead: CUDA context and kernels (~1 GiB), NCCL communicators and buffers (~1.5 GiB) and
allocator fragmentation (10% of activations + logits).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from masa_megatron.errors import UserError

GIB = 1024 ** 3
GPU_MEMORY_GIB = 80.0                 # what the recipes are sized for (H100/A100 80 GB)
CUDA_CONTEXT_GIB = 1.0
NCCL_BUFFERS_GIB = 1.5
FRAGMENTATION = 0.10                  # of the dynamic (activation + logit) memory
SGLANG_RELEASED_GIB = 2.0             # what a paused SGLang engine keeps (CUDA graphs, runtime)
ENTROPY_TEMPORARIES_GIB = 0.2         # chunked entropy (vocab_parallel.py): 198 MiB measured


@dataclass(frozen=True)
class ModelArch:
    """The numbers of a Hugging Face decoder config.json that decide memory."""
    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tie_word_embeddings: bool

    @classmethod
    def from_hf_config(cls, path: str | Path) -> ModelArch:
        """Read a folder's (or file's) config.json; UserError names a missing key."""
        path = Path(path)
        file = path / "config.json" if path.is_dir() else path
        try:
            raw = json.loads(file.read_text())
            heads = raw["num_attention_heads"]
            return cls(name=raw.get("_name_or_path") or file.parent.name,
                       hidden=raw["hidden_size"], layers=raw["num_hidden_layers"], heads=heads,
                       kv_heads=raw.get("num_key_value_heads", heads),
                       head_dim=raw.get("head_dim") or raw["hidden_size"] // heads,
                       intermediate=raw["intermediate_size"], vocab=raw["vocab_size"],
                       tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)))
        except KeyError as err:
            raise UserError(f"{file}: no {err.args[0]!r}; not a decoder config.json") from None
        except (OSError, ValueError) as err:
            raise UserError(f"{file}: cannot read it as JSON ({err})") from None

    @property
    def q_width(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def layer_params(self) -> int:
        h, hq, hkv = self.hidden, self.q_width, self.kv_width
        attention = h * hq + 2 * h * hkv + hq * h + 2 * self.head_dim   # q, k, v, o, q/k norms
        return attention + 3 * h * self.intermediate + 2 * h            # gate, up, down; 2 norms

    @property
    def total_params(self) -> int:
        embeddings = self.vocab * self.hidden * (1 if self.tie_word_embeddings else 2)
        return self.layers * self.layer_params + embeddings + self.hidden

    def kv_cache_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        return 2 * self.layers * self.kv_width * dtype_bytes


def _activation_bytes_per_token_layer(arch: ModelArch, tp: int, sequence_parallel: bool) -> float:
    h, hq, hkv, f = arch.hidden, arch.q_width, arch.kv_width, arch.intermediate
    replicated = 8 * h / (tp if sequence_parallel else 1)
    sharded = (2 * (hq + 2 * hkv) + 2 * hq + 2 * (hq + hkv) + 6 * f) / tp
    return replicated + sharded


def _activation_bytes_per_token(arch: ModelArch, model, tp: int, sequence_parallel: bool) -> float:
    """Stored activations of all L layers per token, with model.recompute (module docstring)."""
    act = _activation_bytes_per_token_layer(arch, tp, sequence_parallel)
    layers = arch.layers
    if model.recompute != "full":
        return layers * act
    unit_input = 2 * arch.hidden / (tp if sequence_parallel else 1)
    n = min(model.recompute_num_layers, layers)
    if model.recompute_method == "uniform":
        return math.ceil(layers / n) * unit_input + n * act
    return n * unit_input + (layers - n) * act + act


def estimate(cfg, arch: ModelArch, gpu_memory_gib: float = GPU_MEMORY_GIB) -> dict[str, float]:
    """GiB per GPU by component for `cfg` (an ExperimentConfig) and `arch`, plus `total`."""
    p = cfg.parallel
    tp, pp, cp = (p.tensor_model_parallel_size, p.pipeline_model_parallel_size,
                  p.context_parallel_size)
    world = p.world_size or tp * pp * cp
    dp = max(1, world // (tp * pp * cp))
    sp = p.sequence_parallel

    embedding_copies = 1 if (pp > 1 or arch.tie_word_embeddings) else 2
    params = (math.ceil(arch.layers / pp) * arch.layer_params
              + arch.vocab * arch.hidden * embedding_copies) / tp
    fp32 = cfg.model.dtype == "fp32"
    weight_bytes = (4 if fp32 else 2) + (2 if cfg.model.fp8 else 0)
    optimizer_bytes = (8 if fp32 else 12) / (dp if p.use_distributed_optimizer else 1)

    tokens = cfg.grpo.micro_batch_tokens / cp
    activations = tokens * _activation_bytes_per_token(arch, cfg.model, tp, sp)
    logits = tokens * arch.vocab / tp * (2 + 4) + ENTROPY_TEMPORARIES_GIB * GIB

    parts = {
        "weights": params * weight_bytes / GIB,
        "gradients": params * 4 / GIB,
        "optimizer": params * optimizer_bytes / GIB,
        "activations": activations / GIB,
        "logits": logits / GIB,
    }
    static = parts["weights"] + parts["gradients"] + parts["optimizer"]
    dynamic = parts["activations"] + parts["logits"]
    parts["overhead"] = CUDA_CONTEXT_GIB + NCCL_BUFFERS_GIB + FRAGMENTATION * dynamic
    train_phase = static + dynamic + parts["overhead"]
    generate_phase = 0.0
    if cfg.rollout.engine == "sglang" and cfg.rollout.colocate:
        parts["sglang_pool"] = cfg.rollout.sglang_mem_fraction * gpu_memory_gib
        parts["sglang_paused"] = SGLANG_RELEASED_GIB
        train_phase += SGLANG_RELEASED_GIB
        resident = 0.0 if cfg.rollout.offload_train_state else static
        generate_phase = parts["sglang_pool"] + resident + parts["overhead"]
    parts["train_phase"] = train_phase
    parts["generate_phase"] = generate_phase
    parts["total"] = max(train_phase, generate_phase)
    return parts


def rollout_kv_tokens(cfg, arch: ModelArch, gpu_memory_gib: float = GPU_MEMORY_GIB) -> int:
    """KV-cache capacity (tokens) of one SGLang server: its pool minus its weight shard."""
    r = cfg.rollout
    pool = r.sglang_mem_fraction * gpu_memory_gib * GIB * r.sglang_tp
    free = pool - arch.total_params * 2
    return max(0, int(free // arch.kv_cache_bytes_per_token()))


def fits(parts: dict[str, float], gpu_memory_gib: float = GPU_MEMORY_GIB) -> bool:
    return parts["total"] < gpu_memory_gib


def format_estimate(parts: dict[str, float], title: str = "",
                    gpu_memory_gib: float = GPU_MEMORY_GIB, kv_tokens: int | None = None) -> str:
    """One row per component, then the two phases (when colocated) and the total vs the GPU."""
    rows = [f"memory estimate per GPU{f' ({title})' if title else ''}:"]
    for key, value in parts.items():
        if key not in _SUMMARY_KEYS:
            rows.append(f"  {key:<15}{value:8.1f} GiB")
    if parts["generate_phase"]:
        rows.append(f"  {'train phase':<15}{parts['train_phase']:8.1f} GiB")
        rows.append(f"  {'generate phase':<15}{parts['generate_phase']:8.1f} GiB")
    verdict = "fits" if fits(parts, gpu_memory_gib) else "DOES NOT FIT"
    rows.append(f"  {'total':<15}{parts['total']:8.1f} GiB of {gpu_memory_gib:.0f} GiB: {verdict}")
    if kv_tokens is not None:
        rows.append(f"  SGLang KV cache: ~{kv_tokens:,} tokens per server")
    return "\n".join(rows)


_SUMMARY_KEYS = ("train_phase", "generate_phase", "total")
