"""The embedded engine: generation with the trainer's own Megatron GPTModel (TP/PP-sharded).

Data path
---------
Every rank of a model-parallel (TP x PP) group calls `generate`; the requests of the group's
first rank are broadcast to the others, so all of them run the same batches. Each data-parallel
group generates its own share independently (no collective crosses DP groups).

Per batch of rows (one row per sample; a request with n samples gives n rows):
1. Prompts are left-padded to the longest; every row keeps its own positions (0 at its first real
   token) for RoPE and learned position embeddings, and a mask hides the pads. The n rows of a
   request share one prefill: the prompt runs once, its KV cache is copied to the n rows.
2. Each step runs the model's own modules layer by layer with a KV cache of rotated keys
   (`megatron_step`: embedding, norms, fused QKV with q/k norms, SDPA attention with grouped KV
   heads, output projection, MLP, final norm, output layer; TP collectives as in their forward).
3. With PP, stages pass hidden states [s, b, h] by send/recv along the pipeline group; the last
   stage holds TP-gathered logits over the true vocabulary (Megatron's padding rows cut off).
4. One rank (last stage, TP rank 0) samples (`rollout.sampling`, one seeded generator per row)
   and broadcasts tokens and log-probs to the whole model-parallel group, so every rank makes the
   same decisions and returns the same results.
5. A row stops at its own max_new_tokens or stop id; finished rows are dropped from the batch
   (KV cache rows compacted) so they cost nothing afterwards.
6. Threads: each forward (a prefill micro-batch, the decode loop of a batch) runs on
   min(torch's threads, max(1, MACs // MACS_PER_THREAD)) intra-op threads, MACs = its new tokens
   x this rank's matmul weights (decoder layers and output layer; MoE: all experts, an upper
   bound). A decode step is ~15 ops per layer; when each is too small to split, every one of
   them pays an OpenMP fork/join, and on a busy machine a descheduled sibling thread stalls it
   for a time slice, so small forwards run single-threaded. The thread count is a function of the
   batch alone, so a seed gives the same samples on every run with the same torch threads.
7. `decode="graphs"` (rollout.cuda_graphs, CUDA, TP = PP = 1) replaces the decode steps of point 2
   by static-shape steps (`static_decode`: batch padded to a bucket, fixed-size KV buffers, the
   slot a tensor) replayed from one CUDA graph per bucket (`cuda_graphs`); `decode="static"`
   runs the same steps eagerly (any device; what the CPU tests compare with the default).
   The capture path has not run on a GPU yet.

The model runs in eval mode under no_grad; per-module train flags are restored afterwards and
nothing else in the model is touched (no Megatron inference context, no rotary cache, nor
Megatron 0.19's global InferenceMode flag is used), so training forwards work right after.
Supported layers: Megatron TransformerLayer with standard self-attention, dense or MoE MLP, RoPE
or learned absolute positions; local spec (tested) or TE spec (its modules are called as they
are; not run here, no GPU). Refused with NotImplementedError: sequence or context parallelism,
virtual pipeline chunks, multi-latent attention, attention output gates, sliding windows,
softmax offsets.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

from masa_megatron.compat.cpu import hot_path
from masa_megatron.rollout.base import (FINISH_ABORT, FINISH_LENGTH, FINISH_STOP, Completion,
                                        GenerationRequest, GenerationResult, RolloutEngine,
                                        SamplingParams)
from masa_megatron.rollout.megatron_step import (KVCache, MegatronStep, ModelParallel,
                                                 release_megatron_buffers, unwrap)
from masa_megatron.rollout.sampling import RowSampling, sample_next_tokens
from masa_megatron.rollout.static_decode import StaticDecoder

_MASK64 = (1 << 64) - 1
# multiply-adds of one forward's matmuls per intra-op thread it may use (2^27: ~3 ms on one
# AVX2/AVX-512 core, against ~10-50 us of fork/join per op and ~60 ops per decode step)
MACS_PER_THREAD = 1 << 27


def matmul_weights(gpt: Any) -> int:
    """Elements of this rank's matmul weights a token passes through: the 2-D parameters of the
    decoder layers and the output projection on the last stage (the embedding is a lookup)."""
    weights = [p for layer in gpt.decoder.layers for p in layer.parameters() if p.dim() == 2]
    if getattr(gpt, "post_process", True):
        weights.append(gpt.shared_embedding_or_output_weight()
                       if gpt.share_embeddings_and_output_weights else gpt.output_layer.weight)
    return sum(w.numel() for w in weights if w is not None)


def mix_seed(*values: int) -> int:
    """A 64-bit seed from integers (splitmix64-style), e.g. (request seed, sample index)."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = ((h ^ (int(v) & _MASK64)) * 0xBF58476D1CE4E5B9) & _MASK64
        h ^= h >> 31
    return h


@dataclass
class _Row:
    """One sample to generate."""
    request: int                 # index into the request list
    sample: int                  # index among the request's n samples
    prompt: list[int]
    params: SamplingParams
    max_new: int
    stop_ids: tuple[int, ...]
    seed: int


@dataclass
class _LiveRows:
    """Per-row state of the rows still generating (`keep` drops the others)."""
    index: torch.Tensor                  # [B] position of each row in the batch as built
    width: int                           # padded prompt length (first generated slot)
    positions: torch.Tensor              # [B, T] position of each slot (0 = first real token)
    real: Optional[torch.Tensor]         # [B, T] False on left padding; None: no padding
    rope: Optional[torch.Tensor]         # [T, B or 1, 1, d] rotary angles
    stop_ids: torch.Tensor               # [B, S] stop ids, -1 padded
    max_new: torch.Tensor                # [B]
    sampling: Optional[RowSampling]      # on the sampling rank only

    def keep(self, rows: torch.Tensor) -> None:
        self.index, self.positions = self.index[rows], self.positions[rows]
        self.stop_ids, self.max_new = self.stop_ids[rows], self.max_new[rows]
        if self.real is not None:
            self.real = self.real[rows]
            if self.rope is not None:
                self.rope = self.rope[:, rows]
        if self.sampling is not None:
            self.sampling = self.sampling.select(rows)


class _EagerSteps:
    """The default decode step: attention over the slots so far, finished rows compacted away."""

    def __init__(self, engine: "EmbeddedEngine", live: _LiveRows, cache: KVCache):
        self.engine, self.live, self.cache = engine, live, cache

    def drop(self, keep: torch.Tensor) -> None:
        self.cache.select(keep)         # `live` is kept by the loop

    def step(self, tokens: torch.Tensor, slot: int) -> Optional[torch.Tensor]:
        live = self.live
        mask = None if live.real is None else live.real[:, None, None, :slot + 1]
        rope = None if live.rope is None else live.rope[slot:slot + 1]
        return self.engine._stepper(tokens.unsqueeze(1), live.positions[:, slot:slot + 1], rope,
                                    mask, self.cache, slot, slice(None), self.engine._mp)


class EmbeddedEngine(RolloutEngine):
    """Generates with `model` (a GPTModel, a DDP/Float16Module wrapper, or a list of one).

    `vocab_size`: the tokenizer's vocabulary (default: the HF config's, which the model builder
    records); logits beyond it are Megatron's padding rows, never sampled nor counted in
    log-probs. `eos_token_ids` join every request's
    stop set unless it sets ignore_eos. `seed` drives unseeded requests. Construct it on every
    rank of the model-parallel group (it runs one collective to learn the layout).
    `decode`: "eager" (default), "static" or "graphs" (point 7 of the module docstring), with
    buckets up to `cuda_graph_max_batch` rows.
    """

    def __init__(self, model: Any, *, vocab_size: Optional[int] = None,
                 eos_token_ids: Sequence[int] = (), seed: int = 0, max_batch_size: int = 64,
                 prefill_token_budget: int = 8192, max_context_length: Optional[int] = None,
                 decode: str = "eager", cuda_graph_max_batch: int = 64):
        if isinstance(model, (list, tuple)):
            if len(model) != 1:
                raise NotImplementedError("virtual pipeline chunks are not supported")
            model = model[0]
        self.model, self.gpt = model, unwrap(model)
        self.config = self.gpt.config
        self._stepper = MegatronStep(self.gpt)
        hf_vocab = (getattr(self.gpt, "masa_hf_config", None) or {}).get("vocab_size")
        self.vocab_size = int(vocab_size or hf_vocab or self.gpt.vocab_size)
        self.eos_token_ids = tuple(int(t) for t in eos_token_ids)
        self.seed = seed
        self.max_batch_size = max_batch_size
        self.prefill_token_budget = prefill_token_budget
        self.max_context_length = int(max_context_length or self.gpt.max_sequence_length)
        self.weight_version = 0
        self._calls = 0
        self._paused = False
        self._alive = True
        self._mp = ModelParallel()
        self._device = next(self.gpt.parameters()).device
        self._macs_per_token = matmul_weights(self.gpt)
        self._static = self._static_decoder(decode, cuda_graph_max_batch)

    @classmethod
    def from_config(cls, model: Any, cfg: Any, *, vocab_size: Optional[int] = None,
                    eos_token_ids: Sequence[int] = (), **kwargs: Any) -> "EmbeddedEngine":
        """From an `ExperimentConfig` or its `RolloutConfig` (seed; context = max prompt + max
        response length). Every engine's from_config takes the ExperimentConfig (train/main.py)."""
        rollout_cfg = getattr(cfg, "rollout", cfg)
        context = rollout_cfg.max_prompt_length + rollout_cfg.max_response_length
        kwargs.setdefault("decode", "graphs" if rollout_cfg.cuda_graphs else "eager")
        return cls(model, vocab_size=vocab_size, eos_token_ids=eos_token_ids,
                   seed=rollout_cfg.seed, max_context_length=context,
                   cuda_graph_max_batch=rollout_cfg.cuda_graph_max_batch, **kwargs)

    def _static_decoder(self, decode: str, max_batch: int) -> Optional[StaticDecoder]:
        if decode not in ("eager", "static", "graphs"):
            raise ValueError(f"decode must be eager, static or graphs, got {decode!r}")
        if decode == "eager":
            return None
        runner = None
        if decode == "graphs":
            from masa_megatron.rollout.cuda_graphs import GraphRunner
            runner = GraphRunner(self._device, self.config)
        return StaticDecoder(self._stepper, self._mp, max_batch, runner)

    # ------------------------------------------------------------ interface
    def generate(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        """Call on every rank of the model-parallel group; the group's first rank's requests
        are the ones served, and every rank returns the same results."""
        if not self._alive:
            raise RuntimeError("engine was shut down")
        if self._paused:
            raise RuntimeError("engine is paused; call resume() before generate()")
        requests = self._mp.share(list(requests))
        self._calls += 1
        rows, results = self._expand(requests)
        try:
            with self._eval_mode():
                for batch in self._batches(rows):
                    for row, completion in zip(batch, self._generate_batch(batch)):
                        results[row.request].completions[row.sample] = completion
        finally:
            if self._static is not None:    # static KV buffers and graphs: this call's only
                self._static.release()
        return results

    def update_weights(self, model: Any = None, path: Optional[str] = None, *,
                       version: Optional[int] = None) -> int:
        """The engine shares the trainer's parameters: nothing moves, the version advances."""
        self.weight_version = self.weight_version + 1 if version is None else int(version)
        return self.weight_version

    def pause(self) -> None:
        """Release generation memory. KV caches live only inside `generate`; this frees
        Megatron's shared scratch buffer and the allocator's cached blocks."""
        self._paused = True
        release_megatron_buffers()

    def resume(self) -> None:
        self._paused = False

    def health(self) -> bool:
        return self._alive

    def shutdown(self) -> None:
        self.pause()
        self._alive = False
        self.model = self.gpt = None

    # ------------------------------------------------------------ requests -> rows -> batches
    def _expand(self, requests: list[GenerationRequest]) -> tuple[list[_Row], list[GenerationResult]]:
        rows, results = [], []
        for i, req in enumerate(requests):
            p, prompt = req.sampling, [int(t) for t in req.prompt_token_ids]
            aborted = Completion([], [], FINISH_ABORT)
            results.append(GenerationResult(req.request_id, len(prompt), [aborted] * p.n,
                                            self.weight_version))
            room = self.max_context_length - len(prompt)
            if not prompt or room < 1 or min(prompt) < 0 or max(prompt) >= self.vocab_size:
                continue
            stop = p.stop_token_ids + (() if p.ignore_eos else self.eos_token_ids)
            base = p.seed if p.seed is not None else mix_seed(self.seed, self._calls,
                                                              self._mp.dp_rank, i)
            rows += [_Row(i, j, prompt, p, min(p.max_new_tokens, room), stop, mix_seed(base, j))
                     for j in range(p.n)]
        return rows, results

    def _batches(self, rows: list[_Row]) -> list[list[_Row]]:
        """Longest prompts first (little padding), a request's samples together (one prefill)."""
        rows = sorted(rows, key=lambda r: (-len(r.prompt), r.request, r.sample))
        return [rows[i:i + self.max_batch_size] for i in range(0, len(rows), self.max_batch_size)]

    # ------------------------------------------------------------ one batch
    def _generate_batch(self, rows: list[_Row]) -> list[Completion]:
        live = self._layout(rows)
        logits, cache = self._prefill(rows, live)
        steps = _EagerSteps(self, live, cache) if self._static is None else \
            self._static.start(live, cache)
        del cache
        with self._threads(len(rows)):
            return self._decode(live, logits, steps)

    @contextlib.contextmanager
    def _threads(self, tokens: int):
        """torch's intra-op threads capped for a forward over `tokens` new tokens (point 6 of
        the module docstring); restored on exit."""
        before = torch.get_num_threads()
        wanted = min(before, max(1, tokens * self._macs_per_token // MACS_PER_THREAD))
        if wanted != before:
            torch.set_num_threads(wanted)
        try:
            yield
        finally:
            if wanted != before:
                torch.set_num_threads(before)

    def _layout(self, rows: list[_Row]) -> "_LiveRows":
        """Left padding to the longest prompt; per-row positions start at the first real token."""
        dev = self._device
        lens = torch.tensor([len(r.prompt) for r in rows], device=dev)
        max_new = torch.tensor([r.max_new for r in rows], device=dev)
        width = int(lens.max())
        pads = width - lens
        slots = torch.arange(width + int(max_new.max()), device=dev)
        positions = (slots.unsqueeze(0) - pads.unsqueeze(1)).clamp_(min=0)     # [B, T]
        has_pads = bool((pads > 0).any())
        stop_ids = torch.full((len(rows), max(1, max(len(r.stop_ids) for r in rows))), -1,
                              dtype=torch.long, device=dev)
        for b, r in enumerate(rows):
            stop_ids[b, :len(r.stop_ids)] = torch.tensor(r.stop_ids, dtype=torch.long)
        sampling = None
        if self._mp.is_sampler:
            sampling = RowSampling.from_params([r.params for r in rows], [r.seed for r in rows],
                                               int(max_new.max()), device=dev)
        return _LiveRows(
            index=torch.arange(len(rows), device=dev), width=width, positions=positions,
            real=(slots.unsqueeze(0) >= pads.unsqueeze(1)) if has_pads else None,
            rope=self._stepper.rope_table(positions if has_pads else positions[:1]),
            stop_ids=stop_ids, max_new=max_new, sampling=sampling)

    def _prefill(self, rows: list[_Row], live: "_LiveRows") -> tuple[Optional[torch.Tensor],
                                                                     KVCache]:
        """Run each distinct prompt once (row micro-batches of `prefill_token_budget` tokens),
        then copy its cache to the rows of its samples. Returns first-step logits [B, V]."""
        dev, width, real = self._device, live.width, live.real
        firsts = [0] + [b for b in range(1, len(rows)) if rows[b].request != rows[b - 1].request]
        prompt_of = torch.tensor([0] + [int(a.request != b.request) for a, b in
                                        zip(rows, rows[1:])], device=dev).cumsum(0)
        cache = KVCache(len(self.gpt.decoder.layers), len(firsts), live.positions.size(1))
        tokens = torch.zeros(len(firsts), width, dtype=torch.long, device=dev)
        for u, b in enumerate(firsts):
            tokens[u, width - len(rows[b].prompt):] = torch.tensor(rows[b].prompt)
        visible = torch.ones(width, width, dtype=torch.bool, device=dev).tril_()
        itself = torch.eye(width, dtype=torch.bool, device=dev)   # pad queries see themselves
        step_rows = max(1, self.prefill_token_budget // width)
        parts = []
        for start in range(0, len(firsts), step_rows):
            part = slice(start, min(start + step_rows, len(firsts)))
            sel = torch.tensor(firsts[part], device=dev)
            mask = None if real is None else visible & (real[sel, None, None, :width] | itself)
            rope = live.rope
            if rope is not None:
                rope = rope[:width, sel] if real is not None else rope[:width]
            with self._threads(tokens[part].numel()):
                parts.append(self._stepper(tokens[part], live.positions[sel, :width], rope,
                                           mask, cache, 0, part, self._mp))
        if len(firsts) < len(rows):
            cache.select(prompt_of)
        return (torch.cat(parts)[prompt_of] if self._mp.is_last_stage else None), cache

    def _decode(self, live: "_LiveRows", logits: Optional[torch.Tensor],
                steps: Any) -> list[Completion]:
        """Sample, record, drop finished rows, feed the new tokens; until every row is done.
        `steps`: an _EagerSteps or a StaticDecoder (drop(keep), step(tokens, slot) -> logits)."""
        n_rows, longest, dev = len(live.index), int(live.max_new.max()), self._device
        out_tokens = torch.zeros(n_rows, longest, dtype=torch.long, device=dev)
        out_logprobs = torch.zeros(n_rows, longest, dtype=torch.float32, device=dev)
        lengths = torch.zeros(n_rows, dtype=torch.long, device=dev)
        stopped_rows = torch.zeros(n_rows, dtype=torch.bool, device=dev)
        for step in range(longest):
            tok, logp = self._next_tokens(logits, live.sampling, len(live.index), step)
            out_tokens[live.index, step], out_logprobs[live.index, step] = tok, logp
            stopped = (tok.unsqueeze(1) == live.stop_ids).any(1)
            done = stopped | (live.max_new <= step + 1)
            if bool(done.any()):
                lengths[live.index[done]] = step + 1
                stopped_rows[live.index[stopped]] = True
                if bool(done.all()):
                    break
                keep = (~done).nonzero().squeeze(1)
                live.keep(keep)
                steps.drop(keep)
                tok = tok[keep]
            logits = steps.step(tok, live.width + step)
        out_tokens, out_logprobs, lengths = out_tokens.cpu(), out_logprobs.cpu(), lengths.cpu()
        return [Completion(out_tokens[b, :lengths[b]].tolist(),
                           out_logprobs[b, :lengths[b]].tolist(),
                           FINISH_STOP if stopped_rows[b] else FINISH_LENGTH)
                for b in range(n_rows)]

    def _next_tokens(self, logits: Optional[torch.Tensor], sampling: Optional[RowSampling],
                     n_rows: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Sample on the sampler rank, then give (tokens, log-probs) to every rank."""
        if self._mp.group is None:                  # one rank: nothing to share
            return sample_next_tokens(logits[:, :self.vocab_size], sampling, step)
        payload = torch.empty(2, n_rows, dtype=torch.float64, device=self._device)
        if self._mp.is_sampler:
            tok, logp = sample_next_tokens(logits[:, :self.vocab_size], sampling, step)
            payload[0], payload[1] = tok, logp
        payload = self._mp.broadcast_from_sampler(payload)
        return payload[0].long(), payload[1].float()

    @contextlib.contextmanager
    def _eval_mode(self):
        """Eval mode without autograd; every module's train flag restored on exit."""
        modules = list(self.model.modules())
        training = [m.training for m in modules]
        self.model.eval()
        try:
            with torch.no_grad(), hot_path():
                yield
        finally:
            for module, flag in zip(modules, training):
                module.training = flag
