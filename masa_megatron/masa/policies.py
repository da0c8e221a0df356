"""Predictive gating and early-cutoff policies (spec section 6), swappable through registries.

A policy sees one problem's `MetaPrediction` (the parsed text predictions and/or the meta-head's
outputs) and the MASA config:

- gating -> True to skip the problem this step (predicted zero-variance: all-correct or all-wrong);
- cutoff -> max_new_tokens for its solution rollouts.

Built-ins:
- `text_consensus` gate: parsed pass rates p_hat = k/8 have population std < sigma AND
  round(8 * mean(p_hat)) in {0, 8}; only when at least ceil(M * gate_min_parsed_fraction)
  predictions parsed. (`round` is Python's, half to even, as in the reference code.)
- `head_agreement` gate: the head's pass-rate probability p gives the chance that all G rollouts
  agree, p^G + (1-p)^G; skip when it is >= head_gate_threshold.
- `margin_mean` cutoff: min(max_len, ceil(margin * mean(parsed lengths))); no cutoff without lengths.
- `head_margin` cutoff: min(max_len, ceil(margin * exp(head_log_length))).

Register your own with `@GATING.register("name")` / `@CUTOFF.register("name")`, or name a dotted
import path in `masa.gating` / `masa.cutoff` ("auto": those of the predictor, predictors.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional

from masa_megatron.masa.predictors import resolve_predictor
from masa_megatron.registry import Registry

GATING = Registry("gating policy")
CUTOFF = Registry("cutoff policy")


@dataclass
class MetaPrediction:
    """What MASA knows about one problem before rolling out its solutions."""
    num_meta_rollouts: int = 0
    pass_rates: list[float] = field(default_factory=list)   # parsed k/8, ints only
    lengths: list[int] = field(default_factory=list)        # parsed solution_length, ints only
    notions: list[list[str]] = field(default_factory=list)
    head_pass_rate: Optional[float] = None
    head_log_length: Optional[float] = None

    @property
    def mean_pass_rate(self) -> Optional[float]:
        return sum(self.pass_rates) / len(self.pass_rates) if self.pass_rates else None


def _population_std(values: list[float]) -> float:
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))


@GATING.register("text_consensus")
def text_consensus_gate(pred: MetaPrediction, cfg, group_size: int) -> bool:
    needed = max(1, math.ceil(pred.num_meta_rollouts * cfg.gate_min_parsed_fraction))
    if len(pred.pass_rates) < needed:
        return False
    consensus = round(8 * pred.mean_pass_rate)
    return _population_std(pred.pass_rates) < cfg.gate_sigma and consensus in (0, 8)


@GATING.register("head_agreement")
def head_agreement_gate(pred: MetaPrediction, cfg, group_size: int) -> bool:
    if pred.head_pass_rate is None:
        return False
    p = min(max(pred.head_pass_rate, 0.0), 1.0)
    return p ** group_size + (1 - p) ** group_size >= cfg.head_gate_threshold


@CUTOFF.register("margin_mean")
def margin_mean_cutoff(pred: MetaPrediction, cfg, max_len: int) -> int:
    if not pred.lengths:
        return max_len
    return max(1, min(max_len, math.ceil(cfg.cutoff_margin * sum(pred.lengths) / len(pred.lengths))))


@CUTOFF.register("head_margin")
def head_margin_cutoff(pred: MetaPrediction, cfg, max_len: int) -> int:
    if pred.head_log_length is None:
        return max_len
    predicted = math.exp(min(pred.head_log_length, 30.0))
    return max(1, min(max_len, math.ceil(cfg.cutoff_margin * predicted)))


def resolve_policies(cfg) -> tuple[Callable, Callable]:
    """The (gate, cutoff) callables `cfg` (a MASAConfig) selects; "auto": the predictor's."""
    predictor = resolve_predictor(cfg)
    gate = GATING.get(predictor.gating if cfg.gating == "auto" else cfg.gating)
    cut = CUTOFF.get(predictor.cutoff if cfg.cutoff == "auto" else cfg.cutoff)
    return gate, cut
