"""The actor's update and log-prob pass on shared-prefix micro-batches vs the padded layout.

    python benchmarks/shared_prefix.py [--threads 1 --repeats 7]

Two GRPO-shaped batches of random tokens on random tiny Qwen3 models (fp32, CPU, TP = PP = 1):
    grpo_vs_trl   the model of benchmarks/grpo_vs_trl.py (hidden 128, 4 layers, 4 / 2 heads of
                  dim 32, MLP 384, vocab 320): 4 prompts of 65 / 69 / 73 / 89 tokens x 8
                  samples of 57 tokens on average (6-64), the lengths of one of its steps
    demo_masa     the demo's model (head dim 64, vocab 640): 8 solution prompts of ~60 tokens x 8
                  samples of ~35 tokens plus 8 meta prompts of ~200 tokens x 4 samples of ~40,
                  one MASA step of `masa demo`
Each side times `Actor.update` (one optimizer step, one micro-batch budget of 16,384 tokens)
and `Actor.logprobs`, alternating shared / padded, `--repeats` times after one warm-up each;
the figure is the ratio of medians. It also reports the positions each layout computes and the
largest log-prob difference between them on the same weights. Writes benchmarks/results/shared_prefix.json.
"""
import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from machine import machine_info, machine_label   # benchmarks/, the script's folder

BASE = {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": 128,
        "intermediate_size": 384, "num_hidden_layers": 4, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 1024, "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False, "rope_theta": 10000.0, "initializer_range": 0.02}
WORKS = {
    "grpo_vs_trl": (dict(BASE, vocab_size=320, head_dim=32),
                    [(65, 8, 6, 64), (69, 8, 6, 64), (73, 8, 6, 64), (89, 8, 6, 64)]),
    "demo_masa": (dict(BASE, vocab_size=640, head_dim=64),
                  [(60, 8, 10, 60)] * 8 + [(200, 4, 25, 55)] * 8),
}


def make_batch(vocab: int, groups, seed: int = 0):
    """(prompt length, samples, shortest, longest response) per group -> a TrainBatch."""
    from masa_megatron.train.batching import TrainBatch

    gen = torch.Generator().manual_seed(seed)
    prompts, responses = [], []
    for length, samples, low, high in groups:
        prompt = torch.randint(3, vocab, (length,), generator=gen).tolist()
        for _ in range(samples):
            size = int(torch.randint(low, high + 1, (1,), generator=gen))
            prompts.append(prompt)
            responses.append(torch.randint(3, vocab, (size,), generator=gen).tolist())
    return TrainBatch(prompts, responses, torch.randn(len(prompts), generator=gen))


def measure(name: str, repeats: int) -> dict:
    from masa_megatron.config import GRPOConfig, ModelConfig, OptimizerConfig, ParallelConfig
    from masa_megatron.model import build_gpt_model
    from masa_megatron.parallel import destroy_parallel, init_parallel
    from masa_megatron.train.actor import Actor
    from masa_megatron.train.optim import build_optimizer, wrap_ddp

    hf, groups = WORKS[name]
    init_parallel(ParallelConfig(), seed=0)
    try:
        model = build_gpt_model(hf, ModelConfig(hf_path="<dict>", random_init=True))
        chunks = wrap_ddp([model], ParallelConfig(), "adam")
        optimizer, scheduler = build_optimizer(chunks, OptimizerConfig(name="adam", lr=1e-6),
                                               ParallelConfig(), "fp32", total_steps=1000)
        actor = Actor(chunks, optimizer, scheduler, GRPOConfig(micro_batch_tokens=16384))
        assert not actor.shared_prefix_off, actor.shared_prefix_off
        batch = make_batch(hf["vocab_size"], groups)
        sides = {"shared": [], "padded": ["benchmark: the padded layout"]}
        times = {side: {"update": [], "logprobs": []} for side in sides}
        positions, logps = {}, {}
        for side, off in sides.items():                  # same weights: the layouts' difference
            actor.shared_prefix_off = off
            logps[side] = actor.logprobs(batch)
        difference = max((a - b).abs().max().item() for a, b in zip(logps["shared"],
                                                                     logps["padded"]))
        for rep in range(repeats + 1):
            for side, off in sides.items():
                actor.shared_prefix_off = off
                micro = actor._micro_batches(batch, range(len(batch)))
                positions[side] = sum(mb.input_positions for mb in micro)
                start = time.perf_counter()
                batch.old_logprobs = actor.logprobs(batch)
                middle = time.perf_counter()
                actor.update(batch)
                end = time.perf_counter()
                if rep:                                  # the first round is a warm-up
                    times[side]["logprobs"].append(middle - start)
                    times[side]["update"].append(end - middle)
    finally:
        destroy_parallel()
    median = {side: {k: statistics.median(v) for k, v in t.items()} for side, t in times.items()}
    return {
        "samples": len(batch), "prompts": len(groups),
        "valid_positions": sum(len(p) + len(r) - 1 for p, r in zip(batch.prompt_ids,
                                                                   batch.response_ids)),
        "positions": positions, "median_s": median, "runs_s": times,
        "ratio_shared_over_padded": {k: median["shared"][k] / median["padded"][k]
                                     for k in ("update", "logprobs")},
        "max_logprob_difference": difference,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", type=Path,
                        default=Path(__file__).parent / "results" / "shared_prefix.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    info = machine_info()
    results = {name: measure(name, args.repeats) for name in WORKS}
    report = {"machine": info, "machine_label": machine_label(info),
              "load_average_after": machine_info()["load_average"], "repeats": args.repeats,
              "command": f"python benchmarks/shared_prefix.py --threads {args.threads} "
                         f"--repeats {args.repeats}", "works": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(f"machine: {report['machine_label']}, load {info['load_average']} -> "
          f"{report['load_average_after']}")
    for name, r in results.items():
        m, ratio = r["median_s"], r["ratio_shared_over_padded"]
        print(f"{name}: {r['samples']} samples of {r['prompts']} prompts; positions shared "
              f"{r['positions']['shared']} / padded {r['positions']['padded']} (valid "
              f"{r['valid_positions']}); max |logp diff| {r['max_logprob_difference']:.1e}")
        for key in ("update", "logprobs"):
            print(f"  {key:8s} shared {m['shared'][key]:.3f} s  padded {m['padded'][key]:.3f} s"
                  f"  ratio {ratio[key]:.2f}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
