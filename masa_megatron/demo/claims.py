"""The demo's three claims, checked seed by seed from each run's held-out evaluations.

Per run (mode, seed), from its first (step 0) and last evaluation on the same held-out problems:
accuracy start/end and the gain end - start with its paired-bootstrap standard error
(`eval.metrics.paired_gain`), the pass-rate MAE start/end and its ratio start / end, the meta
reward start/end, and the generated tokens per step after masa_efficient's start step k.

1. RL improves the task: GRPO's gain, averaged over seeds, is at least `MIN_GAIN`, and in every
   seed it exceeds two standard errors.
2. MASA makes the model meta-aware: in every seed MASA's MAE falls at least `MIN_MAE_RATIO`-fold
   and its meta reward rises, while GRPO's MAE ratio and meta-reward rise are each less than half
   of MASA's in that seed.
3. MASA-efficient is cheaper at no cost in accuracy: in every seed it generates fewer tokens per
   step than MASA after step k, and its end accuracy is within two standard errors of MASA's (a
   paired bootstrap over the same held-out problems at the end).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from masa_megatron.eval.metrics import paired_gain

MIN_GAIN = 0.10
MIN_MAE_RATIO = 3.0


@dataclass
class Claim:
    name: str
    holds: bool | None          # None: a mode it needs was not run
    detail: str


def eval_records(run_dir: Path, which: str) -> list[dict]:
    """The per-problem records of the run's first or last evaluation ([] when there is none)."""
    files = sorted((Path(run_dir) / "eval").glob("step_*.jsonl"))
    if not files:
        return []
    path = files[0] if which == "first" else files[-1]
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def eval_scores(run_dir: Path, which: str) -> dict[str, list[float]]:
    """Problem id -> scores of the run's first or last evaluation."""
    return {str(r["id"]): list(r.get("scores") or []) for r in eval_records(run_dir, which)}


def run_stats(run_dir: Path, series: dict, k_step: int) -> dict:
    """One run's figures (see the module docstring); series is `report.run_series(run_dir)`."""
    first, last = series["evals"][0], series["evals"][-1]
    gain = paired_gain(eval_scores(run_dir, "first"), eval_scores(run_dir, "last"))
    after_k = [row["tokens/total"] for row in series["steps"]
               if row["step"] > k_step and "tokens/total" in row]
    mae_start, mae_end = first.get("mae"), last.get("mae")
    return {"acc_start": first["accuracy"], "acc_end": last["accuracy"],
            "gain": gain["gain"], "gain_se": gain["se"],
            "mae_start": mae_start, "mae_end": mae_end,
            "mae_ratio": mae_start / mae_end if mae_start and mae_end else math.nan,
            "meta_reward_start": first.get("meta_reward"),
            "meta_reward_end": last.get("meta_reward"),
            "tokens_per_step_after_k": sum(after_k) / len(after_k) if after_k else math.nan}


def _seeds(stats: dict, *modes: str) -> list[int]:
    return sorted({seed for (_, seed) in stats
                   if all((mode, seed) in stats for mode in modes)})


def _rise(s: dict) -> float:
    return (s["meta_reward_end"] or 0.0) - (s["meta_reward_start"] or 0.0)


def _grpo_gain(stats: dict, run_dirs: dict, seeds: list[int]) -> tuple[bool, str]:
    runs = [stats["grpo", s] for s in seeds]
    mean = sum(r["gain"] for r in runs) / len(runs)
    each = all(r["gain"] > 2 * r["gain_se"] for r in runs)
    return mean >= MIN_GAIN and each, (
        f"mean gain {mean:+.3f} (needs >= {MIN_GAIN:+.2f}); per seed "
        + ", ".join(f"{r['gain']:+.3f} ± {r['gain_se']:.3f}" for r in runs)
        + " (each needs > 2 SE)")


def _meta_awareness(stats: dict, run_dirs: dict, seeds: list[int]) -> tuple[bool, str]:
    holds, parts = True, []
    for s in seeds:
        masa, grpo = stats["masa", s], stats["grpo", s]
        holds &= (masa["mae_ratio"] >= MIN_MAE_RATIO and _rise(masa) > 0
                  and grpo["mae_ratio"] < masa["mae_ratio"] / 2 and _rise(grpo) < _rise(masa) / 2)
        parts.append(f"seed {s}: MAE /{masa['mae_ratio']:.1f} (grpo /{grpo['mae_ratio']:.1f}),"
                     f" meta reward {_rise(masa):+.3f} (grpo {_rise(grpo):+.3f})")
    return holds, "; ".join(parts)


def _efficiency(stats: dict, run_dirs: dict, seeds: list[int]) -> tuple[bool, str]:
    holds, parts = True, []
    for s in seeds:
        masa, eff = stats["masa", s], stats["masa_efficient", s]
        diff = paired_gain(eval_scores(run_dirs["masa", s], "last"),
                           eval_scores(run_dirs["masa_efficient", s], "last"))
        ratio = eff["tokens_per_step_after_k"] / masa["tokens_per_step_after_k"]
        holds &= ratio < 1 and abs(diff["gain"]) <= 2 * diff["se"]
        parts.append(f"seed {s}: tokens/step {ratio:.2f}x masa's, end accuracy "
                     f"{diff['gain']:+.3f} ± {diff['se']:.3f}")
    return holds, "; ".join(parts)


# (claim, the modes it compares, its check over the seeds where all of them ran)
CLAIMS = (("GRPO raises held-out accuracy", ("grpo",), _grpo_gain),
          ("MASA makes the model meta-aware", ("grpo", "masa"), _meta_awareness),
          ("MASA-efficient generates fewer tokens at MASA's accuracy",
           ("masa", "masa_efficient"), _efficiency))


def check_claims(stats: dict, run_dirs: dict) -> list[Claim]:
    """stats, run_dirs: {(mode, seed): run_stats(...) / run folder} -> the three claims."""
    claims = []
    for name, modes, check in CLAIMS:
        seeds = _seeds(stats, *modes)
        if not seeds:
            claims.append(Claim(name, None, f"{' or '.join(modes)} was not run"))
            continue
        holds, detail = check(stats, run_dirs, seeds)
        claims.append(Claim(name, bool(holds), detail))
    return claims


def format_cell(value) -> str:
    """A number for the summary tables: ints as they are, 3 decimals below 100, none above, '–'
    for a missing or non-finite value."""
    if isinstance(value, int):
        return str(value)
    finite = isinstance(value, float) and math.isfinite(value)
    return f"{value:.3f}" if finite and abs(value) < 100 else (f"{value:.0f}" if finite else "–")


def claims_markdown(claims: list[Claim], stats: dict) -> list[str]:
    """The claims, then one row per run: what summary.md shows under "Claims"."""
    verdict = {True: "holds", False: "does NOT hold", None: "not checked"}
    lines = ["## Claims, seed by seed", ""]
    lines += [f"- **{c.name}: {verdict[c.holds]}.** {c.detail}" for c in claims]
    cols = ["acc_start", "acc_end", "gain", "gain_se", "mae_start", "mae_end", "mae_ratio",
            "meta_reward_start", "meta_reward_end", "tokens_per_step_after_k"]
    lines += ["", "| mode | seed | " + " | ".join(cols) + " |", "|" + "---|" * (len(cols) + 2)]
    for (mode, seed), s in sorted(stats.items()):
        lines.append(f"| {mode} | {seed} | " + " | ".join(format_cell(s[c]) for c in cols) + " |")
    return lines
