"""One RL step of a random model on one GPU (or CPU): generation + old log-probs + PPO update.

    python benchmarks/gpu_rl_step.py --size tiny|1b [--device cuda|cpu] [--out FILE]
        [--core-attention sdpa|megatron]

Builds a random Llama-architecture HF folder (transformers save_pretrained, no download), loads it
into Megatron (local layer spec, bf16 on CUDA with fp32 master weights, fp32 on CPU), generates
G samples for B prompts with the embedded engine, recomputes old log-probs and runs one PPO
update. Prints step time, tokens/s and model FLOPs utilisation:

    MFU = 6 * N * T_train / t_update / peak      (N parameters, T_train tokens in the update)

peak = 989 TFLOP/s (H100 SXM dense bf16; override with --peak-tflops). Generation tokens/s is
reported separately (decode is memory-bound; MFU is not meaningful there).

`--core-attention megatron` swaps the local spec's SDPA core attention back to Megatron's own
unfused DotProductAttention (the spec before 6c62b46), to compare the two in one lease.

`--cuda-graphs` also generates every step's requests with a second engine on the same model,
decode="graphs" (CUDA graphs per batch-size bucket; on CPU the same static steps eagerly), timed
separately (its samples are not trained on), and afterwards compares greedy rows of
`--greedy-tokens` tokens from the default (eager), static-eager and graph decoding. The graph
rows must equal the static-eager rows (same kernels; exit 1 otherwise); with `--strict-greedy`
they must also equal the eager rows (exact in fp32; bf16 rounding may part them). The peak
GPU memory then includes the second engine's static KV buffers.
"""
import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

SIZES = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=1003),
    # ~1.1B parameters
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=20,
               num_attention_heads=16, num_key_value_heads=8, head_dim=128, vocab_size=32000),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=SIZES, default="tiny")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--dtype", choices=("bf16", "fp32"), default=None,
                   help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--steps", type=int, default=3,
                   help="RL steps; the first is a warm-up, the others' medians are reported")
    p.add_argument("--peak-tflops", type=float, default=989.0)
    p.add_argument("--core-attention", choices=("sdpa", "megatron"), default="sdpa",
                   help="the local spec's core attention (megatron: its unfused default)")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="also time generation with CUDA-graph decoding, compare greedy rows")
    p.add_argument("--greedy-tokens", type=int, default=64)
    p.add_argument("--strict-greedy", action="store_true",
                   help="with --cuda-graphs: exit 1 unless graph rows equal the eager rows too")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available")
    if args.device == "cpu" and torch.cuda.is_available():
        raise SystemExit("--device cpu: the model builder uses CUDA when it is there; "
                         "run with CUDA_VISIBLE_DEVICES= instead")
    cuda = torch.cuda.is_available()

    from masa_megatron.config import GRPOConfig, ModelConfig, OptimizerConfig, ParallelConfig
    from masa_megatron.model import build_gpt_model, load_hf_weights
    from masa_megatron.model.tiny import make_tiny_hf_model
    from masa_megatron.parallel import destroy_parallel, init_parallel
    from masa_megatron.rollout.base import SamplingParams
    from masa_megatron.rollout.embedded import EmbeddedEngine
    from masa_megatron.train.actor import Actor
    from masa_megatron.train.optim import build_optimizer, wrap_ddp

    if args.core_attention == "megatron":   # the builder imports the class when it builds
        import masa_megatron.model.sdpa_attention as sdpa_module
        from megatron.core.transformer.dot_product_attention import DotProductAttention
        sdpa_module.SDPADotProductAttention = DotProductAttention

    shape = dict(SIZES[args.size], max_position_embeddings=args.prompt_len + args.new_tokens + 8)
    dtype = args.dtype or ("bf16" if cuda else "fp32")
    with tempfile.TemporaryDirectory() as folder:
        make_tiny_hf_model(folder, "llama", eos_token_id=2, bos_token_id=1, **shape)
        init_parallel(ParallelConfig(), seed=0)
        try:
            model_cfg = ModelConfig(hf_path=folder, dtype=dtype, layer_spec="local")
            model = build_gpt_model(folder, model_cfg)
            load_hf_weights(model, folder)
            n_params = sum(p.numel() for p in model.parameters())
            chunks = wrap_ddp([model], ParallelConfig())
            optimizer, scheduler = build_optimizer(chunks, OptimizerConfig(lr=1e-6, warmup_steps=0),
                                                   ParallelConfig(), dtype,
                                                   total_steps=args.steps)
            actor = Actor(chunks, optimizer, scheduler, GRPOConfig(micro_batch_tokens=16384),
                          vocab_size=shape["vocab_size"])
            rows = args.prompts * args.group

            def make_engine(decode):
                return EmbeddedEngine(model, vocab_size=shape["vocab_size"], seed=0,
                                      max_batch_size=rows, decode=decode,
                                      cuda_graph_max_batch=rows)
            engine = make_engine("eager")
            graph_engine = make_engine("graphs" if cuda else "static") if args.cuda_graphs \
                else None
            gen = torch.Generator().manual_seed(0)
            prompts = [torch.randint(3, shape["vocab_size"], (args.prompt_len,), generator=gen)
                       .tolist() for _ in range(args.prompts)]
            sampling = SamplingParams(max_new_tokens=args.new_tokens, n=args.group, seed=1,
                                      ignore_eos=True)
            sync = torch.cuda.synchronize if cuda else (lambda: None)
            steps = [_one_step(engine, actor, prompts, sampling, gen, sync, graph_engine)
                     for _ in range(args.steps)]
            timed = steps[1:] or steps          # the first step pays for kernel set-up
            phases = ("generate_s", "logprob_s", "update_s")
            med = {k: statistics.median(s[k] for s in timed) for k in phases}
            gen_tokens, train_tokens = steps[-1]["generated_tokens"], steps[-1]["train_tokens"]
            result = {
                "size": args.size, "device": torch.cuda.get_device_name() if cuda else "cpu",
                "dtype": dtype, "core_attention": type(
                    model.decoder.layers[0].self_attention.core_attention).__name__,
                "parameters": n_params, "steps": args.steps,
                "timed_steps": len(timed), **med, "step_s": sum(med.values()),
                "first_step_s": sum(steps[0][k] for k in phases),
                "generated_tokens": gen_tokens, "train_tokens": train_tokens,
                "generate_tokens_per_s": gen_tokens / med["generate_s"],
                "update_tokens_per_s": train_tokens / med["update_s"],
                "update_mfu": 6 * n_params * train_tokens / med["update_s"]
                / (args.peak_tflops * 1e12),
                "ratio_dev_max": steps[0]["ratio_dev_max"],
                "peak_gpu_mem_gb": torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else None,
                "per_step": [{k: s[k] for k in phases} for s in steps]}
            if graph_engine is not None:
                result.update(_graph_figures(timed, steps[0], gen_tokens, med["generate_s"],
                                             graph_engine._static.runner, args.steps))
                result.update(_greedy_rows({"eager": engine, "static": make_engine("static"),
                                            "graphs": graph_engine}, prompts, args.greedy_tokens))
        finally:
            destroy_parallel()
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    if args.cuda_graphs and (result["greedy_graphs_vs_static_identical"] < 1 or (
            args.strict_greedy and result["greedy_graphs_vs_eager_identical"] < 1)):
        raise SystemExit("greedy rows of graph decoding differ (see greedy_* above)")


def _graph_figures(timed: list, first: dict, tokens: int, eager_s: float, runner,
                   calls: int) -> dict:
    """Generation with graph decoding (each call captures its graphs again: included)."""
    graphs_s = statistics.median(s["generate_graphs_s"] for s in timed)
    out = {"graph_decode": "cuda graphs" if runner else "static, eager (no CUDA)",
           "generate_graphs_s": graphs_s, "generate_graphs_tokens_per_s": tokens / graphs_s,
           "graphs_speedup": eager_s / graphs_s,
           "first_step_generate_graphs_s": first["generate_graphs_s"],
           "sampled_rows_identical": min(s["sampled_rows_identical"] for s in timed)}
    if runner:
        out.update(graph_captures_per_call=len(runner.captured) / calls,
                   graph_capture_s_per_call=runner.capture_s / calls)
    return out


def _greedy_rows(engines: dict, prompts: list, tokens: int) -> dict:
    """Greedy rows of each engine; fraction of graph rows equal to the eager and static rows,
    and the first differing position of each differing row."""
    from masa_megatron.rollout.base import GenerationRequest, SamplingParams

    greedy = SamplingParams(max_new_tokens=tokens, temperature=0.0, ignore_eos=True)
    rows = {name: [r.completions[0].token_ids for r in e.generate(
        [GenerationRequest(ids, greedy) for ids in prompts])] for name, e in engines.items()}
    out = {}
    for other in ("eager", "static"):
        pairs = list(zip(rows["graphs"], rows[other]))
        out[f"greedy_graphs_vs_{other}_identical"] = sum(a == b for a, b in pairs) / len(pairs)
        out[f"greedy_graphs_vs_{other}_first_difference"] = [
            next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            for a, b in pairs if a != b]
    return out


def _one_step(engine, actor, prompts, sampling, gen, sync, graph_engine=None) -> dict:
    """Generate G samples per prompt, recompute old log-probs, one PPO update; phase times.
    `graph_engine`: generates the same requests again, timed apart (not trained on)."""
    from masa_megatron.rollout.base import GenerationRequest
    from masa_megatron.train.batching import TrainBatch

    out = {}
    sync()
    t0 = time.perf_counter()
    results = engine.generate([GenerationRequest(ids, sampling) for ids in prompts])
    sync()
    out["generate_s"] = time.perf_counter() - t0
    if graph_engine is not None:
        t0 = time.perf_counter()
        again = graph_engine.generate([GenerationRequest(ids, sampling) for ids in prompts])
        sync()
        out["generate_graphs_s"] = time.perf_counter() - t0
        pairs = [(a.token_ids, b.token_ids) for r, q in zip(results, again)
                 for a, b in zip(r.completions, q.completions)]
        out["sampled_rows_identical"] = sum(a == b for a, b in pairs) / len(pairs)
    samples = [(pr, c.token_ids) for pr, r in zip(prompts, results) for c in r.completions]
    batch = TrainBatch([s[0] for s in samples], [s[1] for s in samples],
                       torch.randn(len(samples), generator=gen))
    t0 = time.perf_counter()
    actor.compute_old_logprobs(batch)
    sync()
    out["logprob_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    metrics = actor.update(batch, check_ratio=True)   # tolerance by dtype (train/actor.py)
    sync()
    out["update_s"] = time.perf_counter() - t0
    out["generated_tokens"] = sum(len(t) for _, t in samples)
    out["train_tokens"] = sum(len(a) + len(b) for a, b in samples)
    out["ratio_dev_max"] = metrics.get("train/step0_ratio_dev_max")
    return out


if __name__ == "__main__":
    main()
