"""One KV-cached forward step of a (TP/PP-sharded) Megatron GPTModel, through its own modules.

Used by the embedded engine. A step runs this pipeline stage on new tokens [b, s] written at cache
slot `slot`: embedding (first stage) or hidden states received from the previous stage, then
per TransformerLayer

    h   = x + proj(attention(rope(q), cache <- rope(k), cache <- v))      q, k, v = qkv(norm(x))
    out = h + mlp(norm(h))

then final norm and output layer (last stage, TP-gathered logits of the last token) or a send of
the hidden states to the next stage. Keys are cached already rotated, so a decode step rotates
only the new token; attention is torch's scaled_dot_product_attention with grouped KV heads.
For a cache with `fold_query_groups` (static_decode's), a one-token step attends each KV group
with its query heads as query rows (the same maths, no KV head repeated, any SDPA kernel).
Megatron's static-inference path re-rotates the whole key cache and repeats the KV heads at
every step and layer (about 30% of a CPU decode step) and has no per-row positions.

Local-spec modules (ColumnParallelLinear, RowParallelLinear, MLP) take a direct path that
performs exactly their forward ops (matmul, TP all-reduce / all-gather, bias, GLU) without their
autograd.Function wrappers, which cost more than the matmuls of small CPU models; any other
module (Transformer Engine, MoE, an MLP with Megatron's fused activation) is called as is.
"""
from __future__ import annotations

import gc
import math
from typing import Any, Optional

import torch
import torch.nn.functional as F


class KVCache:
    """Rotated keys and values of this stage's layers, each [rows, kv_heads, slots, head_dim]."""
    fold_query_groups = False       # see MegatronStep._layer; the static decode cache sets it

    def __init__(self, layers: int, rows: int, slots: int):
        self.keys: list[Optional[torch.Tensor]] = [None] * layers
        self.values: list[Optional[torch.Tensor]] = [None] * layers
        self.rows, self.slots = rows, slots

    def append(self, layer: int, key: torch.Tensor, value: torch.Tensor, slot: int,
               rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
        """Store key/value [s, b, g, d] at slots slot.. of `rows`; return the cache up to them."""
        if self.keys[layer] is None:
            shape = (self.rows, key.size(2), self.slots, key.size(3))
            self.keys[layer], self.values[layer] = key.new_empty(shape), value.new_empty(shape)
        end = slot + key.size(0)
        k, v = self.keys[layer][rows], self.values[layer][rows]
        k[:, :, slot:end] = key.permute(1, 2, 0, 3)
        v[:, :, slot:end] = value.permute(1, 2, 0, 3)
        return k[:, :, :end], v[:, :, :end]

    def select(self, rows: torch.Tensor) -> None:
        """Keep (or repeat) batch rows."""
        for cache in (self.keys, self.values):
            for i, t in enumerate(cache):
                if t is not None:
                    cache[i] = t.index_select(0, rows)
        self.rows = len(rows)


def unwrap(model: Any) -> Any:
    """The GPTModel inside DDP / Float16Module wrappers."""
    while hasattr(model, "module") and not hasattr(model, "decoder"):
        model = model.module
    return model


def release_megatron_buffers() -> None:
    """Free Megatron's shared scratch buffer and the allocator's cached blocks."""
    try:
        from megatron.core import parallel_state
        parallel_state.get_global_memory_buffer().buffer.clear()
    except (ImportError, AssertionError, AttributeError):
        pass
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class ModelParallel:
    """This rank's place in its TP x PP group and the few collectives generation needs."""

    def __init__(self) -> None:
        self.group = None
        self.first_rank = self.sampler_rank = 0
        self.prev_rank = self.next_rank = None
        self.is_first_stage = self.is_last_stage = self.is_sampler = True
        self.dp_rank = 0
        dist = torch.distributed
        if not dist.is_available() or not dist.is_initialized():
            return
        from megatron.core import parallel_state as ps
        if not ps.model_parallel_is_initialized():
            return
        if ps.get_context_parallel_world_size() != 1:
            raise NotImplementedError("generation with context parallelism is not supported")
        self.dp_rank = ps.get_data_parallel_rank()
        pp_ranks = dist.get_process_group_ranks(ps.get_pipeline_model_parallel_group())
        stage = pp_ranks.index(dist.get_rank())
        self.is_first_stage, self.is_last_stage = stage == 0, stage == len(pp_ranks) - 1
        self.prev_rank = None if self.is_first_stage else pp_ranks[stage - 1]
        self.next_rank = None if self.is_last_stage else pp_ranks[stage + 1]
        group = ps.get_model_parallel_group()
        if dist.get_world_size(group) == 1:
            return
        self.group = group
        self.first_rank = min(dist.get_process_group_ranks(group))
        mine = self.is_last_stage and ps.get_tensor_model_parallel_rank() == 0
        flags = [None] * dist.get_world_size(group)
        dist.all_gather_object(flags, (dist.get_rank(), mine), group=group)
        self.sampler_rank = next(rank for rank, flag in flags if flag)
        self.is_sampler = mine

    def share(self, obj: Any) -> Any:
        """The first rank's `obj` on every rank of the group."""
        if self.group is None:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=self.first_rank, group=self.group)
        return box[0]

    def broadcast_from_sampler(self, payload: torch.Tensor) -> torch.Tensor:
        if self.group is not None:
            torch.distributed.broadcast(payload, src=self.sampler_rank, group=self.group)
        return payload


def unsupported_layout(gpt: Any) -> list[str]:
    """What in `gpt` a forward through its own layer modules, as this module runs it, cannot run
    ([] when it can); the actor's shared-prefix forward (train/shared_prefix.py) shares it."""
    from megatron.core.transformer.attention import SelfAttention

    c = gpt.config
    checks = {"sequence parallelism": c.sequence_parallel,
              "multi-latent attention": getattr(c, "multi_latent_attention", False),
              "attention output gates": getattr(c, "attention_output_gate", False),
              "post-layernorm residuals": c.apply_residual_connection_post_layernorm,
              "sliding-window attention": getattr(c, "window_size", None) is not None,
              "softmax offsets": getattr(c, "softmax_type", "vanilla") != "vanilla",
              "layers without standard self-attention": not all(
                  isinstance(layer.self_attention, SelfAttention) for layer in gpt.decoder.layers)}
    bad = [name for name, on in checks.items() if on]
    kind = getattr(gpt, "position_embedding_type", "rope")
    if kind not in ("rope", "learned_absolute", "none"):
        bad.append(f"position_embedding_type={kind}")
    return bad


class MegatronStep:
    """One KV-cached forward of this pipeline stage (see the module docstring). Raises
    NotImplementedError at construction for layouts it cannot run."""

    def __init__(self, gpt: Any):
        from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
        from megatron.core.transformer.mlp import MLP

        self.gpt, self.config = gpt, gpt.config
        self._column, self._row, self._mlp_type = ColumnParallelLinear, RowParallelLinear, MLP
        bad = unsupported_layout(gpt)
        if bad:
            raise NotImplementedError(f"the embedded engine does not support: {', '.join(bad)}")
        c = self.config
        self.hidden_dtype = torch.float32 if c.fp32_residual_connection else c.params_dtype
        self.interleaved = getattr(getattr(gpt, "rotary_pos_emb", None), "rotary_interleaved", False)

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor,
                 rope: Optional[torch.Tensor], mask: Optional[torch.Tensor], cache: KVCache,
                 slot: int, rows: slice, mp: ModelParallel) -> Optional[torch.Tensor]:
        """Tokens [b, s] at `slot` -> last-token logits [b, padded vocab] on the last stage.

        `rope` [s, b|1, 1, d] rotary angles; `mask` [b, 1, s, slot+s] (True = attend) or None
        for plain causal attention; `rows`: the cache rows these tokens belong to."""
        gpt = self.gpt
        if mp.is_first_stage:
            hidden = gpt.embedding(input_ids=tokens, position_ids=positions)    # [s, b, h]
        else:
            hidden = torch.empty(tokens.size(1), tokens.size(0), self.config.hidden_size,
                                 dtype=self.hidden_dtype, device=tokens.device)
            torch.distributed.recv(hidden, src=mp.prev_rank)
        cos_sin = None if rope is None else self.cos_sin(rope)
        for index, layer in enumerate(gpt.decoder.layers):
            hidden = self._layer(layer, hidden, cos_sin, mask, cache, index, slot, rows)
        if not mp.is_last_stage:
            torch.distributed.send(hidden.contiguous(), dst=mp.next_rank)
            return None
        hidden = hidden[-1:]
        norm = getattr(gpt.decoder, "final_layernorm", None)
        if norm is not None:
            hidden = norm(hidden)
        weight = gpt.shared_embedding_or_output_weight() \
            if gpt.share_embeddings_and_output_weights else None
        if type(gpt.output_layer) is self._column:
            logits = self._linear(gpt.output_layer, hidden, weight, gather=True)[0]
        else:
            logits = gpt.output_layer(hidden, weight=weight, runtime_gather_output=True)[0]
        return logits[0].float()

    def _layer(self, layer: Any, hidden: torch.Tensor, cos_sin: Optional[tuple], mask,
               cache: KVCache, index: int, slot: int, rows: slice) -> torch.Tensor:
        """A pre-norm TransformerLayer; attention over the cache with grouped KV heads."""
        attn = layer.self_attention
        query, key, value = self._qkv(attn, layer.input_layernorm(hidden))
        if cos_sin is not None:
            query, key = self.rotate(query, *cos_sin), self.rotate(key, *cos_sin)
        keys, values = cache.append(index, key, value, slot, rows)
        query = query.permute(1, 2, 0, 3)                                     # [b, heads, s, d]
        b, heads, s, dim = query.shape
        fold = cache.fold_query_groups and s == 1 and keys.size(1) < heads
        if fold:    # one token: a KV group's heads are its query rows [b, groups, heads/g, d]
            query = query.reshape(b, keys.size(1), heads // keys.size(1), dim)
        context = F.scaled_dot_product_attention(
            query, keys, values, attn_mask=mask, is_causal=mask is None and s > 1,
            scale=self.softmax_scale(attn), enable_gqa=not fold)
        context = context.reshape(b, heads, s, context.size(-1))             # [b, heads, s, d]
        out, bias = self._linear(attn.linear_proj, context.permute(2, 0, 1, 3).flatten(2))
        hidden = hidden + (out if bias is None else out + bias)
        out, bias = self._mlp(layer.mlp, layer.pre_mlp_layernorm(hidden))
        return hidden + (out if bias is None else out + bias)

    def _qkv(self, attn: Any, hidden: torch.Tensor) -> tuple:
        """Query [s, b, heads, d], key and value [s, b, groups, d], with q/k norms applied."""
        if type(attn.linear_qkv) is not self._column or \
                self.config.num_query_groups < attn.world_size:
            return attn.get_query_key_value_tensors(hidden, None)[:3]
        mixed, bias = self._linear(attn.linear_qkv, hidden)
        if bias is not None:
            mixed = mixed + bias
        groups, dim = attn.num_query_groups_per_partition, attn.hidden_size_per_attention_head
        per_group = attn.num_attention_heads_per_partition // groups
        mixed = mixed.view(*mixed.shape[:2], groups, (per_group + 2) * dim)
        query, key, value = torch.split(mixed, [per_group * dim, dim, dim], dim=3)
        query = query.reshape(*query.shape[:2], -1, dim)
        if attn.q_layernorm is not None:
            query = attn.q_layernorm(query)
        if attn.k_layernorm is not None:
            key = attn.k_layernorm(key)
        return query, key, value

    def _mlp(self, mlp: Any, hidden: torch.Tensor) -> tuple:
        c = self.config
        if type(mlp) is not self._mlp_type or getattr(c, "use_te_activation_func", False) or \
                c.bias_activation_fusion or \
                type(mlp.linear_fc1) is not self._column or type(mlp.linear_fc2) is not self._row:
            return mlp(hidden)      # fused activations (CUDA): the trainer's very function
        x, bias = self._linear(mlp.linear_fc1, hidden)
        if bias is not None:
            x = x + bias
        if c.gated_linear_unit:
            x_glu, x_linear = torch.chunk(x, 2, dim=-1)
            clamp = getattr(c, "activation_func_clamp_value", None)
            if clamp is not None:
                x_glu, x_linear = x_glu.clamp(max=clamp), x_linear.clamp(min=-clamp, max=clamp)
            x = c.activation_func(x_glu) * (x_linear + getattr(c, "glu_linear_offset", 0.0))
        else:
            x = mlp.activation_func(x)
        return self._linear(mlp.linear_fc2, x)

    def _linear(self, module: Any, x: torch.Tensor, weight: Optional[torch.Tensor] = None,
                gather: bool = False) -> tuple:
        """(output, bias left to add) of a Column/RowParallelLinear, as their forward computes."""
        is_row = type(module) is self._row
        if not (is_row or type(module) is self._column) or \
                (is_row and (not module.input_is_parallel or module.explicit_expert_comm)):
            return module(x)
        out = torch.matmul(x, (module.weight if weight is None else weight).t())
        group = getattr(module, "tp_group", None)
        if group is not None and torch.distributed.get_world_size(group) > 1:
            if is_row:
                torch.distributed.all_reduce(out, group=group)
            elif gather:
                parts = [torch.empty_like(out) for _ in range(torch.distributed.get_world_size(group))]
                torch.distributed.all_gather(parts, out.contiguous(), group=group)
                out = torch.cat(parts, dim=-1)
        if module.bias is None or module.skip_bias_add:
            return out, module.bias
        return out + module.bias, None

    def cos_sin(self, rope: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin of the angles, once per step for every layer; without interleaving the
        sin's first half is negated, so that rotate_half(t) * sin == roll(t, d/2) * signed sin
        (negation is exact: the same bits as Megatron's -x2 * sin)."""
        sin = rope.sin()
        if not self.interleaved:
            half = sin.size(-1) // 2
            sin = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)
        return rope.cos(), sin

    def rotate(self, t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """RoPE as Megatron's unfused bshd path: t * cos + rotate_half(t) * sin, with cos and sin
        cast to t's dtype first (as Megatron does; a bf16 model keeps bf16 queries and keys).
        `sin` comes from `cos_sin` (half-negated unless interleaved)."""
        dim = cos.size(-1)
        cos, sin = cos.to(t.dtype), sin.to(t.dtype)
        rest = None
        if t.size(-1) != dim:
            t, rest = t[..., :dim], t[..., dim:]
        if self.interleaved:
            half = torch.stack((-t[..., 1::2], t[..., ::2]), dim=-1).flatten(-2)
        else:
            half = t.roll(dim // 2, dims=-1)
        out = t * cos + half * sin
        return out if rest is None else torch.cat((out, rest), dim=-1)

    def softmax_scale(self, attn: Any) -> float:
        """The net scale of q.k (Megatron's query-key layer scaling cancels out)."""
        scale = self.config.softmax_scale
        return scale if scale is not None else 1.0 / math.sqrt(attn.hidden_size_per_attention_head)

    def rope_table(self, positions: torch.Tensor) -> Optional[torch.Tensor]:
        """Rotary angles per slot and row, [T, B, 1, d], from the model's own frequencies."""
        if getattr(self.gpt, "position_embedding_type", None) != "rope":
            return None
        freqs = self.gpt.rotary_pos_emb.get_freqs_non_repeated(int(positions.max()) + 1)
        freqs = freqs[positions]                                                # [B, T, d/2]
        if self.interleaved:
            emb = torch.stack((freqs, freqs), dim=-1).flatten(-2)
        else:
            emb = torch.cat((freqs, freqs), dim=-1)
        return emb.transpose(0, 1).unsqueeze(2).contiguous()
