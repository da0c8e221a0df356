"""Shared-prefix micro-batches: each distinct prompt runs through the model once per micro-batch.

A GRPO step trains G samples of every prompt. In the padded layout (batching.py) every sample's
row repeats its prompt, so the prompt's tokens pass through every layer G times. Here a
micro-batch holds

    prefix    [U, Pp]   the distinct prompts without their last token, p_0 .. p_{P-2}
    segments  [B, R]    per sample: p_{P-1} y_0 .. y_{R-2}  (R = its response length)

both right-padded, and each layer runs the U*Pp + B*R positions through the same modules as one
token stream. Attention (True = attend):

    prefix token t of prompt u   -> prefix tokens 0..t of u                      (causal)
    segment token j of sample i  -> prefix tokens 0..P_u - 2 of its prompt u, and
                                    segment tokens 0..j of i                     (causal)

with RoPE positions t and P_u - 1 + j: the positions these tokens have in the padded layout, so
every segment token computes what it computes there, up to rounding (sums run in another
order). Labels: segment token j predicts y_j, so log pi(y_j | p, y_<j) sits in column j
(response_start 0) and the actor's loss code is unchanged. A prompt's keys and values are
gathered into the attention of each of its samples (index_select), so in backward their
gradients sum over the samples: the padded layout's sum over rows.

Work: the norms, linear layers and MLPs see U*Pp + B*R positions instead of B*(P + R - 1), and
the output layer only the B*R segment positions; with G samples per prompt and prompts about as
long as responses that is ~2x fewer (benchmarks/results/shared_prefix.json).

Used where `unsupported_reasons` is empty: the local layer spec (SDPA core attention) on CPU, on
one pipeline stage, without sequence/context parallelism, activation recompute, dropout, FP8,
MoE, multi-token prediction, and for batches without prompt-state targets (the meta head reads
the decoder's output through a hook that this forward does not call). Elsewhere the actor uses
the padded layout. Not on CUDA yet: there torch's SDPA has no fused kernel for an explicit mask
with grouped KV heads (the math kernel would keep every layer's scores), and no GPU has measured
an alternative (KV heads repeated for the memory-efficient kernel, or FlexAttention).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from masa_megatron.train.batching import MicroBatch, TrainBatch, zero_rows


@dataclass
class SharedPrefix:
    """The prefix half of a shared-prefix micro-batch (the segments are MicroBatch.tokens)."""
    tokens: Tensor         # [U, Pp] int64, 0 at padding (Pp >= 1: a 1-token prompt pads it)
    lengths: Tensor        # [U] int64: P_u - 1 valid prefix tokens
    prompt_of: Tensor      # [B] int64: the prefix row of each segment row

    def to(self, device: torch.device | str) -> "SharedPrefix":
        return SharedPrefix(*(t.to(device) for t in (self.tokens, self.lengths,
                                                       self.prompt_of)))


def unsupported_reasons(gpt: Any, pipeline_stages: int, context_parallel: int) -> list[str]:
    """Why this model cannot train on shared-prefix micro-batches ([] when it can): what the
    layer-by-layer forward of rollout.megatron_step cannot run, and what training adds."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.mlp import MLP

    from masa_megatron.rollout.megatron_step import unsupported_layout

    c = gpt.config
    checks = {
        # on CUDA, SDPA with a mask and grouped KV heads has no fused kernel and would keep
        # B x heads x R x (Pp + R) scores per layer; not measured on a GPU yet
        "CUDA": next(gpt.parameters()).is_cuda,
        "pipeline parallelism": pipeline_stages > 1,
        "context parallelism": context_parallel > 1,
        "activation recompute": c.recompute_granularity is not None,
        "dropout": c.hidden_dropout > 0 or c.attention_dropout > 0,
        "FP8": bool(getattr(c, "fp8", None)),
        "MoE layers": bool(getattr(c, "num_moe_experts", None)),
        "multi-token prediction": bool(getattr(c, "mtp_num_layers", None)),
        "position embeddings other than RoPE": getattr(gpt, "position_embedding_type",
                                                       "rope") != "rope",
        "layers without RoPE": bool(getattr(c, "no_rope_freq", None)),
        "layers other than the local spec's": not all(
            isinstance(layer.mlp, MLP) and isinstance(
                getattr(layer.self_attention, "core_attention", None), DotProductAttention)
            for layer in gpt.decoder.layers),
    }
    return unsupported_layout(gpt) + [name for name, bad in checks.items() if bad]


def plan_shared_micro_batches(prompts: Sequence[Sequence[int]], response_lengths: Sequence[int],
                              token_budget: int) -> list[list[int]]:
    """Group sample indices into micro-batches whose padded size U*Pp + B*R <= token_budget.

    Samples with equal prompts stay together (their prompt is computed once); groups are taken
    longest first and a micro-batch keeps taking the next group while the budget holds. A group
    too big for the budget alone is cut into runs of samples that fit, each with its prompt."""
    if token_budget < 1:
        raise ValueError(f"token_budget={token_budget}: must be >= 1")
    members: dict[tuple, list[int]] = {}
    for i, prompt in enumerate(prompts):
        members.setdefault(tuple(prompt), []).append(i)
    pieces = []          # (prefix width, [samples]) each fitting the budget alone
    for key, idx in members.items():
        pp, run = max(len(key) - 1, 1), []      # the packer's width: at least 1
        for i in sorted(idx, key=lambda i: (-response_lengths[i], i)):
            if run and pp + (len(run) + 1) * response_lengths[run[0]] > token_budget:
                pieces.append((pp, run))
                run = []
            run.append(i)
        pieces.append((pp, run))
    pieces.sort(key=lambda piece: (-(piece[0] + response_lengths[piece[1][0]]), piece[1][0]))
    groups: list[list[int]] = []
    shape = (0, 0, 0, 0)                      # prefixes, longest prefix, rows, longest row
    for pp, run in pieces:
        u, p, b, r = shape
        grown = (u + 1, max(p, pp), b + len(run), max(r, response_lengths[run[0]]))
        if groups and grown[0] * grown[1] + grown[2] * grown[3] <= token_budget:
            groups[-1].extend(run)
            shape = grown
        else:
            groups.append(list(run))
            shape = (1, pp, len(run), response_lengths[run[0]])
    return groups


def pack_shared_micro_batch(batch: TrainBatch, indices: Sequence[int]) -> MicroBatch:
    """The samples `indices` of `batch` as one shared-prefix MicroBatch (module docstring):
    tokens/labels/loss_mask/per-token fields [B, R] in segment columns, `prefix` set."""
    indices = list(indices)
    if not indices or batch.prompt_targets is not None:
        raise ValueError("a shared-prefix micro-batch needs samples and no prompt targets")
    rows: dict[tuple, int] = {}
    prompt_of = [rows.setdefault(tuple(batch.prompt_ids[i]), len(rows)) for i in indices]
    prompts = list(rows)
    width_p = max(1, max(len(p) - 1 for p in prompts))
    width_r = max(1, max(len(batch.response_ids[i]) for i in indices))
    prefix = torch.zeros(len(prompts), width_p, dtype=torch.long)
    for u, p in enumerate(prompts):
        prefix[u, :len(p) - 1] = torch.as_tensor(p[:-1], dtype=torch.long)
    lengths = torch.tensor([len(p) - 1 for p in prompts], dtype=torch.long)
    b = len(indices)
    tokens, labels, loss_mask, per_token = zero_rows(batch, b, width_r)
    counts = []
    for row, i in enumerate(indices):
        response = list(batch.response_ids[i])
        seq = torch.as_tensor([batch.prompt_ids[i][-1]] + response, dtype=torch.long)
        n = len(response)
        tokens[row, :n], labels[row, :n], loss_mask[row, :n] = seq[:n], seq[1:], True
        for name, out in per_token.items():
            out[row, :n] = torch.as_tensor(getattr(batch, name)[i], dtype=torch.float32)
        counts.append(n)
    prompt_of_t = torch.tensor(prompt_of, dtype=torch.long)
    position_ids = lengths[prompt_of_t].unsqueeze(1) + torch.arange(width_r).unsqueeze(0)
    return MicroBatch(indices, tokens, position_ids, labels, loss_mask,
                      batch.advantages[indices].clone(), [0] * b, counts, per_token, None,
                      prefix=SharedPrefix(prefix, lengths, prompt_of_t))


def shared_prefix_forward(gpt: Any, mb: MicroBatch, per_token: Callable[[Tensor, Tensor], Tensor],
                          step: Any) -> Tensor:
    """per_token(labels [B, R], logits [R, B, V/TP]) of a shared-prefix micro-batch: [B, R].

    The layer math is the local TransformerLayer's (input norm, QKV with q/k norms, RoPE, SDPA,
    output projection, residual, pre-MLP norm, MLP, residual) through the model's own modules,
    so TP collectives and their gradients are Megatron's; only the attention pattern differs.
    `step`: a rollout.megatron_step.MegatronStep of `gpt` (its RoPE table and rotation)."""
    pre = mb.prefix
    (u, pp), (b, r) = pre.tokens.shape, mb.tokens.shape
    positions = torch.arange(pp, device=pre.tokens.device).expand(u, pp)   # prefix t at t
    hidden = torch.cat([
        gpt.embedding(input_ids=pre.tokens, position_ids=positions).flatten(0, 1),
        gpt.embedding(input_ids=mb.tokens, position_ids=mb.position_ids).flatten(0, 1)]
    ).unsqueeze(1)                                                  # [Pp*U + R*B, 1, h]
    rope_pre = step.cos_sin(step.rope_table(positions))     # [Pp, U, 1, d] each
    rope_seg = step.cos_sin(step.rope_table(mb.position_ids))      # [R, B, 1, d] each
    keys_visible = positions[0] < pre.lengths[pre.prompt_of, None]          # [B, Pp]
    causal = torch.ones(r, r, dtype=torch.bool, device=keys_visible.device).tril_()
    mask = torch.cat([keys_visible[:, None, :].expand(b, r, pp), causal.expand(b, r, r)],
                     dim=-1).unsqueeze(1)                           # [B, 1, R, Pp + R]
    split = pp * u
    for layer in gpt.decoder.layers:
        attn = layer.self_attention
        query, key, value = attn.get_query_key_value_tensors(layer.input_layernorm(hidden),
                                                            None)[:3]
        scale = step.softmax_scale(attn)
        q_pre, k_pre, v_pre = (t[:split].view(pp, u, *t.shape[2:]) for t in (query, key, value))
        q_seg, k_seg, v_seg = (t[split:].view(r, b, *t.shape[2:]) for t in (query, key, value))
        q_pre, k_pre = step.rotate(q_pre, *rope_pre), step.rotate(k_pre, *rope_pre)
        q_seg, k_seg = step.rotate(q_seg, *rope_seg), step.rotate(k_seg, *rope_seg)
        k_pre, v_pre = k_pre.permute(1, 2, 0, 3), v_pre.permute(1, 2, 0, 3)   # [U, g, Pp, d]
        context_pre = F.scaled_dot_product_attention(
            q_pre.permute(1, 2, 0, 3), k_pre, v_pre, is_causal=True, scale=scale,
            enable_gqa=True)
        context_seg = F.scaled_dot_product_attention(
            q_seg.permute(1, 2, 0, 3),
            torch.cat([k_pre.index_select(0, pre.prompt_of), k_seg.permute(1, 2, 0, 3)], dim=2),
            torch.cat([v_pre.index_select(0, pre.prompt_of), v_seg.permute(1, 2, 0, 3)], dim=2),
            attn_mask=mask, scale=scale, enable_gqa=True)          # [B, heads, R, d]
        context = torch.cat([context_pre.permute(2, 0, 1, 3).flatten(0, 1),
                             context_seg.permute(2, 0, 1, 3).flatten(0, 1)]).flatten(1)
        out, bias = attn.linear_proj(context.unsqueeze(1))
        hidden = hidden + (out if bias is None else out + bias)
        out, bias = layer.mlp(layer.pre_mlp_layernorm(hidden))
        hidden = hidden + (out if bias is None else out + bias)
    segments = gpt.decoder.final_layernorm(hidden[split:].view(r, b, -1))
    weight = gpt.shared_embedding_or_output_weight() \
        if gpt.share_embeddings_and_output_weights else None
    logits, _ = gpt.output_layer(segments, weight=weight, runtime_gather_output=False)
    return per_token(mb.labels, logits)
