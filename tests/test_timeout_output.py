"""A test that fails because a subprocess ran past its own timeout (subprocess.TimeoutExpired)
reports the end of what that subprocess had written by then: the suite's long tests give their
subprocesses limits under the test's own (tests/support/timeouts.py) so that this output, not
pytest-timeout's bare stack, is what a hung run leaves."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HANGING_TEST = '''
import subprocess, sys

CHILD = """
import sys, time
for step in range(1, 300):
    print("finished step", step)
    print("rank 0 finished step", step, file=sys.stderr)
print("stuck in step", 100 * 3)
print("waiting for rank", 2 - 1, file=sys.stderr)
for beat in range(20):
    print("still waiting", beat, flush=True)
    print("still waiting", beat, file=sys.stderr, flush=True)
time.sleep(60)
"""


def test_hang():
    subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=3)
'''


@pytest.mark.slow
def test_a_subprocess_timeout_reports_the_end_of_what_the_subprocess_wrote(tmp_path):
    """A log whose last lines say where it hung, then ~300 characters more (pytest's
    traceback alone shows at most ~240 characters of the output: its repr as an argument of
    subprocess's timeout check)."""
    (tmp_path / "test_hang.py").write_text(HANGING_TEST)
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          "-p", "tests.conftest", "test_hang.py"],     # the suite's hooks
                         cwd=tmp_path, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert run.returncode == 1 and "TimeoutExpired" in run.stdout, run.stdout + run.stderr
    assert "stuck in step 300" in run.stdout and "waiting for rank 1" in run.stdout, \
        run.stdout[-3000:]
