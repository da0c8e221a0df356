"""Logits -> next tokens and their log-probs, one row per sample, each row its own parameters.

Maths (per row, logits z over the full vocabulary, in fp32):
    T        = temperature, or 1 for greedy rows
    logp     = log_softmax(z / T)                          reported log-probs (see rollout.base)
    p        = exp(logp), sorted descending when top-k / top-p apply
    keep     = rank < top_k  and  (cumsum(p) - p) <= top_p  (the head of the distribution)
    draw     = inverse CDF: the first kept token whose cumulative kept mass exceeds u * kept mass,
               u = the row's k-th draw at step k from torch.Generator().manual_seed(row seed)
               (`seeded_uniforms`: all rows' draws for all steps made at once per batch)
Greedy rows take argmax(z). One uniform per row per step makes a seeded row's samples depend
only on its own logits and seed, not on which other rows share the batch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from masa_megatron.rollout.base import SamplingParams
from masa_megatron.rollout.seeded_uniforms import seeded_uniforms


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor,
                   temperature: float = 1.0) -> torch.Tensor:
    """log_softmax(logits / T)[token] for logits [..., V] and tokens [...]; T <= 0 means 1.

    The definition every engine reports and the actor recomputes (no top-k/top-p renormalisation).
    """
    scale = 1.0 / temperature if temperature > 0 else 1.0
    logits = logits.float() * scale
    picked = logits.gather(-1, tokens.long().unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


@dataclass
class RowSampling:
    """Sampling parameters of the rows of a batch, as tensors, with every row's uniforms."""
    temperature: torch.Tensor        # [B] float, 1.0 on greedy rows
    greedy: torch.Tensor             # [B] bool
    top_k: torch.Tensor              # [B] long, <= 0: off
    top_p: torch.Tensor              # [B] float, 1.0: off
    uniforms: torch.Tensor           # [B, steps] float64: row b's draw at step k
    sampled: torch.Tensor            # [S] long: the non-greedy rows
    truncated: torch.Tensor          # [S] bool: which of them apply top-k / top-p
    all_sampled: bool                # no greedy row
    any_truncated: bool

    @classmethod
    def from_params(cls, params: Sequence[SamplingParams], seeds: Sequence[int], steps: int,
                    device: torch.device | str = "cpu") -> "RowSampling":
        """Settings and `steps` uniforms per row on `device` (the logits'); the uniforms are
        drawn on the CPU, so a seed gives the same samples on any device."""
        greedy = torch.tensor([p.greedy for p in params], dtype=torch.bool)
        temperature = torch.tensor([p.temperature for p in params], dtype=torch.float32)
        uniforms = seeded_uniforms(list(seeds), steps if bool((~greedy).any()) else 0)
        return cls._build(temperature.masked_fill(greedy, 1.0), greedy,
                          torch.tensor([p.top_k for p in params], dtype=torch.long),
                          torch.tensor([p.top_p for p in params], dtype=torch.float32),
                          uniforms, device)

    @classmethod
    def _build(cls, temperature, greedy, top_k, top_p, uniforms, device) -> "RowSampling":
        sampled = (~greedy).nonzero().squeeze(-1)
        truncated = (top_k[sampled] > 0) | (top_p[sampled] < 1.0)
        move = (lambda t: t.to(device, non_blocking=True))
        return cls(move(temperature), move(greedy), move(top_k), move(top_p), move(uniforms),
                   move(sampled), move(truncated), len(sampled) == len(greedy),
                   bool(truncated.any()))

    def select(self, rows: torch.Tensor) -> "RowSampling":
        """The rows listed in `rows` (a long tensor), in that order."""
        return RowSampling._build(self.temperature[rows], self.greedy[rows], self.top_k[rows],
                                  self.top_p[rows], self.uniforms[rows], rows.device)


def _draw(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw of one index per row of (unnormalised) probs [R, K]."""
    cdf = probs.double().cumsum(-1)
    target = (u * cdf[:, -1]).unsqueeze(-1)
    picked = torch.searchsorted(cdf, target, right=True).squeeze(-1)
    return picked.clamp_(max=probs.size(-1) - 1)


def _draw_truncated(logp: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                    u: torch.Tensor) -> torch.Tensor:
    """Draw from the top-k / top-p head of exp(logp) [R, V]; returns vocabulary ids."""
    vocab = logp.size(-1)
    k_max = int(top_k.max().item()) if bool((top_k > 0).all()) and bool((top_p >= 1).all()) \
        else vocab
    k_max = min(max(k_max, 1), vocab)
    if k_max < vocab:          # top-k only: a partial sort is enough
        head_logp, head_ids = logp.topk(k_max, dim=-1)
    else:
        head_logp, head_ids = logp.sort(dim=-1, descending=True)
    probs = head_logp.exp()
    rank = torch.arange(probs.size(-1), device=probs.device).unsqueeze(0)
    keep = torch.ones_like(probs, dtype=torch.bool)
    keep &= (top_k.unsqueeze(-1) <= 0) | (rank < top_k.unsqueeze(-1))
    keep &= (probs.cumsum(-1) - probs) <= top_p.unsqueeze(-1)
    keep[:, 0] = True
    picked = _draw(probs * keep, u)
    return head_ids.gather(-1, picked.unsqueeze(-1)).squeeze(-1)


def sample_next_tokens(logits: torch.Tensor, rows: RowSampling,
                       step: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [B, V] at decode step `step` -> (tokens [B] long, log-probs [B] float32), following
    the module docstring."""
    logits = logits.float()
    sampled = rows.sampled
    if not sampled.numel():                  # all greedy: T = 1, no [B, V] log-softmax needed
        tokens = logits.argmax(dim=-1)
        picked = logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
        return tokens, picked - torch.logsumexp(logits, dim=-1)
    logp = torch.log_softmax(logits / rows.temperature.unsqueeze(-1), dim=-1)
    if rows.all_sampled and not rows.any_truncated:     # plain draws on every row (the demo's)
        tokens = _draw(logp.exp(), rows.uniforms[:, step])
        return tokens, logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    tokens = logits.argmax(dim=-1)
    u = rows.uniforms[sampled, step]
    truncated = rows.truncated
    if not rows.any_truncated:
        tokens[sampled] = _draw(logp[sampled].exp(), u)
    elif bool(truncated.all()):
        tokens[sampled] = _draw_truncated(logp[sampled], rows.top_k[sampled],
                                          rows.top_p[sampled], u)
    else:
        plain_rows, trunc_rows = sampled[~truncated], sampled[truncated]
        tokens[plain_rows] = _draw(logp[plain_rows].exp(), u[~truncated])
        tokens[trunc_rows] = _draw_truncated(logp[trunc_rows], rows.top_k[trunc_rows],
                                             rows.top_p[trunc_rows], u[truncated])
    return tokens, logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
