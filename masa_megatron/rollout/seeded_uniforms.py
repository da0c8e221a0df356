"""Many rows' seeded uniforms at once: torch's CPU Mersenne Twister, vectorised over rows.

`seeded_uniforms(seeds, steps)[b, k]` equals the k-th value of
`torch.rand(1, dtype=torch.float64, generator=torch.Generator().manual_seed(seeds[b]))` called
repeatedly, bit for bit, without a Python loop over rows or steps after seeding:

    state    = the 624 32-bit words of MT19937 seeded with seed (torch's own seeding, read back
               with Generator.get_state())
    words    = twist(state), twist(twist(state)), ...      each twist regenerates all 624 words
    temper   y ^= y>>11; y ^= (y<<7) & 0x9d2c5680; y ^= (y<<15) & 0xefc60000; y ^= y>>18
    u_k      = ((w_2k & (2^21 - 1)) * 2^32 + w_2k+1) * 2^-53   (torch's random64 -> double)

Words are held in int64 tensors (every value < 2^32, so shifts, masks and xors are exact).
"""
from __future__ import annotations

from typing import Sequence

import torch

_N, _M = 624, 397
_UPPER, _LOWER, _MATRIX_A = 0x80000000, 0x7FFFFFFF, 0x9908B0DF
_WORD = 0xFFFFFFFF
# Byte offset of the 624 state words (uint64 each) in Generator.get_state(): after the initial
# seed (8 bytes), `left` and `seeded` (4 each) and `next` (8).
_STATE_OFFSET = 24


def _twisted(mt: torch.Tensor, lo: int, hi: int, source: torch.Tensor, following: torch.Tensor
             ) -> torch.Tensor:
    """New words lo..hi: source ^ (((mt & UPPER) | (following & LOWER)) >> 1) ^ A * (following & 1)."""
    y = (mt[:, lo:hi] & _UPPER) | (following & _LOWER)
    return source ^ (y >> 1) ^ ((following & 1) * _MATRIX_A)


def _twist(mt: torch.Tensor) -> torch.Tensor:
    """MT19937's state regeneration for every row of mt [B, 624], in four vectorised chunks
    (each chunk only reads words the sequential algorithm has already rewritten)."""
    new = torch.empty_like(mt)
    k = _N - _M                                                       # 227
    new[:, :k] = _twisted(mt, 0, k, mt[:, _M:], mt[:, 1:k + 1])
    new[:, k:2 * k] = _twisted(mt, k, 2 * k, new[:, :k], mt[:, k + 1:2 * k + 1])
    new[:, 2 * k:_N - 1] = _twisted(mt, 2 * k, _N - 1, new[:, k:_M - 1], mt[:, 2 * k + 1:])
    new[:, _N - 1:] = _twisted(mt, _N - 1, _N, new[:, _M - 1:_M], new[:, :1])
    return new


def _temper(y: torch.Tensor) -> torch.Tensor:
    y = y ^ (y >> 11)
    y = y ^ ((y << 7) & 0x9D2C5680)
    y = y ^ ((y << 15) & 0xEFC60000)
    return y ^ (y >> 18)


def seeded_states(seeds: Sequence[int]) -> torch.Tensor:
    """[B, 624] int64: MT19937 state right after `torch.Generator().manual_seed(seed)`."""
    raw = torch.stack([torch.Generator().manual_seed(int(s)).get_state() for s in seeds])
    return raw[:, _STATE_OFFSET:_STATE_OFFSET + 8 * _N].contiguous().view(torch.int64)


def seeded_uniforms(seeds: Sequence[int], steps: int) -> torch.Tensor:
    """[B, steps] float64 uniforms in [0, 1): row b's first `steps` draws from seed b (CPU)."""
    if not len(seeds) or steps < 1:
        return torch.zeros(len(seeds), max(steps, 0), dtype=torch.float64)
    state, blocks = seeded_states(seeds), []
    for _ in range(-(-2 * steps // _N)):             # a fresh generator twists before its 1st word
        state = _twist(state)
        blocks.append(state)
    words = _temper(torch.cat(blocks, dim=1)[:, :2 * steps]).view(len(seeds), steps, 2)
    bits = ((words[..., 0] & 0x1FFFFF) << 32) | words[..., 1]
    return bits.double() * 2.0 ** -53
