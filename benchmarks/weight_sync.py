"""Weight-sync cost against training-step cost, measured in one run (CPU, stand-in server).

    python benchmarks/weight_sync.py [--sizes demo,7m,100m] [--repeats 3] [--loop-steps 12]
                                     [--out benchmarks/results]
                                     [--sync-dir /dev/shm --name weight_sync_shm]

First, in the demo's own loop (`demo_loop`, `--loop-steps 0` skips it): `masa demo`'s grpo run
(its warm-started model, batch and trainer) with rollouts from a stand-in server, synced by each
strategy after every update; the loop's timers give sync / update and sync / RL step.

Then for each model size (`SIZES`: the demo's own 1.1M-parameter Qwen3, a 7.1M and a ~100M
Llama): a random HF checkpoint of that shape is loaded into a Megatron GPTModel in this process
(the trainer, TP=PP=1, fp32) and into the stand-in SGLang server (another process,
tests/sglang_standin, the same HTTP API and weight-update paths as SGLang 0.5.x). Measured:
- step: one training step on the trainer (forward + backward + AdamW) over the size's batch
  (`Size.batch` x `Size.seq` tokens; for the demo model the demo's 64 rollouts of 64 tokens),
  median of `--repeats`, after one warm-up step;
- generate: the embedded engine's rollout of the demo's batch shape (`--prompts` prompts of
  `Size.prompt_len` random tokens x `--group` samples x `--new-tokens` tokens, ignore_eos), median
  of `--repeats`; an RL step is at least generate + step, and a sync happens once per RL step,
  so each sync is also reported as a share of that sum (`ratio_to_rl_step`);
- disk sync: export HF safetensors + POST /update_weights_from_disk (server reloads) + flush;
- broadcast sync: POST /update_weights_from_distributed per bucket while the trainer broadcasts
  over gloo (the group is opened once, before timing), one broadcast per tensor (`broadcast`,
  the default) or one flattened tensor per bucket (`broadcast_flat`).
Each sync's median seconds, its ratio to the step time, and bytes moved per second are printed
and written to <out>/weight_sync.json. The checks after each sync (sampled weights read back) are
on, outside the timed region.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, NamedTuple

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
# name -> (rollout.weight_sync, rollout.weight_sync_flattened_broadcast): disk, broadcast (one
# broadcast per tensor, the default) and the flattened broadcast (one per bucket)
STRATEGIES = {"disk": ("disk", False), "broadcast": ("broadcast", False),
              "broadcast_flat": ("broadcast", True)}


class Size(NamedTuple):
    """A benchmarked model (family and shape) and the batch its training step and rollout use."""
    family: str
    arch: Any           # masa_megatron.memory_estimator.ModelArch
    batch: int          # training step: sequences ...
    seq: int            # ... of this many tokens
    prompt_len: int     # rollout: prompt tokens (8 prompts x 8 samples x 96 new tokens)


def _arch(name: str, hidden: int, layers: int, heads: int, kv_heads: int, intermediate: int,
          vocab: int, head_dim: int = 64):
    from masa_megatron.memory_estimator import ModelArch

    return ModelArch(name, hidden, layers, heads, kv_heads, head_dim, intermediate, vocab,
                     tie_word_embeddings=False)


def demo_size() -> Size:
    """The model `masa demo` trains (demo.warmstart.WarmStartConfig; its tokenizer has 603
    tokens) with the demo's batch: 8 problems x 8 samples of 64 tokens, the mean rollout of a
    demo run (a 33-token prompt + 31 generated, from its metrics; the actor packs micro-batches
    longest first, so little padding is added)."""
    from masa_megatron.demo.warmstart import WarmStartConfig

    w = WarmStartConfig()
    arch = _arch("demo", w.hidden, w.layers, w.heads, w.kv_heads, w.intermediate, 603, w.head_dim)
    return Size("qwen3", arch, batch=64, seq=64, prompt_len=33)


SIZES = {
    "demo": demo_size,   # 1.1M parameters
    "7m": lambda: Size("llama", _arch("7m", 256, 4, 4, 2, 688, 8192), batch=8, seq=256,
                       prompt_len=128),
    "100m": lambda: Size("llama", _arch("100m", 768, 12, 12, 4, 2048, 16000), batch=8, seq=256,
                         prompt_len=128),
}


def make_model(folder: Path, size: Size) -> None:
    from masa_megatron.model.tiny import make_tiny_hf_model

    a = size.arch
    make_tiny_hf_model(folder, size.family, seed=0, hidden_size=a.hidden,
                       num_hidden_layers=a.layers, num_attention_heads=a.heads,
                       num_key_value_heads=a.kv_heads, head_dim=a.head_dim,
                       intermediate_size=a.intermediate, vocab_size=a.vocab,
                       tied=a.tie_word_embeddings, max_position_embeddings=1024)


def step_seconds(model, batch: int, seq: int, repeats: int) -> float:
    import torch

    vocab = model.masa_hf_config["vocab_size"]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
    ids = torch.randint(0, vocab, (batch, seq + 1), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(seq).unsqueeze(0).expand(batch, seq)
    times = []
    for k in range(repeats + 1):                       # k = 0: warm-up
        start = time.perf_counter()
        opt.zero_grad()
        loss = model(ids[:, :-1], positions, None, labels=ids[:, 1:]).float().mean()
        loss.backward()
        opt.step()
        if k:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def generate_seconds(model, size: Size, args) -> float:
    import torch

    from masa_megatron.rollout.base import GenerationRequest, SamplingParams
    from masa_megatron.rollout.embedded import EmbeddedEngine

    vocab = model.masa_hf_config["vocab_size"]
    engine = EmbeddedEngine(model, vocab_size=vocab, seed=0)
    gen = torch.Generator().manual_seed(1)
    sampling = SamplingParams(max_new_tokens=args.new_tokens, n=args.group, ignore_eos=True, seed=2)
    requests = [GenerationRequest(torch.randint(3, vocab, (size.prompt_len,), generator=gen)
                                  .tolist(), sampling) for _ in range(args.prompts)]
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        engine.generate(requests)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def time_sync(engine, model, repeats: int, name: str) -> dict:
    engine.weight_sync.verify = False
    engine.update_weights(model)                      # warm-up (opens the broadcast group)
    times, stats = [], {}
    for _ in range(repeats):
        start = time.perf_counter()
        engine.update_weights(model)
        times.append(time.perf_counter() - start)
        stats = engine.last_sync_stats
    engine.weight_sync.verify = True
    engine.weight_sync.sync(model, engine.weight_version)   # checked once, untimed
    seconds = statistics.median(times)
    nbytes = stats[f"weight_sync/{name}/bytes"]
    return {"seconds": seconds, "all_seconds": times, "bytes": nbytes,
            "bytes_per_s": nbytes / seconds, "buckets": stats[f"weight_sync/{name}/buckets"]}


def run_size(name: str, args, workdir: Path) -> dict:
    from masa_megatron.config import ModelConfig
    from masa_megatron.model import build_gpt_model, load_hf_weights
    from masa_megatron.rollout.sglang import SGLangEngine
    from tests.sglang_standin import start_standin

    size = SIZES[name]()
    folder = workdir / name
    make_model(folder, size)
    server = start_standin(str(folder), log_dir=str(workdir / f"logs-{name}"),
                           health_timeout_s=900)
    try:
        model = build_gpt_model(str(folder), ModelConfig(hf_path=str(folder)))
        load_hf_weights(model, folder)
        params = sum(p.numel() for p in model.parameters())
        step = step_seconds(model, size.batch, size.seq, args.repeats)
        generate = generate_seconds(model, size, args)
        result = {"params": params, "step_seconds": step,
                  "size": {**size._asdict(), "arch": size.arch.__dict__},
                  "generate_seconds": generate, "rl_step_seconds": step + generate}
        for strategy, (sync_name, flattened) in STRATEGIES.items():
            options = {"load_format": "flattened_bucket"} if flattened else None
            engine = SGLangEngine(str(folder), urls=[server.url],
                                  weight_sync=sync_name, sync_options=options,
                                  bucket_mb=args.bucket_mb,
                                  sync_dir=str(workdir / f"sync-{folder.name}"),
                                  request_timeout_s=1800, health_timeout_s=60)
            try:
                sync = time_sync(engine, model, args.repeats, sync_name)
            finally:
                engine.shutdown()
            sync["ratio_to_step"] = sync["seconds"] / step
            sync["ratio_to_rl_step"] = sync["seconds"] / (step + generate)
            result[strategy] = sync
        return result
    finally:
        server.stop()


def demo_loop(strategy: str, args, workdir: Path) -> dict:
    """The demo's own grpo run (demo.run.run_config: its warm-started model, batch and trainer)
    with rollouts from a stand-in server that the loop syncs by `strategy` after every update;
    medians over steps 2.. of the loop's own timers (time/step holds generate, score, train and
    weight_sync)."""
    from dataclasses import replace

    from masa_megatron.data.synthetic import generate_problems, to_verl_rows, write_rows
    from masa_megatron.demo.run import DemoBudget, run_config, run_one
    from masa_megatron.demo.warmstart import WarmStartConfig, warm_start
    from masa_megatron.metrics import read_jsonl
    from tests.sglang_standin import start_standin

    budget = replace(DemoBudget(), steps=args.loop_steps, eval_every=0)
    hf_dir = warm_start(WarmStartConfig(max_len=budget.max_response_length))
    data = workdir / "loop-data"
    train = write_rows(to_verl_rows(generate_problems(budget.n_train, 0, "train"), "train"),
                       data / "train.parquet")
    held_out = write_rows(to_verl_rows(generate_problems(8, 0, "eval"), "eval"),
                          data / "eval.parquet")
    out = workdir / f"loop-{strategy}"
    server = start_standin(str(hf_dir), log_dir=str(workdir / f"logs-loop-{strategy}"))
    try:
        cfg = run_config(budget, "grpo", 0, hf_dir, train, held_out, out)
        cfg.rollout.engine, cfg.rollout.sglang_urls = "sglang", [server.url]
        cfg.rollout.weight_sync, cfg.rollout.weight_sync_flattened_broadcast = \
            STRATEGIES[strategy]
        cfg.logging.progress = False
        run_one(cfg, log=lambda *_: None)
    finally:
        server.stop()
    rows = [r for r in read_jsonl(out / "metrics.jsonl") if r["step"] >= 2]
    keys = ("time/step", "time/generate", "time/train", "time/weight_sync")
    result = {k.split("/")[1]: statistics.median(r[k] for r in rows) for k in keys}
    result["steps"] = len(rows)
    result["ratio_to_step"] = result["weight_sync"] / result["step"]
    result["ratio_to_train"] = result["weight_sync"] / result["train"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default=",".join(SIZES), help="comma-separated subset of "
                        + ", ".join(SIZES))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=8, help="generate: prompts (the demo's P)")
    parser.add_argument("--group", type=int, default=8, help="generate: samples per prompt (G)")
    parser.add_argument("--new-tokens", type=int, default=96, help="the demo's max response")
    parser.add_argument("--bucket-mb", type=int, default=512)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    parser.add_argument("--sync-dir", default=None, help="parent folder of the checkpoints and "
                        "disk-sync files (default: the system temp folder; /dev/shm: RAM)")
    parser.add_argument("--name", default="weight_sync", help="result file <out>/<name>.json")
    parser.add_argument("--loop-steps", type=int, default=12, help="steps of each in-loop run "
                        "(the demo's grpo run through a stand-in server; 0: skip)")
    args = parser.parse_args()

    import torch

    from masa_megatron.config import ParallelConfig
    from masa_megatron.parallel import init_parallel

    sizes = [size for size in args.sizes.split(",") if size]
    for size in sizes:
        if size not in SIZES:
            parser.error(f"--sizes: unknown size {size!r}; choose from {', '.join(SIZES)}")
    torch.set_num_threads(os.cpu_count() or 1)
    results = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                           "torch": torch.__version__,
                           "load_average_1m": os.getloadavg()[0]},
               "settings": vars(args), "demo_loop": {}, "sizes": {}}
    with tempfile.TemporaryDirectory(prefix="masa-wsync-bench-", dir=args.sync_dir) as tmp:
        for strategy in STRATEGIES if args.loop_steps else ():
            r = results["demo_loop"][strategy] = demo_loop(strategy, args, Path(tmp))
            print(f"demo loop, {strategy}: sync {r['weight_sync']:6.3f} s = "
                  f"{100 * r['ratio_to_step']:4.1f}% of the RL step ({r['step']:.2f} s), "
                  f"{100 * r['ratio_to_train']:4.1f}% of its update ({r['train']:.2f} s); "
                  f"medians of {r['steps']} steps", flush=True)
        if sizes:
            init_parallel(ParallelConfig())
        for size in sizes:
            results["sizes"][size] = run_size(size, args, Path(tmp))
            r = results["sizes"][size]
            print(f"{size:>5}: {r['params'] / 1e6:6.1f} M params, step {r['step_seconds']:7.2f} s,"
                  f" generate {r['generate_seconds']:7.2f} s"
                  + "".join(f" | {n} {r[n]['seconds']:6.3f} s ({100 * r[n]['ratio_to_step']:4.1f}"
                            f"% of step, {100 * r[n]['ratio_to_rl_step']:4.1f}% of step + generate,"
                            f" {r[n]['bytes_per_s'] / 1e6:6.1f} MB/s)"
                            for n in STRATEGIES), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {out / f'{args.name}.json'}")


if __name__ == "__main__":
    main()
