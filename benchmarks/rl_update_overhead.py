"""RL update overhead: `Actor.update` vs a plain Megatron next-token-loss step.

Both steps run on the same model, optimizer (Adam), micro-batches (same packing, same token
budget) and tokens, through Megatron's forward_backward_func, DDP and optimizer.step:

    plain : GPTModel(labels=...) per-token CE -> masked mean over the response tokens
    rl    : Actor.update = vocab-parallel log-probs at temperature T, PPO clipped loss
            (clip-higher, dual clip, token-mean with global normalisers), metric reduction,
            finite-gradient check, LR schedule

One optimizer step each. The old log-probs are computed once before timing: the timed RL step
EXCLUDES the log-prob recompute, which is timed and reported separately (a forward-only pass).
The two steps alternate, `--repeats` times after `--warmup` rounds; the headline is the ratio of
the medians; the median of the per-round ratios and the ratio of the minima are reported too
and so is the process CPU time (on a shared machine these are less sensitive to the load of
other processes; with --threads 1 the CPU time is free of thread spin-waiting).
Throughput counts the model input tokens (sum of row lengths, no padding).

    python benchmarks/rl_update_overhead.py [--repeats 9] [--threads 2]

Prints a summary and writes benchmarks/results/rl_update_overhead.json.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

HF_CONFIG = {
    "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "vocab_size": 8000,
    "hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 4,
    "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 32,
    "max_position_embeddings": 1024, "rms_norm_eps": 1e-6, "tie_word_embeddings": True,
    "rope_theta": 10000.0, "initializer_range": 0.02,
}
RESULTS = Path(__file__).parent / "results" / "rl_update_overhead.json"


def make_batch(num_samples: int, seed: int = 0):
    from masa_megatron.train.batching import TrainBatch

    gen = torch.Generator().manual_seed(seed)
    vocab = HF_CONFIG["vocab_size"]
    prompts = [torch.randint(3, vocab, (int(torch.randint(32, 97, (1,), generator=gen)),),
                             generator=gen).tolist() for _ in range(num_samples)]
    responses = [torch.randint(3, vocab, (int(torch.randint(16, 257, (1,), generator=gen)),),
                               generator=gen).tolist() for _ in range(num_samples)]
    return TrainBatch(prompts, responses, torch.randn(num_samples, generator=gen))


def plain_step(actor, micro) -> None:
    """Megatron's own next-token loss (masked mean over response tokens) + optimizer step."""
    from functools import partial

    tokens = sum(int(mb.loss_mask.sum()) for mb in micro)

    def loss_func(mb, per_token):
        loss = (per_token.float() * mb.loss_mask).sum() / tokens * len(micro)
        return loss, {"loss": loss.detach().clone()}

    def forward_step(data_iterator, model):
        mb = next(data_iterator)
        return model(mb.tokens, mb.position_ids, None, labels=mb.labels), partial(loss_func, mb)

    for chunk in actor.model_chunks:
        chunk.zero_grad_buffer()
    actor.optimizer.zero_grad()
    actor._forward_backward(
        forward_step_func=forward_step, data_iterator=iter(micro), model=actor.model_chunks,
        num_microbatches=len(micro), seq_length=max(mb.tokens.shape[1] for mb in micro),
        micro_batch_size=max(mb.num_rows for mb in micro), forward_only=False)
    actor.optimizer.step()


def timed(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process: less sensitive to other processes' load)."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--micro-batch-tokens", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--temperature", type=float, default=1.0,
                        help="sampling temperature of the log-probs (rollout.temperature)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from masa_megatron.config import GRPOConfig, ModelConfig, OptimizerConfig, ParallelConfig
    from masa_megatron.model import build_gpt_model
    from masa_megatron.parallel import destroy_parallel, init_parallel
    from masa_megatron.train.actor import Actor
    from masa_megatron.train.optim import build_optimizer, wrap_ddp

    parallel = ParallelConfig()
    init_parallel(parallel, seed=0)
    model = build_gpt_model(HF_CONFIG, ModelConfig(hf_path="<dict>", random_init=True))
    params = sum(p.numel() for p in model.parameters())
    opt_cfg = OptimizerConfig(lr=1e-5, warmup_steps=0)
    chunks = wrap_ddp([model], parallel, opt_cfg.name)
    optimizer, scheduler = build_optimizer(chunks, opt_cfg, parallel, "fp32", total_steps=1000)
    grpo = GRPOConfig(micro_batch_tokens=args.micro_batch_tokens)
    actor = Actor(chunks, optimizer, scheduler, grpo, temperature=args.temperature)

    batch = make_batch(args.samples)
    input_tokens = sum(batch.row_lengths())
    micro = actor._micro_batches(batch, range(len(batch)))
    times = {"plain": [], "rl": [], "logprobs": []}
    cpu_times = {"plain": [], "rl": [], "logprobs": []}

    def logprobs():
        batch.old_logprobs = actor.logprobs(batch)

    logprobs()
    for round_ in range(args.warmup + args.repeats):
        sample = {"plain": timed(lambda: plain_step(actor, micro)),
                  "rl": timed(lambda: actor.update(batch)),
                  "logprobs": timed(logprobs)}
        if round_ >= args.warmup:
            for key, (wall, cpu) in sample.items():
                times[key].append(wall)
                cpu_times[key].append(cpu)
    destroy_parallel()

    median = {k: statistics.median(v) for k, v in times.items()}
    cpu_median = {k: statistics.median(v) for k, v in cpu_times.items()}
    paired = [rl / plain for rl, plain in zip(times["rl"], times["plain"])]
    result = {
        "overhead_rl_vs_plain": median["rl"] / median["plain"] - 1.0,
        "overhead_cpu_time": cpu_median["rl"] / cpu_median["plain"] - 1.0,
        "overhead_paired_median": statistics.median(paired) - 1.0,
        "overhead_of_minima": min(times["rl"]) / min(times["plain"]) - 1.0,
        "median_s": median,
        "cpu_median_s": cpu_median,
        "load_average_1min": __import__("os").getloadavg()[0],
        "tokens_per_s": {k: input_tokens / v for k, v in median.items()},
        "times_s": times,
        "cpu_times_s": cpu_times,
        "input_tokens": input_tokens,
        "response_tokens": batch.response_token_count(),
        "samples": args.samples,
        "micro_batches": len(micro),
        "micro_batch_tokens": args.micro_batch_tokens,
        "temperature": args.temperature,
        "model": {k: HF_CONFIG[k] for k in ("vocab_size", "hidden_size", "intermediate_size",
                                            "num_hidden_layers", "num_attention_heads")},
        "parameters": params,
        "note": "rl excludes the log-prob recompute (reported as logprobs, forward only)",
        "device": "cuda" if torch.cuda.is_available() else f"cpu x{args.threads} threads",
        "machine": platform.machine(), "torch": torch.__version__,
        "megatron_core": __import__("megatron.core", fromlist=["__version__"]).__version__,
        "repeats": args.repeats, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"model {params / 1e6:.1f} M params, {args.samples} samples, {input_tokens} input "
          f"tokens, {len(micro)} micro-batches, {args.repeats} alternating repeats (medians)")
    for key in ("plain", "rl", "logprobs"):
        print(f"  {key:9s} {median[key] * 1e3:8.1f} ms  {input_tokens / median[key]:9.0f} tokens/s"
              f"   (CPU time {cpu_median[key] * 1e3:8.1f} ms)")
    print(f"  RL update overhead vs plain step: {result['overhead_rl_vs_plain'] * 100:+.1f}% "
          f"(ratio of medians; target <= 15%; log-prob recompute excluded)")
    print(f"  CPU time {result['overhead_cpu_time'] * 100:+.1f}%, median of per-round ratios "
          f"{result['overhead_paired_median'] * 100:+.1f}%, ratio of minima "
          f"{result['overhead_of_minima'] * 100:+.1f}% (less sensitive to load; 1-min load "
          f"average {result['load_average_1min']:.1f})")
    print(f"  wrote {args.out}")


if __name__ == "__main__":
    main()
