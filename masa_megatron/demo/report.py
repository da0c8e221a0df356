"""The demo's report: plots and a summary table from each run's metrics and eval records.

Per run (`runs/<mode>-s<seed>/`): `metrics.jsonl` (step 0: the initial evaluation; then one row
per RL step, with held-out evaluation every eval_every steps) and `eval/step_NNNNNN.jsonl`
(per-problem records). Wall time and generated tokens on the x axes are cumulative training
time (`time/step`) and training tokens (`tokens/total`), evaluation excluded; curves are means
over seeds.
"""
from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

from masa_megatron.demo.claims import (check_claims, claims_markdown, eval_records,
                                       format_cell, run_stats)
from masa_megatron.eval.report import plot_scatter, save_figure
from masa_megatron.metrics import read_jsonl

COLORS = {"grpo": "tab:gray", "masa": "tab:blue", "masa_efficient": "tab:orange"}


def new_figure(width: float, height: float):
    """An empty figure on the Agg canvas (subplots are added per panel)."""
    from matplotlib.figure import Figure
    return Figure(figsize=(width, height))


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def _mean(values) -> float:
    values = [v for v in values if _finite(v)]
    return sum(values) / len(values) if values else float("nan")


def run_series(run_dir: Path) -> dict:
    """Cumulative time/tokens per step, eval points, and per-step training metrics of one run."""
    rows = read_jsonl(run_dir / "metrics.jsonl")
    wall, tokens, evals, steps = 0.0, 0.0, [], []
    for row in rows:
        if row["step"] > 0:
            wall += row.get("time/step", 0.0)
            tokens += row.get("tokens/total", 0.0)
            steps.append(row)
        if "eval/accuracy" in row:
            evals.append({"step": row["step"], "wall": wall, "tokens": tokens,
                          "accuracy": row["eval/accuracy"],
                          "mae": row.get("eval/meta_pass_rate_mae"),
                          "meta_reward": row.get("eval/meta_reward")})
    return {"evals": evals, "steps": steps, "wall": wall, "tokens": tokens}


def _pass_rate_pairs(records: list[dict]) -> tuple[list[float], list[float]]:
    predicted, actual = [], []
    for r in records:
        parsed = [p for p in r.get("predicted_pass_rates") or [] if _finite(p)]
        if parsed and r.get("scores"):
            predicted.append(sum(parsed) / len(parsed))
            actual.append(sum(r["scores"]) / len(r["scores"]))
    return predicted, actual


def _by_mode(series: dict) -> dict:
    grouped = defaultdict(list)
    for (mode, _seed), s in series.items():
        grouped[mode].append(s)
    return grouped


def _mean_curve(runs: list[dict], x: str, y: str) -> tuple[list, list]:
    points = defaultdict(list)
    xs = defaultdict(list)
    for run in runs:
        for e in run["evals"]:
            points[e["step"]].append(e[y])
            xs[e["step"]].append(e[x])
    steps = sorted(points)
    return [_mean(xs[s]) for s in steps], [_mean(points[s]) for s in steps]


def plot_accuracy(out: Path, grouped: dict) -> Path:
    fig = new_figure(15, 4)
    axes = [fig.add_subplot(1, 3, i + 1) for i in range(3)]
    for ax, (x, label) in zip(axes, (("step", "RL step"), ("wall", "training wall time (s)"),
                                     ("tokens", "generated tokens (training)"))):
        for mode, runs in grouped.items():
            xs, ys = _mean_curve(runs, x, "accuracy")
            ax.plot(xs, ys, marker="o", label=mode, color=COLORS.get(mode))
        ax.set_xlabel(label)
        ax.set_ylabel("held-out accuracy (pass@1)")
        ax.grid(alpha=0.3)
    axes[0].legend()
    from matplotlib.ticker import FuncFormatter
    axes[2].set_xlabel("generated tokens (training), thousands")
    axes[2].xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v / 1000:g}"))
    return save_figure(fig, out / "accuracy.png")


def plot_meta_curves(out: Path, grouped: dict) -> Path:
    fig = new_figure(10, 4)
    for i, (key, label) in enumerate((("mae", "held-out pass-rate error (MAE)"),
                                      ("meta_reward", "held-out meta reward"))):
        ax = fig.add_subplot(1, 2, i + 1)
        for mode, runs in grouped.items():
            xs, ys = _mean_curve(runs, "step", key)
            ax.plot(xs, ys, marker="o", label=mode, color=COLORS.get(mode))
        ax.set_xlabel("RL step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    return save_figure(fig, out / "meta_awareness.png")


def plot_before_after(out: Path, run_dirs: dict) -> Path:
    modes = [m for m in ("grpo", "masa", "masa_efficient") if m in run_dirs]
    fig = new_figure(8, 4 * len(modes))
    for row, mode in enumerate(modes):
        for col, which in enumerate(("first", "last")):
            ax = fig.add_subplot(len(modes), 2, 2 * row + col + 1)
            pred, actual = _pass_rate_pairs(eval_records(run_dirs[mode], which))
            mae = _mean(abs(p - a) for p, a in zip(pred, actual))
            plot_scatter(ax, pred, actual, label=mode, diagonal=True,
                         xlabel="predicted pass rate", ylabel="actual pass rate")
            ax.set_title(f"{mode}, {'before' if which == 'first' else 'after'}: MAE {mae:.3f}")
    return save_figure(fig, out / "pass_rate_before_after.png")


def plot_efficiency(out: Path, grouped: dict) -> Path:
    fig = new_figure(18, 4)
    panels = (("gating/fraction", "gated fraction"), ("gating/audit_precision",
              "audit precision"), ("solution/zero_variance_fraction",
              "trained groups with no signal"), ("cutoff/fraction", "cut-off fraction"),
              ("cutoff/accuracy", "accuracy of cut rollouts"), ("tokens/total",
              "generated tokens per step"))
    for i, (key, label) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        for mode, runs in grouped.items():
            per_step = defaultdict(list)
            for run in runs:
                for row in run["steps"]:
                    per_step[row["step"]].append(row.get(key))
            steps = sorted(per_step)
            ax.plot(steps, [_mean(per_step[s]) for s in steps], label=mode,
                    color=COLORS.get(mode))
        ax.set_xlabel("RL step")
        ax.set_title(label, fontsize=9)
        ax.grid(alpha=0.3)
    fig.axes[-1].legend()
    return save_figure(fig, out / "efficiency.png")


def summary_rows(grouped: dict, k_step: int) -> list[dict]:
    rows = []
    for mode, runs in grouped.items():
        first = [r["evals"][0] for r in runs if r["evals"]]
        last = [r["evals"][-1] for r in runs if r["evals"]]
        after_k = [row for r in runs for row in r["steps"] if row["step"] > k_step]
        rows.append({
            "mode": mode, "seeds": len(runs),
            "acc_start": _mean(e["accuracy"] for e in first),
            "acc_end": _mean(e["accuracy"] for e in last),
            "mae_start": _mean(e["mae"] for e in first), "mae_end": _mean(e["mae"] for e in last),
            "meta_reward_start": _mean(e["meta_reward"] for e in first),
            "meta_reward_end": _mean(e["meta_reward"] for e in last),
            "tokens_per_step_after_k": _mean(r.get("tokens/total") for r in after_k),
            "gated_after_k": _mean(r.get("gating/fraction") for r in after_k),
            "train_wall_s": _mean(r["wall"] for r in runs),
            "train_tokens": _mean(r["tokens"] for r in runs)})
    return rows


def _timing_lines(timing: dict | None) -> list[str]:
    if not timing:
        return []
    warm = ("the warm start was cached" if timing["warm_start_s"] is None
            else f"{timing['warm_start_s']:.0f} s of it the warm start, "
                 f"{timing['warm_start_cpu_s']:.0f} CPU-s")
    return [f"Wall time {timing['total_s']:.0f} s in all ({warm}); "
            f"{timing['total_cpu_s']:.0f} CPU-seconds in all (they vary less between machines "
            f"than wall time); {timing['jobs']} run(s) at "
            f"a time with "
            f"{timing['threads_per_job']} thread(s) each; peak resident memory of the runs "
            f"together {timing['peak_rss_total_gib']:.2f} GiB.", ""]


def write_demo_report(out: Path, runs: dict, budget, timing: dict | None = None) -> Path:
    """runs: {(mode, seed): (run_dir, wall seconds)} -> plots + summary.md; returns its path.

    timing (optional): total_s, warm_start_s, jobs, threads_per_job, peak_rss_total_gib."""
    out = Path(out)
    series = {key: run_series(run_dir) for key, (run_dir, _) in runs.items()}
    grouped = _by_mode(series)
    first_seed = {mode: run_dir for (mode, seed), (run_dir, _) in sorted(runs.items(),
                                                                         reverse=True)}
    k_step = budget.efficient_start_step
    plots = [plot_accuracy(out, grouped), plot_meta_curves(out, grouped),
             plot_before_after(out, first_seed), plot_efficiency(out, grouped)]
    rows = summary_rows(grouped, k_step)
    cols = list(rows[0]) if rows else []
    lines = ["# MASA demo", "",
             f"{budget.steps} RL steps per run, {budget.problems_per_step} problems x "
             f"(G={budget.group_size} solutions + M={budget.meta_group_size} metas) per step, "
             f"max {budget.max_response_length} new tokens; masa_efficient starts at step "
             f"{k_step}. Held-out: {budget.eval_problems} problems x {budget.eval_n} solutions "
             f"(+{budget.eval_meta_n} meta rollouts). 'start' is step 0, 'end' the last step.", "",
             *_timing_lines(timing),
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r[c]) if isinstance(r[c], str) else format_cell(r[c])
                                for c in cols) + " |" for r in rows]
    run_dirs = {key: run_dir for key, (run_dir, _) in runs.items()}
    stats = {key: run_stats(run_dirs[key], s, k_step) for key, s in series.items() if s["evals"]}
    claims = check_claims(stats, run_dirs)
    lines += ["", *claims_markdown(claims, stats)]
    lines += ["", *[f"![{p.stem}]({p.name})" for p in plots]]
    summary = out / "summary.md"
    summary.write_text("\n".join(lines) + "\n")
    (out / "summary.json").write_text(json.dumps(
        {"modes": rows, "claims": [vars(c) for c in claims],
         "runs": [{"mode": mode, "seed": seed, **s} for (mode, seed), s in sorted(stats.items())]},
        indent=1, default=str))
    if timing:
        (out / "timing.json").write_text(json.dumps(timing, indent=1))
    return summary
