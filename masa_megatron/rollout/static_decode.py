"""Static-shape decode steps for the embedded engine: the shapes a CUDA graph can replay.

A batch with n live rows runs as a bucket of b >= n rows, b the smallest of `bucket_sizes`
(1, 2, 4, ... up to the largest captured size) that holds n; a batch larger than every bucket
runs at its own size (a shape never captured). Everything a step reads lives in buffers
allocated once and refilled in place, so a step's tensors have the same shapes and addresses
every time:

    keys, values  [R, g, C, d] per layer     R rows >= b, C slots >= the batch's slots
    tokens        [R]      this step's input tokens (rows not live: stale, computed, ignored)
    slot          [1]      the slot this step writes and attends up to (a tensor, not an int)
    positions     [R, C]   per-row positions      rope  [C, R, 1, d]  per-row rotary angles
    real          [R, C]   False on a row's left padding

A step on bucket b reads rows :b: position = positions[:, slot], angles = rope[slot], the new key
and value are written at `slot` by index_copy_, and attention covers all C slots with
mask = real & (arange(C) <= slot). Slots past `slot` hold finite leftovers (buffers start as
zeros), which the mask weighs by exactly 0. With one query token, the heads of a KV group
attend as that group's query rows (MegatronStep._layer), so no KV head is repeated.

Finished rows keep their place (computed, outputs ignored) until the live count fits a smaller
bucket; then the live rows are compacted into rows :n and that bucket runs. `runner` (a
cuda_graphs.GraphRunner) replays a graph per bucket; without one every step runs eagerly, the
path the CPU tests check against the engine's default decode.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch

from masa_megatron.rollout.megatron_step import KVCache, MegatronStep, ModelParallel

SLOT_ROUNDING = 128     # slot capacity grows in these steps (fewer re-allocations, re-captures)


def bucket_sizes(max_batch: int) -> tuple[int, ...]:
    """1, 2, 4, ... below max_batch, then max_batch itself."""
    if max_batch < 1:
        raise ValueError(f"rollout.cuda_graph_max_batch must be >= 1, got {max_batch}")
    sizes, b = [], 1
    while b < max_batch:
        sizes.append(b)
        b *= 2
    return tuple(sizes + [max_batch])


class _SlotCache:
    """The KVCache interface over rows :b of the static buffers: `append` writes the new token's
    key/value at the tensor `slot` and returns every slot (the mask hides the others)."""
    fold_query_groups = True

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor]):
        self.keys, self.values = keys, values

    def append(self, layer: int, key: torch.Tensor, value: torch.Tensor, slot: torch.Tensor,
               rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = self.keys[layer], self.values[layer]
        k.index_copy_(2, slot, key.permute(1, 2, 0, 3))
        v.index_copy_(2, slot, value.permute(1, 2, 0, 3))
        return k, v


class _Buffers:
    """The static inputs of every bucket (module docstring), R rows x C slots."""

    def __init__(self, cache: KVCache, rope: Optional[torch.Tensor], rows: int, slots: int):
        dev = cache.keys[0].device
        self.rows, self.slots = rows, slots
        self.keys = [k.new_zeros(rows, k.size(1), slots, k.size(3)) for k in cache.keys]
        self.values = [v.new_zeros(rows, v.size(1), slots, v.size(3)) for v in cache.values]
        self.tokens = torch.zeros(rows, dtype=torch.long, device=dev)
        self.slot = torch.zeros(1, dtype=torch.long, device=dev)
        self.positions = torch.zeros(rows, slots, dtype=torch.long, device=dev)
        self.real = torch.ones(rows, slots, dtype=torch.bool, device=dev)
        self.slot_index = torch.arange(slots, device=dev)
        self.rope = None if rope is None else rope.new_zeros(slots, rows, 1, rope.size(-1))

    def fits(self, cache: KVCache, rows: int, slots: int) -> bool:
        return rows <= self.rows and slots <= self.slots and len(cache.keys) == len(self.keys) \
            and all(a.shape[1::2] == b.shape[1::2] and a.dtype == b.dtype
                    for a, b in zip(cache.keys, self.keys))

    def compact(self, rows: torch.Tensor) -> None:
        """Move `rows` (buffer rows, in order) to rows :len(rows)."""
        n = len(rows)
        for t in (*self.keys, *self.values, self.positions, self.real):
            t[:n] = t.index_select(0, rows)
        if self.rope is not None:
            self.rope[:, :n] = self.rope.index_select(1, rows)


class StaticDecoder:
    """Decode steps of fixed shapes for one engine (TP = PP = 1).

    Per batch: `start(live, cache)` after the prefill, then per step `drop(keep)` when rows finish
    and `step(tokens, slot)` -> logits of the live rows [n, padded vocab], as the eager loop.
    Buffers (and graphs) serve the batches of one generate call; `release` frees them."""

    def __init__(self, stepper: MegatronStep, mp: ModelParallel, max_batch: int,
                 runner: Optional[Callable[[Any, Callable[[], torch.Tensor]], torch.Tensor]] = None):
        if mp.group is not None:
            raise NotImplementedError("static-shape decoding (rollout.cuda_graphs) needs "
                                      "tensor and pipeline parallel sizes of 1")
        self.stepper, self.mp = stepper, mp
        self.sizes = bucket_sizes(max_batch)
        self.runner = runner
        self._buf: Optional[_Buffers] = None
        self.n = self.bucket = 0
        self.rowpos: Optional[torch.Tensor] = None      # buffer rows of the live rows; None: :n

    def bucket_for(self, n: int) -> int:
        return next((b for b in self.sizes if b >= n), n)

    def release(self) -> None:
        """Free the buffers and every captured graph."""
        self._buf = None
        if self.runner is not None:
            self.runner.reset()

    def start(self, live: Any, cache: KVCache) -> "StaticDecoder":
        """Load a prefilled batch (`live`: the engine's _LiveRows, `cache` its prefill cache,
        emptied layer by layer as it is copied)."""
        n, slots = len(live.index), live.positions.size(1)
        self.n, self.bucket, self.rowpos = n, self.bucket_for(n), None
        buf = self._buf
        if buf is None or not buf.fits(cache, self.bucket, slots):
            rows, capacity = self.bucket, -(-slots // SLOT_ROUNDING) * SLOT_ROUNDING
            if buf is not None:         # grow: never shrink below what earlier batches used
                rows, capacity = max(rows, buf.rows), max(capacity, buf.slots)
            buf = None
            self.release()
            buf = self._buf = _Buffers(cache, live.rope, rows, capacity)
        width = live.width              # the prefill's slots; the cache's others are unwritten
        # each prefill layer is freed once copied: the two caches never coexist whole
        for i in range(len(cache.keys)):
            buf.keys[i][:n, :, :width].copy_(cache.keys[i][:, :, :width])
            buf.values[i][:n, :, :width].copy_(cache.values[i][:, :, :width])
            cache.keys[i] = cache.values[i] = None
        buf.positions[:n, :slots] = live.positions
        buf.real[:n, :slots] = True if live.real is None else live.real
        buf.real[n:] = True
        if buf.rope is not None:
            buf.rope[:slots, :n] = live.rope
        return self

    def drop(self, keep: torch.Tensor) -> None:
        """Only the live rows listed in `keep` go on."""
        rows = keep if self.rowpos is None else self.rowpos.index_select(0, keep)
        self.n, bucket = len(keep), self.bucket_for(len(keep))
        if bucket < self.bucket:
            self._buf.compact(rows)
            self.bucket, self.rowpos = bucket, None
        else:
            self.rowpos = rows

    def step(self, tokens: torch.Tensor, slot: int) -> torch.Tensor:
        """Feed `tokens` [n] at `slot`; the next logits of the live rows, in order."""
        buf, b = self._buf, self.bucket
        if self.rowpos is None:
            buf.tokens[:self.n].copy_(tokens)
        else:
            buf.tokens.index_copy_(0, self.rowpos, tokens)
        buf.slot.fill_(slot)
        if self.runner is not None and b in self.sizes:
            logits = self.runner(b, lambda: self._forward(b))
        else:
            logits = self._forward(b)
        return logits[:self.n] if self.rowpos is None else logits.index_select(0, self.rowpos)

    def _forward(self, b: int) -> torch.Tensor:
        """One step of bucket b from the buffers alone (what a graph captures)."""
        buf = self._buf
        slot = buf.slot
        rope = None if buf.rope is None else buf.rope.index_select(0, slot)[:, :b]
        mask = (buf.real[:b] & (buf.slot_index <= slot)).view(b, 1, 1, buf.slots)
        cache = _SlotCache([k[:b] for k in buf.keys], [v[:b] for v in buf.values])
        return self.stepper(buf.tokens[:b].unsqueeze(1), buf.positions[:b].index_select(1, slot),
                            rope, mask, cache, slot, slice(None), self.mp)
