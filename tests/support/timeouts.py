"""pytest-timeout limits for tests that wait on subprocesses longer than pytest.ini's
--timeout (600 s). That limit counts fixture set-up too and ends the test without the
subprocess's output, so such a test gets a limit above the sum of the subprocess limits it can
wait on (in its body and in module fixtures it may be the first to build): a hung subprocess
then hits its own limit first, and the test fails with whatever it reports."""
import pytest

MARGIN_S = 120     # set-up beside the subprocesses: tiny models, stand-ins, a Slurm cluster


def outlasting(*subprocess_limits_s: float):
    """A timeout marker `MARGIN_S` above the sum of the given subprocess limits."""
    return pytest.mark.timeout(sum(subprocess_limits_s) + MARGIN_S)
