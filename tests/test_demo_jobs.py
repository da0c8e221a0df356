"""The demo's worker pool (status lines, a failed run reported by name with its log) and its
command-line budget (seeds, masa_efficient's start step)."""
import os
from pathlib import Path

import pytest

from masa_megatron.demo.jobs import RunSpec, _last_progress, run_specs
from masa_megatron.demo.run import QUICK, DemoBudget, parse_seeds
from masa_megatron.errors import UserError


def test_last_progress_picks_the_newest_line_of_that_run(tmp_path):
    log = tmp_path / "log.txt"
    assert _last_progress(log, "grpo-s0") == ""           # no log yet
    log.write_text("noise\ngrpo-s0 step 1/5 | 2.0 s/it | ETA 0:00:08 | solution/accuracy=0.1 | "
                   "gating/fraction=0\nwarning\ngrpo-s0 step 2/5 | 2.0 s/it | ETA 0:00:06 | "
                   "solution/accuracy=0.25 | x=1\n")
    assert _last_progress(log, "grpo-s0") == "grpo-s0 step 2/5 ETA 0:00:06 solution/accuracy=0.25"
    assert _last_progress(log, "masa-s0") == ""


def test_failed_runs_are_named_with_their_log_tail_after_the_others_finish(tmp_path):
    from dataclasses import asdict
    specs = [RunSpec(mode, 0, asdict(QUICK), str(tmp_path / "no-such-model"),
                     str(tmp_path / "train.parquet"), str(tmp_path / "eval.parquet"),
                     str(tmp_path / "runs" / mode)) for mode in ("grpo", "masa")]
    with pytest.raises(UserError) as err:
        run_specs(specs, jobs=2, log=lambda message: None, poll_s=0.2)
    text = str(err.value)
    assert "2 run(s) failed: grpo-s0, masa-s0" in text
    assert str(Path(specs[0].run_dir) / "log.txt") in text and "no-such-model" in text


def test_seeds_are_a_count_or_a_list_and_bad_text_names_the_flag():
    assert parse_seeds("3") == [0, 1, 2]
    assert parse_seeds("3,4,5") == [3, 4, 5] and parse_seeds("5,") == [5]
    with pytest.raises(UserError, match="--seeds 'x'"):
        parse_seeds("x")
    with pytest.raises(UserError, match="at least one seed"):
        parse_seeds("0")
    with pytest.raises(UserError, match="at least one seed"):
        parse_seeds(",")


def test_efficient_start_step_is_a_share_of_the_steps_and_at_least_one():
    assert DemoBudget(steps=60).efficient_start_step == 20
    assert DemoBudget(steps=100, efficient_start=0.2).efficient_start_step == 20
    assert QUICK.efficient_start_step == 1          # round(0.34 * 3)
    assert DemoBudget(steps=1, efficient_start=0.1).efficient_start_step == 1


def _pins_cpu_kernels_on_x86_without_overriding_the_user(monkeypatch):
    from masa_megatron.demo import run
    for name in run.PINNED_CPU_KERNELS:       # set first, so the undo restores even unset ones
        monkeypatch.setenv(name, "x")
        monkeypatch.delenv(name)
    monkeypatch.setenv("MKL_CBWR", "COMPATIBLE")
    monkeypatch.setattr(run.platform, "machine", lambda: "x86_64")
    assert run.pin_cpu_kernels() == {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "COMPATIBLE",
                                     "ONEDNN_MAX_CPU_ISA": "AVX2"}
    monkeypatch.delenv("ATEN_CPU_CAPABILITY")
    monkeypatch.setattr(run.platform, "machine", lambda: "arm64")
    assert run.pin_cpu_kernels() == {} and "ATEN_CPU_CAPABILITY" not in os.environ


def test_demo_pins_cpu_kernels_on_x86_without_overriding_the_user(monkeypatch):
    _pins_cpu_kernels_on_x86_without_overriding_the_user(monkeypatch)


def test_the_kernel_pinning_test_leaves_the_environment_as_it_found_it(monkeypatch):
    """Its pins must not reach the rest of the session (every later subprocess would run AVX2
    kernels), also when the pinned names were unset before it."""
    from masa_megatron.demo import run
    for name in run.PINNED_CPU_KERNELS:
        monkeypatch.setenv(name, "x")           # recorded, so restored after this test
        monkeypatch.delenv(name)
    before = dict(os.environ)
    with pytest.MonkeyPatch.context() as inner:
        _pins_cpu_kernels_on_x86_without_overriding_the_user(inner)
    assert dict(os.environ) == before
