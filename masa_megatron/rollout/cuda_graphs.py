"""CUDA graphs of the embedded engine's static decode step, one per batch-size bucket.

Protocol (torch.cuda.CUDAGraph, as the CUDA-graph notes of torch prescribe):
  capture(key, fn): run fn `warmup` times on a side stream (first-call allocations, cuBLAS
                    workspaces and lazy initialisation happen outside the capture), then record
                    one call into a graph whose memory comes from a pool shared by all the
                    graphs (they never run concurrently); keep its output tensor.
  replay(key):      re-launch the recorded kernels; they read the static buffers (refilled in
                    place by the caller before each replay) and rewrite the same output tensor.
                    The caller reads that output before any other replay: graphs sharing the
                    pool may reuse the memory of another graph's output for their temporaries.
A step's warm-up runs and capture run on the step's real inputs: its only side effect, the new
key/value written at the current slot, is the one the replay writes again.

Graphs bake in the addresses of the buffers and weights they read. The engine drops them with
its buffers at the end of every `generate` call (`reset`), so they never outlive the buffers,
never hold memory through a training step and never see weights that moved; the next call
captures again (its first capture of a key warms up `warmup` times, later ones once: the
lazy initialisation is done by then).
Sampling stays outside the graph (per-row seeded, rollout/sampling.py).

Not yet run on a GPU (none was lent when this was written): benchmarks/gpu_rl_step.py
--cuda-graphs compares it with the eager decode on the device.
"""
from __future__ import annotations

import time
from typing import Any, Callable

import torch


class GraphRunner:
    """Replays one captured graph per key (a bucket size); captures on first use."""

    def __init__(self, device: torch.device, model_config: Any = None, warmup: int = 3):
        if device.type != "cuda" or not torch.cuda.is_available():
            raise ValueError(f"rollout.cuda_graphs=True needs the model on a CUDA device; it is "
                             f"on {device} (set rollout.cuda_graphs=false)")
        if getattr(model_config, "num_moe_experts", None):
            raise NotImplementedError("rollout.cuda_graphs=True: MoE layers route tokens with "
                                      "data-dependent shapes, which a CUDA graph cannot replay "
                                      "(set rollout.cuda_graphs=false)")
        self.device, self.warmup = device, warmup
        self.graphs: dict[Any, tuple[Any, torch.Tensor]] = {}
        self.captured: list = []          # every key captured, in order (kept across resets)
        self.capture_s = 0.0              # host time spent warming up and capturing
        self._pool = None

    def reset(self) -> None:
        """Drop every graph and the memory pool."""
        self.graphs.clear()
        self._pool = None

    def __call__(self, key: Any, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        entry = self.graphs.get(key)
        if entry is None:
            start = time.perf_counter()
            entry = self.graphs[key] = self._capture(fn, 1 if key in self.captured
                                                     else self.warmup)
            self.captured.append(key)
            self.capture_s += time.perf_counter() - start
        graph, out = entry
        graph.replay()
        return out

    def _capture(self, fn: Callable[[], torch.Tensor], warmup: int) -> tuple[Any, torch.Tensor]:
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(warmup):
                fn()
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: CUDA calls of other threads (none of ours) do not abort the capture
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            out = fn()
        return graph, out
