"""The trainer's weights as full Hugging Face tensors, grouped into buckets (shared by all syncs).

Data path
---------
`stage_hf_tensors` walks this pipeline stage's Megatron parameters in model order. Each one is
cast to the transfer dtype on its own device (FP8/quantised tensors are dequantised first),
all-gathered over the tensor-parallel group unless replicated (every TP rank ends with every
shard), and merged into HF tensors by the model registry's rules (masa_megatron.model.registry:
fused q/k/v and gate/up are split back, Megatron's padded vocabulary rows are dropped). With tied
embeddings the last stage's `output_layer.weight` is skipped: HF keeps only embed_tokens.

TP shards are placed into the full tensors with the registry's layout description
(masa_megatron.model.sharding.shard_pieces / shard_views), the same one the HF loader uses.

`bucketize` groups the stream: a bucket closes when the next tensor would push it past
`bucket_bytes`; a tensor larger than a bucket travels alone. Peak extra memory is therefore about
one bucket plus one gathered parameter.

`flatten_bucket` packs one bucket's tensors (one dtype) into a 1-D tensor plus metadata, the
layout of SGLang's FlattenedTensorBucket (sglang 0.5.x,
python/sglang/srt/weight_sync/tensor_bucket.py): tensor i is flat[start_idx:end_idx].view(shape).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator, Optional, Sequence

import torch

NamedTensor = tuple[str, torch.Tensor]
MiB = 1 << 20


def nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def params_dtype(model_chunks) -> torch.dtype:
    """The dtype the model computes in (its TransformerConfig.params_dtype)."""
    from masa_megatron.model import unwrap

    chunk = unwrap(_as_list(model_chunks)[0])
    return getattr(chunk.config, "params_dtype", None) or next(chunk.parameters()).dtype


def dtype_name(dtype: torch.dtype) -> str:
    """'float32', 'bfloat16', ...: what SGLang's `getattr(torch, name)` turns back into a dtype."""
    return str(dtype).removeprefix("torch.")


def _as_list(models) -> list:
    return list(models) if isinstance(models, (list, tuple)) else [models]


def _tp_group():
    from megatron.core import parallel_state as ps

    if not (torch.distributed.is_initialized() and ps.model_parallel_is_initialized()):
        return 1, None
    return ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_group()


def _cast(param: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    data = param.data if isinstance(param, torch.nn.Parameter) else param
    if type(data) is not torch.Tensor and hasattr(data, "dequantize"):
        data = data.dequantize()
    return data.detach().to(dtype=dtype).contiguous()


def _gather(tensor: torch.Tensor, tp: int, group) -> list[torch.Tensor]:
    if tp == 1:
        return [tensor]
    parts = [torch.empty_like(tensor) for _ in range(tp)]
    torch.distributed.all_gather(parts, tensor, group=group)
    return parts


def merge_tp_shards(rule, shards: Sequence[torch.Tensor], shape) -> list[torch.Tensor]:
    """The full HF tensors (one per name in rule.hf) from the TP shards in rank order, placed
    with the registry's own layout description (sharding.shard_pieces / shard_views)."""
    from masa_megatron.model.sharding import hf_shapes, shard_pieces, shard_views

    tp = len(shards)
    first = shards[0]
    full_shapes = hf_shapes(rule, first.shape, tp, shape)
    if tp == 1:        # one shard: its views are the HF tensors (no copy unless strided)
        pieces = shard_pieces(rule, 0, 1, first.shape, shape)
        return [view.reshape(full_shapes[p.hf_index])
                for p, view in zip(pieces, shard_views(rule, first, 0, shape))]
    fulls = [torch.empty(s, dtype=first.dtype, device=first.device) for s in full_shapes]
    for rank, shard in enumerate(shards):
        views = shard_views(rule, shard, rank, shape)
        for piece, view in zip(shard_pieces(rule, rank, tp, shard.shape, shape), views):
            full = fulls[piece.hf_index]
            span = slice(piece.start, piece.stop)
            target = full[span] if piece.axis == 0 else full[:, span]
            target.copy_(view.reshape(piece.shape(full.shape)))
    return fulls


def stage_hf_tensors(model_chunks, dtype: Optional[torch.dtype] = None) -> Iterator[NamedTensor]:
    """(HF name, full tensor) for this stage's parameters; a collective over the TP group (every
    TP rank must iterate to the end). Tensors stay on the parameters' device."""
    from masa_megatron.model import unwrap
    from masa_megatron.model.hf_config import decoder_shape
    from masa_megatron.model.hf_io import mapped_parameters
    from masa_megatron.model.registry import Split

    dtype = dtype or params_dtype(model_chunks)
    tp, group = _tp_group()
    for chunk in _as_list(model_chunks):
        chunk = unwrap(chunk)
        shape = decoder_shape(chunk.masa_hf_config)
        for name, param, rule, hf_names in mapped_parameters(chunk):
            if shape.tie_embeddings and name == "output_layer.weight":
                continue
            shards = _gather(_cast(param, dtype), 1 if rule.split is Split.REPLICATED else tp,
                             group)
            for hf_name, full in zip(hf_names, merge_tp_shards(rule, shards, shape)):
                yield hf_name, full


def bucketize(named: Iterable[NamedTensor], bucket_bytes: int) -> Iterator[list[NamedTensor]]:
    """Consecutive runs of tensors of at most `bucket_bytes` (one dtype per bucket)."""
    if bucket_bytes < 1:
        raise ValueError(f"bucket_bytes={bucket_bytes}: must be >= 1")
    bucket: list[NamedTensor] = []
    size = 0
    for name, tensor in named:
        n = nbytes(tensor)
        if bucket and (size + n > bucket_bytes or tensor.dtype != bucket[0][1].dtype):
            yield bucket
            bucket, size = [], 0
        bucket.append((name, tensor))
        size += n
    if bucket:
        yield bucket


@dataclass
class FlattenedTensorMetadata:
    """Where one tensor sits in a flattened bucket; same fields as SGLang's class of this name."""
    name: str
    shape: torch.Size
    dtype: torch.dtype
    start_idx: int
    end_idx: int
    numel: int


def flatten_bucket(bucket: Sequence[NamedTensor]) -> tuple[torch.Tensor, list[FlattenedTensorMetadata]]:
    """One 1-D tensor holding the bucket's tensors back to back, and where each one is."""
    if not bucket:
        raise ValueError("cannot flatten an empty bucket")
    dtypes = {t.dtype for _, t in bucket}
    if len(dtypes) != 1:
        raise ValueError(f"a flattened bucket holds one dtype, got {sorted(map(str, dtypes))}")
    metadata, start = [], 0
    for name, tensor in bucket:
        n = tensor.numel()
        metadata.append(FlattenedTensorMetadata(name, tensor.shape, tensor.dtype, start, start + n, n))
        start += n
    flat = torch.cat([t.reshape(-1) for _, t in bucket])
    return flat, metadata


def unflatten_bucket(flat: torch.Tensor, metadata: Sequence) -> list[NamedTensor]:
    """The inverse of `flatten_bucket` (views into `flat`); `metadata` needs only the fields."""
    return [(m.name, flat[m.start_idx:m.end_idx].view(m.dtype).reshape(m.shape))
            for m in metadata]
