"""`masa demo`: GRPO vs MASA vs MASA-efficient on the synthetic task, on CPU, with a report.

Every run goes through the real trainer (Megatron actor, embedded engine, the loop of
train/loop.py) from the same warm start, seed and budget; held-out accuracy and meta-awareness
are measured by the evaluation module (train/loop.evaluate_in_loop) at step 0, every
`eval_every` steps and at the end. The report folder holds each run's metrics JSONL and eval
records, the plots and `summary.md` (see demo/report.py).

    masa demo                      default budget, one seed: ~2 min on 2 cores (+ ~3 min warm start, once)
    masa demo --quick              about a minute: a smoke run of all three modes
    masa demo --seeds 3 --out runs/demo3
"""
from __future__ import annotations

import argparse
import os
import platform
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Optional, Sequence

from masa_megatron.errors import UserError

MODES = ("grpo", "masa", "masa_efficient")
# Kernel paths pinned so that one seed gives the same bits on x86-64 machines of different
# vendors and vector widths: ATen's vectorised kernels at AVX2 even where AVX-512 is present,
# MKL's conditional numerical reproducibility (CNR) at its AVX2 branch, oneDNN at AVX2. With the
# thread counts fixed too (one torch thread per run, `WarmStartConfig.threads` for the warm start),
# the results do not depend on the machine's core count either. On the AVX-512 machine measured
# (2026-12-03) the pinned kernels changed the bits of an SFT run and not its speed (within noise).
PINNED_CPU_KERNELS = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2",
                      "ONEDNN_MAX_CPU_ISA": "AVX2"}
THREADS_PER_RUN = 1
# Rough work per step relative to grpo (tokens per step in benchmarks/results/masa_modes.json);
# only used to start the longest runs first.
RELATIVE_COST = {"grpo": 1.0, "masa": 1.7, "masa_efficient": 1.3}


@dataclass
class DemoBudget:
    steps: int = 24
    problems_per_step: int = 8
    group_size: int = 8
    meta_group_size: int = 4
    max_response_length: int = 96
    eval_problems: int = 48
    eval_every: int = 8
    eval_n: int = 4
    eval_meta_n: int = 2
    efficient_start: float = 1 / 3  # masa_efficient's start step k, as a fraction of the steps
    lr: float = 2e-4
    n_train: int = 2000

    @property
    def efficient_start_step(self) -> int:
        """masa_efficient's start step k: the gate acts on steps k, k+1, .. (logged from k + 1)."""
        return max(1, round(self.efficient_start * self.steps))


QUICK = DemoBudget(steps=3, problems_per_step=2, group_size=4, meta_group_size=2,
                   max_response_length=64, eval_problems=4, eval_every=3, eval_n=2,
                   eval_meta_n=1, efficient_start=0.34, n_train=64)


def run_config(budget: DemoBudget, mode: str, seed: int, hf_dir: Path, train_file: Path,
               eval_file: Path, out_dir: Path):
    from masa_megatron.config import ExperimentConfig
    from masa_megatron.config_checks import validate_static
    cfg = ExperimentConfig(name=f"{mode}-s{seed}")
    cfg.model.hf_path, cfg.model.seed = str(hf_dir), 1234 + seed
    cfg.masa.mode = mode
    cfg.masa.efficient_start_step = budget.efficient_start_step
    cfg.masa.audit_fraction = 0.25
    cfg.grpo.group_size, cfg.masa.meta_group_size = budget.group_size, budget.meta_group_size
    cfg.grpo.micro_batch_tokens = 4096   # 8192: 1.5x the peak memory, no faster
    cfg.grpo.old_logprobs = "policy"   # on-policy, one optimizer step: skip the recompute
    r = cfg.rollout
    r.max_response_length, r.max_prompt_length, r.seed = budget.max_response_length, 1024, seed
    cfg.data.train_files, cfg.data.eval_files = [str(train_file)], [str(eval_file)]
    cfg.data.prompt_batch_size, cfg.data.seed = budget.problems_per_step, seed
    o = cfg.optimizer
    o.lr, o.weight_decay, o.warmup_steps, o.clip_grad = budget.lr, 0.0, 2, 1.0
    t = cfg.trainer
    t.steps, t.eval_every, t.output_dir = budget.steps, budget.eval_every, str(out_dir)
    t.eval_n, t.eval_meta_n = budget.eval_n, budget.eval_meta_n
    cfg.checkpoint.save_every = 0
    cfg.logging.progress = True
    validate_static(cfg)
    return cfg


def run_one(cfg, log=print) -> float:
    """Train one configuration in this process; returns its wall time in seconds."""
    from masa_megatron.parallel import destroy_parallel, init_parallel
    from masa_megatron.train.loop import run_loop
    from masa_megatron.train.main import build_training

    started = time.time()
    init_parallel(cfg.parallel, seed=cfg.model.seed)
    try:
        parts, start = build_training(cfg, log=log)
        run_loop(parts, start)
        parts.sinks.close()
        parts.engine.shutdown()
    finally:
        destroy_parallel()
    return time.time() - started


def parse_seeds(text: str) -> list[int]:
    """A count ("3": seeds 0, 1, 2) or a comma-separated list ("3,4,5"); at least one seed."""
    try:
        seeds = [int(part) for part in text.split(",") if part.strip()] if "," in text else \
            list(range(int(text)))
    except ValueError:
        raise UserError(f"--seeds {text!r}: a count (3) or a comma-separated list (3,4,5)") \
            from None
    if not seeds:
        raise UserError(f"--seeds {text!r}: at least one seed")
    return seeds


def _parse(argv: Optional[Sequence[str]]):
    p = argparse.ArgumentParser(prog="masa demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a ~1 minute smoke run of all modes")
    p.add_argument("--steps", type=int, default=None, help="RL steps per run")
    p.add_argument("--seeds", default="1", help="a count (3 -> seeds 0,1,2) or a list (0,5)")
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of " +
                   ", ".join(MODES))
    p.add_argument("--out", default="runs/demo", help="report folder")
    p.add_argument("--jobs", type=int, default=None, help="runs trained at once, each a "
                   "process (default: CPU cores + 1, at most the number of runs)")
    p.add_argument("--cache-dir", default=None, help="where the warm start is cached "
                   "(default $MASA_CACHE_DIR or ~/.cache/masa_megatron)")
    args = p.parse_args(argv)
    seeds = parse_seeds(args.seeds)
    modes = [m for m in args.modes.split(",") if m]
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise UserError(f"--modes: unknown mode {bad[0]!r}; choose from {', '.join(MODES)}")
    if args.jobs is not None and args.jobs < 1:
        raise UserError(f"--jobs = {args.jobs}: must be >= 1")
    if args.steps is not None and args.steps < 1:
        raise UserError(f"--steps = {args.steps}: must be >= 1")
    return args, seeds, modes


def pin_cpu_kernels() -> dict:
    """Set `PINNED_CPU_KERNELS` in this process's environment (inherited by the workers) where
    the user has not set them, on x86-64 only; must run before the first torch kernel. Returns
    what is in effect."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return {}
    for name, value in PINNED_CPU_KERNELS.items():
        os.environ.setdefault(name, value)
    return {name: os.environ[name] for name in PINNED_CPU_KERNELS}


def main(argv: Optional[Sequence[str]] = None) -> int:
    from masa_megatron.data.synthetic import to_verl_rows, generate_problems, write_rows
    from masa_megatron.demo.jobs import RunSpec, cpu_seconds, run_specs
    from masa_megatron.demo.report import write_demo_report
    from masa_megatron.demo.warmstart import WarmStartConfig, cached_warm_start, warm_start

    args, seeds, modes = _parse(argv)
    pinned = pin_cpu_kernels()
    budget = QUICK if args.quick else DemoBudget()
    if args.steps is not None:
        budget = replace(budget, steps=args.steps,
                         eval_every=max(1, min(budget.eval_every, args.steps)))
    out = Path(args.out)
    started = time.time()
    ws = WarmStartConfig(max_len=budget.max_response_length)
    if args.quick:
        ws = replace(ws, steps=500, n_problems=600, meta_fraction=0.5, hidden=64, layers=2,
                     heads=2, kv_heads=1, head_dim=32,
                     intermediate=128)
    cache_dir = Path(args.cache_dir) if args.cache_dir else None
    cached = cached_warm_start(ws, cache_dir) is not None
    hf_dir = warm_start(ws, cache_dir)
    warm_s = None if cached else time.time() - started
    warm_cpu_s = None if cached else cpu_seconds()
    train_file = write_rows(to_verl_rows(generate_problems(budget.n_train, 0, "train"), "train"),
                            out / "data" / "train.parquet")
    eval_file = write_rows(to_verl_rows(generate_problems(budget.eval_problems, 0, "eval"),
                                        "eval"), out / "data" / "eval.parquet")
    order = sorted(modes, key=lambda m: -RELATIVE_COST[m])   # longest first: better packing
    # One more worker than cores: the three modes' runs differ in length, so with one per core
    # a core idles at the end; each worker peaks at ~1.3 GB.
    jobs = args.jobs or min(len(seeds) * len(modes), (os.cpu_count() or 1) + 1)
    threads = THREADS_PER_RUN
    specs = [RunSpec(mode, seed, asdict(budget), str(hf_dir), str(train_file), str(eval_file),
                     str(out / "runs" / f"{mode}-s{seed}"), threads)
             for seed in seeds for mode in order]
    print(f"demo: {len(specs)} runs of {budget.steps} steps, {jobs} at a time", flush=True)
    results = run_specs(specs, jobs)
    runs = {(s.mode, s.seed): (Path(s.run_dir), results[s.name]["wall_s"]) for s in specs}
    timing = {"total_s": time.time() - started, "warm_start_s": warm_s,
              "total_cpu_s": cpu_seconds(), "warm_start_cpu_s": warm_cpu_s,
              "runs_cpu_s": {name: r["cpu_s"] for name, r in results.items()},
              "jobs": jobs, "threads_per_job": threads, "pinned_cpu_kernels": pinned,
              "peak_rss_total_gib": max(r["peak_rss_total_bytes"] for r in results.values())
              / 2**30}
    summary = write_demo_report(out, runs, budget, timing)
    print(f"demo: finished in {timing['total_s']:.0f} s; report: {summary}")
    return 0
