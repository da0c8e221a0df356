"""Predictors: where MASA's prediction of a problem, before its solutions, comes from.

A predictor is a plain description, selected by `masa.predictor` (a registered name or a dotted
import path to a `Predictor`):

- `uses_head`: in a MASA mode the actor computes the meta-head's (p, u = log length) for every
  problem before generation (a prompt-only forward) and the head is fitted each step;
- `head_decides`: in masa_efficient the gate and cutoff run on the head's outputs before any
  meta rollout (gated problems skip their meta rollouts too); otherwise they run once the meta
  rollouts are parsed, and see the head's outputs too when `uses_head`;
- `gating` / `cutoff`: the policies (policies.py) that `masa.gating=auto` / `masa.cutoff=auto`
  select.

Built-ins:
- `text`: the parsed meta rollouts decide (std of k/8 < sigma and a consensus of 0 or 8; cutoff
  margin x mean parsed length); no head;
- `head`: the head decides (skip when p^G + (1-p)^G >= threshold; cutoff margin x exp(u));
- `both`: the text path decides; the head is computed, trained and compared in the metrics.

Register your own with `PREDICTORS.register("name", Predictor(...))`, or name a module attribute
holding a `Predictor` in `masa.predictor` ("my_pkg.predictors:GATE_ON_HEAD").
"""
from __future__ import annotations

from dataclasses import dataclass

from masa_megatron.registry import Registry

PREDICTORS = Registry("predictor")


@dataclass(frozen=True)
class Predictor:
    uses_head: bool
    head_decides: bool
    gating: str        # a registered gating policy name or a dotted import path
    cutoff: str        # a registered cutoff policy name or a dotted import path

    def __post_init__(self) -> None:
        if self.head_decides and not self.uses_head:
            raise ValueError("a predictor whose head decides must use the head")


PREDICTORS.register("text", Predictor(uses_head=False, head_decides=False,
                                      gating="text_consensus", cutoff="margin_mean"))
PREDICTORS.register("head", Predictor(uses_head=True, head_decides=True,
                                      gating="head_agreement", cutoff="head_margin"))
PREDICTORS.register("both", Predictor(uses_head=True, head_decides=False,
                                      gating="text_consensus", cutoff="margin_mean"))


def resolve_predictor(masa_cfg) -> Predictor:
    """The `Predictor` that `masa_cfg.predictor` names (RegistryError / TypeError otherwise)."""
    predictor = PREDICTORS.get(masa_cfg.predictor)
    if not isinstance(predictor, Predictor):
        raise TypeError(f"masa.predictor {masa_cfg.predictor!r} names {predictor!r}, "
                        "not a masa_megatron.masa.predictors.Predictor")
    return predictor


def head_in_use(masa_cfg) -> bool:
    """The meta-head is computed and trained: a MASA mode and a predictor that uses it."""
    return masa_cfg.mode != "grpo" and resolve_predictor(masa_cfg).uses_head
