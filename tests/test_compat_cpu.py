"""The CPU compatibility layer: the patches themselves, and Megatron training through them."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "dist_scripts"))

import harness  # noqa: E402
from masa_megatron.compat import apply_cpu_compat, is_applied  # noqa: E402
from tests.support.timeouts import outlasting  # noqa: E402

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU shim only without CUDA")


def test_apply_is_idempotent_and_patches_cuda_calls():
    assert apply_cpu_compat() is True
    synchronize = torch.cuda.synchronize
    assert apply_cpu_compat() is True and is_applied()
    assert torch.cuda.synchronize is synchronize  # second call patched nothing again
    assert torch.cuda.current_device() == "cpu"
    torch.cuda.synchronize()
    x = torch.zeros(3, device="cuda")
    assert x.device.type == "cpu"
    assert x.cuda() is x and x.to("cuda").device.type == "cpu"
    assert x.to(torch.device("cuda:0"), torch.float64).dtype == torch.float64
    assert x.type() == "torch.cuda.FloatTensor"
    assert x.type(torch.float64).dtype == torch.float64
    event = torch.cuda.Event(enable_timing=True)
    event.record()
    with torch.cuda.stream(torch.cuda.Stream()):
        torch.cuda.current_stream().wait_stream(torch.cuda.default_stream())


def test_patched_functions_are_distinct_objects():
    """torch._dynamo refuses one function object registered under two torch.cuda names."""
    names = ("synchronize", "set_device", "manual_seed", "manual_seed_all", "empty_cache",
             "set_stream", "current_device", "memory_allocated", "max_memory_allocated")
    objects = [getattr(torch.cuda, n) for n in names if hasattr(torch.cuda, n)]
    assert len({id(o) for o in objects}) == len(objects)


@pytest.mark.parametrize("sq,skv,window", [(5, 5, (2, 0)), (3, 7, (1, 2)), (6, 6, (0, 0))])
def test_hot_path_lifts_the_mode_and_mask_helpers_match_megatron(sq, skv, window):
    """Inside hot_path() a literal device="cuda" fails again (the mode is lifted), and the CPU
    mask helpers the softmax uses there equal Megatron's own, which run under the mode."""
    apply_cpu_compat()
    from megatron.core.fusions import fused_softmax
    from megatron.core.transformer import utils

    from masa_megatron.compat.cpu import hot_path

    with hot_path():
        with pytest.raises((AssertionError, RuntimeError)):
            torch.zeros(1, device="cuda")
        causal = fused_softmax.get_default_causal_mask(sq)
        window_mask = fused_softmax.get_sliding_window_causal_mask(sq, skv, window)
    assert torch.equal(causal, utils.get_default_causal_mask(sq))
    assert torch.equal(window_mask, utils.get_sliding_window_causal_mask(sq, skv, window))
    assert torch.zeros(1, device="cuda").device.type == "cpu"   # mode back on after the block


def test_rng_tracker_forks_on_the_cpu_generator():
    apply_cpu_compat()
    from megatron.core.tensor_parallel.random import CudaRNGStatesTracker

    tracker = CudaRNGStatesTracker()
    torch.manual_seed(0)
    tracker.add("a", 123)
    default_next = torch.get_rng_state()
    with tracker.fork("a"):
        first = torch.rand(3)
    assert torch.equal(torch.get_rng_state(), default_next)  # default stream untouched
    with tracker.fork("a"):
        second = torch.rand(3)
    torch.manual_seed(123)
    assert torch.equal(first, torch.rand(3)) and torch.equal(second, torch.rand(3))
    with pytest.raises(Exception, match="seed 123 already exists"):
        tracker.add("b", 123)


def test_megatron_training_loss_decreases_at_tp1():
    for case in harness.TRAIN_CASES:
        losses = harness.tp1_results()[case]["losses"]
        assert all(b < a for a, b in zip(losses, losses[1:])), losses


@pytest.mark.slow
@outlasting(900)                            # harness.launch_layout's torchrun
@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)], ids=["tp2", "pp2"])
def test_parallel_training_reproduces_tp1_losses(tp, pp):
    results, _ = harness.launch_layout(tp, pp)
    for case in harness.TRAIN_CASES:
        want = harness.tp1_results()[case]["losses"]
        got = results[case]["losses"]
        assert got == pytest.approx(want, abs=1e-6, rel=0), (case, got, want)


def test_version_helpers():
    from masa_megatron.compat.megatron_versions import (
        leave_inference_mode, megatron_version, use_fork_for_checkpoint_queue)

    assert megatron_version() >= (0, 16, 1)
    leave_inference_mode()
    use_fork_for_checkpoint_queue()
    use_fork_for_checkpoint_queue()  # idempotent
