"""The sequence length a parallel layout needs, and a hook that checks every linear layer sees it.

Rule. A micro-batch's padded sequence length s (Megatron's activations are [s, b, h]) must be a
multiple of

    m = (TP if sequence parallelism else 1) x (a if FP8 else 1),   a = 32 for MXFP8, else 16

With sequence parallelism each TP rank holds s/TP rows of the hidden states between the
TP-parallel blocks (Megatron splits them along the sequence and asserts divisibility).
Transformer Engine's FP8 GEMMs need a token dimension divisible by a (Megatron's
`get_fp8_align_size`: MXFP8 scales blocks of 32), on each rank's s/TP rows too.

Check. At a linear layer the input is [s_in, b, ..., k]. A layer that takes the
sequence-sharded hidden state (a column-parallel layer under sequence parallelism, which
all-gathers before its GEMM) sees s_in = s/TP; every other one sees s_in = s. The pre-hook of
`LinearShapeCheck` requires s_in x (TP if sharded else 1) to be a multiple of m, which gives both
s % m == 0 and, with FP8, s_in x b divisible by a on every rank. Megatron's and Transformer
Engine's linear layers (and torch.nn.Linear) are checked; the first violation raises
`LinearShapeError` naming the layer.
"""
from __future__ import annotations

import sys
from typing import Iterable

import torch


class LinearShapeError(RuntimeError):
    """A linear layer got a sequence length that the parallel layout cannot split or run."""


def sequence_multiple(config) -> int:
    """m of the module docstring for a Megatron TransformerConfig."""
    from megatron.core.fp8_utils import get_fp8_align_size

    tp = config.tensor_model_parallel_size if config.sequence_parallel else 1
    return tp * (get_fp8_align_size(config.fp8_recipe) if config.fp8 else 1)


def _linear_types() -> tuple[type, ...]:
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    kinds: list[type] = [torch.nn.Linear, ColumnParallelLinear, RowParallelLinear]
    te = sys.modules.get("transformer_engine.pytorch")   # imported iff the model uses TE
    if te is not None:
        kinds += [te.Linear, te.LayerNormLinear, te.LayerNormMLP]
    return tuple(kinds)


def takes_sharded_sequence(module: torch.nn.Module) -> bool:
    """Whether the layer's input is this rank's s/TP rows: sequence parallel and not row-parallel
    (Megatron's RowParallelLinear and TE's parallel_mode="row" take the whole sequence)."""
    from megatron.core.tensor_parallel import RowParallelLinear

    row = isinstance(module, RowParallelLinear) or getattr(module, "parallel_mode", None) == "row"
    return bool(getattr(module, "sequence_parallel", False)) and not row


class LinearShapeCheck:
    """Forward pre-hooks on every linear layer of `modules` checking the rule above.

    `calls` counts the checked inputs, `shapes` holds each layer's last input shape. Use as a
    context manager, or call `remove()`."""

    def __init__(self, modules: Iterable[torch.nn.Module], multiple: int, tp: int):
        if multiple < 1 or tp < 1:
            raise ValueError(f"multiple={multiple}, tp={tp}: both must be >= 1")
        self.multiple, self.tp, self.calls = int(multiple), int(tp), 0
        self.shapes: dict[str, tuple[int, ...]] = {}
        kinds = _linear_types()
        self._handles = []
        for index, model in enumerate(modules):
            for name, module in model.named_modules():
                if isinstance(module, kinds):
                    label = f"chunk{index}.{name}" if index else name
                    self._handles.append(module.register_forward_pre_hook(
                        self._hook(label, takes_sharded_sequence(module)), with_kwargs=True))
        if not self._handles:
            raise ValueError("LinearShapeCheck: the modules hold no linear layer")

    @classmethod
    def for_config(cls, modules: Iterable[torch.nn.Module], config) -> "LinearShapeCheck":
        """The check of a Megatron TransformerConfig's layout (`sequence_multiple`)."""
        return cls(modules, sequence_multiple(config), config.tensor_model_parallel_size)

    def _hook(self, name: str, sharded: bool):
        def check(module, args, kwargs):
            x = args[0] if args else next(v for v in kwargs.values() if torch.is_tensor(v))
            self.calls += 1
            self.shapes[name] = tuple(x.shape)
            length = x.shape[0] * (self.tp if sharded else 1)
            if length % self.multiple:
                where = f"{x.shape[0]} rows x TP {self.tp}" if sharded else f"{x.shape[0]} rows"
                raise LinearShapeError(
                    f"{name}: input {tuple(x.shape)} holds a sequence of {length} ({where}), "
                    f"not a multiple of {self.multiple} (TP with sequence parallelism x the FP8 "
                    f"GEMM alignment): micro-batches must be padded to it")
        return check

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> "LinearShapeCheck":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()
