"""The actor: log-probs, the PPO update and a supervised step on Megatron model chunks (TP/PP/DP).

Log-probs and entropies per token come from this TP rank's vocabulary slice without gathering
the vocabulary (vocab_parallel.py states the maths).

Every forward/backward goes through Megatron's `get_forward_backward_func()`, so pipeline
parallelism works; micro-batches have different shapes (see batching.py), which the PP p2p
exchange supports with `variable_seq_lengths=True` (set on the model config when PP > 1).
Results computed on the last pipeline stage are broadcast over the PP group: `logprobs` and every
metric dict are returned on ALL ranks; `prompt_last_hidden` only on the last stage.

Normalisation. `update` takes this data-parallel rank's samples (every GRPO group whole on one
rank: see batching.split_for_data_parallel). For each mini-batch the valid-token and sequence
counts are all-reduced over DP and passed to `policy_loss` as global normalisers, so that the sum
of the per-micro-batch losses over micro-batches and DP ranks IS the loss of the whole mini-batch
(token-mean = mean over all its valid tokens). Megatron then divides each micro-batch loss by
the number of micro-batches n_mb, and DDP averages gradients over DP (scales by 1/DP before the
sum); the loss handed to Megatron is therefore multiplied by n_mb * DP, which makes the final
gradient exactly the single-process, single-micro-batch gradient.

Mini-batches. Either grpo.mini_batches_per_step equal consecutive parts of this rank's samples,
or, with grpo.mini_batch_sequences = S, the reference's mini-batches of S sequences over all DP
ranks (batching.sequence_mini_batches): a short last mini-batch of s sequences has its loss
multiplied by s / S, as verl's dynamic batch size does (3,072 sequences: 2,048 + 1,024 x 0.5).

Prompt-state loss. When the batch carries `prompt_targets` [N, k], the update adds
`prompt_state_loss(h, targets, normalisers)` to each micro-batch's policy loss, where h [b, H] is
the final hidden state (after the final norm, with grad) at each row's last prompt token, i.e.
the state `prompt_last_hidden` returns, and normalisers [k] are the mini-batch's counts of finite
targets per column over DP: a loss that sums its rows and divides by them is the mini-batch mean.
Its gradient reaches the backbone in the same optimizer step (joint meta-head training).

Invariants. With `check_ratio=True`, before the first optimizer step max |exp(logp - old_logp) - 1|
over the first mini-batch must stay within `ratio_tolerance` (old log-probs recomputed by the same
model), else `RatioInvariantError`. The tolerance defaults to `RATIO_TOLERANCE[dtype]` of the
model's parameters: the two forwards see the same weights and tokens but different micro-batch
shapes, so their logits may differ by rounding. In fp32 that is far below 1e-5. In 16-bit the
logits are stored with unit roundoff u (bf16 2^-8, fp16 2^-11): one rounding flip of a confident
token's logit z in [16, 32) moves it by one ulp = 32 u (bf16 0.125, fp16 0.0156), i.e. the ratio
by exp(32 u) - 1 (bf16 0.133, fp16 0.0157); the tolerance is that rounded up (bf16 0.15, fp16
0.02). Bugs the check exists for (a vocabulary or temperature mismatch, a packing shift, another
model) move ratios by O(1). A non-finite loss or gradient skips the optimizer step
(gradients dropped, LR schedule not advanced), reported as skipped_step.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from functools import partial
from typing import Any, Callable, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from masa_megatron.algo.losses import policy_loss, summarize_policy_metrics
from masa_megatron.compat.cpu import hot_path
from masa_megatron.config import GRPOConfig
from masa_megatron.model.shape_check import sequence_multiple
from masa_megatron.parallel import collective_device
from masa_megatron.train.batching import (MicroBatch, TrainBatch, pack_micro_batch,
                                          plan_micro_batches, sequence_mini_batches,
                                          split_mini_batches)
from masa_megatron.train.dist import DataParallelInfo, PipelineStages
from masa_megatron.train.optim import load_train_state, save_train_state, unwrap_model
from masa_megatron.train.shared_prefix import (pack_shared_micro_batch, plan_shared_micro_batches,
                                               shared_prefix_forward, unsupported_reasons)
from masa_megatron.train.vocab_parallel import (scaled_vocab_logits, vocab_parallel_entropy,
                                                vocab_parallel_logprobs)

LossFn = Callable[[MicroBatch, Tensor], tuple[Tensor, dict[str, Tensor]]]
PerTokenFn = Callable[[Tensor, Tensor], Tensor]
PromptStateLoss = Callable[[Tensor, Tensor, Tensor], Tensor]  # (h [b, H], targets, normalisers)


RATIO_TOLERANCE = {"fp32": 1e-5, "fp16": 2e-2, "bf16": 0.15}   # see the module docstring
_DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


class RatioInvariantError(RuntimeError):
    """The first mini-batch's probability ratio is not 1: old log-probs do not match the model."""


class Actor:
    """Owns the model chunks (DDP-wrapped to train), their optimizer and LR scheduler."""

    def __init__(self, model_chunks: Sequence[torch.nn.Module], optimizer: Any, scheduler: Any,
                 grpo_cfg: GRPOConfig, *, temperature: float = 1.0,
                 vocab_size: Optional[int] = None, ratio_tolerance: Optional[float] = None):
        from megatron.core import parallel_state as ps
        from megatron.core.distributed import finalize_model_grads
        from megatron.core.pipeline_parallel import get_forward_backward_func
        from megatron.core.utils import get_model_config

        if ps.get_context_parallel_world_size() > 1:
            raise NotImplementedError("the actor does not split sequences (context parallel)")
        self.model_chunks = list(model_chunks)
        self.optimizer, self.scheduler, self.cfg = optimizer, scheduler, grpo_cfg
        self.temperature = float(temperature)
        hf = getattr(unwrap_model(self.model_chunks[0]), "masa_hf_config", None)
        self.vocab_size = vocab_size or (hf.get("vocab_size") if isinstance(hf, dict) else None)
        self.device = collective_device()      # micro-batches and collectives live here
        config = get_model_config(self.model_chunks[0])
        self.ratio_tolerance = float(ratio_tolerance) if ratio_tolerance is not None \
            else RATIO_TOLERANCE[_DTYPE_NAMES[config.params_dtype]]
        if ps.get_pipeline_model_parallel_world_size() > 1:
            config.variable_seq_lengths = True
        config.finalize_model_grads_func = finalize_model_grads
        if optimizer is not None:
            config.grad_scale_func = optimizer.scale_loss
        self.model_config = config
        # micro-batch sequence length: s/TP rows per rank with SP, FP8 GEMM alignment
        self.sequence_multiple = sequence_multiple(config)
        self._forward_backward = get_forward_backward_func()
        self.dp = DataParallelInfo.from_megatron()
        self.pipeline = PipelineStages.from_megatron()
        self.is_last_stage = ps.is_pipeline_last_stage()
        # DDP scales gradients by 1/DP unless the config asks for per-token loss scaling
        self._dp_grad_factor = 1 if config.calculate_per_token_loss else self.dp.size
        # set on the last stage to train on batches with prompt_targets (see the module docstring)
        self.prompt_state_loss: Optional[PromptStateLoss] = None
        # shared-prefix micro-batches (train/shared_prefix.py) where the model allows them
        gpt = unwrap_model(self.model_chunks[0])
        self.shared_prefix_off = ["grpo.shared_prefix=false"] if not grpo_cfg.shared_prefix else \
            ["virtual pipeline chunks"] if len(self.model_chunks) > 1 else \
            unsupported_reasons(gpt, self.pipeline.size, ps.get_context_parallel_world_size())
        self._stepper = None                   # made by the first shared-prefix forward

    # ------------------------------------------------------------------ plumbing

    def _micro_batches(self, batch: TrainBatch, indices: Sequence[int],
                       shared: bool = True) -> list[MicroBatch]:
        """Micro-batches of the samples `indices` within grpo.micro_batch_tokens: shared-prefix
        ones when `shared`, the model allows them and the batch has no prompt targets."""
        indices = list(indices)
        if shared and not self.shared_prefix_off and batch.prompt_targets is None and indices:
            plan = plan_shared_micro_batches([batch.prompt_ids[i] for i in indices],
                                             [len(batch.response_ids[i]) for i in indices],
                                             self.cfg.micro_batch_tokens)
            return [pack_shared_micro_batch(batch, [indices[j] for j in g]).to(self.device)
                    for g in plan]
        lengths = batch.row_lengths()
        plan = plan_micro_batches([lengths[i] for i in indices], self.cfg.micro_batch_tokens,
                                  multiple_of=self.sequence_multiple)
        groups = [[indices[j] for j in g] for g in plan] or [[]]
        return [pack_micro_batch(batch, g, multiple_of=self.sequence_multiple).to(self.device)
                for g in groups]

    def _run(self, micro: list[MicroBatch], per_token: PerTokenFn, loss_func: Callable, *,
             forward_only: bool, collect: bool = False) -> list:
        """Megatron's schedule over `micro`; returns the loss_func outputs (last stage).

        On the last stage the model output is per_token(labels [b, s], logits [s, b, V/TP]),
        a [b, s] tensor: it stands in for GPTModel's language-model loss, which gets the logits
        in their native layout (without labels GPTModel returns a transposed copy of the largest
        activation). loss_func(mb, output) is the schedule's loss function."""
        def forward_step(data_iterator, model):
            mb = next(data_iterator)
            with hot_path():
                if mb.prefix is not None:
                    gpt = unwrap_model(model)
                    if self._stepper is None:
                        from masa_megatron.rollout.megatron_step import MegatronStep
                        self._stepper = MegatronStep(gpt)
                    output = shared_prefix_forward(gpt, mb, per_token, self._stepper)
                else:
                    output = model(mb.tokens, mb.position_ids, None, labels=mb.labels,
                                   runtime_gather_output=False)
            return output, partial(loss_func, mb)

        heads = [m for m in map(unwrap_model, self.model_chunks) if m.post_process]
        for model in heads:
            model.compute_language_model_loss = per_token
        iterators = [iter(micro) for _ in self.model_chunks]
        try:
            return self._forward_backward(
                forward_step_func=forward_step,
                data_iterator=iterators if len(iterators) > 1 else iterators[0],
                model=self.model_chunks, num_microbatches=len(micro),
                seq_length=max(mb.tokens.shape[1] for mb in micro),
                micro_batch_size=max(mb.num_rows for mb in micro),
                forward_only=forward_only, collect_non_loss_data=collect)
        finally:
            for model in heads:
                del model.compute_language_model_loss

    def _logprob_fn(self, temperature: float, entropies: Optional[list] = None) -> PerTokenFn:
        """per_token function: log-probs (and, into `entropies`, entropy) of the labels."""
        def per_token(labels: Tensor, logits: Tensor) -> Tensor:
            z = scaled_vocab_logits(logits, temperature, self.vocab_size)
            if entropies is not None:
                entropies.append(vocab_parallel_entropy(z).t())
            return vocab_parallel_logprobs(z, labels.t().contiguous()).t()
        return per_token

    @contextmanager
    def _eval_mode(self):
        """The model chunks in eval mode, back in training mode however the block ends."""
        for chunk in self.model_chunks:
            chunk.eval()
        try:
            yield
        finally:
            for chunk in self.model_chunks:
                chunk.train()

    @contextmanager
    def _final_hidden_states(self, enabled: bool = True):
        """Yields a list that collects the decoder output [T, b, H] (after the final norm) of
        every forward of the last model chunk, on the last stage only; pop it in loss_func.
        Under sequence parallelism each TP rank's output holds T/TP rows: they are all-gathered
        (backward: each rank keeps its rows of the gradient, which every TP rank computes whole
        from the same loss, as without SP)."""
        captured: list[Tensor] = []
        if not (enabled and self.is_last_stage):
            yield captured
            return
        from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

        def whole(out: Tensor) -> Tensor:
            out = out[0] if isinstance(out, tuple) else out
            if self.model_config.sequence_parallel:
                out = gather_from_sequence_parallel_region(out, tensor_parallel_output_grad=False)
            return out

        decoder = unwrap_model(self.model_chunks[-1]).decoder
        hook = decoder.register_forward_hook(
            lambda module, args, out: captured.append(whole(out)))
        try:
            yield captured
        finally:
            hook.remove()

    @staticmethod
    def _last_prompt_states(mb: MicroBatch, hidden: Tensor) -> Tensor:
        """[b, H]: the hidden state [T, b, H] at each row's last prompt token."""
        rows = torch.arange(mb.num_rows, device=hidden.device)
        return hidden[torch.as_tensor(mb.response_start, device=hidden.device), rows]

    def _reduce_metrics(self, store: list[dict], keys: Sequence[str]) -> dict[str, float]:
        """Sum (max for "_max" keys) over micro-batches and DP ranks; the same on all ranks."""
        values = torch.zeros(len(keys), dtype=torch.float64, device=self.device)
        is_max = torch.tensor([k.endswith("_max") for k in keys], device=self.device)
        for item in store:
            row = torch.stack([item[k].to(self.device, torch.float64) for k in keys])
            values = torch.where(is_max, torch.maximum(values, row), values + row)
        values = self.pipeline.broadcast_tensor(self.dp.sum_or_max(values, is_max))
        return dict(zip(keys, values.tolist()))

    def _mini_batches(self, batch: TrainBatch) -> tuple[list[list[int]], list[float]]:
        """This rank's sample indices per mini-batch and each mini-batch's loss scale: equal
        parts (grpo.mini_batches_per_step, scale 1) or, with grpo.mini_batch_sequences, chunks
        of that many sequences over all DP ranks (batching.sequence_mini_batches)."""
        size = self.cfg.mini_batch_sequences
        if not size:
            minis = split_mini_batches(len(batch), self.cfg.mini_batches_per_step)
            return minis, [1.0] * len(minis)
        mine = [[0.0] * self.dp.size]
        mine[0][self.dp.rank] = float(len(batch))
        counts = [int(n) for n in self.dp.sum(mine)[0].tolist()]
        return sequence_mini_batches(counts, size)[self.dp.rank]

    def _zero_grads(self) -> None:
        for chunk in self.model_chunks:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()

    def _grads_finite(self) -> bool:
        """All gradient buffers finite on every rank (checked before the DP-sharded step)."""
        bad = torch.zeros((), dtype=torch.float32, device=self.device)
        for chunk in self.model_chunks:
            for buf in list(chunk.buffers) + list(chunk.expert_parallel_buffers):
                bad = torch.maximum(bad, (~torch.isfinite(buf.grad_data.sum())).float())
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        return not bool(bad.item())

    def _train_step(self, micro: list[MicroBatch], loss_of: LossFn, keys: Sequence[str],
                    check_ratio: bool = False, advance_schedule: bool = True,
                    temperature: Optional[float] = None) -> dict[str, float]:
        """Zero grads, forward/backward all micro-batches, then step unless non-finite.
        The LR schedule advances by one before a step (and back if the step fails)."""
        self._zero_grads()
        scale = len(micro) * self._dp_grad_factor

        def loss_func(mb: MicroBatch, logprobs: Tensor):
            loss, metrics = loss_of(mb, logprobs)
            metrics["loss"] = loss.detach().to(torch.float64)
            if mb.is_padding_only:
                metrics = {k: torch.zeros_like(v) for k, v in metrics.items()}
            return loss * scale, metrics  # Megatron divides by len(micro) in place

        per_token = self._logprob_fn(self.temperature if temperature is None else temperature)
        store = self._run(micro, per_token, loss_func, forward_only=False)
        sums = self._reduce_metrics(store, list(keys) + ["loss"])
        if check_ratio:
            sums["step0_ratio_dev_max"] = sums["ratio_dev_max"]
            if not sums["ratio_dev_max"] <= self.ratio_tolerance:
                self._zero_grads()
                raise RatioInvariantError(
                    f"before the first optimizer step max |exp(logp - old_logp) - 1| = "
                    f"{sums['ratio_dev_max']:.3e} exceeds {self.ratio_tolerance:.1e}: the old "
                    f"log-probs were not computed by this model on these tokens (stale weights, "
                    f"dropout, a temperature or vocabulary mismatch, or a packing bug)")
        finite = math.isfinite(sums["loss"])
        if not self.optimizer.config.fp16:  # fp16: the loss scaler handles overflow itself
            finite = self._grads_finite() and finite
        grad_norm, stepped = float("nan"), False
        if finite:
            if advance_schedule:
                self.scheduler.step(1)
            stepped, grad_norm, _ = self.optimizer.step()
            if advance_schedule and not stepped:
                self.scheduler.step(-1)
        if not stepped:
            self._zero_grads()
        sums.update(grad_norm=float(grad_norm) if grad_norm is not None else float("nan"),
                    skipped_step=float(not stepped), lr=self.current_lr())
        return sums

    def current_lr(self) -> float:
        groups = self.optimizer.param_groups
        return float(next((g["lr"] for g in groups if g.get("default_config", True)),
                          groups[0]["lr"] if groups else float("nan")))

    # ------------------------------------------------------------------ public API

    @staticmethod
    def make_batch(samples: Sequence[Any], advantages: Tensor | Sequence[float]) -> TrainBatch:
        """TrainBatch from objects with prompt_ids, response_ids, rollout_logprobs, group_id."""
        rollout = [getattr(s, "rollout_logprobs", None) for s in samples]
        has_rollout = bool(samples) and all(r is not None and len(r) == len(s.response_ids)
                                            for r, s in zip(rollout, samples))
        return TrainBatch(
            prompt_ids=[list(s.prompt_ids) for s in samples],
            response_ids=[list(s.response_ids) for s in samples],
            advantages=torch.as_tensor(advantages, dtype=torch.float32).reshape(-1),
            rollout_logprobs=[torch.as_tensor(r, dtype=torch.float32) for r in rollout]
            if has_rollout else None,
            group_ids=[getattr(s, "group_id", 0) for s in samples])

    @torch.no_grad()
    def logprobs(self, batch: TrainBatch, *, with_entropy: bool = False):
        """Per-sample response-token log-probs (list of [R_i] fp32 CPU tensors), on all ranks.

        With `with_entropy`, returns (logprobs, entropies) of the same shapes."""
        micro = self._micro_batches(batch, range(len(batch)))

        entropies: list[Tensor] = []

        def collect(mb: MicroBatch, logprobs: Tensor, non_loss_data: bool = True):
            return {"logprobs": logprobs, "entropy": entropies.pop(0) if with_entropy else None}

        per_token = self._logprob_fn(self.temperature, entropies if with_entropy else None)
        with self._eval_mode():
            store = self._run(micro, per_token, collect, forward_only=True, collect=True)
        lengths = [len(r) for r in batch.response_ids]
        rows = 2 if with_entropy else 1
        flat = torch.zeros(rows, sum(lengths), dtype=torch.float32)
        if self.is_last_stage:
            per_sample: list = [None] * len(batch)
            for mb, out in zip(micro, store):
                keys = ["logprobs", "entropy"][:rows]
                parts = [mb.unpack(out[k].float()) for k in keys]
                for j, i in enumerate(mb.sample_index):
                    per_sample[i] = torch.stack([p[j] for p in parts]).cpu()
            if per_sample:
                flat = torch.cat(per_sample, dim=1)
        flat = self.pipeline.broadcast_tensor(flat)
        split = [list(torch.split(flat[r], lengths)) for r in range(rows)]
        return (split[0], split[1]) if with_entropy else split[0]

    def compute_old_logprobs(self, batch: TrainBatch) -> dict[str, float]:
        """Fill batch.old_logprobs; returns entropy and trainer-vs-rollout gap metrics (over DP)."""
        logp, entropy = self.logprobs(batch, with_entropy=True)
        batch.old_logprobs = logp
        flat_logp, flat_ent = torch.cat(logp or [torch.zeros(0)]), torch.cat(entropy or [torch.zeros(0)])
        gap = torch.zeros(0)
        if batch.rollout_logprobs is not None and len(batch):
            gap = (flat_logp - torch.cat(batch.rollout_logprobs)).abs()
        totals = self.dp.sum([[flat_ent.double().sum().item(), float(flat_ent.numel()),
                               gap.double().sum().item(), float(gap.numel())]])[0]
        out = {"logprob/entropy_mean": (totals[0] / totals[1].clamp_min(1)).item()}
        if totals[3] > 0:
            out["logprob/rollout_gap_mean"] = (totals[2] / totals[3]).item()
        return out

    def update(self, batch: TrainBatch, check_ratio: bool = False) -> dict[str, float]:
        """PPO update: one optimizer step per mini-batch (x ppo_epochs). Metrics on all ranks.

        With grpo.old_logprobs = "policy" and no batch.old_logprobs, old_logp is the update's
        own logp detached (validated to be one optimizer step)."""
        cfg = self.cfg
        from_policy = batch.old_logprobs is None and cfg.old_logprobs == "policy"
        if batch.old_logprobs is None and not from_policy:
            raise ValueError("batch.old_logprobs is None: call compute_old_logprobs(batch) first")
        minis, scales = self._mini_batches(batch)
        if from_policy and (cfg.ppo_epochs, len(minis)) != (1, 1):
            raise ValueError("old_logprobs='policy' needs one optimizer step per update")
        targets = batch.prompt_targets
        if targets is not None and self.is_last_stage and self.prompt_state_loss is None:
            raise ValueError("the batch has prompt_targets but the actor has no prompt_state_loss")
        counts = self.dp.sum(
            [[sum(len(batch.response_ids[i]) for i in idx), len(idx)]
             + ([] if targets is None else torch.isfinite(targets[idx]).sum(0).tolist())
             for idx in minis])
        loss_kwargs = dict(clip_low=cfg.clip_low, clip_high=cfg.clip_high,
                           dual_clip=cfg.dual_clip, agg=cfg.loss_agg, tis_cap=cfg.tis_cap,
                           kl_coef=cfg.kl_coef, kl_type=cfg.kl_type)
        # optional inputs are used iff every DP rank with samples has them (same metric keys)
        optional = ("rollout_logprobs", "ref_logprobs")
        missing = self.dp.sum([[float(getattr(batch, name) is None and len(batch) > 0)
                                for name in optional]])[0]
        used = [name for name, m in zip(optional, missing.tolist()) if m == 0]
        if cfg.tis_cap is not None and "rollout_logprobs" not in used:
            raise ValueError(f"grpo.tis_cap={cfg.tis_cap} needs the rollout log-probs of every "
                             f"sample (truncated importance sampling), but the batch has none")
        _, template = policy_loss(torch.zeros(1, 1), torch.zeros(1, 1), torch.zeros(1),
                                  torch.ones(1, 1, dtype=torch.bool), **loss_kwargs,
                                  **{name: torch.zeros(1, 1) for name in used})
        keys = list(template) + ([] if targets is None else ["prompt_state_loss"])
        steps, padded, valid = [], 0, 0
        with self._final_hidden_states(enabled=targets is not None) as hidden_states:
            for _epoch in range(cfg.ppo_epochs):
                for index, samples in enumerate(minis):
                    tokens, seqs = counts[index, :2].clamp_min(1).tolist()
                    norms = counts[index, 2:].to(self.device, torch.float32)

                    def loss_of(mb: MicroBatch, logprobs: Tensor, tokens=tokens, seqs=seqs,
                                norms=norms, scale=scales[index]):
                        extra = {name: mb.per_token.get(name, torch.zeros_like(logprobs))
                                 for name in used}  # absent only on a padding-only micro-batch
                        old = logprobs.detach() if from_policy else mb.per_token["old_logprobs"]
                        loss, metrics = policy_loss(
                            logprobs, old, mb.advantages, mb.loss_mask,
                            **loss_kwargs, **extra, token_normalizer=tokens, seq_normalizer=seqs)
                        if targets is not None:
                            hidden = self._last_prompt_states(mb, hidden_states.pop())
                            term = self.prompt_state_loss(hidden, mb.prompt_targets, norms)
                            metrics["prompt_state_loss"] = term.detach().to(torch.float64)
                            loss = loss + term
                        return loss * scale, metrics

                    micro = self._micro_batches(batch, samples)
                    padded += sum(mb.input_positions for mb in micro)
                    valid += sum(mb.valid_tokens for mb in micro)
                    steps.append(self._train_step(micro, loss_of, keys,
                                                  check_ratio and not steps))
        out = _summarize_steps(steps, "train")
        # padding of this rank's micro-batches: 1 - valid / padded input positions
        out["train/padding_fraction"] = 1.0 - valid / padded if padded else 0.0
        return out

    def sft_step(self, prompt_ids_list: Sequence[Sequence[int]],
                 target_ids_list: Sequence[Sequence[int]],
                 lr: Optional[float] = None) -> dict[str, float]:
        """One optimizer step on the mean NLL of the target tokens (over all DP ranks):
        loss = -sum_{pairs, t} log p(target_t | prompt, target_<t) / (number of target tokens).
        Temperature 1. The LR is `lr` or the peak LR; the RL schedule is not advanced."""
        batch = TrainBatch([list(p) for p in prompt_ids_list], [list(t) for t in target_ids_list])
        tokens = self.dp.sum([[batch.response_token_count()]])[0, 0].clamp_min(1).item()

        def loss_of(mb: MicroBatch, logprobs: Tensor):
            nll = -torch.where(mb.loss_mask, logprobs, 0.0).sum()
            return nll / tokens, {"nll_sum": nll.detach().double(),
                                  "token_count": mb.loss_mask.sum().double()}

        for group in self.optimizer.param_groups:
            group["lr"] = lr if lr is not None else group.get("max_lr", self.scheduler.max_lr)
        micro = self._micro_batches(batch, range(len(batch)))
        step = self._train_step(micro, loss_of, ["nll_sum", "token_count"],
                                advance_schedule=False, temperature=1.0)
        self.scheduler.step(0)  # back to the scheduled LR
        tokens_seen = max(step["token_count"], 1.0)
        return {"sft/nll": step["nll_sum"] / tokens_seen, "sft/tokens": step["token_count"],
                "sft/grad_norm": step["grad_norm"], "sft/skipped_step": step["skipped_step"]}

    @torch.no_grad()
    def prompt_last_hidden(self, prompt_ids_list: Sequence[Sequence[int]]) -> Optional[Tensor]:
        """[N, hidden] fp32: the final hidden state (after the final norm) at each prompt's last
        token, i.e. the state that predicts the first response token. Last stage only (None on
        other stages; use pipeline.broadcast_object for what is computed from it)."""
        batch = TrainBatch([list(p) for p in prompt_ids_list], [[0] for _ in prompt_ids_list])
        micro = self._micro_batches(batch, range(len(batch)), shared=False)  # hook on the decoder
        with self._eval_mode(), self._final_hidden_states() as captured:

            def collect(mb: MicroBatch, unused: Tensor, non_loss_data: bool = True):
                return self._last_prompt_states(mb, captured.pop()).float()

            store = self._run(micro, lambda labels, logits: labels, collect,
                              forward_only=True, collect=True)
        if not self.is_last_stage:
            return None
        out = torch.zeros(len(batch), store[0].shape[-1]) if store else torch.zeros(0, 0)
        for mb, hidden in zip(micro, store):
            out[mb.sample_index] = hidden.cpu()
        return out

    # ------------------------------------------------------------------ checkpoints

    def save_checkpoint(self, folder: str) -> None:
        """Model, optimizer and LR schedule (see optim.save_train_state). Collective."""
        save_train_state(folder, self.model_chunks, self.optimizer, self.scheduler)

    def load_checkpoint(self, folder: str) -> None:
        """Collective; the checkpoint may come from another TP/PP/DP layout."""
        load_train_state(folder, self.model_chunks, self.optimizer, self.scheduler)


def _summarize_steps(steps: list[dict[str, float]], prefix: str) -> dict[str, float]:
    """Policy metrics over all steps' tokens; loss / grad norm averaged over steps."""
    totals: dict[str, float] = {}
    for step in steps:
        for key, value in step.items():
            if key.endswith("_max"):   # NaN wins (Python's max(0.0, nan) would say 0.0)
                old = totals.get(key, 0.0)
                totals[key] = value if math.isnan(value) or value > old else old
            elif key.endswith(("_sum", "_count")):
                totals[key] = totals.get(key, 0.0) + value
    out = {f"{prefix}/{k}": v for k, v in summarize_policy_metrics(totals).items()}
    applied = [s["grad_norm"] for s in steps if not s["skipped_step"]]
    out.update({
        f"{prefix}/loss": sum(s["loss"] for s in steps) / len(steps),
        f"{prefix}/grad_norm": sum(applied) / len(applied) if applied else float("nan"),
        f"{prefix}/lr": steps[-1]["lr"],
        f"{prefix}/skipped_step": sum(s["skipped_step"] for s in steps),
        f"{prefix}/optimizer_steps": float(len(applied)),
    })
    if "prompt_state_loss" in steps[0]:
        out[f"{prefix}/prompt_state_loss"] = sum(s["prompt_state_loss"] for s in steps) / len(steps)
    if "step0_ratio_dev_max" in steps[0]:
        out[f"{prefix}/step0_ratio_dev_max"] = steps[0]["step0_ratio_dev_max"]
    return out
