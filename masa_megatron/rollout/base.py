"""The rollout engine interface, its request/result types and the engine registry.

Log-probabilities (the same definition in every engine and in the actor)
-----------------------------------------------------------------------
For a sampled token y at a step with logits z (full vocabulary, fp32) and the request's
temperature T, the reported log-prob is

    logprob(y) = log_softmax(z / T)[y]

with T = 1 for greedy requests (temperature 0). Top-k / top-p truncation only restricts which
tokens may be drawn; it is NOT renormalised into the log-prob, so the actor can recompute the
same number from a plain forward pass (`sampling.token_logprobs`) without knowing the truncation.

Stopping
--------
A completion ends when it emits one of `stop_token_ids` (the stop token is kept as the last
output token, finish reason "stop"), when it has `max_new_tokens` tokens (finish reason
"length"), or when the engine cannot serve it (finish reason "abort", e.g. a prompt longer than
the engine's context). Engines that know the model's EOS ids add them to the stop set unless
`ignore_eos` is set (SGLang's semantics).
"""
from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

from masa_megatron.registry import Registry, RegistryError, import_object

__all__ = ["ENGINES", "Completion", "FollowUp", "GenerationRequest", "GenerationResult", "RegistryError",
           "RolloutEngine", "SamplingParams", "build_engine", "get_engine_class", "register_engine"]

FINISH_STOP = "stop"
FINISH_LENGTH = "length"
FINISH_ABORT = "abort"
FINISH_REASONS = (FINISH_STOP, FINISH_LENGTH, FINISH_ABORT)


@dataclass
class SamplingParams:
    """Per-request sampling. temperature 0 means greedy; top_k <= 0 and top_p == 1 disable them.

    `seed`: samples of a seeded request are reproducible (sample j of n uses a generator derived
    from (seed, j)); unseeded requests draw from the engine's own seeded stream.
    """
    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    stop_token_ids: Sequence[int] = ()
    ignore_eos: bool = False
    n: int = 1
    seed: Optional[int] = None

    def __post_init__(self) -> None:
        self.stop_token_ids = tuple(int(t) for t in self.stop_token_ids)
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens}: must be >= 1")
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature}: must be >= 0 (0 = greedy)")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p}: must be in (0, 1]")
        if self.n < 1:
            raise ValueError(f"n={self.n}: must be >= 1")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass
class GenerationRequest:
    """One prompt (token ids) and how to sample from it; `request_id` is returned as given."""
    prompt_token_ids: Sequence[int]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    request_id: Optional[str] = None


@dataclass
class Completion:
    """One sample: generated token ids, their log-probs (see module docstring), why it ended."""
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


@dataclass
class GenerationResult:
    """The n completions of one request, in sample order."""
    request_id: Optional[str]
    prompt_tokens: int
    completions: list[Completion]
    weight_version: int = 0

    @property
    def completion_tokens(self) -> int:
        return sum(c.completion_tokens for c in self.completions)


# follow(i, result of request i) -> the requests that depend on it (possibly none); a pure
# function of its arguments, so every rank that calls generate_chained can recompute it
FollowUp = Callable[[int, "GenerationResult"], Sequence[GenerationRequest]]


def two_phase(engine: "RolloutEngine", requests: list[GenerationRequest],
              follow: FollowUp) -> list[GenerationResult]:
    """generate_chained as two batches: every first request, then every follow-up."""
    first = engine.generate(requests)
    second = [r for i, res in enumerate(first) for r in follow(i, res)]
    return first + (engine.generate(second) if second else [])


class RolloutEngine(abc.ABC):
    """What the trainer needs from a generator.

    Under SPMD training, each engine documents which ranks call `generate` (the embedded engine:
    every rank, each data-parallel group with its own requests).
    """

    @abc.abstractmethod
    def generate(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        """One result per request, in request order."""

    def generate_chained(self, requests: list[GenerationRequest], follow: FollowUp,
                         stream: bool = True) -> list[GenerationResult]:
        """The results of `requests`, then of every follow-up in (request, follow-up) order,
        where request i's follow-ups are `follow(i, its result)`. Engines that accept requests
        while others run send a request's follow-ups as soon as it is answered (`stream`); the
        default runs two batches (`two_phase`), whatever `stream` says. Call it where
        `generate` is called (collective alike)."""
        return two_phase(self, requests, follow)

    # metrics of the last generate / generate_chained call (rollout/<name> -> value), if any
    rollout_metrics: dict[str, float] = {}

    @abc.abstractmethod
    def update_weights(self, model: Any = None, path: Optional[str] = None, *,
                       version: Optional[int] = None) -> int:
        """Make the engine sample from the trainer's current weights (from `model` in memory or
        a checkpoint at `path`, whichever the engine uses). Returns the new weight version."""

    @abc.abstractmethod
    def pause(self) -> None:
        """Release generation memory (KV cache, ...) so training can use it."""

    @abc.abstractmethod
    def resume(self) -> None:
        """Retake what `pause` released; `generate` works again."""

    @abc.abstractmethod
    def health(self) -> bool:
        """True when the engine can serve `generate`."""

    @abc.abstractmethod
    def shutdown(self) -> None:
        """Free everything; the engine cannot be used afterwards."""


# ---------------------------------------------------------------- registry
# `rollout.engine` names an entry here or gives an import path ("pkg.mod:Class" / "pkg.mod.Class").
# Built-in engines are registered as import paths so that importing this module stays light.

ENGINES = Registry("rollout engine")
ENGINES.register("embedded", "masa_megatron.rollout.embedded:EmbeddedEngine")
ENGINES.register("sglang", "masa_megatron.rollout.sglang:SGLangEngine")


def register_engine(name: str) -> Callable[[type], type]:
    """Class decorator: `@register_engine("mine")` makes `rollout.engine=mine` resolve to it."""
    return ENGINES.register(name, override=True)


def get_engine_class(name: str) -> type:
    """Resolve a registered name or an import path to a RolloutEngine subclass."""
    target = ENGINES.get(name)
    if isinstance(target, str):
        target = import_object(target)
    if not (isinstance(target, type) and issubclass(target, RolloutEngine)):
        raise TypeError(f"rollout engine '{name}' resolves to {target!r}, not a RolloutEngine")
    return target


def build_engine(name: str, **kwargs: Any) -> RolloutEngine:
    return get_engine_class(name)(**kwargs)
