"""model/shape_check.py: the sequence multiple of a layout and the linear-input hook, on plain
modules (the actor-level check is in test_actor_single_process.py, the TP=2 sequence-parallel
one in test_actor_parallel.py)."""
from types import SimpleNamespace

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("megatron.core")

from masa_megatron.model.shape_check import (LinearShapeCheck, LinearShapeError,  # noqa: E402
                                             sequence_multiple, takes_sharded_sequence)


@pytest.mark.parametrize("tp,sp,fp8,recipe,multiple", [
    (2, False, None, "delayed", 1),          # TP without SP: the whole sequence on every rank
    (2, True, None, "delayed", 2),           # SP: s/TP rows per rank
    (1, False, "e4m3", "delayed", 16),       # FP8 GEMM alignment
    (4, True, "hybrid", "tensorwise", 64),   # both: 16 rows per rank
    (4, True, "hybrid", "mxfp8", 128),       # MXFP8 blocks of 32
])
def test_sequence_multiple_is_tp_with_sp_times_the_fp8_alignment(tp, sp, fp8, recipe, multiple):
    config = SimpleNamespace(tensor_model_parallel_size=tp, sequence_parallel=sp, fp8=fp8,
                             fp8_recipe=recipe)
    assert sequence_multiple(config) == multiple


def _layers():
    full = torch.nn.Linear(8, 8)
    sharded = torch.nn.Linear(8, 8)
    sharded.sequence_parallel = True          # as Megatron's column-parallel layers under SP
    row = torch.nn.Linear(8, 8)
    row.sequence_parallel, row.parallel_mode = True, "row"   # as TE's row-parallel layers
    return torch.nn.ModuleDict(dict(full=full, sharded=sharded, row=row))


def test_sharded_layers_count_their_rows_times_tp():
    layers = _layers()
    assert [takes_sharded_sequence(m) for m in layers.values()] == [False, True, False]
    with LinearShapeCheck([layers], multiple=4, tp=2) as check:
        layers["sharded"](torch.zeros(2, 3, 8))        # 2 rows x TP 2 = 4
        for name in ("full", "row"):
            layers[name](torch.zeros(4, 3, 8))
            with pytest.raises(LinearShapeError, match=rf"{name}: input \(2, 3, 8\).* 2 .*of 4"):
                layers[name](torch.zeros(2, 3, 8))
        with pytest.raises(LinearShapeError, match=r"sharded: .*6 \(3 rows x TP 2\).*of 4"):
            layers["sharded"](torch.zeros(3, 3, 8))
    assert check.calls == 6 and check.shapes["sharded"] == (3, 3, 8)
    layers["full"](torch.zeros(3, 3, 8))               # removed on exit
    assert check.calls == 6


def test_a_module_without_linear_layers_is_refused():
    with pytest.raises(ValueError, match="no linear layer"):
        LinearShapeCheck([torch.nn.LayerNorm(4)], multiple=2, tp=2)
