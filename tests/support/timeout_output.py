"""pytest hook (registered by tests/conftest.py): a test that fails because a subprocess ran
past its own timeout (subprocess.TimeoutExpired, raised by subprocess.run with the output read
so far attached) gets the last TAIL characters of that output as report sections, shown with
the failure: the lines that say where the run hung."""
import subprocess

import pytest

TAIL = 8000


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    err = call.excinfo.value if call.excinfo is not None else None
    if isinstance(err, subprocess.TimeoutExpired):
        for name in ("stdout", "stderr"):
            text = getattr(err, name)
            if isinstance(text, bytes):
                text = text.decode(errors="replace")
            if text:
                report.sections.append(
                    (f"{name} of the subprocess that timed out after {err.timeout:g} s",
                     text[-TAIL:]))
    return report
