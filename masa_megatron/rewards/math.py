"""Solution reward: s = 1 if the last brace-balanced \\boxed{...} (or \\fbox{...}) of a response is
mathematically equivalent to the reference answer, else 0.

Answer fallback (`ANSWER_FALLBACKS`), for a response with no usable box: "none" (the spec: score
0) or "qwen_math" (the Qwen2.5-Math evaluation's extraction, which the authors' evaluation used):
the text after the last "he answer is", else after the last "final answer is", else the last
number matched by -?\\d*\\.?\\d+ once commas are removed; then line breaks are joined, a leading
":" and trailing "." / "/" dropped, and surrounding "$" stripped.

Equivalence is decided by math-verify (`verify(parse(reference), parse(answer))`). Parsing and
comparison of model output can take unbounded time (e.g. \\boxed{9^{9^{9^{9^{9}}}}}), so every
comparison runs in the time-limited worker processes of `grading_pool` (an item still running
after `timeout_s` scores 0). Box extraction happens in the calling process, so responses without a
usable box never reach a worker. Nothing here raises on model output: any failure scores 0.
"""
from __future__ import annotations

import re
from itertools import accumulate, repeat
from typing import Sequence

from masa_megatron.rewards.grading_pool import get_pool

DEFAULT_TIMEOUT_S = 5.0
ANSWER_FALLBACKS = ("none", "qwen_math")
_LAST_NUMBER = re.compile(r"-?\d*\.?\d+")
_ANSWER_PHRASES = ("he answer is", "final answer is")

_BOX_COMMANDS = ("\\boxed", "\\fbox")
_ESCAPED_CHAR = re.compile(r"\\.", re.DOTALL)
_BRACE_STEP = {"{": 1, "}": -1}


# ----------------------------------------------------------------------------- box extraction
def last_boxed_content(text: str) -> str | None:
    """Content of the last \\boxed{...} / \\fbox{...} in `text`, or None.

    The last occurrence of a box command followed (after optional spaces) by "{" is taken; if its
    braces never balance (e.g. a truncated rollout) the result is None, earlier boxes are not used.
    A backslash escapes the next character, so \\{ and \\} do not count as braces. O(len(text)).
    """
    if not isinstance(text, str):
        return None
    end = len(text)
    while True:
        start = max(text.rfind(cmd, 0, end) for cmd in _BOX_COMMANDS)
        if start < 0:
            return None
        cmd_len = len("\\boxed") if text.startswith("\\boxed", start) else len("\\fbox")
        i = start + cmd_len
        while i < len(text) and text[i] in " \t":
            i += 1
        if i < len(text) and text[i] == "{":
            return _balanced_group(text, i)
        end = start  # "\boxed" not followed by a group (e.g. "\boxed 5", "\boxedx"): look earlier


def _balanced_group(text: str, open_index: int) -> str | None:
    """Content of the brace group opening at text[open_index], or None if it never closes.

    Depth is a running sum of +1/-1 computed with C-level iterators, chunk by chunk."""
    tail = _ESCAPED_CHAR.sub("  ", text[open_index:])  # escapes are no braces; offsets are kept
    depth = 0
    for chunk_start in range(0, len(tail), 1 << 16):
        chunk = tail[chunk_start:chunk_start + (1 << 16)]
        depths = list(accumulate(map(_BRACE_STEP.get, chunk, repeat(0)), initial=depth))[1:]
        try:
            end = chunk_start + depths.index(0)
        except ValueError:
            depth = depths[-1]
            continue
        return text[open_index + 1:open_index + end]
    return None


def fallback_answer(text: str) -> str | None:
    """The Qwen-Math-style answer of a response without a box (see the module docstring)."""
    if not isinstance(text, str):
        return None
    phrase = next((p for p in _ANSWER_PHRASES if p in text), None)
    if phrase is not None:
        answer = text.split(phrase)[-1].strip()
    else:
        numbers = _LAST_NUMBER.findall(text.replace(",", ""))
        answer = numbers[-1] if numbers else ""
    answer = re.sub(r"\n\s*", "", answer)
    answer = answer[1:] if answer.startswith(":") else answer
    answer = answer.rstrip("./").strip().strip("$").strip()
    return answer or None


def extract_answer(text: str, fallback: str = "none") -> str | None:
    """The answer graded in a response: its last box, else (fallback "qwen_math") the
    Qwen-Math-style answer; None when there is none."""
    if fallback not in ANSWER_FALLBACKS:
        raise ValueError(f"unknown answer fallback {fallback!r}; expected one of "
                         f"{', '.join(ANSWER_FALLBACKS)}")
    boxed = last_boxed_content(text)
    if boxed is None and fallback == "qwen_math":
        return fallback_answer(text)
    return boxed


# ----------------------------------------------------------------------------- worker side
def _boxed_configs():
    from math_verify import LatexExtractionConfig

    return [LatexExtractionConfig(boxed_match_priority=0)]


_REFERENCE_CACHE: dict[str, list] = {}


def _parse_reference(reference: str) -> list:
    """Parse the reference as \\boxed{ref} (LaTeX), falling back to plain LaTeX / expression."""
    cached = _REFERENCE_CACHE.get(reference)
    if cached is not None:
        return cached
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse

    gold = parse("\\boxed{" + reference + "}", extraction_config=_boxed_configs(), parsing_timeout=None)
    if not gold:
        gold = parse(reference, extraction_config=[LatexExtractionConfig(), ExprExtractionConfig()],
                     parsing_timeout=None)
    if len(_REFERENCE_CACHE) > 4096:
        _REFERENCE_CACHE.clear()
    _REFERENCE_CACHE[reference] = gold
    return gold


def verify_answer(answer: str, reference: str) -> float:
    """1.0 if the box content `answer` is equivalent to `reference`. No time limit: worker-side only."""
    from math_verify import parse, verify

    gold = _parse_reference(reference)
    pred = parse("\\boxed{" + answer + "}", extraction_config=_boxed_configs(), parsing_timeout=None)
    if not gold or not pred:
        return 0.0
    return 1.0 if verify(gold, pred, timeout_seconds=None) else 0.0


# ----------------------------------------------------------------------------- public API
def grade_batch(responses: Sequence[str], references: Sequence[str],
                timeout_s: float = DEFAULT_TIMEOUT_S, workers: int | None = None,
                fallback: str = "none") -> list[float]:
    """Solution rewards s_i in {0.0, 1.0} for each (response, reference) pair, graded in parallel.

    Each comparison gets at most `timeout_s` seconds of a worker; `workers` caps the processes used
    (default: available cores); `fallback` grades responses without a box (module docstring).
    Never raises on model output.
    """
    if len(responses) != len(references):
        raise ValueError(f"{len(responses)} responses but {len(references)} references")
    scores = [0.0] * len(responses)
    jobs, slots = [], []
    for i, (response, reference) in enumerate(zip(responses, references)):
        if isinstance(reference, (int, float)) and not isinstance(reference, bool):
            reference = str(reference)
        answer = extract_answer(response, fallback)
        if answer is None or not answer.strip() or not isinstance(reference, str) or not reference.strip():
            continue
        jobs.append((answer, reference))
        slots.append(i)
    if jobs:
        for i, score in zip(slots, get_pool(workers).map(jobs, float(timeout_s), workers)):
            scores[i] = score
    return scores


def grade(response: str, reference: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> float:
    """s = 1.0 if the last \\boxed{...} of `response` is equivalent to `reference`, else 0.0."""
    return grade_batch([response], [reference], timeout_s=timeout_s)[0]


grade.batch = grade_batch  # type: ignore[attr-defined]  # used by rewards.registry.get_batch_reward
