"""Test modules that set up Megatron's parallel state in this process tear it down again, so
later modules start from nothing (tests/support/parallel_leftovers.py checks, in a pytest run of
its own, after each module's fixtures are gone)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# One test per way these modules set the state up: an autouse fixture, a test body, a fixture
# of harness.py's, and harness.tp1_results (the in-process TP=PP=1 reference, cached).
SETTING_UP = ["tests/test_model_builder.py::test_transformer_config_fields",
              "tests/test_model_te_names.py::test_registry_local_names_match_a_built_model",
              "tests/test_model_bad_input.py::test_wrong_shape_names_file_and_tensor",
              "tests/test_model_bad_input.py::test_missing_shard_names_file_and_tensor",
              "tests/test_model_roundtrip.py::test_tp1_export_is_bit_exact",
              "tests/test_model_roundtrip.py::test_sharded_source_and_bf16_sharded_export"]


@pytest.mark.slow
def test_model_test_modules_leave_no_parallel_state_behind():
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          "-p", "tests.support.parallel_leftovers", *SETTING_UP],
                         cwd=REPO, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
