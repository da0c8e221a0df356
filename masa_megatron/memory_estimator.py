"""Per-GPU memory estimate of a training layout, used to choose and check the recipes' settings.

`estimate(cfg, arch)` returns a `MemoryEstimate`: GiB by component, the components on the GPU in
each phase of the colocated cycle (below), the peak phase and what dominates it, and SGLang's KV
capacity; `format_estimate` prints it. All
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

Tokens per micro-batch: the planner (train/batching.py) packs rows, each rounded up to the
layout's multiple (TP under SP; x16 with FP8, x32 with MXFP8: model/shape_check.py), while rows x
padded width <= grpo.micro_batch_tokens, so the padding stays inside the budget the estimate uses.

Logits (last stage, one micro-batch), as measured by benchmarks/vocab_parallel_memory.py on CPU:
the old-log-prob pass (no grad, chunked entropy) holds the bf16 logits (2 B per logit element)
plus 4.00 B + 198 MiB; the update holds 6.00 B (the fp32 gradient and its bf16 copy, after the
bf16 logits are freed). Both are tokens * V/t * 6 B + ENTROPY_TEMPORARIES_GIB, the `logits` term.

The colocated cycle (rollout.colocate; train/handoff.py has the order). Each phase is the sum of
what is on the GPU during it; the estimate is the largest phase (`MemoryEstimate.total`), not
the sum::

    generation   SGLang weights + KV cache + CUDA graphs + SGLang runtime + trainer runtime
                 [+ trainer weights, gradients, optimizer and its allocator cache (activations +
                 logits + fragmentation, not returned: torch.cuda.empty_cache only runs when
                 offloading) without rollout.offload_train_state]
    weight_sync  SGLang weights (resumed) + trainer weights + one sync bucket + both runtimes
                 [+ gradients, optimizer, cache without offload]
    update       trainer weights + gradients + optimizer + activations + logits + fragmentation
                 + trainer runtime + SGLang runtime (weights, KV cache and graphs released)
    head_forward generation + trainer weights (handoff.trainer_params, when offloaded) + a
                 no-grad forward (bf16 logits of one micro-batch + one layer's activations),
                 only when the MASA meta-head predictor is in use (predictors.head_in_use)

SGLang's static pool (weights + KV cache) is sglang_mem_fraction of the memory free when its
server starts (SGLang's ModelRunner measures the free memory at start and keeps that fraction);
the servers start before the trainer allocates, so free = GPU - the trainer's CUDA context -
SGLang's own runtime. KV cache per GPU = pool - weights / sglang_tp. Disaggregated: the training
node has only the update phase (no SGLang runtime); the KV cache is that of a server alone on
its GPUs.

Calibration: the activation formula's MLP share and the logits' bytes were measured on CPU
(benchmarks/activation_memory.py, vocab_parallel_memory.py; benchmarks/RESULTS.md); the attention
and norm shares, weights/gradients/optimizer and the phase model are formulas. The constants below
(CUDA context, NCCL buffers, fragmentation, SGLang's runtime and CUDA graphs) are assumptions; no
GPU has checked the phases (the H100 rows in RESULTS.md predate the hand-off).

Runtime of each process: the trainer's CUDA context and kernels (~1 GiB) and NCCL communicators
and buffers (~1.5 GiB); allocator fragmentation: 10% of activations + logits.
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
SGLANG_RUNTIME_GIB = 1.0              # an SGLang server's context and runtime, kept when released
SGLANG_GRAPHS_GIB = 1.0               # its CUDA graphs (memory type cuda_graph)
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


@dataclass(frozen=True)
class MemoryEstimate:
    """GiB per GPU: `components` (each once), `phases` (phase -> the components on the GPU then)
    and the SGLang KV capacity in tokens per server (None without SGLang)."""
    components: dict[str, float]
    phases: dict[str, dict[str, float]]
    kv_tokens: int | None

    @property
    def phase_totals(self) -> dict[str, float]:
        return {name: sum(parts.values()) for name, parts in self.phases.items()}

    @property
    def peak_phase(self) -> str:
        totals = self.phase_totals
        return max(totals, key=totals.get)

    @property
    def total(self) -> float:
        return self.phase_totals[self.peak_phase]

    @property
    def dominant(self) -> str:
        """The largest component of the peak phase."""
        parts = self.phases[self.peak_phase]
        return max(parts, key=parts.get)


def _trainer_components(cfg, arch: ModelArch) -> dict[str, float]:
    """The trainer's GiB per GPU by component (module docstring)."""
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
    parts = {"weights": params * weight_bytes, "gradients": params * 4,
             "optimizer": params * optimizer_bytes, "activations": activations, "logits": logits,
             "fragmentation": FRAGMENTATION * (activations + logits),
             "head_forward": tokens * (arch.vocab / tp * 2
                                       + _activation_bytes_per_token_layer(arch, tp, sp))}
    parts = {k: v / GIB for k, v in parts.items()}
    parts["trainer_runtime"] = CUDA_CONTEXT_GIB + NCCL_BUFFERS_GIB
    return parts


def _sglang_components(cfg, arch: ModelArch, gpu_memory_gib: float) -> dict[str, float]:
    """One SGLang server's GiB per GPU: its pool is mem_fraction of the memory free at its start."""
    r = cfg.rollout
    used_at_start = SGLANG_RUNTIME_GIB + (CUDA_CONTEXT_GIB if r.colocate else 0.0)
    pool = r.sglang_mem_fraction * (gpu_memory_gib - used_at_start)
    weights = arch.total_params * 2 / r.sglang_tp / GIB
    return {"sglang_weights": weights, "sglang_kv": max(0.0, pool - weights),
            "sglang_graphs": SGLANG_GRAPHS_GIB, "sglang_runtime": SGLANG_RUNTIME_GIB,
            "sync_bucket": r.weight_sync_bucket_mb / 1024}


def _pick(parts: dict[str, float], *names: str) -> dict[str, float]:
    return {n: parts[n] for n in names}


def estimate(cfg, arch: ModelArch, gpu_memory_gib: float = GPU_MEMORY_GIB) -> MemoryEstimate:
    """GiB per GPU of `cfg` (an ExperimentConfig) on `arch`, phase by phase (module docstring)."""
    from masa_megatron.masa.predictors import head_in_use

    parts = _trainer_components(cfg, arch)
    state = ("weights", "gradients", "optimizer")
    dynamic = ("activations", "logits", "fragmentation")
    update = _pick(parts, "trainer_runtime", *state, *dynamic)
    r = cfg.rollout
    if r.engine != "sglang":
        return MemoryEstimate(parts, {"update": update}, None)
    sg = _sglang_components(cfg, arch, gpu_memory_gib)
    parts.update(sg)
    kv_tokens = int(sg["sglang_kv"] * r.sglang_tp * GIB // arch.kv_cache_bytes_per_token())
    if not r.colocate:
        return MemoryEstimate(parts, {"update": update}, kv_tokens)

    update["sglang_runtime"] = sg["sglang_runtime"]
    runtimes = _pick(parts, "trainer_runtime", "sglang_runtime")
    resident = {}                      # what of the trainer stays on the GPU beside the servers
    if not r.offload_train_state:
        resident = _pick(parts, *state)
        resident["trainer_cache"] = sum(parts[k] for k in dynamic)
    generation = {**runtimes, **_pick(parts, "sglang_weights", "sglang_kv", "sglang_graphs"),
                  **resident}
    phases = {
        "generation": generation,
        "weight_sync": {**runtimes, **_pick(parts, "sglang_weights", "weights", "sync_bucket"),
                        **resident},
        "update": update,
    }
    if head_in_use(cfg.masa):
        phases["head_forward"] = {**generation, **_pick(parts, "weights", "head_forward")}
    return MemoryEstimate(parts, phases, kv_tokens)


def fits(est: MemoryEstimate, gpu_memory_gib: float = GPU_MEMORY_GIB) -> bool:
    return est.total < gpu_memory_gib


def format_estimate(est: MemoryEstimate, title: str = "",
                    gpu_memory_gib: float = GPU_MEMORY_GIB) -> str:
    """One row per phase with its components, then the peak and what dominates it."""
    rows = [f"memory estimate per GPU{f' ({title})' if title else ''}, by phase:"]
    for name, parts in est.phases.items():
        cells = ", ".join(f"{k} {v:.1f}" for k, v in sorted(parts.items(), key=lambda kv: -kv[1]))
        rows.append(f"  {name:<13}{sum(parts.values()):6.1f} GiB = {cells}")
    verdict = "fits" if fits(est, gpu_memory_gib) else "DOES NOT FIT"
    rows.append(f"  peak: {est.peak_phase} {est.total:.1f} GiB of {gpu_memory_gib:.0f} GiB "
                f"({verdict}), dominated by {est.dominant} "
                f"({est.phases[est.peak_phase][est.dominant]:.1f} GiB)")
    if est.kv_tokens is not None:
        rows.append(f"  SGLang KV cache: ~{est.kv_tokens:,} tokens per server")
    return "\n".join(rows)
