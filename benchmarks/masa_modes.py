"""MASA modes on the demo task: tokens generated per step and step time.

Configurations: grpo; masa and masa_efficient, each with the text predictor (parsed meta
rollouts) and with the meta-head (`masa.predictor=head`). Each is a real training run
(demo.run.run_config / run_one: Megatron actor, embedded engine, train/loop.py) from the demo's
warm start, on the synthetic problems, with the demo's budget (problems per step, G, M, maximum
response length), the same seed and data, and in-loop evaluation off. masa_efficient gates and
cuts from step k = --efficient-start on; before k it is masa.

Per configuration, medians over the steps s >= k (where the modes differ; the first steps also
carry start-up costs) of: generated tokens (solution, meta, total), step time and its generate /
train phases, gated and cut fractions. With t = median total tokens, the saving of a
configuration is 1 - t / t(masa, same predictor).

    python benchmarks/masa_modes.py [--steps 6] [--efficient-start 2] [--threads 2]

Prints a table and writes benchmarks/results/masa_modes.json (settings, machine, medians, and the
per-step values).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "masa_modes.json"
CONFIGS = {  # name -> (masa.mode, masa.predictor)
    "grpo": ("grpo", "text"),
    "masa/text": ("masa", "text"),
    "masa_efficient/text": ("masa_efficient", "text"),
    "masa/head": ("masa", "head"),
    "masa_efficient/head": ("masa_efficient", "head"),
}
KEYS = ("tokens/solution", "tokens/meta", "tokens/total", "time/step", "time/generate",
        "time/train", "time/meta_head", "time/meta_head_train", "gating/fraction",
        "cutoff/fraction", "solution/accuracy")


def train_config(name: str, args, budget, hf_dir: Path, train_file: Path, out: Path) -> list[dict]:
    """Train one configuration; returns its per-step metrics (the run's metrics.jsonl)."""
    from masa_megatron.demo.run import run_config as demo_config
    from masa_megatron.demo.run import run_one

    mode, predictor = CONFIGS[name]
    run_dir = out / name.replace("/", "-")
    # the eval file is not read: in-loop evaluation is turned off below
    cfg = demo_config(budget, mode, args.seed, hf_dir, train_file, train_file, run_dir)
    cfg.masa.predictor = predictor
    cfg.masa.efficient_start_step = args.efficient_start
    cfg.trainer.eval_every = 0
    cfg.logging.progress = False
    run_one(cfg, log=lambda message: None)
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def medians(rows: list[dict], first_step: int) -> dict[str, float]:
    """Median of each KEYS metric over the rows of steps >= first_step (logged step = s + 1)."""
    kept = [r for r in rows if r["step"] > first_step]
    return {k: statistics.median(r[k] for r in kept) for k in KEYS if all(k in r for r in kept)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--efficient-start", type=int, default=2, help="masa_efficient's k")
    parser.add_argument("--configs", default=",".join(CONFIGS),
                        help="comma-separated subset of " + ", ".join(CONFIGS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache-dir", type=Path, default=None, help="warm-start cache")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    names = [n for n in args.configs.split(",") if n]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown or not 0 <= args.efficient_start < args.steps:
        parser.error(f"unknown configs {unknown} or --efficient-start not in [0, --steps)")

    import torch

    from masa_megatron.data.synthetic import write_task_files
    from masa_megatron.demo.run import DemoBudget
    from masa_megatron.demo.warmstart import WarmStartConfig, warm_start

    torch.set_num_threads(args.threads)
    budget = DemoBudget(steps=args.steps)
    hf_dir = warm_start(WarmStartConfig(), args.cache_dir)
    results, per_step = {}, {}
    with tempfile.TemporaryDirectory(prefix="masa_modes_") as tmp:
        train_file, _ = write_task_files(tmp, n_train=budget.n_train, n_eval=1, seed=0)
        for name in names:
            started = time.perf_counter()
            per_step[name] = train_config(name, args, budget, hf_dir, train_file, Path(tmp))
            results[name] = medians(per_step[name], args.efficient_start)
            results[name]["run_s"] = time.perf_counter() - started
            print(f"  {name}: done in {results[name]['run_s']:.0f} s", flush=True)
    for mode, predictor in CONFIGS.values():
        name, base = f"{mode}/{predictor}", f"masa/{predictor}"
        if mode == "masa_efficient" and name in results and base in results:
            results[name]["token_saving_vs_masa"] = \
                1 - results[name]["tokens/total"] / results[base]["tokens/total"]

    result = {
        "benchmark": "masa_modes",
        "settings": {"steps": args.steps, "efficient_start_step": args.efficient_start,
                     "medians_over_steps": f">= {args.efficient_start} (0-based)",
                     "seed": args.seed, "problems_per_step": budget.problems_per_step,
                     "group_size": budget.group_size, "meta_group_size": budget.meta_group_size,
                     "max_response_length": budget.max_response_length, "lr": budget.lr,
                     "audit_fraction": 0.25, "warm_start": hf_dir.name},
        "medians": results,
        "per_step": {name: [{k: r.get(k) for k in ("step",) + KEYS} for r in rows]
                     for name, rows in per_step.items()},
        "machine": {"device": f"cpu x{args.threads} threads", "cpus": os.cpu_count(),
                    "machine": platform.machine(), "python": platform.python_version(),
                    "torch": torch.__version__,
                    "megatron_core": __import__("megatron.core",
                                                fromlist=["__version__"]).__version__,
                    "load_average_1m": os.getloadavg()[0]},
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")

    print(f"\n{budget.problems_per_step} problems/step, G={budget.group_size}, "
          f"M={budget.meta_group_size}, max {budget.max_response_length} tokens; medians over "
          f"steps {args.efficient_start}..{args.steps - 1} (masa_efficient from step "
          f"{args.efficient_start})")
    print(f"  {'config':21s} {'solution':>9s} {'meta':>7s} {'total':>7s} {'saving':>7s} "
          f"{'step s':>7s} {'gen s':>6s} {'train s':>7s} {'gated':>6s} {'cut':>6s}")
    for name, m in results.items():
        saving = m.get("token_saving_vs_masa")
        print(f"  {name:21s} {m['tokens/solution']:9.0f} {m['tokens/meta']:7.0f} "
              f"{m['tokens/total']:7.0f} {'' if saving is None else f'{saving:+.0%}':>7s} "
              f"{m['time/step']:7.2f} {m['time/generate']:6.2f} {m['time/train']:7.2f} "
              f"{m.get('gating/fraction', 0.0):6.2f} {m.get('cutoff/fraction', 0.0):6.2f}")
    print(f"  wrote {args.out}")


if __name__ == "__main__":
    main()
