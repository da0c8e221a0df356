"""When the SGLang contract test (tests/test_sglang_contract.py) runs: only in a side
environment that tools/sglang_side_env.sh finished, i.e. one holding the stamp the script writes
last, named after setup.py's SGLang pins and the hash of constraints/sglang-side.txt. A venv the
script created but did not fill (pip failed during its ~6 GB download) skips the contract test
with a reason that says what is missing and how to build it."""
import hashlib
import importlib.util
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _contract_skip_mark(monkeypatch, side: Path):
    """The contract module's skip mark, as imported with SGLANG_SIDE_VENV=side."""
    monkeypatch.setenv("SGLANG_SIDE_VENV", str(side))
    spec = importlib.util.spec_from_file_location("sglang_contract_probe",
                                                  REPO / "tests" / "test_sglang_contract.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    marks = module.pytestmark if isinstance(module.pytestmark, list) else [module.pytestmark]
    (skip,) = [mark for mark in marks if mark.name == "skipif"]
    return skip


def _venv_with_python(tmp_path) -> Path:
    side = tmp_path / "side"
    (side / "bin").mkdir(parents=True)
    (side / "bin" / "python").symlink_to(sys.executable)
    return side


def _stamp_name() -> str:
    pins = dict(re.findall(r'^(SGLANG(?:_ROUTER)?) = "(.*)"$', (REPO / "setup.py").read_text(),
                           re.M))
    digest = hashlib.sha1((REPO / "constraints" / "sglang-side.txt").read_bytes()).hexdigest()
    return f".installed-{pins['SGLANG']}-{pins['SGLANG_ROUTER']}-{digest[:12]}"


def test_a_half_built_side_environment_skips_the_contract_test(tmp_path, monkeypatch):
    side = _venv_with_python(tmp_path)          # the venv exists, the install never finished
    (side / ".installed-0.0.1-0.0.1-000000000000").touch()     # a stamp for other pins
    mark = _contract_skip_mark(monkeypatch, side)
    assert mark.args[0] is True
    assert _stamp_name() in mark.kwargs["reason"]
    assert "make sglang-side-env" in mark.kwargs["reason"]


def test_a_finished_side_environment_runs_the_contract_test(tmp_path, monkeypatch):
    side = _venv_with_python(tmp_path)
    (side / _stamp_name()).touch()
    assert _contract_skip_mark(monkeypatch, side).args[0] is False
