"""A resumable, seeded epoch sampler over problem indices.

Epoch e visits a permutation of range(n) drawn from seed + e; the state is (epoch, position), so
a checkpoint restores exactly where the run stopped. Batches never straddle an epoch boundary
silently: the rest of an epoch is taken, then the next epoch's permutation continues the batch.
"""
from __future__ import annotations

import random


class ResumableSampler:
    def __init__(self, num_items: int, batch_size: int, seed: int = 0, shuffle: bool = True):
        if num_items < 1:
            raise ValueError("the training set is empty")
        self.num_items, self.batch_size = num_items, batch_size
        self.seed, self.shuffle = seed, shuffle
        self.epoch, self.position = 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> list[int]:
        order = list(range(self.num_items))
        if self.shuffle:
            random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def next_batch(self, size: int | None = None) -> list[int]:
        """The next `size` (default batch_size) indices, crossing epochs as needed."""
        size = self.batch_size if size is None else size
        batch: list[int] = []
        while len(batch) < size:
            if self.position >= self.num_items:
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._permutation(self.epoch)
            take = min(size - len(batch), self.num_items - self.position)
            batch.extend(self._order[self.position:self.position + take])
            self.position += take
        return batch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "num_items": self.num_items}

    def load_state_dict(self, state: dict) -> None:
        if state["num_items"] != self.num_items:
            raise ValueError(f"sampler state is for {state['num_items']} problems, the dataset "
                             f"has {self.num_items}: the training files changed since the checkpoint")
        self.seed, self.epoch, self.position = state["seed"], state["epoch"], state["position"]
        self._order = self._permutation(self.epoch)
