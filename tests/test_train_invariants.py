"""In-loop invariants of the RL loop that need no model."""
from types import SimpleNamespace

import pytest

from masa_megatron.errors import TrainingStopped
from masa_megatron.train.loop import _check_finite


def test_consecutive_nonfinite_steps_stop_the_run_after_the_limit():
    parts = SimpleNamespace(nonfinite_streak=0, cfg=SimpleNamespace(
        trainer=SimpleNamespace(max_consecutive_nonfinite=3)))
    _check_finite(parts, {"train/skipped_step": 1.0})
    _check_finite(parts, {"train/skipped_step": 0.0})  # a good step resets the count
    _check_finite(parts, {"train/skipped_step": 1.0})
    _check_finite(parts, {"train/skipped_step": 1.0})
    with pytest.raises(TrainingStopped, match="3 consecutive steps.*checkpoint is intact"):
        _check_finite(parts, {"train/skipped_step": 1.0})
