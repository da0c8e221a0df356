"""Weight sync from tensors, for servers colocated on the trainer's GPUs (CUDA IPC).

Data path
---------
1. Every rank gets every HF tensor on its own device, one bucket at a time: the ranks of stage p
   gather their TP shards (buckets.stage_hf_tensors); with pipeline parallelism stage p's rank
   then broadcasts each bucket (names, shapes and dtypes as an object, then the tensors) along
   its pipeline group.
2. Each rank pickles its copy of the bucket the way SGLang's MultiprocessingSerializer does
   (below): only a CUDA IPC handle per tensor crosses, never the data.
3. Server s runs on the GPUs of global ranks s*tp .. s*tp+tp-1 (the colocated layout: trainer
   world size = sum of the servers' TP sizes). The first of those ranks gathers the tp payloads
   and POSTs /update_weights_from_tensor {"serialized_named_tensors": [payload for server TP rank
   r, ...], "load_format": "flattened_bucket" | null, "flush_cache": false, "weight_version"};
   SGLang's TP rank r opens entry r, the memory of the trainer rank on its own GPU.
4. A barrier over the server's ranks keeps each bucket alive until its POST has returned.

Payload format (sglang 0.5.x: python/sglang/srt/utils/common.py MultiprocessingSerializer and
SafeUnpickler, python/sglang/srt/utils/patch_torch.py, python/sglang/srt/weight_sync/
tensor_bucket.py, python/sglang/srt/model_executor/model_runner.py update_weights_from_tensor):
base64 of a pickle made with multiprocessing's ForkingPickler reductions of either
[(hf_name, tensor), ...] (load_format null) or {"flattened_tensor": 1-D tensor, "metadata":
[FlattenedTensorMetadata(name, shape, dtype, start_idx, end_idx, numel), ...]} (load_format
"flattened_bucket", one dtype per bucket). A CUDA tensor pickles as
torch.multiprocessing.reductions.rebuild_cuda_tensor(...) with its IPC handle; argument 6 (the
device) is written as the GPU's UUID string, as SGLang's patched reductions write it, so the
server maps it whatever its CUDA_VISIBLE_DEVICES order. FlattenedTensorMetadata is written as the
global `sglang.srt.weight_sync.tensor_bucket.FlattenedTensorMetadata` (our look-alike class,
pickled under SGLang's name without importing SGLang). SGLang's restricted unpickler allows that
module and torch.*, which is everything the payload references. We write this serializer
ourselves because sglang cannot be imported next to the trainer (it pins another torch).
CPU tensors (tests) travel as shared-memory files (torch's "file_system" sharing strategy, set
only while pickling), which an unrelated process can open; SGLang never receives CPU tensors.
"""
from __future__ import annotations

import base64
import copyreg
import io
import pickle
import threading
from typing import Any, Optional

import torch
import torch.multiprocessing as torch_mp
from torch.multiprocessing import reductions

from masa_megatron.rollout.sglang_launch import EngineError
from masa_megatron.rollout.weight_sync import SyncTarget, WeightSync, raise_if_any, world
from masa_megatron.rollout.weight_sync.buckets import (FlattenedTensorMetadata, bucketize,
                                                       flatten_bucket, nbytes, stage_hf_tensors)

SGLANG_METADATA_GLOBAL = ("sglang.srt.weight_sync.tensor_bucket", "FlattenedTensorMetadata")
_FOREIGN_GLOBALS = {FlattenedTensorMetadata: SGLANG_METADATA_GLOBAL}
_DEVICE_ARG = 6                       # SGLang's _REDUCE_TENSOR_ARG_DEVICE_INDEX
_STRATEGY_LOCK = threading.Lock()


def _reduce_tensor_for_sglang(tensor: torch.Tensor):
    rebuild, args = reductions.reduce_tensor(tensor)
    if tensor.is_cuda and len(args) > _DEVICE_ARG and isinstance(args[_DEVICE_ARG], int):
        uuid = str(torch.cuda.get_device_properties(args[_DEVICE_ARG]).uuid)
        args = args[:_DEVICE_ARG] + (uuid,) + args[_DEVICE_ARG + 1:]
    return rebuild, args


class _SGLangPickler(pickle._Pickler):
    """The pure-Python pickler with ForkingPickler's reductions, device UUIDs and SGLang's name
    for FlattenedTensorMetadata."""

    def __init__(self, file):
        super().__init__(file, protocol=4)
        from multiprocessing.reduction import ForkingPickler

        table = dict(copyreg.dispatch_table)
        table.update(ForkingPickler._extra_reducers)
        for cls, reducer in list(table.items()):
            if reducer is reductions.reduce_tensor:
                table[cls] = _reduce_tensor_for_sglang
        self.dispatch_table = table

    def save_global(self, obj, name=None):
        foreign = _FOREIGN_GLOBALS.get(obj)
        if foreign is None:
            return super().save_global(obj, name)
        self.save(foreign[0])
        self.save(foreign[1])
        self.write(pickle.STACK_GLOBAL)
        self.memoize(obj)


def serialize_for_sglang(obj: Any) -> str:
    """base64 text of `obj` pickled as SGLang's MultiprocessingSerializer.serialize(obj,
    output_str=True) would, tensors by handle (CUDA IPC, or shared-memory files on CPU)."""
    buf = io.BytesIO()
    with _STRATEGY_LOCK:
        old = torch_mp.get_sharing_strategy()
        torch_mp.set_sharing_strategy("file_system")
        try:
            _SGLangPickler(buf).dump(obj)
        finally:
            torch_mp.set_sharing_strategy(old)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def bucket_payload(bucket: list, load_format: Optional[str]) -> Any:
    """What one TP rank's entry holds for `bucket` in the given load format."""
    if load_format == "flattened_bucket":
        flat, metadata = flatten_bucket(bucket)
        return {"flattened_tensor": flat, "metadata": metadata}
    if load_format is None:
        return [(name, t if t.is_cuda else t.clone()) for name, t in bucket]
    raise ValueError(f"load_format={load_format!r}: must be 'flattened_bucket' or None")


def _pipeline() -> tuple[int, int, Optional[list[int]], Any]:
    from megatron.core import parallel_state as ps

    if not (torch.distributed.is_initialized() and ps.model_parallel_is_initialized()):
        return 0, 1, None, None
    group = ps.get_pipeline_model_parallel_group()
    return (ps.get_pipeline_model_parallel_rank(), ps.get_pipeline_model_parallel_world_size(),
            torch.distributed.get_process_group_ranks(group), group)


def all_stage_buckets(model_chunks, bucket_bytes: int):
    """Every stage's buckets, in stage order, on every rank (pipeline broadcast when PP > 1)."""
    pp_rank, pp, ranks, group = _pipeline()
    if pp == 1:
        yield from bucketize(stage_hf_tensors(model_chunks), bucket_bytes)
        return
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
        else torch.device("cpu")
    for stage in range(pp):
        mine = bucketize(stage_hf_tensors(model_chunks), bucket_bytes) if stage == pp_rank else None
        while True:
            bucket = next(mine, None) if mine is not None else None
            box = [None if bucket is None else [(n, t.shape, t.dtype) for n, t in bucket]]
            torch.distributed.broadcast_object_list(box, src=ranks[stage], group=group)
            if box[0] is None:
                break
            if bucket is None:
                bucket = [(n, torch.empty(s, dtype=d, device=device)) for n, s, d in box[0]]
            for _, tensor in bucket:
                torch.distributed.broadcast(tensor, src=ranks[stage], group=group)
            yield bucket


class TensorSync(WeightSync):
    name = "tensor"

    def __init__(self, target: SyncTarget, *, load_format: Optional[str] = "flattened_bucket",
                 **common: Any):
        super().__init__(target, **common)
        self.load_format = load_format
        self._groups: Optional[list] = None       # per server: (ranks, process group)

    def _server_groups(self) -> list:
        rank, size = world()
        tps = self.target.tp_sizes
        if size > 1 and sum(tps) != size:
            raise EngineError(f"weight_sync=tensor needs colocated servers covering the trainer's "
                              f"{size} ranks, got servers of TP sizes {tps} (sum {sum(tps)})")
        groups, start = [], 0
        for tp in tps:
            ranks = list(range(start, start + tp)) if size > 1 else [0]
            group = torch.distributed.new_group(ranks) if size > 1 else None
            groups.append((ranks, group))
            start += tp
        return groups

    def _transfer(self, model_chunks: Any, version: int) -> tuple[int, int]:
        if self._groups is None:
            self._groups = self._server_groups()
        rank, size = world()
        mine = [(s, ranks, group) for s, (ranks, group) in enumerate(self._groups) if rank in ranks]
        error: Optional[str] = None
        sent_bytes = sent_buckets = index = 0
        for bucket in all_stage_buckets(model_chunks, self.bucket_bytes):
            payload = serialize_for_sglang(bucket_payload(bucket, self.load_format))
            for server, ranks, group in mine:
                payloads = [payload] * self.target.tp_sizes[server]
                if group is not None:
                    gathered = [None] * len(ranks) if rank == ranks[0] else None
                    torch.distributed.gather_object(payload, gathered, dst=ranks[0], group=group)
                    payloads = gathered
                if rank == ranks[0] and error is None:
                    error = self._post(server, payloads, version)
                    sent_buckets += 1
                    sent_bytes += sum(nbytes(t) for _, t in bucket)
                if group is not None:
                    torch.distributed.barrier(group=group)
            if rank == 0:
                for name, tensor in bucket:
                    self.record_sample(index, name, tensor)
                    index += 1
        raise_if_any(error)
        return sent_bytes, sent_buckets

    def _post(self, server: int, payloads: list, version: int) -> Optional[str]:
        body = {"serialized_named_tensors": payloads, "load_format": self.load_format,
                "flush_cache": False, "weight_version": str(version)}
        try:
            self.target.http.call(self.target.urls[server], "/update_weights_from_tensor", body,
                                  retries=0).check()
        except EngineError as err:
            return str(err)
        return None
