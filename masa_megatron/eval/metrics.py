"""Pass@k and meta-awareness metrics (pure functions, numpy only).

A problem has n graded solutions with scores s_i (correct when s_i >= 0.5), token lengths L_i,
c = #correct, empirical pass rate p = c / n, correct lengths C = {L_i : correct}. A meta prediction
is a pass rate p_hat in [0, 1] (k/8), a length l_hat and notions N. A missing prediction is None:
it is left out of every metric, and `coverage` = #not-None / #problems is reported beside it.
Metrics over an empty set are nan.
"""
from __future__ import annotations

import math
from types import SimpleNamespace
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from masa_megatron.masa.policies import MetaPrediction, text_consensus_gate
from masa_megatron.rewards.meta import normalize_notions

Number = float | None


def is_number(x) -> bool:
    """A finite int/float (numpy included), not a bool."""
    return x is not None and not isinstance(x, bool) and isinstance(x, (int, float, np.number)) \
        and math.isfinite(float(x))


def num_correct(scores: Sequence[float]) -> int:
    """c = #{i : s_i >= 0.5}."""
    return int(sum(1 for s in scores if s >= 0.5))


def pass_rate(scores: Sequence[float]) -> float:
    """p = c / n (nan when n = 0)."""
    return num_correct(scores) / len(scores) if len(scores) else float("nan")


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k (Chen et al. 2021): 1 - C(n-c, k) / C(n, k).

    Computed as the product 1 - prod_{i=n-c+1}^{n} (1 - k/i), which never forms a binomial;
    1 when n - c < k (every k-subset holds a correct sample), 0 when c = 0."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def pass_at_k_stats(scores_per_problem: Sequence[Sequence[float]],
                    ks: Iterable[int]) -> dict[int, dict]:
    """{k: {"mean", "std", "n_problems"}} of per-problem pass@k; std is the population std
    (ddof 0) across problems. Problems with fewer than k samples are left out for that k."""
    out = {}
    for k in ks:
        values = [pass_at_k(len(s), num_correct(s), k) for s in scores_per_problem if len(s) >= k]
        arr = np.asarray(values, dtype=float)
        out[int(k)] = {"mean": float(arr.mean()) if arr.size else float("nan"),
                       "std": float(arr.std()) if arr.size else float("nan"),
                       "n_problems": int(arr.size)}
    return out


def paired_gain(before: Mapping[str, Sequence[float]], after: Mapping[str, Sequence[float]],
                n_boot: int = 2000, seed: int = 0) -> dict:
    """Accuracy gain end-minus-start on the same problems, with a paired bootstrap.

    before/after: problem id -> scores. d_i = pass_rate(after_i) - pass_rate(before_i) over the
    problems in both; gain = mean(d). The standard error is the standard deviation of mean(d*)
    over `n_boot` resamples d* of the problems with replacement (fixed `seed`), so problem
    difficulty, shared by both ends, cancels. Returns gain, se and the number of problems."""
    ids = sorted(set(before) & set(after))
    if not ids:
        raise ValueError("paired_gain: no problem is in both evaluations")
    d = np.array([pass_rate(after[i]) - pass_rate(before[i]) for i in ids])
    picks = np.random.default_rng(seed).integers(0, len(d), size=(n_boot, len(d)))
    return {"gain": float(d.mean()), "se": float(d[picks].mean(axis=1).std()),
            "problems": len(ids)}


def coverage(predictions: Sequence) -> float:
    """Fraction of predictions that are present (not None / not nan)."""
    if not len(predictions):
        return float("nan")
    return sum(1 for p in predictions if is_number(p) or isinstance(p, (bool, Mapping, list))
               ) / len(predictions)


def _pairs(predicted: Sequence[Number], actual: Sequence[Number]) -> tuple[np.ndarray, np.ndarray]:
    keep = [i for i in range(len(predicted)) if is_number(predicted[i]) and is_number(actual[i])]
    return (np.asarray([predicted[i] for i in keep], dtype=float),
            np.asarray([actual[i] for i in keep], dtype=float))


def mean_absolute_error(predicted: Sequence[Number], actual: Sequence[Number]) -> float:
    """MAE = mean |p_hat - p| over problems with a prediction."""
    x, y = _pairs(predicted, actual)
    return float(np.abs(x - y).mean()) if x.size else float("nan")


def average_ranks(values: Sequence[float]) -> np.ndarray:
    """Ranks 1..n; tied values share the mean of the ranks they span."""
    arr = np.asarray(values, dtype=float)
    order = np.argsort(arr, kind="mergesort")
    ranks = np.empty(arr.size)
    i = 0
    while i < arr.size:
        j = i
        while j + 1 < arr.size and arr[order[j + 1]] == arr[order[i]]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(x: Sequence[Number], y: Sequence[Number]) -> float:
    """Spearman rho = Pearson correlation of the average ranks of the pairs present.

    nan when fewer than 2 pairs or when either side is constant (the correlation is undefined)."""
    a, b = _pairs(x, y)
    if a.size < 2:
        return float("nan")
    ra, rb = average_ranks(a) - (a.size + 1) / 2, average_ranks(b) - (b.size + 1) / 2
    denom = math.sqrt(float((ra ** 2).sum() * (rb ** 2).sum()))
    return float((ra * rb).sum() / denom) if denom > 0 else float("nan")


def calibration_curve(predicted: Sequence[Number], observed: Sequence[Number],
                      n_bins: int = 10) -> dict:
    """Equal-width bins on [0, 1]: bin b holds p_hat in [b/B, (b+1)/B) (the last bin includes 1).

    Returns {"bin_edges" (B+1), "mean_predicted", "mean_observed" (nan for empty bins), "counts"}."""
    x, y = _pairs(predicted, observed)
    idx = np.minimum(np.floor(np.clip(x, 0.0, 1.0) * n_bins + 1e-9), n_bins - 1).astype(int)
    counts = np.bincount(idx, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_pred = np.bincount(idx, weights=x, minlength=n_bins) / counts
        mean_obs = np.bincount(idx, weights=y, minlength=n_bins) / counts
    return {"bin_edges": np.round(np.linspace(0.0, 1.0, n_bins + 1), 12).tolist(),
            "mean_predicted": mean_pred.tolist(), "mean_observed": mean_obs.tolist(),
            "counts": counts.astype(int).tolist()}


def expected_calibration_error(predicted: Sequence[Number], observed: Sequence[Number],
                               n_bins: int = 10) -> float:
    """ECE = sum_b (n_b / N) |mean p_hat in b - mean p in b| over the bins of `calibration_curve`."""
    curve = calibration_curve(predicted, observed, n_bins)
    counts = np.asarray(curve["counts"], dtype=float)
    if counts.sum() == 0:
        return float("nan")
    gap = np.abs(np.asarray(curve["mean_predicted"]) - np.asarray(curve["mean_observed"]))
    return float(np.nansum(counts * gap) / counts.sum())


def length_in_range_rate(predicted_lengths: Sequence[Number],
                         correct_lengths: Sequence[Sequence[float]]) -> float:
    """Fraction of problems with min(C) < l_hat < max(C) (strict, as the length reward), over the
    problems that have a prediction and at least one correct solution (one correct: never in range)."""
    hits = [min(c) < l < max(c) for l, c in zip(predicted_lengths, correct_lengths)
            if is_number(l) and len(c)]
    return float(np.mean(hits)) if hits else float("nan")


def notion_net_counts(notions, problem_text: str, solution_texts: Sequence[str],
                      scores: Sequence[float]) -> dict[str, int] | None:
    """net(n) = #{correct O_i containing n} - #{wrong O_i containing n} (case-sensitive substring)
    for each notion n as the reward normalises them (`rewards.meta.normalize_notions`); None when
    the notions are malformed (the reward scores them 0)."""
    notions = normalize_notions(notions, problem_text)
    if notions is None:
        return None
    return {n: sum((1 if s >= 0.5 else -1) for t, s in zip(solution_texts, scores) if n in t)
            for n in notions}


def notion_precision(net_counts: Sequence[Mapping[str, int] | None]) -> dict:
    """Pooled precision = #{notions with net > 0} / #notions over all problems (micro), and the
    mean over problems with >= 1 notion of their fraction (macro, = mean notion reward); coverage =
    fraction of problems with a dict (None: no prediction)."""
    present = [m for m in net_counts if isinstance(m, Mapping) and len(m)]
    positives = sum(sum(1 for v in m.values() if v > 0) for m in present)
    total = sum(len(m) for m in present)
    macro = [sum(1 for v in m.values() if v > 0) / len(m) for m in present]
    return {"micro": positives / total if total else float("nan"),
            "macro": float(np.mean(macro)) if macro else float("nan"), "n_notions": total,
            "coverage": (sum(isinstance(m, Mapping) for m in net_counts) / len(net_counts)
                         if len(net_counts) else float("nan"))}


def is_zero_variance(scores: Sequence[float]) -> bool:
    """True when all n >= 1 solutions are correct or all are wrong (no GRPO signal)."""
    c = num_correct(scores)
    return len(scores) > 0 and c in (0, len(scores))


def gating_decision(predicted_pass_rates: Sequence[Number] | None, sigma: float = 0.1,
                    min_parsed_fraction: float = 0.5) -> bool | None:
    """The trainer's text gating rule (`masa.policies.text_consensus_gate`) on M parsed pass rates
    (None for an unparsed rollout); None when there are no predictions at all."""
    if not predicted_pass_rates:
        return None
    parsed = [float(p) for p in predicted_pass_rates if is_number(p)]
    prediction = MetaPrediction(num_meta_rollouts=len(predicted_pass_rates), pass_rates=parsed)
    rule = SimpleNamespace(gate_sigma=sigma, gate_min_parsed_fraction=min_parsed_fraction)
    return text_consensus_gate(prediction, rule, 0)


def gating_scores(gated: Sequence[bool | None],
                  scores_per_problem: Sequence[Sequence[float]]) -> dict:
    """Precision = TP/(TP+FP), recall = TP/(TP+FN), F1 = 2PR/(P+R) of "gated" against the truly
    zero-variance problems, over problems with a decision (gated_fraction too); nan when a
    denominator is 0."""
    tp = fp = fn = tn = 0
    for g, s in zip(gated, scores_per_problem):
        if g is None:
            continue
        truth = is_zero_variance(s)
        tp, fp = tp + (g and truth), fp + (g and not truth)
        fn, tn = fn + (not g and truth), tn + (not g and not truth)
    precision = tp / (tp + fp) if tp + fp else float("nan")
    recall = tp / (tp + fn) if tp + fn else float("nan")
    if math.isnan(precision) or math.isnan(recall):
        f1 = float("nan")
    else:
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    n, decided = len(gated), tp + fp + fn + tn
    return {"precision": precision, "recall": recall, "f1": f1, "tp": int(tp), "fp": int(fp),
            "fn": int(fn), "tn": int(tn),
            "gated_fraction": (tp + fp) / decided if decided else float("nan"),
            "coverage": decided / n if n else float("nan")}


def pass_rate_metrics(predicted: Sequence[Number], scores_per_problem: Sequence[Sequence[float]],
                      n_bins: int = 10) -> dict:
    """Predicted pass rate p_hat vs empirical p = c/n: coverage, MAE, Spearman, ECE, calibration."""
    actual = [pass_rate(s) for s in scores_per_problem]
    return {"coverage": coverage(predicted), "mae": mean_absolute_error(predicted, actual),
            "spearman": spearman(predicted, actual),
            "ece": expected_calibration_error(predicted, actual, n_bins),
            "calibration": calibration_curve(predicted, actual, n_bins)}


def correct_lengths(scores: Sequence[float], lengths: Sequence[float]) -> list[float]:
    """C = {L_i : s_i >= 0.5}."""
    return [float(l) for l, s in zip(lengths, scores) if s >= 0.5]


def length_metrics(predicted: Sequence[Number], scores_per_problem: Sequence[Sequence[float]],
                   lengths_per_problem: Sequence[Sequence[float]]) -> dict:
    """Predicted length l_hat vs C: coverage, in-range rate, and MAE / Spearman against mean(C)
    (problems with C empty are left out of all but coverage)."""
    correct = [correct_lengths(s, l) for s, l in zip(scores_per_problem, lengths_per_problem)]
    mean_correct = [float(np.mean(c)) if c else None for c in correct]
    return {"coverage": coverage(predicted), "in_range": length_in_range_rate(predicted, correct),
            "mae": mean_absolute_error(predicted, mean_correct),
            "spearman": spearman(predicted, mean_correct)}


def meta_awareness_metrics(predicted_pass_rates: Sequence[Number] | Mapping[str, Sequence[Number]],
                           scores_per_problem: Sequence[Sequence[float]],
                           lengths_per_problem: Sequence[Sequence[float]] | None = None,
                           predicted_lengths: Sequence[Number] | None = None,
                           notion_nets: Sequence[Mapping[str, int] | None] | None = None,
                           gated: Sequence[bool | None] | None = None,
                           n_bins: int = 10) -> dict:
    """{"pass_rate": {source: pass_rate_metrics}, "length", "notion", "gating"} for one problem set.

    `predicted_pass_rates` is one value per problem, or {source: values} for several predictors
    (e.g. "text" parsed from meta rollouts and a "head"); a plain sequence is source "meta"."""
    n = len(scores_per_problem)
    sources = (predicted_pass_rates if isinstance(predicted_pass_rates, Mapping)
               else {"meta": predicted_pass_rates})
    lengths = lengths_per_problem if lengths_per_problem is not None else [[] for _ in range(n)]
    return {
        "pass_rate": {k: pass_rate_metrics(v, scores_per_problem, n_bins) for k, v in sources.items()},
        "length": length_metrics(predicted_lengths if predicted_lengths is not None else [None] * n,
                                 scores_per_problem, lengths),
        "notion": notion_precision(notion_nets if notion_nets is not None else []),
        "gating": gating_scores(gated if gated is not None else [None] * n, scores_per_problem),
    }
