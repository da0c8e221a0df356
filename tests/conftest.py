"""Shared test set-up: deterministic CPU torch, the path of the shared data files, a
one-process Megatron parallel state, an echo stand-in server."""
import os
from pathlib import Path

import pytest

from tests.support.timeout_output import pytest_runtest_makereport  # noqa: F401  (a hook)

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _deterministic_torch():
    try:
        import torch
    except ImportError:  # pure-python tests
        yield
        return
    torch.manual_seed(0)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    yield


def _one_process_parallel():
    """Megatron's parallel state for one process (TP = PP = 1), torn down after."""
    from masa_megatron.config import ParallelConfig
    from masa_megatron.parallel import destroy_parallel, init_parallel

    init_parallel(ParallelConfig())
    yield
    destroy_parallel()


@pytest.fixture(scope="module")
def parallel():
    """The one-process parallel state for a test module."""
    yield from _one_process_parallel()


@pytest.fixture
def parallel_per_test():
    """The same for one test, for tests whose code under test tears it down itself (the
    converters' main) or changes it."""
    yield from _one_process_parallel()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data folder {SHARED_DATA} not present")
    return SHARED_DATA


@pytest.fixture(scope="module")
def echo(tmp_path_factory):
    """A stand-in SGLang server with the echo backend (no model), one per test module."""
    from tests.sglang_standin import start_standin

    proc = start_standin("/nonexistent-model", backend="echo",
                         log_dir=str(tmp_path_factory.mktemp("echo_logs")))
    yield proc
    proc.stop()
