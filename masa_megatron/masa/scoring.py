"""Grade a step's rollouts, score meta rollouts against them, and build training samples.

Per problem q (spec section 4): solution rewards s_i in {0, 1} from the grader, lengths L_i
(generated tokens incl. EOS), texts O_i; every meta rollout of q is scored by the self-alignment
reward against (s, L, O). Samples carry a group id so GRPO normalises solution and meta groups of
the same problem separately: group 2j = solutions of problem j, 2j+1 = its meta rollouts.

Gated problems are not trained (their meta rollouts have nothing to be scored against, except
audited ones, whose solutions exist but are only measured). Cut-off solutions are graded like any
other and stay in their group.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from masa_megatron.masa.planner import ProblemRollouts
from masa_megatron.parallel import run_on_model_parallel_source
from masa_megatron.rewards.meta import meta_reward, notion_context
from masa_megatron.rollout.base import FINISH_LENGTH

SOLUTION, META = "solution", "meta"


@dataclass
class TrainSample:
    prompt_ids: list[int]
    response_ids: list[int]
    rollout_logprobs: list[float]
    reward: float
    group_id: int
    kind: str


@dataclass
class ProblemStats:
    scores: list[float]
    lengths: list[int]
    texts: list[str]

    @property
    def pass_rate(self) -> float:
        return sum(self.scores) / len(self.scores) if self.scores else float("nan")

    @property
    def zero_variance(self) -> bool:
        return len(set(self.scores)) <= 1

    @property
    def correct_lengths(self) -> list[int]:
        return [n for n, s in zip(self.lengths, self.scores) if s > 0]


def grade_solutions(items: Sequence[ProblemRollouts], tokenizer,
                    grade_batch: Callable[[list[str], list[str]], list[float]]
                    ) -> list[Optional[ProblemStats]]:
    """One batched grading call for every solution of the step; None where none was generated.

    Under Megatron the ranks of a model-parallel group hold the same rollouts and must train on
    the same rewards, but a grader under a wall-clock limit can answer differently from one
    process to another: the group's first rank grades, and its peers receive the scores
    (`parallel.run_on_model_parallel_source`). Every rank of the group calls this together. The
    meta rewards computed from these statistics (`score_metas`) are pure functions of them."""
    texts, refs, owners = [], [], []
    for j, item in enumerate(items):
        for c in item.solutions:
            texts.append(tokenizer.decode(c.token_ids, skip_special_tokens=True))
            refs.append(item.answer)
            owners.append(j)
    scores = run_on_model_parallel_source(
        lambda: [float(s) for s in grade_batch(texts, refs)] if texts else [],
        lambda values: [torch.tensor(values, dtype=torch.float64)],
        lambda tensors: tensors[0].tolist())
    stats: list[Optional[ProblemStats]] = [None] * len(items)
    for j, item in enumerate(items):
        if item.solutions:
            stats[j] = ProblemStats([], [], [])
    for owner, text, score in zip(owners, texts, scores):
        stats[owner].scores.append(float(score))
        stats[owner].texts.append(text)
    for j, item in enumerate(items):
        if stats[j] is not None:
            stats[j].lengths = [len(c.token_ids) for c in item.solutions]
    return stats


def score_metas(item: ProblemRollouts, stats: ProblemStats, base: float,
                notion_rules: str = "spec") -> list[dict]:
    """Self-alignment reward of each meta rollout; notions are dropped when found in the problem
    (spec rules) or anywhere in the meta prompt (reference rules)."""
    context = notion_context(item.problem, item.meta_prompt, notion_rules)
    return [meta_reward(pred, stats.scores, stats.lengths, stats.texts, context, base,
                        notion_rules) for pred in item.predictions]


def build_samples(items: Sequence[ProblemRollouts], stats: Sequence[Optional[ProblemStats]],
                  meta_scores: Sequence[Optional[list[dict]]]) -> list[TrainSample]:
    """Training samples of the problems that are trained this step (not gated)."""
    samples = []
    for j, (item, st, ms) in enumerate(zip(items, stats, meta_scores)):
        if not item.trained or st is None:
            continue
        for c, r in zip(item.solutions, st.scores):
            samples.append(TrainSample(item.solution_prompt_ids, c.token_ids, c.logprobs, r,
                                       2 * j, SOLUTION))
        for c, m in zip(item.metas, ms or []):
            samples.append(TrainSample(item.meta_prompt_ids, c.token_ids, c.logprobs,
                                       m["score"], 2 * j + 1, META))
    return samples


def drop_zero_variance_groups(samples: list[TrainSample]) -> tuple[list[TrainSample], int]:
    """DAPO dynamic sampling: remove every group whose rewards are all equal."""
    rewards: dict[int, set] = {}
    for s in samples:
        rewards.setdefault(s.group_id, set()).add(s.reward)
    flat = {g for g, r in rewards.items() if len(r) <= 1}
    return [s for s in samples if s.group_id not in flat], len(flat)


def relabel_for_cloning(item: ProblemRollouts, stats: ProblemStats, meta_scores: list[dict],
                        min_notion: float) -> Optional[tuple[list[int], str]]:
    """Behaviour cloning (spec section 6, v1): the problem's meta rollout with the best notion
    score >= min_notion, relabelled with pass_rate = round(8p) and, when some solution was
    correct, solution_length = round(mean(correct lengths)), written as compact JSON after the
    rollout's own <meta> reasoning. Returns (prompt ids, target text) or None."""
    best = max(range(len(meta_scores)), key=lambda i: meta_scores[i]["notion"], default=None)
    if best is None or meta_scores[best]["notion"] < min_notion:
        return None
    pred = item.predictions[best]
    label = {"math_notion": pred.get("math_notion", []), "pass_rate": round(8 * stats.pass_rate)}
    correct = stats.correct_lengths
    if correct:
        label["solution_length"] = round(sum(correct) / len(correct))
    elif "solution_length" in pred:
        label["solution_length"] = pred["solution_length"]
    text = item.meta_texts[best]
    end = text.rfind("</meta>")
    reasoning = text[:end + len("</meta>")] if end >= 0 else ""
    return item.meta_prompt_ids, (reasoning + "\n" if reasoning else "") + \
        json.dumps(label, separators=(",", ":"))


class StepTotals:
    """Additive sums behind the step metrics, so data-parallel ranks can all-reduce them.

    Means are (sum, count) pairs; correlations keep the moments n, Sx, Sy, Sxx, Syy, Sxy.
    """

    def __init__(self):
        self.sums: dict[str, list[float]] = {}

    def add(self, name: str, value: float, count: float = 1.0) -> None:
        entry = self.sums.setdefault(name, [0.0, 0.0])
        entry[0] += float(value)
        entry[1] += count

    def add_pair(self, name: str, x: float, y: float) -> None:
        for key, v in (("n", 1.0), ("x", x), ("y", y), ("xx", x * x), ("yy", y * y),
                       ("xy", x * y), ("abs", abs(x - y))):
            self.add(f"{name}#{key}", v, 0.0)

    def vector(self, names: list[str]) -> list[float]:
        return [v for n in names for v in self.sums.get(n, [0.0, 0.0])]

    def finalize(self) -> dict[str, float]:
        out: dict[str, float] = {}
        pairs = {n.split("#")[0] for n in self.sums if "#" in n}
        for name, (total, count) in self.sums.items():
            if "#" in name:
                continue
            out[name] = total / count if count else (total if name.startswith(_TOTALS) else
                                                     float("nan"))
        for name in pairs:
            g = {k: self.sums[f"{name}#{k}"][0] for k in ("n", "x", "y", "xx", "yy", "xy", "abs")}
            n = g["n"]
            out[f"{name}_mae"] = g["abs"] / n if n else float("nan")
            sxx, syy = g["xx"] - g["x"] ** 2 / n if n else 0, g["yy"] - g["y"] ** 2 / n if n else 0
            sxy = g["xy"] - g["x"] * g["y"] / n if n else 0
            out[f"{name}_corr"] = sxy / math.sqrt(sxx * syy) if n > 1 and sxx > 1e-12 \
                and syy > 1e-12 else float("nan")
        return out


_TOTALS = ("tokens/", "gating/audited")


def step_totals(items: Sequence[ProblemRollouts], stats, meta_scores, max_len: int,
                reference_parse: Optional[Callable[[str], dict]] = None) -> StepTotals:
    """The spec's section-9 quantities of this rank's problems, as additive totals."""
    t = StepTotals()
    sol_tokens = sum(len(c.token_ids) for it in items if not it.audited for c in it.solutions)
    meta_tokens = sum(len(c.token_ids) for it in items for c in it.metas)
    t.add("tokens/solution", sol_tokens, 0.0)
    t.add("tokens/meta", meta_tokens, 0.0)
    t.add("tokens/total", sol_tokens + meta_tokens, 0.0)   # what the method costs: no audit
    t.add("tokens/audit", sum(len(c.token_ids) for it in items if it.audited
                              for c in it.solutions), 0.0)
    for it, st, ms in zip(items, stats, meta_scores):
        t.add("gating/fraction", float(it.gated))
        if st is not None and it.trained:
            # groups that carry no GRPO signal: what a perfect gate would have skipped
            t.add("solution/zero_variance_fraction", float(st.zero_variance))
            for c, score in zip(it.solutions, st.scores):
                t.add("solution/accuracy", score)
                was_cut = it.max_new_tokens < max_len and c.finish_reason == FINISH_LENGTH
                t.add("cutoff/fraction", float(was_cut))
                if was_cut:
                    t.add("cutoff/accuracy", score)
        if it.audited and st is not None:
            t.add("gating/audited", 1.0, 0.0)
            t.add("gating/audit_precision", float(st.zero_variance))
        for p, text in zip(it.predictions, it.meta_texts):
            t.add("meta/parse_rate", float(bool(p)))
            if reference_parse is not None:
                t.add("meta/parse_rate_reference", float(bool(reference_parse(text))))
        for score in ms or []:
            for key in ("score", "notion", "difficulty", "length"):
                t.add(f"meta/r_{key}", score[key])
        if st is None:
            continue
        pred = it.prediction
        if pred.mean_pass_rate is not None:
            t.add_pair("meta/pass_rate", pred.mean_pass_rate, st.pass_rate)
        if pred.lengths and st.correct_lengths:
            t.add_pair("meta/length", sum(pred.lengths) / len(pred.lengths),
                       sum(st.correct_lengths) / len(st.correct_lengths))
        if pred.head_pass_rate is not None:
            t.add_pair("head/pass_rate", pred.head_pass_rate, st.pass_rate)
    return t
