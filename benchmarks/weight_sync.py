"""Weight-sync cost against training-step cost, measured in one run (CPU, stand-in server).

    python benchmarks/weight_sync.py [--sizes demo,100m] [--repeats 3] [--out benchmarks/results]
                                     [--sync-dir /dev/shm --name weight_sync_shm]

For each model size: a random HF checkpoint (Llama layout) is loaded into a Megatron GPTModel in
this process (the trainer, TP=PP=1, fp32) and into the stand-in SGLang server (another process,
tests/sglang_standin, the same HTTP API and weight-update paths as SGLang 0.5.x). Measured:
- step: one training step on the trainer (forward + backward + AdamW) over `--batch` x `--seq`
  tokens, median of `--repeats`, after one warm-up step;
- generate: the embedded engine's rollout of the demo's batch shape (`--prompts` prompts of
  `--prompt-len` random tokens x `--group` samples x `--new-tokens` tokens, ignore_eos), median
  of `--repeats`; an RL step is at least generate + step, and a sync happens once per RL step,
  so each sync is also reported as a share of that sum (`ratio_to_rl_step`);
- disk sync: export HF safetensors + POST /update_weights_from_disk (server reloads) + flush;
- broadcast sync: POST /update_weights_from_distributed per bucket while the trainer broadcasts
  over gloo (the group is opened once, before timing).
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

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SIZES = {
    # name: (hidden, layers, heads, kv heads, intermediate, vocab)
    "demo": (256, 4, 4, 2, 688, 8192),
    "100m": (768, 12, 12, 4, 2048, 16000),
}


def make_model(folder: Path, size: str) -> None:
    from masa_megatron.model.tiny import make_tiny_hf_model

    hidden, layers, heads, kv, inter, vocab = SIZES[size]
    make_tiny_hf_model(folder, "llama", seed=0, hidden_size=hidden, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=kv,
                       head_dim=hidden // heads, intermediate_size=inter, vocab_size=vocab,
                       max_position_embeddings=1024)


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


def generate_seconds(model, args) -> float:
    import torch

    from masa_megatron.rollout.base import GenerationRequest, SamplingParams
    from masa_megatron.rollout.embedded import EmbeddedEngine

    vocab = model.masa_hf_config["vocab_size"]
    engine = EmbeddedEngine(model, vocab_size=vocab, seed=0)
    gen = torch.Generator().manual_seed(1)
    sampling = SamplingParams(max_new_tokens=args.new_tokens, n=args.group, ignore_eos=True, seed=2)
    requests = [GenerationRequest(torch.randint(3, vocab, (args.prompt_len,), generator=gen)
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


def run_size(size: str, args, workdir: Path) -> dict:
    from masa_megatron.config import ModelConfig
    from masa_megatron.model import build_gpt_model, load_hf_weights
    from masa_megatron.rollout.sglang import SGLangEngine
    from tests.sglang_standin import start_standin

    folder = workdir / size
    make_model(folder, size)
    server = start_standin(str(folder), log_dir=str(workdir / f"logs-{size}"),
                           health_timeout_s=900)
    try:
        model = build_gpt_model(str(folder), ModelConfig(hf_path=str(folder)))
        load_hf_weights(model, folder)
        params = sum(p.numel() for p in model.parameters())
        step = step_seconds(model, args.batch, args.seq, args.repeats)
        generate = generate_seconds(model, args)
        result = {"params": params, "step_seconds": step, "batch": args.batch, "seq": args.seq,
                  "generate_seconds": generate, "rl_step_seconds": step + generate}
        for name in ("disk", "broadcast"):
            engine = SGLangEngine(str(folder), urls=[server.url], weight_sync=name,
                                  bucket_mb=args.bucket_mb, sync_dir=str(workdir / f"sync-{size}"),
                                  request_timeout_s=1800, health_timeout_s=60)
            try:
                sync = time_sync(engine, model, args.repeats, name)
            finally:
                engine.shutdown()
            sync["ratio_to_step"] = sync["seconds"] / step
            sync["ratio_to_rl_step"] = sync["seconds"] / (step + generate)
            result[name] = sync
        return result
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="demo,100m")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--prompts", type=int, default=8, help="generate: prompts (the demo's P)")
    parser.add_argument("--group", type=int, default=8, help="generate: samples per prompt (G)")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=96, help="the demo's max response")
    parser.add_argument("--bucket-mb", type=int, default=512)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    parser.add_argument("--sync-dir", default=None, help="parent folder of the checkpoints and "
                        "disk-sync files (default: the system temp folder; /dev/shm: RAM)")
    parser.add_argument("--name", default="weight_sync", help="result file <out>/<name>.json")
    args = parser.parse_args()

    import torch

    from masa_megatron.config import ParallelConfig
    from masa_megatron.parallel import init_parallel

    torch.set_num_threads(os.cpu_count() or 1)
    init_parallel(ParallelConfig())
    results = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                           "torch": torch.__version__,
                           "load_average_1m": os.getloadavg()[0]},
               "settings": vars(args), "sizes": {}}
    with tempfile.TemporaryDirectory(prefix="masa-wsync-bench-", dir=args.sync_dir) as tmp:
        for size in args.sizes.split(","):
            results["sizes"][size] = run_size(size, args, Path(tmp))
            r = results["sizes"][size]
            print(f"{size:>5}: {r['params'] / 1e6:6.1f} M params, step {r['step_seconds']:7.2f} s,"
                  f" generate {r['generate_seconds']:7.2f} s"
                  + "".join(f" | {n} {r[n]['seconds']:6.3f} s ({100 * r[n]['ratio_to_step']:4.1f}"
                            f"% of step, {100 * r[n]['ratio_to_rl_step']:4.1f}% of step + generate,"
                            f" {r[n]['bytes_per_s'] / 1e6:6.1f} MB/s)"
                            for n in ("disk", "broadcast")), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {out / f'{args.name}.json'}")


if __name__ == "__main__":
    main()
