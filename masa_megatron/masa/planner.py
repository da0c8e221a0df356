"""Which prompts to roll out this step, on which path, with how many tokens (spec section 6).

Modes:
- `grpo`: G solution rollouts per problem.
- `masa`: G solution + M meta rollouts per problem in ONE generation call.
- `masa_efficient`: `masa` before step k; from step k on, per problem:
  1. its M meta rollouts, parsed into a `MetaPrediction`;
  2. gating (skip predicted zero-variance problems, except an audited fraction that is rolled out
     anyway and not trained) and early cutoff (per-request max_new_tokens) for its solutions.
  With `masa.stream_solutions` a problem's solutions are requested as soon as its own metas are
  answered (`engine.generate_chained`; engines without streaming run two batches), else after
  every problem's metas. Decisions depend only on the problem's own metas and seeds (the audit
  draw is seeded per problem), so both orders give the same rollouts.
     Audited solutions are generated in a call of their own (`roll_out_audits`), so that the
     loop times them apart from the step (they measure the gate; they are not MASA's cost).
  With a predictor whose head decides (`masa.predictor=head`, predictors.py) the meta-head's
  predictions (computed by the actor before generation) drive gating and cutoff instead, so
  gated problems skip their meta rollouts too.
- notion hints (any MASA mode): metas first, then each solution prompt gets the notions of one
  parsed prediction appended.

The planner only decides and generates; `scoring.py` grades and builds training samples.
"""
from __future__ import annotations

import random
import zlib
from dataclasses import dataclass, field
from typing import Optional, Sequence

from masa_megatron.data.prompts import (PromptConfig, encode_messages, meta_messages,
                                        render_meta_prompt, render_solution_prompt,
                                        solution_prompt_text)
from masa_megatron.masa.policies import MetaPrediction
from masa_megatron.masa.predictors import resolve_predictor
from masa_megatron.rewards.meta import parse_meta_prediction
from masa_megatron.rollout.base import Completion, GenerationRequest, SamplingParams

HINT_PREFIX = " The problem could be solved using the following math notions: "


@dataclass
class ProblemRollouts:
    """Everything generated for one problem in one step."""
    problem: str
    answer: str
    uid: str
    solution_prompt_ids: list[int] = field(default_factory=list)
    meta_prompt_ids: list[int] = field(default_factory=list)
    meta_prompt: str = ""          # the meta prompt's text (system + user message)
    solutions: list[Completion] = field(default_factory=list)
    metas: list[Completion] = field(default_factory=list)
    meta_texts: list[str] = field(default_factory=list)
    predictions: list[dict] = field(default_factory=list)   # parsed meta rollouts
    prediction: MetaPrediction = field(default_factory=MetaPrediction)
    gated: bool = False
    audited: bool = False          # gated, but rolled out anyway to measure gating (not trained)
    max_new_tokens: int = 0        # the solution cap used (cutoff when < the run's maximum)
    hint: Optional[str] = None

    @property
    def trained(self) -> bool:
        return not self.gated


def prompt_config_from(cfg) -> PromptConfig:
    """The prompt settings of an experiment config."""
    return PromptConfig(max_prompt_length=cfg.rollout.max_prompt_length,
                        max_response_length=cfg.rollout.max_response_length,
                        max_source=cfg.masa.max_source,
                        suffix_solution_prompt=cfg.data.solution_suffix)


def summarise_predictions(parsed: Sequence[dict], num_rollouts: int,
                          head: Optional[tuple[float, float]] = None) -> MetaPrediction:
    """Collect the int-typed fields of parsed meta rollouts (bools are not ints)."""
    def is_int(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)
    pred = MetaPrediction(num_meta_rollouts=num_rollouts)
    for p in parsed:
        if is_int(p.get("pass_rate")):
            pred.pass_rates.append(p["pass_rate"] / 8)
        if is_int(p.get("solution_length")):
            pred.lengths.append(p["solution_length"])
        if "math_notion" in p:
            notions = p["math_notion"]
            pred.notions.append([notions] if isinstance(notions, str) else list(notions))
    if head is not None:
        pred.head_pass_rate, pred.head_log_length = head
    return pred


class RolloutPlanner:
    def __init__(self, cfg, tokenizer, engine, gate, cutoff):
        self.cfg, self.tokenizer, self.engine = cfg, tokenizer, engine
        self.gate, self.cutoff = gate, cutoff
        self.head_decides = resolve_predictor(cfg.masa).head_decides
        self.max_len = cfg.rollout.max_response_length
        self.prompts = prompt_config_from(cfg)
        self.metrics: dict[str, float] = {}   # the engine's metrics of the last rollout's calls

    # -------------------------------------------------------------- helpers
    def _sampling(self, n: int, max_new: int, seed: int) -> SamplingParams:
        r = self.cfg.rollout
        stop = [self.tokenizer.eos_token_id] if self.tokenizer.eos_token_id is not None else []
        return SamplingParams(max_new_tokens=max_new, temperature=r.temperature, top_p=r.top_p,
                              top_k=r.top_k, stop_token_ids=stop, n=n, seed=seed)

    def _seed(self, step: int, uid: str, kind: int, round_: int) -> int:
        """Per (run seed, step, problem, path) seed: independent of batch order and composition,
        so a resumed or re-batched run draws the same samples."""
        base = self.cfg.rollout.seed
        return (base * 1_000_003 + step * 100_003 + round_ * 10_007
                + zlib.crc32(uid.encode()) * 4 + kind) % (2 ** 31)

    def _generate(self, jobs: list[tuple[ProblemRollouts, str, list[int], SamplingParams]]):
        if not jobs:
            return
        results = self.engine.generate([GenerationRequest(ids, sp) for _, _, ids, sp in jobs])
        for (item, kind, _, _), result in zip(jobs, results):
            getattr(item, kind).extend(result.completions)

    def _parse_metas(self, item: ProblemRollouts, head) -> None:
        item.meta_texts = [self.tokenizer.decode(c.token_ids, skip_special_tokens=True)
                           for c in item.metas]
        item.predictions = [parse_meta_prediction(t, self.cfg.masa.parser) for t in item.meta_texts]
        item.prediction = summarise_predictions(item.predictions, len(item.metas), head)

    # -------------------------------------------------------------- the step
    def rollout(self, step: int, problems: Sequence[tuple[str, str, str]],
                head_predictions: Optional[Sequence[tuple[float, float]]] = None,
                round_: int = 0, audit: bool = True) -> list[ProblemRollouts]:
        """problems: (uid, problem text, reference answer). head_predictions: (p, log length).
        With `audit` off, audited problems get their solutions only from `roll_out_audits`."""
        cfg = self.cfg
        mode, masa_cfg, G, M = cfg.masa.mode, cfg.masa, cfg.grpo.group_size, cfg.masa.meta_group_size
        efficient = mode == "masa_efficient" and step >= masa_cfg.efficient_start_step
        use_head = self.head_decides
        metas_first = mode != "grpo" and (masa_cfg.notion_hints or (efficient and not use_head))
        items = []
        for uid, problem, answer in problems:
            items.append(ProblemRollouts(
                problem=problem, answer=answer, uid=uid, max_new_tokens=self.max_len,
                solution_prompt_ids=render_solution_prompt(self.tokenizer, problem, self.prompts),
                meta_prompt_ids=(render_meta_prompt(self.tokenizer, problem, self.prompts)
                                 if mode != "grpo" else []),
                meta_prompt="\n".join(m["content"] for m in meta_messages(problem, self.prompts))
                if mode != "grpo" else ""))
        heads = list(head_predictions) if head_predictions is not None else [None] * len(items)

        if use_head and efficient:  # the head decides before anything is generated
            for item, head in zip(items, heads):
                item.prediction = summarise_predictions([], 0, head)
                self._decide(item, step, round_, G)
        if metas_first:
            self._metas_then_solutions(step, round_, [(it, head) for it, head in zip(items, heads)
                                                      if not it.gated],
                                       decide=efficient and not use_head)
        jobs = []
        for item in items:
            if not item.gated and not metas_first:
                jobs.append(self._solution_job(step, item, round_))
            if mode != "grpo" and not metas_first and not item.gated:
                jobs.append((item, "metas", item.meta_prompt_ids, self._sampling(
                    M, self.max_len, self._seed(step, item.uid, 1, round_))))
        self._generate(jobs)
        if mode != "grpo" and not metas_first:
            for item, head in zip(items, heads):
                if not item.gated:
                    self._parse_metas(item, head)
                elif head is not None:
                    item.prediction.head_pass_rate, item.prediction.head_log_length = head
        self.metrics = dict(getattr(self.engine, "rollout_metrics", None) or {})
        if audit:
            self.roll_out_audits(step, items, round_)
        return items

    def roll_out_audits(self, step: int, items: Sequence[ProblemRollouts], round_: int = 0) -> None:
        """The solutions of audited (gated, not trained) problems, in one generation call."""
        self._generate([self._solution_job(step, item, round_) for item in items
                        if item.audited and not item.solutions])

    def _solution_job(self, step: int, item: ProblemRollouts, round_: int):
        return (item, "solutions", item.solution_prompt_ids, self._sampling(
            self.cfg.grpo.group_size, item.max_new_tokens, self._seed(step, item.uid, 0, round_)))

    def _metas_then_solutions(self, step: int, round_: int, todo: list, decide: bool) -> None:
        """Metas of `todo` [(item, head)], then each kept problem's solutions: the follow-ups of
        its meta request (streamed or two-phase, see the module docstring). `follow` is pure
        per problem (cached), so every rank recomputes the same split of the results."""
        M, done = self.cfg.masa.meta_group_size, {}

        def follow(i: int, result) -> list[GenerationRequest]:
            if i not in done:
                item, head = todo[i]
                item.metas = list(result.completions)
                self._parse_metas(item, head)
                if decide:
                    self._decide(item, step, round_, self.cfg.grpo.group_size)
                if self.cfg.masa.notion_hints:
                    self._add_hint(item)
                done[i] = [] if item.gated else \
                    [GenerationRequest(*self._solution_job(step, item, round_)[2:])]
            return done[i]

        if not todo:
            return
        requests = [GenerationRequest(it.meta_prompt_ids, self._sampling(
            M, self.max_len, self._seed(step, it.uid, 1, round_))) for it, _ in todo]
        results = self.engine.generate_chained(requests, follow,
                                               stream=self.cfg.masa.stream_solutions)
        at = len(todo)
        for i, ((item, _), result) in enumerate(zip(todo, results)):
            for _ in follow(i, result):
                item.solutions.extend(results[at].completions)
                at += 1

    def _decide(self, item: ProblemRollouts, step: int, round_: int, group_size: int) -> None:
        """Gate, audit draw (seeded per problem) and cutoff from `item.prediction`."""
        item.gated = bool(self.gate(item.prediction, self.cfg.masa, group_size))
        draw = random.Random(self._seed(step, item.uid, 3, round_)).random()
        item.audited = item.gated and draw < self.cfg.masa.audit_fraction
        item.max_new_tokens = int(self.cutoff(item.prediction, self.cfg.masa, self.max_len))

    def _add_hint(self, item: ProblemRollouts) -> None:
        notions = next((n for n in item.prediction.notions if n), None)
        if not notions:
            return
        item.hint = ", ".join(str(n) for n in notions)
        content = solution_prompt_text(item.problem, self.prompts) + HINT_PREFIX + item.hint + "."
        item.solution_prompt_ids = encode_messages(
            self.tokenizer, [[{"role": "user", "content": content}]])[0]

