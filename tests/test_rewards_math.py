"""Solution grader: box extraction, equivalence on real dataset targets, time limits, robustness."""
import os
import signal
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from masa_megatron.rewards.grading_pool import get_pool
from masa_megatron.rewards.math import grade, grade_batch, last_boxed_content

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _targets(name: str) -> list[str]:
    rows = pq.read_table(DATA / f"{name}.parquet", columns=["reward_model"]).column("reward_model")
    return [row["ground_truth"]["target"] for row in rows.to_pylist()]


@pytest.fixture(scope="module")
def targets():
    if not DATA.is_dir():
        pytest.skip(f"shared data not found at {DATA}")
    return {name: _targets(name) for name in ("math_test", "amc23", "aime2025")}


# (dataset, row, target as stored, boxed answer, expected) -- verdicts decided by hand.
CASES = [
    ("math_test", 261, r"\frac{1}{2}", "1/2", 1.0),
    ("math_test", 261, r"\frac{1}{2}", "0.5", 1.0),
    ("math_test", 261, r"\frac{1}{2}", r"\dfrac{1}{2}", 1.0),
    ("math_test", 261, r"\frac{1}{2}", r"\frac{2}{4}", 1.0),
    ("math_test", 261, r"\frac{1}{2}", r"\frac{1}{3}", 0.0),
    ("math_test", 261, r"\frac{1}{2}", r"-\frac{1}{2}", 0.0),
    ("math_test", 261, r"\frac{1}{2}", "2", 0.0),
    ("math_test", 26, "0.5", r"\frac12", 1.0),
    ("math_test", 26, "0.5", "1/2", 1.0),
    ("math_test", 26, "0.5", "0.05", 0.0),
    ("math_test", 157, r"-\frac{1}{2}", "-0.5", 1.0),
    ("math_test", 157, r"-\frac{1}{2}", "-1/2", 1.0),
    ("math_test", 157, r"-\frac{1}{2}", r"\frac{-1}{2}", 1.0),
    ("math_test", 157, r"-\frac{1}{2}", r"\frac{1}{2}", 0.0),
    ("math_test", 2, r"\frac{9}{7}", "9/7", 1.0),
    ("math_test", 2, r"\frac{9}{7}", r"\frac{7}{9}", 0.0),
    ("math_test", 2, r"\frac{9}{7}", "1.2857", 0.0),
    ("math_test", 9, r"-\frac{1}{8}", "-0.125", 1.0),
    ("math_test", 9, r"-\frac{1}{8}", r"\frac{1}{8}", 0.0),
    ("math_test", 33, "-13.5", r"-\frac{27}{2}", 1.0),
    ("math_test", 33, "-13.5", "13.5", 0.0),
    ("math_test", 11, "-15", "-15", 1.0),
    ("math_test", 11, "-15", "15", 0.0),
    ("math_test", 25, r"[0,\infty)", r"[0, \infty)", 1.0),
    ("math_test", 25, r"[0,\infty)", r"(0,\infty)", 0.0),
    ("math_test", 169, r"(-\infty,0)", r"(-\infty, 0)", 1.0),
    ("math_test", 169, r"(-\infty,0)", r"(-\infty,0]", 0.0),
    ("math_test", 169, r"(-\infty,0)", r"(0,\infty)", 0.0),
    ("math_test", 40, r"(-\infty,-8)\cup(8,\infty)", r"(8,\infty)\cup(-\infty,-8)", 1.0),
    ("math_test", 40, r"(-\infty,-8)\cup(8,\infty)", r"(-\infty,-8]\cup[8,\infty)", 0.0),
    ("math_test", 40, r"(-\infty,-8)\cup(8,\infty)", "(-8,8)", 0.0),
    ("math_test", 36, r"(-\sqrt{3},\sqrt{3})", r"(-\sqrt3,\sqrt3)", 1.0),
    ("math_test", 36, r"(-\sqrt{3},\sqrt{3})", r"[-\sqrt{3},\sqrt{3}]", 0.0),
    ("math_test", 133, r"\frac{\sqrt{3}}{3}", r"\frac{1}{\sqrt{3}}", 1.0),
    ("math_test", 133, r"\frac{\sqrt{3}}{3}", r"\sqrt{3}/3", 1.0),
    ("math_test", 133, r"\frac{\sqrt{3}}{3}", r"\sqrt{3}", 0.0),
    ("math_test", 1108, r"2\sqrt{2}", r"\sqrt{8}", 1.0),
    ("math_test", 1108, r"2\sqrt{2}", r"2\sqrt{3}", 0.0),
    ("math_test", 2204, r"\sqrt{2}", "2^{1/2}", 1.0),
    ("math_test", 2204, r"\sqrt{2}", "2", 0.0),
    ("math_test", 383, r"9\pi", r"9\pi", 1.0),
    ("math_test", 383, r"9\pi", r"\pi \cdot 9", 1.0),
    ("math_test", 383, r"9\pi", "9", 0.0),
    ("math_test", 383, r"9\pi", "28.27", 0.0),
    ("math_test", 1645, r"\frac{\pi}{4}", r"\pi/4", 1.0),
    ("math_test", 1645, r"\frac{\pi}{4}", r"0.25\pi", 1.0),
    ("math_test", 1645, r"\frac{\pi}{4}", r"\frac{\pi}{2}", 0.0),
    ("math_test", 2095, r"\pi", "3.14", 0.0),
    ("math_test", 345, "16,386.16", "16386.16", 1.0),
    ("amc23", 0, "27", "27", 1.0),
    ("amc23", 0, "27", "27.0", 1.0),
    ("amc23", 0, "27", "26", 0.0),
    ("aime2025", 1, "588", "588", 1.0),
    ("aime2025", 1, "588", "587", 0.0),
]


def test_equivalence_table_on_dataset_targets(targets):
    for dataset, row, stored, _, _ in CASES:
        assert targets[dataset][row] == stored, (dataset, row)
    responses = [f"Some reasoning. The answer is $\\boxed{{{answer}}}$." for *_, answer, _ in CASES]
    references = [targets[dataset][row] for dataset, row, *_ in CASES]
    scores = grade_batch(responses, references, timeout_s=30)  # generous: CI machines are noisy
    wrong = [(case, score) for case, score in zip(CASES, scores) if score != case[-1]]
    assert not wrong, wrong


@pytest.mark.parametrize("text, expected", [
    (r"so \boxed{1/2}.", "1/2"),
    (r"\boxed{3} then \boxed{\frac{1}{2}}", r"\frac{1}{2}"),
    (r"\fbox{7}", "7"),
    (r"\boxed {x+1}", "x+1"),
    (r"\boxed{\{1,2\}}", r"\{1,2\}"),
    (r"\boxed{\left\{ x \right.}", r"\left\{ x \right."),
    (r"\boxed{a{b}c}", "a{b}c"),
    (r"\boxed{}", ""),
    (r"\boxed{1/2} and later \boxed{1/", None),  # the last box is cut off: no answer
    (r"\boxed{5} but \boxed 6", "5"),  # "\boxed 6" is not a \boxed{...}
    ("no box at all", None),
    ("", None),
])
def test_last_boxed_content(text, expected):
    assert last_boxed_content(text) == expected


@pytest.mark.parametrize("response, expected", [
    ("The answer is 1/2.", 0.0),  # no box
    (r"\boxed{}", 0.0),  # empty box
    (r"\boxed{   }", 0.0),
    (r"\boxed{1/2", 0.0),  # unbalanced
    (r"\boxed{3} ... wait, \boxed{1/2}", 1.0),  # the last box counts
    (r"\boxed{1/2} ... wait, \boxed{3}", 0.0),
    (r"\boxed{1/2} ... \boxed{\frac{1}", 0.0),  # cut-off last box: earlier boxes do not count
    (r"\fbox{0.5}", 1.0),
])
def test_box_rules(response, expected):
    assert grade(response, r"\frac{1}{2}", timeout_s=30) == expected


def test_non_string_inputs_score_zero():
    assert grade_batch([None, 3, b"\\boxed{1}", r"\boxed{1}"], ["1", "1", "1", None]) == [0.0] * 4
    assert grade_batch([], []) == []
    with pytest.raises(ValueError):
        grade_batch(["a"], [])


def _warm_pool():
    assert grade(r"\boxed{2}", "2", timeout_s=60) == 1.0  # worker start-up is not part of the limit


@pytest.mark.parametrize("answer", ["9^{9^{9^{9^{9}}}}", "10^{10^{10}}"])
def test_pathological_answer_is_cut_off_in_main_thread(answer):
    _warm_pool()
    start = time.monotonic()
    assert grade(rf"\boxed{{{answer}}}", "1", timeout_s=2) == 0.0
    assert time.monotonic() - start < 8  # 2 s limit + slack for a loaded machine
    assert grade(r"\boxed{0.5}", r"\frac{1}{2}", timeout_s=30) == 1.0  # the pool recovered


def test_pathological_answer_is_cut_off_in_worker_thread():
    _warm_pool()
    result = {}

    def run():
        start = time.monotonic()
        try:
            result["score"] = grade(r"\boxed{9^{9^{9^{9^{9}}}}}", "1", timeout_s=2)
        except BaseException as exc:  # noqa: BLE001 - reported below
            result["error"] = exc
        result["elapsed"] = time.monotonic() - start

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(timeout=60)
    assert not thread.is_alive()
    assert "error" not in result, result
    assert result["score"] == 0.0 and result["elapsed"] < 8


def test_batch_with_a_stuck_item_still_grades_the_others():
    _warm_pool()
    responses = [r"\boxed{1/2}", r"\boxed{10^{10^{10}}}", r"\boxed{-0.125}", r"\boxed{7}"]
    references = [r"\frac{1}{2}", "1", r"-\frac{1}{8}", "8"]
    assert grade_batch(responses, references, timeout_s=2) == [1.0, 0.0, 1.0, 0.0]


def test_pool_recovers_from_a_killed_worker():
    _warm_pool()
    pool = get_pool()
    for worker in list(pool._workers):
        os.kill(worker.pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not all(w.conn.poll(0) for w in pool._workers):
        time.sleep(0.05)  # wait until the kernel has closed the dead workers' sockets
    assert grade_batch([r"\boxed{1/2}", r"\boxed{3}", r"\boxed{0.5}"], ["0.5"] * 3, timeout_s=30) == [
        1.0, 0.0, 1.0]


def test_concurrent_callers_from_threads():
    _warm_pool()
    results = [None] * 4

    def run(i):
        results[i] = grade_batch([r"\boxed{1/2}", r"\boxed{3}"], ["0.5", "0.5"], timeout_s=30)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert results == [[1.0, 0.0]] * 4


MEGABYTE = 1 << 20
HUGE_OR_MALFORMED = [
    "\\boxed{" + "1+" * (MEGABYTE // 2) + "1}",
    "\\boxed{" + "{" * MEGABYTE,
    "\\boxed{" + "{" * 50_000 + "}" * 50_000 + "}",
    "\\boxed{" + "\\frac{" * 20_000 + "}",
    "\\boxed{1e999999999}",
    "\\boxed{\\ud800\\udfff}",
    "\\boxed{\ud800}",
    "\\boxed{" + "\\sqrt{" * 3000 + "2" + "}" * 3000 + "}",
    "\\boxed{(" * 5000 + "}",
    "\\boxed{99999!}",
    "x" * MEGABYTE,
]


@pytest.mark.parametrize("text", HUGE_OR_MALFORMED, ids=range(len(HUGE_OR_MALFORMED)))
def test_huge_or_malformed_answers_never_raise(text):
    _warm_pool()
    start = time.monotonic()
    assert grade(text, "1", timeout_s=1) == 0.0
    assert time.monotonic() - start < 8


any_character = st.characters(codec=None, exclude_categories=()) | st.characters(
    min_codepoint=0xD800, max_codepoint=0xDFFF, codec=None, exclude_categories=())  # lone surrogates
junk = st.text(alphabet=any_character | st.sampled_from("{}\\^_$"), max_size=200)
boxed_junk = st.builds(lambda a, b, c: f"{a}\\boxed{{{b}}}{c}", junk, junk, junk)


@settings(max_examples=40, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
@given(st.lists(st.one_of(junk, boxed_junk), min_size=1, max_size=6), junk)
def test_random_text_never_raises(responses, reference):
    assert set(grade_batch(responses, [reference] * len(responses), timeout_s=2)) <= {0.0, 1.0}


# ----------------------------------------------------------------------------- answer fallback
@pytest.mark.parametrize("response, reference, spec, qwen_math", [
    # no \boxed{}: the spec's grader scores 0; the Qwen-Math fallback takes the text after the
    # last "the answer is" / "final answer is", else the last number (commas removed)
    ("Adding them, the answer is 42.", "42", 0.0, 1.0),
    ("So the final answer is $\\frac{1}{2}$.", "\\frac{1}{2}", 0.0, 1.0),
    ("First 3 apples, then 1,024 more: 1,027 in all", "1027", 0.0, 1.0),
    ("The total is 12, or -5 after the refund", "-5", 0.0, 1.0),
    ("No number here at all.", "7", 0.0, 0.0),
    # a box wins over the fallback under both settings
    ("The answer is 3. Checking again: \\boxed{4}", "4", 1.0, 1.0),
    ("The answer is 3. Checking again: \\boxed{4}", "3", 0.0, 0.0),
])
def test_answer_fallback_grades_unboxed_answers(response, reference, spec, qwen_math):
    assert grade_batch([response], [reference], timeout_s=10) == [spec]
    assert grade_batch([response], [reference], timeout_s=10, fallback="none") == [spec]
    assert grade_batch([response], [reference], timeout_s=10, fallback="qwen_math") == [qwen_math]


def test_unknown_answer_fallback_is_an_error():
    with pytest.raises(ValueError, match="fallback"):
        grade_batch(["x"], ["1"], fallback="last_line")
