"""Which part of which HF tensor each tensor-parallel shard holds (layouts: registry.Split).

A TP shard is described as a list of `Piece`s (an HF tensor, and a row or column range of it)
and the matching list of views of the shard (`shard_views`). Loading copies each piece read from
disk into its view; exporting writes each view to its piece's place in the output file. Neither
direction ever materialises a full (unsharded) tensor.

For the fused QKV weight the shard is [G_r, (Q*d | d | d), ...] (G_r = the rank's query groups):
its views are the q, k and v blocks of those groups, i.e. HF rows [g0*Q*d, g1*Q*d) of q_proj
and [g0*d, g1*d) of k_proj and v_proj.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from masa_megatron.model.hf_config import DecoderShape
from masa_megatron.model.registry import Split, WeightRule


@dataclass(frozen=True)
class Piece:
    hf_index: int   # which of rule.hf
    axis: int       # 0: rows [start, stop) of the HF tensor; 1: columns [start, stop)
    start: int
    stop: int

    def shape(self, full_shape: Sequence[int]) -> tuple[int, ...]:
        if self.axis == 0:
            return (self.stop - self.start,) + tuple(full_shape[1:])
        return (full_shape[0], self.stop - self.start)


def hf_shapes(rule: WeightRule, local_shape: Sequence[int], tp: int,
              shape: DecoderShape) -> list[tuple[int, ...]]:
    """Full HF shapes of the rule's HF tensors, given this rank's Megatron shard shape."""
    rest = tuple(local_shape[1:])
    split = rule.split
    if split is Split.REPLICATED:
        return [tuple(local_shape)]
    if split is Split.COLUMN:
        return [(local_shape[0] * tp,) + rest]
    if split is Split.ROW:
        return [(local_shape[0], local_shape[1] * tp)]
    if split is Split.VOCAB:
        return [(shape.vocab_size,) + rest]
    if split is Split.QKV:
        d = shape.head_dim
        return [(shape.num_heads * d,) + rest, (shape.num_kv_heads * d,) + rest,
                (shape.num_kv_heads * d,) + rest]
    if split is Split.GATE_UP:
        return [(local_shape[0] * tp // 2,) + rest] * 2
    raise AssertionError(split)


def shard_pieces(rule: WeightRule, tp_rank: int, tp: int, local_shape: Sequence[int],
                 shape: DecoderShape) -> list[Piece]:
    """The HF ranges TP rank `tp_rank` holds, in the order of `shard_views`."""
    n, split = local_shape[0], rule.split
    if split is Split.REPLICATED:
        return [Piece(0, 0, 0, n)]
    if split is Split.COLUMN:
        return [Piece(0, 0, tp_rank * n, (tp_rank + 1) * n)]
    if split is Split.ROW:
        m = local_shape[1]
        return [Piece(0, 1, tp_rank * m, (tp_rank + 1) * m)]
    if split is Split.VOCAB:  # rows past the real vocabulary are padding: no piece
        start, stop = tp_rank * n, min((tp_rank + 1) * n, shape.vocab_size)
        return [Piece(0, 0, start, stop)] if stop > start else []
    if split is Split.QKV:
        d, q = shape.head_dim, shape.heads_per_group
        groups = shape.num_kv_heads // tp
        g0, g1 = tp_rank * groups, (tp_rank + 1) * groups
        return [Piece(0, 0, g0 * q * d, g1 * q * d), Piece(1, 0, g0 * d, g1 * d),
                Piece(2, 0, g0 * d, g1 * d)]
    if split is Split.GATE_UP:
        half = n // 2
        return [Piece(i, 0, tp_rank * half, (tp_rank + 1) * half) for i in (0, 1)]
    raise AssertionError(split)


def shard_views(rule: WeightRule, shard: torch.Tensor, tp_rank: int,
                shape: DecoderShape) -> list[torch.Tensor]:
    """Views of TP rank `tp_rank`'s `shard` matching `shard_pieces`, piece by piece.

    QKV views are [groups, rows per group, ...]: reshape to the piece's shape to write them."""
    split = rule.split
    if split is Split.VOCAB:
        real = max(0, min(shard.shape[0], shape.vocab_size - tp_rank * shard.shape[0]))
        return [shard[:real]] if real else []
    if split is Split.QKV:
        d, q = shape.head_dim, shape.heads_per_group
        grouped = shard.view((-1, (q + 2) * d) + tuple(shard.shape[1:]))
        return [grouped[:, : q * d], grouped[:, q * d: (q + 1) * d], grouped[:, (q + 1) * d:]]
    if split is Split.GATE_UP:
        return list(shard.chunk(2, dim=0))
    return [shard]
