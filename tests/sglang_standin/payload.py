"""Decoding /update_weights_from_tensor payloads the way an sglang 0.5.x server does.

SGLang (python/sglang/srt/utils/common.py): MultiprocessingSerializer.deserialize(text) =
SafeUnpickler(io.BytesIO(base64.b64decode(text, validate=True))).load(), after
monkey_patch_torch_reductions() made rebuild_cuda_tensor accept a device UUID in argument 6.
SafeUnpickler resolves only globals under an allow-list of module prefixes. Then
(python/sglang/srt/model_executor/model_runner.py update_weights_from_tensor) a
"flattened_bucket" payload is {"flattened_tensor", "metadata"} rebuilt by FlattenedTensorBucket
(python/sglang/srt/weight_sync/tensor_bucket.py): flat[start_idx:end_idx].reshape(shape), cast to
dtype; any other payload is a list of (name, tensor).

This module is written independently of the trainer's serializer (masa_megatron/rollout/
weight_sync/tensor.py) so the two check each other. `decode` also reports every global the
payload referenced.
"""
from __future__ import annotations

import base64
import io
import pickle
from dataclasses import dataclass
from typing import Any

import torch
from torch.multiprocessing import reductions

# sglang 0.5.x SafeUnpickler.ALLOWED_MODULE_PREFIXES (the entries a weight payload can touch)
ALLOWED_MODULE_PREFIXES = (
    "builtins.", "collections.", "copyreg.", "functools.", "itertools.", "operator.", "types.",
    "weakref.", "torch.", "torch._tensor.", "torch.storage.", "torch.nn.parameter.",
    "torch.autograd.function.", "torch.distributed.", "multiprocessing.resource_sharer.",
    "multiprocessing.reduction.", "sglang.srt.weight_sync.tensor_bucket.",
    "sglang.srt.model_executor.model_runner.", "sglang.srt.utils.",
)
DENIED = {("builtins", "eval"), ("builtins", "exec"), ("builtins", "compile"), ("os", "system"),
          ("subprocess", "Popen"), ("subprocess", "run"), ("codecs", "decode"),
          ("types", "CodeType"), ("types", "FunctionType")}
_METADATA_NAMES = {("sglang.srt.weight_sync.tensor_bucket", "FlattenedTensorMetadata"),
                   ("sglang.srt.model_executor.model_runner", "FlattenedTensorMetadata")}


@dataclass
class FlattenedTensorMetadata:
    name: str
    shape: Any
    dtype: Any
    start_idx: int
    end_idx: int
    numel: int


def _device_from_maybe_uuid(device):
    if isinstance(device, int):
        return device
    for index in range(torch.cuda.device_count()):
        if str(torch.cuda.get_device_properties(index).uuid) == device:
            return index
    raise pickle.UnpicklingError(f"no visible GPU has uuid {device}")


def _rebuild_cuda_tensor(*args):
    args = list(args)
    args[6] = _device_from_maybe_uuid(args[6])
    return reductions.rebuild_cuda_tensor(*args)


class PayloadUnpickler(pickle.Unpickler):
    def __init__(self, file):
        super().__init__(file)
        self.globals_seen: list[tuple[str, str]] = []

    def find_class(self, module: str, name: str):
        self.globals_seen.append((module, name))
        if (module, name) in DENIED:
            raise pickle.UnpicklingError(f"blocked {module}.{name}")
        if (module, name) in _METADATA_NAMES:
            return FlattenedTensorMetadata
        if (module, name) == ("torch.multiprocessing.reductions", "rebuild_cuda_tensor"):
            return _rebuild_cuda_tensor
        if any((module + ".").startswith(p) for p in ALLOWED_MODULE_PREFIXES):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"blocked {module}.{name}: module not in SGLang's allow-list")


def decode(text: str) -> tuple[Any, list[tuple[str, str]]]:
    """The object in one serialized_named_tensors entry, and the globals it referenced."""
    if not isinstance(text, str):
        raise ValueError(f"serialized_named_tensors entries must be base64 strings, got "
                         f"{type(text).__name__}")
    unpickler = PayloadUnpickler(io.BytesIO(base64.b64decode(text, validate=True)))
    return unpickler.load(), unpickler.globals_seen


def named_tensors(obj: Any, load_format) -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs of a decoded payload, per load_format (None or flattened_bucket)."""
    if load_format == "flattened_bucket":
        flat = obj["flattened_tensor"]
        out = []
        for meta in obj["metadata"]:
            tensor = flat[meta.start_idx:meta.end_idx].reshape(meta.shape)
            if tensor.dtype != meta.dtype:
                tensor = tensor.to(meta.dtype)
            out.append((meta.name, tensor))
        return out
    if load_format is None:
        return [(str(name), tensor) for name, tensor in obj]
    raise ValueError(f"unknown load_format={load_format!r}")
