"""Time-to-accuracy on the demo task: grpo vs masa vs masa_efficient (text and head predictors).

Each configuration is a real training run through `masa demo`'s machinery (demo.run.run_config,
trained in `demo.jobs` worker processes, `--jobs` at a time with one torch thread each: Megatron
actor, embedded engine, train/loop.py) from the task's cached warm start, with the demo's budget,
evaluated every `--eval-every` steps. Runs that share the machine share it the same way (one core
each), so their wall times compare.

For a run, T(target) is the first evaluated step after step 0 whose accuracy (pass@1 at T = 1)
is at least the target; its cost is the training wall time and the generated tokens summed over
steps 1..T (evaluation excluded). Per seed, the speed-up of a configuration over grpo is
cost(grpo) / cost(config), for wall time and for tokens; reported as medians over seeds. A run
that never reaches the target has no cost; a ratio needs both runs to reach it. When the target
is missed, the summary also gives the speed-ups to the highest accuracy every run reached
(`_common_level`: chosen after the runs, so descriptive only).

Targets live in TASKS, each fixed before the race that first used it. A race that changes the
target or a setting chosen by looking at earlier runs (a gate threshold, the learning rate) runs
on new seeds, so that nothing is scored on the runs that chose it. Every race, what it changed
and why, with its figures: benchmarks/RESULTS.md (the masa_efficiency rows and notes).

- Held-out problems (the default): RL barely moves the demo's 1.1M warm start there (it memorises
  its SFT problems), so `--pool N` trains and evaluates every configuration on one fixed pool of
  N train-split problems (N/8 of each level 1-8; levels 5-8 are almost never solved, the prompts
  gating is for). Pool accuracy is training accuracy, not generalisation.
- `--task steps` (the demo's) has meta answers longer than its solutions (~42 vs ~32 tokens; the
  paper: 2,293 vs 6,251), so the M = G/2 meta rollouts add ~66 % to a step's tokens (the paper
  ~18 %). `--task columns` works every operation column by column (`synthetic.column_work`),
  solutions 2-4x as long, max response length 192, so meta rollouts add ~20 %, as in the paper.

`--from-runs DIR` summarises finished runs again (DIR is the work folder a run prints; the
summary is written once every run has finished, so a stopped race is summarised this way).
The races so far:

    python benchmarks/masa_efficiency.py --seeds 3
    python benchmarks/masa_efficiency.py --pool 32 --steps 60 --eval-every 10 --eval-n 8 \
        --name masa_efficiency_pool
    python benchmarks/masa_efficiency.py --pool 32 --steps 100 --k 20 --seeds 3,4,5 \
        --eval-every 10 --eval-n 8 --configs grpo,masa_efficient/head,masa_efficient/head@0.5 \
        --name masa_efficiency_pool2
    python benchmarks/masa_efficiency.py --task columns --pool 32 --steps 80 --k 20 \
        --seeds 3,4,5 --eval-every 10 --eval-n 8 --jobs 2 --target 0.51 \
        --configs masa_efficient/head@0.5,grpo --name masa_efficiency_columns
    python benchmarks/masa_efficiency.py --task columns --pool 32 --steps 80 --k 20 \
        --seeds 6,7,8 --eval-every 10 --eval-n 8 --jobs 2 \
        --configs grpo,masa_efficient/head,masa_efficient/head@0.5 --name masa_efficiency_columns2
    python benchmarks/masa_efficiency.py --task columns --pool 32 --steps 100 --k 20 --lr 1e-4 \
        --seeds 9,10,11 --eval-every 10 --eval-n 8 --jobs 2 \
        --configs grpo,masa_efficient/head,masa_efficient/head@0.5 --name masa_efficiency_columns3
    python benchmarks/masa_efficiency.py --task columns --pool 32 --steps 70 --k 20 --lr 1e-4 \
        --seeds 12,13,14 --eval-every 10 --eval-n 8 --jobs 2 --target 0.46484375 \
        --configs masa_efficient/head@0.5,grpo --name masa_efficiency_columns4

Prints a table and writes benchmarks/results/<--name>.json (default masa_efficiency) and
<--name>.png: accuracy against generated tokens, one panel per seed, the target as a dashed line
and step k marked on each MASA curve. `--plot NAME` redraws the figure from results/NAME.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import NamedTuple


class Task(NamedTuple):
    """A version of the demo task: its solution style, max response length (= the meta prompt's
    {MAX}) and targets, each fixed before the race that first used it (None: not measured)."""
    solution_style: str
    max_response_length: int
    target_accuracy: float | None         # held-out problems
    target_pool_accuracy: float | None    # --pool


TASKS = {
    # Held out: the warm start's 0.125 on the demo's 48 problems + 0.025 (~1 standard error),
    # fixed before the first run. Pool: 0.35, fixed before any pool run after one grpo pilot on
    # 16 easier problems.
    "steps": Task("steps", 96, target_accuracy=0.15, target_pool_accuracy=0.35),
    # First columns race (seeds 3-5): 0.51 = its warm start's pool accuracy (0.414, masa eval, 8
    # samples, T = 1) + 0.10, the steps task's margin; no run reached it (--target 0.51 reruns
    # it). Since then 0.4375 (112 of 256 samples), the highest accuracy every grpo run of that
    # race reached, fixed before the second columns race (seeds 6-8) and kept for the third.
    "columns": Task("columns", 192, target_accuracy=None, target_pool_accuracy=0.4375),
}
RESULTS_DIR = Path(__file__).parent / "results"
CONFIGS = {  # name -> (masa.mode, other config overrides)
    "grpo": ("grpo", {}),
    "masa": ("masa", {}),
    "masa_efficient/text": ("masa_efficient", {"masa.predictor": "text"}),
    "masa_efficient/head": ("masa_efficient", {"masa.predictor": "head"}),
    # the head gate at 0.5: skip a problem when its G rollouts are more likely than not to agree
    # (default 0.9). Added after the first pool race, where 0.9 gated 14 % of problems while
    # ~80 % of each step's groups had no signal (RESULTS.md).
    "masa_efficient/head@0.5": ("masa_efficient", {"masa.predictor": "head",
                                                   "masa.head_gate_threshold": 0.5}),
}
DEFAULT_CONFIGS = "grpo,masa,masa_efficient/text,masa_efficient/head"


def accuracy_curve(metrics: list[dict]) -> tuple[list[dict], float, float]:
    """Each evaluation: step, accuracy, and the wall seconds and generated tokens of steps
    1..step (evaluation excluded); then the run's total wall seconds and tokens."""
    wall = tokens = 0.0
    curve = []
    for row in metrics:
        if row["step"] > 0:
            wall += row.get("time/step", 0.0)
            tokens += row.get("tokens/total", 0.0)
        if "eval/accuracy" in row:
            curve.append({"step": row["step"], "accuracy": row["eval/accuracy"], "wall_s": wall,
                          "tokens": tokens})
    return curve, wall, tokens


def first_reaching(curve: list[dict], level: float) -> dict | None:
    """The first evaluation after step 0 with accuracy >= level (None when never)."""
    return next((point for point in curve if point["step"] > 0 and point["accuracy"] >= level),
                None)


GATE_SHARES = ("gating/fraction", "gating/audit_precision", "solution/zero_variance_fraction")
GATE_COLUMNS = (*GATE_SHARES, "gating/recall")


def gate_shares(metrics: list[dict], k: int) -> dict:
    """Means over the steps that ran after step k (logged steps k+1.., where the gate acts; the
    loop logs 0-based step s as s + 1) of the gated fraction, the audit precision and the share
    of trained groups with no signal."""
    out = {}
    for key in GATE_SHARES:
        values = [row[key] for row in metrics if row["step"] > k and key in row]
        out[key] = statistics.fmean(values) if values else None
    out["gating/recall"] = gate_recall(*(out[key] for key in GATE_SHARES))
    return out


def gate_recall(gated: float | None, precision: float | None,
                no_signal_kept: float | None) -> float | None:
    """Share of the no-signal problems that the gate skipped, estimated from the means: with g
    gated, audit precision P and a share Z of the kept groups without signal,
    recall = g P / (g P + (1 - g) Z)."""
    if gated is None or no_signal_kept is None or (gated > 0 and precision is None):
        return None    # gated problems but no audit to say how many of them had no signal
    skipped = gated * (precision or 0.0)
    missed = (1 - gated) * no_signal_kept
    return skipped / (skipped + missed) if skipped + missed > 0 else None


def time_to_target(metrics: list[dict], target: float, k: int = 0) -> dict:
    """T = the first evaluated step after step 0 with accuracy >= target: its cost (None when
    never reached), the final accuracy, the totals, the gate shares after step k and the whole
    curve."""
    curve, wall, tokens = accuracy_curve(metrics)
    return {"reached": first_reaching(curve, target),
            "final_accuracy": curve[-1]["accuracy"] if curve else None,
            "total_wall_s": wall, "total_tokens": tokens,
            "from_k": gate_shares(metrics, k), "curve": curve}


def speedups(per_seed: dict, name: str, level: float | None = None) -> dict:
    """Median over seeds of cost(grpo) / cost(name), for wall time and tokens, to the target
    (or, with `level`, to that accuracy)."""
    def cost(run: dict) -> dict | None:
        return run["reached"] if level is None else first_reaching(run["curve"], level)
    out = {}
    for key in ("wall_s", "tokens"):
        pairs = [(cost(per_seed[s]["grpo"]), cost(per_seed[s][name])) for s in per_seed]
        ratios = [ours[key] / theirs[key] for ours, theirs in pairs if ours and theirs]
        out[key] = statistics.median(ratios) if ratios else None
        out[f"{key}_seeds"] = len(ratios)
    return out


def common_level(per_seed: dict) -> float:
    """The highest accuracy every run reached at some evaluation (a level chosen after the runs,
    reported apart from the fixed target)."""
    return min(max(p["accuracy"] for p in run["curve"] if p["step"] > 0)
               for runs in per_seed.values() for run in runs.values())


def plot_races(results: dict, out: Path) -> Path:
    """Accuracy vs cumulative generated tokens per configuration, one panel per seed; the fixed
    target dashed, and a dot where each MASA run reaches step k (where the gate starts)."""
    from masa_megatron.demo.report import new_figure
    from masa_megatron.demo.run import DemoBudget
    from masa_megatron.eval.report import save_figure

    per_seed, target = results["per_seed"], results["settings"]["target_accuracy"]
    k = DemoBudget(**results["settings"]["budget"]).efficient_start_step
    fig = new_figure(4.2 * len(per_seed), 3.4)
    for i, (seed, runs) in enumerate(per_seed.items()):
        ax = fig.add_subplot(1, len(per_seed), i + 1)
        for name, run in runs.items():
            curve = run["curve"]
            color = f"C{list(CONFIGS).index(name) % 10}"    # one colour per config in every race
            ax.plot([p["tokens"] / 1e3 for p in curve], [p["accuracy"] for p in curve],
                    marker=".", color=color, label=name)
            at_k = next((p for p in curve if p["step"] == k), None)
            if name != "grpo" and at_k:
                ax.plot(at_k["tokens"] / 1e3, at_k["accuracy"], "o", color=color, markersize=9,
                        alpha=0.4)
        ax.axhline(target, color="black", linestyle="--", linewidth=0.8)
        ax.set(title=f"seed {seed}", xlabel="generated tokens (thousands)")
        if i == 0:
            ax.set_ylabel("pool accuracy" if results["settings"].get("pool") else "accuracy")
            ax.legend(fontsize=7, title=f"dashed: target; big dot: step k = {k}",
                      title_fontsize=7)
    return save_figure(fig, out)


def main() -> None:
    from dataclasses import asdict

    from masa_megatron.data.synthetic import generate_problems, to_verl_rows, write_rows
    from masa_megatron.demo.jobs import RunSpec, run_specs
    from masa_megatron.demo.run import DemoBudget, parse_seeds
    from masa_megatron.demo.warmstart import WarmStartConfig, warm_start
    from masa_megatron.errors import UserError

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", default="steps", choices=list(TASKS), help="the demo task's "
                   "solution style: steps (the demo's) or columns (~3x longer solutions)")
    p.add_argument("--seeds", default="3", help="a count (3: seeds 0, 1, 2) or a list (3,4,5)")
    p.add_argument("--steps", type=int, default=DemoBudget.steps)
    p.add_argument("--k", type=int, default=None, help="masa_efficient's start step (default: "
                   "the demo's, a third of --steps)")
    p.add_argument("--eval-every", type=int, default=5)
    p.add_argument("--lr", type=float, default=DemoBudget.lr, help="the policy's learning rate "
                   "(the meta head keeps its own, masa.head_lr)")
    p.add_argument("--configs", default=DEFAULT_CONFIGS, help="comma-separated, of " +
                   ", ".join(CONFIGS) + "; runs start in this order (slowest first is fastest)")
    p.add_argument("--jobs", type=int, default=(os.cpu_count() or 1) + 1,
                   help="runs at once, one process and one torch thread each (default: cores "
                        "+ 1, as masa demo)")
    p.add_argument("--pool", type=int, default=0, help="train and evaluate on one fixed pool "
                   "of this many train-split problems (a multiple of 8; 0: the demo's held-out "
                   "set)")
    p.add_argument("--eval-n", type=int, default=DemoBudget.eval_n, help="samples per problem "
                   "at each evaluation")
    p.add_argument("--target", type=float, default=None, help="replace the task's fixed target "
                   "with a race's own, recorded in RESULTS.md before it ran (the first columns "
                   "race: 0.51; the fourth: 0.46484375)")
    p.add_argument("--name", default="masa_efficiency", help="result file results/<name>.json")
    p.add_argument("--plot", default=None, metavar="NAME", help="train nothing: redraw "
                   "results/NAME.png from results/NAME.json")
    p.add_argument("--from-runs", default=None, metavar="DIR", help="train nothing: summarise "
                   "the finished runs in DIR (the work folder a run printed), with the same "
                   "settings")
    args = p.parse_args()
    if args.plot:
        source = RESULTS_DIR / f"{args.plot}.json"
        if not source.is_file():
            p.error(f"--plot {args.plot}: no results file {source}")
        results = json.loads(source.read_text())
        if any("curve" not in run for runs in results["per_seed"].values() for run in runs.values()):
            p.error(f"--plot {args.plot}: {source} has no accuracy curves (written before they "
                    "were recorded)")
        print(f"wrote {plot_races(results, source.with_suffix('.png'))}")
        return
    if args.pool % 8 or args.pool < 0:
        p.error(f"--pool {args.pool}: must be a multiple of 8 (N/8 problems of each level)")
    task = TASKS[args.task]
    target = args.target if args.target is not None else (
        task.target_pool_accuracy if args.pool else task.target_accuracy)
    if target is None:
        p.error(f"--task {args.task} has no target {'with' if args.pool else 'without'} --pool")
    budget = replace(DemoBudget(), steps=args.steps, eval_every=args.eval_every,
                     eval_n=args.eval_n, max_response_length=task.max_response_length,
                     lr=args.lr)
    if args.k is not None:
        budget = replace(budget, efficient_start=args.k / args.steps)
    try:
        seeds = parse_seeds(args.seeds)
    except UserError as err:
        p.error(str(err))
    names = [n for n in args.configs.split(",") if n]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        p.error(f"--configs: unknown {unknown}; known: {', '.join(CONFIGS)}")
    if "grpo" not in names:
        p.error(f"--configs {args.configs}: must include grpo, the baseline of every speed-up")
    k = budget.efficient_start_step
    per_seed: dict = {}
    if args.from_runs:
        work = Path(args.from_runs)
        for seed in seeds:
            per_seed[seed] = measure(work, names, seed, target, k)
        return report(args, budget, "(from runs)", target, per_seed)
    hf_dir = warm_start(WarmStartConfig(max_len=task.max_response_length,
                                        solution_style=task.solution_style))
    work = Path(tempfile.mkdtemp(prefix="masa_efficiency-"))
    print(f"runs in {work}", flush=True)
    if args.pool:
        train = generate_problems(args.pool, 0, "train", style=task.solution_style)  # N/8 a level
        held_out = to_verl_rows(train, "eval")
    else:
        train = generate_problems(budget.n_train, 0, "train", style=task.solution_style)
        held_out = to_verl_rows(generate_problems(budget.eval_problems, 0, "eval",
                                                  style=task.solution_style), "eval")
    train_file = write_rows(to_verl_rows(train, "train"), work / "train.parquet")
    eval_file = write_rows(held_out, work / "eval.parquet")
    # one queue for every run, so no core waits for a seed's slowest run
    run_specs([RunSpec(CONFIGS[name][0], seed, asdict(budget), str(hf_dir), str(train_file),
                       str(eval_file), str(run_dir(work, name, seed)),
                       label=name.replace("/", "-"), overrides=CONFIGS[name][1])
               for name in names for seed in seeds], args.jobs)
    for seed in seeds:
        per_seed[seed] = measure(work, names, seed, target, k)
    report(args, budget, hf_dir, target, per_seed)


def run_dir(work: Path, name: str, seed: int) -> Path:
    return work / f"{name.replace('/', '-')}-s{seed}"


def measure(work: Path, names: list[str], seed: int, target: float, k: int) -> dict:
    from masa_megatron.metrics import read_jsonl

    runs = {name: time_to_target(read_jsonl(run_dir(work, name, seed) / "metrics.jsonl"), target,
                                 k) for name in names}
    for name, run in runs.items():
        print(f"{name} seed {seed}: reached {run['reached']}, final accuracy "
              f"{run['final_accuracy']}, tokens {run['total_tokens']:.0f}", flush=True)
    return runs


def report(args, budget, hf_dir, target: float, per_seed: dict) -> None:
    names = list(next(iter(per_seed.values())))
    level = common_level(per_seed)
    summary = {name: {**speedups(per_seed, name),
                      "to_common_level": speedups(per_seed, name, level),
                      "reached": sum(bool(per_seed[s][name]["reached"]) for s in per_seed),
                      "median_final_accuracy": statistics.median(
                          per_seed[s][name]["final_accuracy"] for s in per_seed),
                      "median_total_tokens": statistics.median(
                          per_seed[s][name]["total_tokens"] for s in per_seed),
                      "median_from_k": {key: _median_or_none(
                          per_seed[s][name]["from_k"][key] for s in per_seed)
                          for key in GATE_COLUMNS}}
               for name in names}
    what = f"accuracy on the {args.pool}-problem training pool" if args.pool else \
        "held-out accuracy"
    print(f"\ntarget {what} {target}; seeds {list(per_seed)}, {args.steps} steps")
    print("| config | seeds reaching | speed-up wall (median) | speed-up tokens (median) | "
          "final acc (median) | tokens / run (median) |")
    print("|---|---|---|---|---|---|")
    fmt = lambda v: "–" if v is None else f"{v:.2f}"   # noqa: E731
    for name, row in summary.items():
        print(f"| {name} | {row['reached']}/{len(per_seed)} | {fmt(row['wall_s'])} "
              f"({row['wall_s_seeds']}) | {fmt(row['tokens'])} ({row['tokens_seeds']}) | "
              f"{row['median_final_accuracy']:.3f} | {row['median_total_tokens']:.0f} |")
    print(f"\nnot the target: every run reached accuracy {level:.3f} (chosen after the runs); "
          "speed-up to it, wall / tokens (median over seeds):")
    for name, row in summary.items():
        common = row["to_common_level"]
        print(f"  {name}: {fmt(common['wall_s'])} / {fmt(common['tokens'])}")
    print("after step k (median over seeds of the per-run means): gated fraction / audit "
          "precision / trained groups with no signal / estimated gate recall")
    for name, row in summary.items():
        shares = row["median_from_k"]
        print(f"  {name}: " + " / ".join(fmt(shares[key]) for key in GATE_COLUMNS))
    summary["_common_level"] = level
    written = write_results(args, budget, hf_dir, target, summary, per_seed)
    figure = plot_races(json.loads(written.read_text()), written.with_suffix(".png"))
    print(f"wrote {written} and {figure}")


def _median_or_none(values) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def write_results(args, budget, hf_dir, target: float, summary: dict, per_seed: dict) -> Path:
    import torch
    out = RESULTS_DIR / f"{args.name}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "torch": torch.__version__, "load_average_1m": os.getloadavg()[0]},
        "settings": {**vars(args), "target_accuracy": target,
                     "budget": budget.__dict__, "warm_start": str(hf_dir)},
        "complete": bool(summary), "summary": summary, "per_seed": per_seed},
        indent=1, default=str))
    return out


if __name__ == "__main__":
    main()
