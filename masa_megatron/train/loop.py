"""The RL loop. One step, as in DESIGN.md:

    problems  = sampler -> this data-parallel rank's share
    head      = actor prompt-only forward -> meta-head predictions        (masa.predictor head/both)
    rollouts  = planner: meta / solution generation, gating, cutoff       (masa/planner.py)
    audit     = solutions of audited gated problems (measured, not trained; time/audit and
                tokens/audit, left out of time/step and tokens/total)
    rewards   = grader on solutions, self-alignment reward on metas       (masa/scoring.py)
    samples   = trained problems only; dynamic sampling drops flat groups
    advantages= GRPO within each group (solution and meta groups apart)   (algo/advantages.py)
    balance   = optionally re-deal samples over DP ranks by tokens         (train/dist.py)
    old logp  = actor forward (separate from the update)                   (train/actor.py)
    update    = PPO loss, one optimizer step per mini-batch                (train/actor.py)
                (+ masa.head_loss_weight x meta-head loss through the backbone, when > 0)
    head fit  = meta-head on this step's statistics (incl. audited problems)
    checkpoint (when due; it keeps the step's metrics so far)
    sync      = engine.update_weights
    eval (when due), log
A run killed after a checkpoint and before that step's eval and log resumes by doing both from
the metrics its checkpoint kept (`LoopParts.unlogged_row`; train/main.py decides).

With colocated servers (train/handoff.py) the servers release their memory and the trainer's
state comes back between generation and the old log-probs (`to_training`); after the
checkpoint the trainer's state leaves, the servers take their weights, the sync runs, then
the servers take their KV cache back (`to_rollout`); in-loop eval and the next generation
use the servers.

Every phase is timed; the times are logged as time/<phase>.
"""
from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from masa_megatron.algo.advantages import grpo_advantages
from masa_megatron.data.prompts import render_solution_prompt
from masa_megatron.errors import TrainingStopped
from masa_megatron.masa.meta_head import joint_targets
from masa_megatron.masa.predictors import head_in_use
from masa_megatron.masa.scoring import (SOLUTION, build_samples, drop_zero_variance_groups,
                                        grade_solutions, relabel_for_cloning, score_metas)
from masa_megatron.train.handoff import Handoff


class PhaseTimer:
    def __init__(self):
        self.times: dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str):
        start = time.perf_counter()
        yield
        self.times[f"time/{phase}"] = self.times.get(f"time/{phase}", 0.0) + \
            time.perf_counter() - start


@dataclass
class LoopParts:
    """What the loop drives; built by train/main.py (or by tests with stand-ins)."""
    cfg: Any
    tokenizer: Any
    problems: list                   # eval.benchmarks.Problem (id, problem, answer)
    sampler: Any                     # data.sampler.ResumableSampler
    planner: Any                     # masa.planner.RolloutPlanner
    actor: Any                       # train.actor.Actor
    engine: Any                      # rollout engine
    grade_batch: Callable
    sinks: Any                       # metrics.MultiSink (rank 0) or None
    dp: Any                          # train.dist.DataParallelInfo
    head: Any = None                 # masa.meta_head.MetaHeadTrainer on the last stage, or None
    checkpoints: Any = None          # train.checkpoint.CheckpointManager or None
    save_checkpoint: Optional[Callable[[int, dict], None]] = None   # (step, its metrics)
    progress: Any = None
    reference_parse: Optional[Callable[[str], dict]] = None
    evaluator: Any = None            # eval.run.Evaluator on the held-out problems, or None
    handoff: Any = field(default_factory=lambda: Handoff(colocate=False, offload=False))
    eval_problems: list = field(default_factory=list)
    bc_buffer: list = field(default_factory=list)
    nonfinite_streak: int = 0
    # resumed from a checkpoint whose step has no metrics row yet (the run was killed between
    # the save and the log): that step's metrics as the checkpoint kept them
    unlogged_row: Optional[dict] = None


def run_step(parts: LoopParts, step: int) -> dict[str, float]:
    """One RL step on this rank; returns the step's metrics (reduced over data-parallel ranks)."""
    cfg, timer = parts.cfg, PhaseTimer()
    items, stats, meta_scores, target = [], [], [], 0
    with timer("step"):
        for round_ in range(cfg.grpo.dynamic_sampling_max_rounds):
            indices = parts.dp.my_share(parts.sampler.next_batch())
            batch = [parts.problems[i] for i in indices]
            triples = [(p.id, p.problem, p.answer) for p in batch]
            with timer("meta_head"):
                head_preds = predict_heads(parts, [p.problem for p in batch])
            with timer("generate"):
                new_items = parts.planner.rollout(step, triples, head_preds, round_=round_,
                                                  audit=False)
            with timer("audit"):
                parts.planner.roll_out_audits(step, new_items, round_)
            with timer("score"):
                new_stats = grade_solutions(new_items, parts.tokenizer, parts.grade_batch)
                new_scores = [score_metas(it, st, cfg.masa.reward_base, cfg.masa.notion_rules)
                              if st is not None and it.trained and it.metas else None
                              for it, st in zip(new_items, new_stats)]
            items += new_items
            stats += new_stats
            meta_scores += new_scores
            target = target or len(indices)
            # Dynamic sampling with refill: draw more problems until enough have a non-flat
            # solution group; every data-parallel rank takes the same decision.
            short = _informative_problems(items, stats) < target
            if not (cfg.grpo.dynamic_sampling and parts.dp.any_rank(short)):
                break
        handoff_metrics = parts.handoff.to_training(parts.engine)   # servers idle from here
        samples = build_samples(items, stats, meta_scores)
        dropped = 0
        if cfg.grpo.dynamic_sampling:
            samples, dropped = drop_zero_variance_groups(samples)
        rewards = torch.tensor([s.reward for s in samples], dtype=torch.float64)
        advantages = grpo_advantages(rewards, [s.group_id for s in samples], eps=cfg.grpo.adv_eps)
        train_batch = parts.actor.make_batch(samples, advantages)
        train_batch.prompt_targets = joint_head_targets(parts, samples, stats)
        if cfg.grpo.balance_sequences:   # the reference's token balancing across DP ranks
            train_batch = parts.dp.balance_sequences(train_batch)
        logprob_metrics = {}
        if cfg.grpo.old_logprobs == "recompute":
            with timer("logprob"):
                logprob_metrics = parts.actor.compute_old_logprobs(train_batch)
        with timer("train"):
            train_metrics = parts.actor.update(
                train_batch, check_ratio=cfg.trainer.check_ratio_invariant)
        with timer("meta_head_train"):
            head_metrics = train_head(parts, items, stats)
        if cfg.masa.behaviour_cloning and cfg.masa.mode != "grpo":
            with timer("behaviour_cloning"):
                bc_metrics = behaviour_cloning(parts, step, items, stats, meta_scores)
        else:
            bc_metrics = {}
    metrics = parts.dp.reduce_step_metrics(items, stats, meta_scores, cfg, parts.reference_parse)
    metrics.update(logprob_metrics)  # entropy, trainer-vs-rollout log-prob gap
    metrics.update(train_metrics)
    metrics.update(head_metrics)
    metrics.update(bc_metrics)
    metrics.update(parts.planner.metrics)   # rollout/*: the generation phase's scheduling
    metrics.update(handoff_metrics)
    metrics.update(timer.times)
    metrics["time/step"] -= metrics["time/audit"]   # the gate's measurement is not the step's cost
    metrics["dynamic_sampling/dropped_groups"] = dropped
    metrics["samples/trained"] = len(samples)
    _check_finite(parts, train_metrics)
    return metrics


def _informative_problems(items, stats) -> int:
    return sum(1 for it, st in zip(items, stats) if it.trained and st and not st.zero_variance)


def predict_heads(parts: LoopParts, problems: list[str]) -> Optional[list[tuple[float, float]]]:
    if not head_in_use(parts.cfg.masa):
        return None
    prompts = [render_solution_prompt(parts.tokenizer, p, parts.planner.prompts) for p in problems]
    with parts.handoff.trainer_params():
        hidden = parts.actor.prompt_last_hidden(prompts)
    preds = parts.head.predict(hidden) if (hidden is not None and parts.head) else None
    return parts.actor.pipeline.broadcast_object(preds)


def joint_head_targets(parts: LoopParts, samples, stats) -> Optional[torch.Tensor]:
    """Joint head training (masa.head_loss_weight > 0): per sample, its problem's observed
    (pass rate, log mean correct length) for solution samples, NaN for meta samples. Sample
    group 2j holds the solutions of problem j (scoring.build_samples)."""
    if parts.cfg.masa.head_loss_weight <= 0 or not head_in_use(parts.cfg.masa):
        return None
    rows = [stats[s.group_id // 2] if s.kind == SOLUTION else None for s in samples]
    return joint_targets(
        [None if st is None else st.pass_rate for st in rows],
        [sum(st.correct_lengths) / len(st.correct_lengths) if st and st.correct_lengths else None
         for st in rows])


def train_head(parts: LoopParts, items, stats) -> dict:
    """Fit the meta-head on every problem with solution statistics (trained or audited), of
    every data-parallel rank (each calls the head's update, with or without rows)."""
    if not head_in_use(parts.cfg.masa):
        return {}
    labelled = [(it, st) for it, st in zip(items, stats) if st is not None]
    hidden = (parts.actor.prompt_last_hidden([it.solution_prompt_ids for it, _ in labelled])
              if labelled else None)
    if parts.head is None:  # not the last stage
        return {}
    lengths = [sum(st.correct_lengths) / len(st.correct_lengths) if st.correct_lengths else None
               for _, st in labelled]
    return parts.head.update(hidden, [st.pass_rate for _, st in labelled], lengths)


def behaviour_cloning(parts: LoopParts, step: int, items, stats, meta_scores) -> dict:
    cfg = parts.cfg.masa
    for it, st, ms in zip(items, stats, meta_scores):
        if st is not None and ms:
            example = relabel_for_cloning(it, st, ms, cfg.bc_min_notion)
            if example is not None:
                prompt, text = example
                target = parts.tokenizer.encode(text, add_special_tokens=False)
                if parts.tokenizer.eos_token_id is not None:
                    target.append(parts.tokenizer.eos_token_id)
                parts.bc_buffer.append((prompt, target))
    metrics = {"bc/buffer": len(parts.bc_buffer)}
    if (step + 1) % cfg.bc_every == 0 and parts.bc_buffer:
        prompts, targets = zip(*parts.bc_buffer)
        metrics.update(parts.actor.sft_step(list(prompts), list(targets)))
        parts.bc_buffer.clear()
    return metrics


def _check_finite(parts: LoopParts, train_metrics: dict) -> None:
    if train_metrics.get("train/skipped_step", 0):
        parts.nonfinite_streak += 1
        limit = parts.cfg.trainer.max_consecutive_nonfinite
        if parts.nonfinite_streak >= limit:
            raise TrainingStopped(
                f"{parts.nonfinite_streak} consecutive steps had a non-finite loss or gradient "
                f"norm (trainer.max_consecutive_nonfinite={limit}); stopping. The last complete "
                f"checkpoint is intact.")
    else:
        parts.nonfinite_streak = 0


def evaluate_in_loop(parts: LoopParts, step: int) -> dict[str, float]:
    """Held-out evaluation with the training engine; records go to <output_dir>/eval/."""
    import json
    from pathlib import Path

    from masa_megatron.eval.report import build_report
    started = time.perf_counter()
    records = []
    batch = max(1, parts.cfg.data.prompt_batch_size)
    for i in range(0, len(parts.eval_problems), batch):
        records += parts.evaluator.records(parts.eval_problems[i:i + batch])
    if parts.sinks is not None:
        out = Path(parts.cfg.trainer.output_dir) / "eval"
        out.mkdir(parents=True, exist_ok=True)
        with open(out / f"step_{step:06d}.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
    overall = build_report(records)["overall"]
    metrics = {"eval/accuracy": overall["pass_at_k"]["1"]["mean"],
               "eval/tokens": sum(sum(r["lengths"]) for r in records),
               "eval/meta_reward": _mean([m for r in records for m in r["meta_rewards"]]),
               "time/eval": time.perf_counter() - started}
    for source, values in overall["meta"].get("pass_rate", {}).items():
        for key in ("mae", "spearman", "ece"):
            metrics[f"eval/{source}_pass_rate_{key}"] = values.get(key)
    return {k: (float("nan") if v is None else v) for k, v in metrics.items()}


def run_loop(parts: LoopParts, start_step: int) -> None:
    cfg = parts.cfg
    if parts.evaluator is not None and start_step == 0:
        initial = evaluate_in_loop(parts, 0)
        if parts.sinks is not None:
            parts.sinks.log(0, initial)
    if parts.unlogged_row is not None:   # the step's sync already ran again at the resume
        _eval_and_log(parts, start_step, dict(parts.unlogged_row))
        parts.unlogged_row = None
    for step in range(start_step, cfg.trainer.steps):
        metrics = run_step(parts, step)     # ends with the trainer holding the GPU
        done = step + 1
        if parts.save_checkpoint is not None and cfg.checkpoint.save_every and \
                (done % cfg.checkpoint.save_every == 0 or done == cfg.trainer.steps):
            parts.save_checkpoint(done, metrics)
        handed = parts.handoff.to_rollout(parts.engine, parts.actor, version=done)
        metrics.update(handed)
        metrics["time/step"] += handed["time/weight_sync"] + handed["time/handoff_to_rollout"]
        _eval_and_log(parts, done, metrics)


def _eval_and_log(parts: LoopParts, done: int, metrics: dict) -> None:
    """The end of step `done`: held-out eval when due, then its metrics row."""
    cfg = parts.cfg
    if parts.evaluator is not None and (done % cfg.trainer.eval_every == 0
                                        or done == cfg.trainer.steps):
        metrics.update(evaluate_in_loop(parts, done))
    if parts.sinks is not None and done % cfg.logging.log_every == 0:
        parts.sinks.log(done, metrics)
    if parts.progress is not None:
        parts.progress.update(done, {k: metrics[k] for k in _PROGRESS_KEYS if k in metrics
                                     and not _nan(metrics[k])})


_PROGRESS_KEYS = ("solution/accuracy", "meta/r_score", "gating/fraction", "time/step")


def _mean(values: list) -> float:
    return sum(values) / len(values) if values else float("nan")


def _nan(value) -> bool:
    return isinstance(value, float) and math.isnan(value)
