"""The cluster image recipe (docker/Dockerfile) agrees with setup.py and the SGLang side
environment: CI cannot build the image, so its pins are checked as text. `image_pin_problems`
returns one line per disagreement; the cases built to fail show that it notices each kind."""
import re
from pathlib import Path

from packaging.specifiers import SpecifierSet

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "docker" / "Dockerfile"


def dockerfile_args(text: str) -> dict:
    """ARG name -> default value (quotes stripped)."""
    return {m.group(1): m.group(2).strip().strip('"')
            for m in re.finditer(r"^ARG\s+(\w+)=(.*)$", text, re.MULTILINE)}


def pip_installs(text: str) -> list[str]:
    """Every RUN instruction (continuation lines joined) that runs pip install."""
    runs = re.findall(r"^RUN\s+(.*?)(?<!\\)$", text, re.MULTILINE | re.DOTALL)
    return [" ".join(r.replace("\\\n", " ").split()) for r in runs if "pip install" in r]


def setup_pins(text: str) -> dict:
    """setup.py's SGLANG / SGLANG_ROUTER pins and megatron-core specifier."""
    pins = dict(re.findall(r'^(SGLANG|SGLANG_ROUTER) = "([^"]+)"$', text, re.MULTILINE))
    pins["megatron-core"] = re.search(r'"megatron-core([^"]+)"', text).group(1)
    pins["math-verify"] = re.search(r'"(math-verify[^"]+)"', text).group(1)
    return pins


def image_pin_problems(dockerfile: str, setup_py: str, side_constraints: str) -> list[str]:
    args, pins = dockerfile_args(dockerfile), setup_pins(setup_py)
    side_torch = re.search(r"^torch==(\S+)$", side_constraints, re.MULTILINE).group(1)
    installs = pip_installs(dockerfile)
    problems = []
    for arg, want, what in (("SGLANG_VERSION", pins["SGLANG"], "setup.py SGLANG"),
                            ("SGLANG_ROUTER_VERSION", pins["SGLANG_ROUTER"],
                             "setup.py SGLANG_ROUTER"),
                            ("SGLANG_TORCH_VERSION", side_torch,
                             "constraints/sglang-side.txt torch")):
        if args.get(arg) != want:
            problems.append(f"ARG {arg}={args.get(arg)} differs from {what} = {want}")
    if args.get("MATH_VERIFY_SPEC") != pins["math-verify"]:
        problems.append(f"ARG MATH_VERIFY_SPEC={args.get('MATH_VERIFY_SPEC')} differs from "
                        f"setup.py's {pins['math-verify']}")
    mcore = args.get("MEGATRON_CORE_VERSION")
    if mcore is None or mcore not in SpecifierSet(pins["megatron-core"]):
        problems.append(f"ARG MEGATRON_CORE_VERSION={mcore} is outside setup.py's "
                        f"megatron-core{pins['megatron-core']}")
    sglang_venv = [r for r in installs if "${SGLANG_VENV}/bin/python" in r]
    wanted = {"sglang venv torch": '"torch==${SGLANG_TORCH_VERSION}"',
              "sglang": '"sglang==${SGLANG_VERSION}"',
              "sglang-router": '"sglang-router==${SGLANG_ROUTER_VERSION}"'}
    for what, spec in wanted.items():
        if not any(spec in r for r in sglang_venv):
            problems.append(f"no pip install of {spec} into the SGLang venv ({what})")
    trainer = [r for r in installs if "${SGLANG_VENV}" not in r]
    if not any('"megatron-core==${MEGATRON_CORE_VERSION}"' in r for r in trainer):
        problems.append("megatron-core is not installed from ARG MEGATRON_CORE_VERSION")
    if not any('"${MATH_VERIFY_SPEC}"' in r for r in trainer):
        problems.append("math-verify is not installed from ARG MATH_VERIFY_SPEC")
    if not any("/opt/masa-megatron" in r for r in trainer):
        problems.append("this package (/opt/masa-megatron) is not installed")
    if args.get("SGLANG_VENV") != "/opt/sglang" or \
            "SGLANG_PYTHON=${SGLANG_VENV}/bin/python" not in dockerfile:
        problems.append("SGLANG_PYTHON is not exported as /opt/sglang/bin/python")
    return problems


def _texts() -> tuple[str, str, str]:
    return (DOCKERFILE.read_text(), (REPO / "setup.py").read_text(),
            (REPO / "constraints" / "sglang-side.txt").read_text())


def test_image_pins_agree_with_setup_py_and_the_sglang_side_environment():
    assert image_pin_problems(*_texts()) == []


def test_a_differing_sglang_pin_is_reported(tmp_path):
    dockerfile, setup_py, side = _texts()
    bumped = tmp_path / "setup.py"
    bumped.write_text(setup_py.replace('SGLANG = "', 'SGLANG = "9.', 1))
    problems = image_pin_problems(dockerfile, bumped.read_text(), side)
    assert len(problems) == 1 and "SGLANG_VERSION" in problems[0]


def test_a_differing_router_torch_math_verify_or_megatron_core_pin_is_reported(tmp_path):
    dockerfile, setup_py, side = _texts()
    args = dockerfile_args(dockerfile)
    edited = tmp_path / "Dockerfile"
    edited.write_text(dockerfile
                      .replace(f"ARG SGLANG_ROUTER_VERSION={args['SGLANG_ROUTER_VERSION']}",
                               "ARG SGLANG_ROUTER_VERSION=0.0.1")
                      .replace(f"ARG SGLANG_TORCH_VERSION={args['SGLANG_TORCH_VERSION']}",
                               "ARG SGLANG_TORCH_VERSION=2.0.0")
                      .replace(f"ARG MEGATRON_CORE_VERSION={args['MEGATRON_CORE_VERSION']}",
                               "ARG MEGATRON_CORE_VERSION=0.20.0")
                      .replace('ARG MATH_VERIFY_SPEC="math-verify', 'ARG MATH_VERIFY_SPEC="mathverify'))
    problems = image_pin_problems(edited.read_text(), setup_py, side)
    assert [p.split("=")[0] for p in problems] == [
        "ARG SGLANG_ROUTER_VERSION", "ARG SGLANG_TORCH_VERSION", "ARG MATH_VERIFY_SPEC",
        "ARG MEGATRON_CORE_VERSION"]


def test_an_install_that_ignores_the_pins_is_reported():
    dockerfile, setup_py, side = _texts()
    unpinned = dockerfile.replace('"sglang==${SGLANG_VERSION}"', "sglang") \
                         .replace('-e "/opt/masa-megatron[launch]"', "nothing") \
                         .replace('"${MATH_VERIFY_SPEC}"', "math-verify")
    problems = image_pin_problems(unpinned, setup_py, side)
    assert any("sglang==" in p for p in problems)
    assert any("this package" in p for p in problems)
    assert any("math-verify is not installed" in p for p in problems)
