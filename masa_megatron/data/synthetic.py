"""Synthetic arithmetic-chain task for the CPU demo: exact answers, controllable difficulty.

A problem is a chain of integer additions/subtractions, e.g. ``Compute 47 + 38 - 91.``; its worked
solution computes one operation per line, names the concepts it used, and ends in ``\\boxed{}``::

    first 47 + 38 = 85 carry
    then 85 - 91 = -6 borrow negative
    so the answer is \\boxed{-6}

- Difficulty: `LEVELS[d]` (a `Level`): level 1 is one single-digit addition without carry, level 8
  is five operations on 4-digit numbers, far beyond what the tiny demo model can do.
- Concepts (the notion reward's vocabulary, `CONCEPTS`): a step writes ``carry`` when the column
  addition of the magnitudes carries, ``borrow`` when the column subtraction borrows, ``negative``
  when its result is below 0. None of these words ever occurs in a problem text.
- Solution length grows with difficulty (one line per operation, longer numbers). Within a problem
  it varies by a few tokens (optional ``first``/``then`` step prefixes and an optional
  ``so the answer is``), so correct rollouts of one problem have a spread of lengths and the
  length reward ``min(C) < l < max(C)`` is attainable.
- Train/eval split by a hash of the problem text (`split_of`): the two splits are disjoint for any
  seeds. Generation is deterministic given (seed, split, n, levels).
- Answers are plain integers (``str(int)``), graded on the last ``\\boxed{}``.
- Solution styles (`SOLUTION_STYLES`, the same problems and answers in both): ``steps`` (above,
  the demo's) and ``columns``, which works every operation column by column before its result
  line, by the same magnitude algorithm that names the concepts (`column_work`)::

    first 47 + 38 : 7 + 8 = 15 , 4 + 3 + 1 = 8 , 47 + 38 = 85 carry
    then 85 - 91 : 91 - 85 : 1 + 10 - 5 = 6 , 9 - 8 - 1 = 0 , 85 - 91 = -6 borrow negative
    so the answer is \\boxed{-6}

  A ``columns`` solution has 2-4x the tokens of a ``steps`` one (1.9x at level 1, 4x at level 8),
  which puts the ratio of meta-answer to solution length near the paper's
  (`benchmarks/masa_efficiency.py --task columns`).

Measured (2026-11-26, 2-core CPU): the demo's warm start (`demo.warmstart.WarmStartConfig`:
1500 SFT steps, ~4.7 min, a 1.1M-parameter Qwen3 with a digit-level tokenizer), 8 samples at T=1
on the 48 held-out problems of the demo (6 per level), solved 3.0 / 1.7 / 0.3 / 0.8 / 0 / 0 /
0.2 / 0 of 8 on average for levels 1-8; one problem always solved, 34 never, 13 in between
(pass@1 10.7 % with `masa eval`). The same recipe on ``columns`` solutions (max length 192,
8.4 min) more than doubles pass@1 on the 32 training problems of `masa_efficiency.py --pool 32`:
41.4 % against 19.5 % (8 samples at T=1): levels 2 / 3 / 4 go from 0.41 / 0.12 / 0.06 to
1.00 / 0.41 / 0.84, while levels 5-8 stay at 0-0.03 in both.
"""
from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Iterable, NamedTuple, Optional, Sequence

CONCEPTS: tuple[str, ...] = ("carry", "borrow", "negative")
DATA_SOURCE = "synthetic_arith"
SOLUTION_STYLES = ("steps", "columns")


class Level(NamedTuple):
    """Shape of a problem: operations, digits of the first / other numbers, which ops, carries."""
    ops: int
    first_digits: int
    digits: int
    subtraction: bool = True
    carry: bool = True          # False: only additions without any carry (level 1)


# Ordered so that mean solution length strictly grows with the level; the tiny demo model's
# pass rate falls with it (see the table above).
LEVELS: dict[int, Level] = {
    1: Level(1, 1, 1, subtraction=False, carry=False),   # 3 + 4
    2: Level(1, 1, 1),                                   # 9 - 7, 8 + 6
    3: Level(1, 2, 1),                                   # 47 - 8
    4: Level(2, 1, 1),                                   # 7 - 9 + 4
    5: Level(2, 2, 2),                                   # 47 + 38 - 91
    6: Level(3, 2, 2),
    7: Level(3, 3, 3),
    8: Level(5, 4, 4),
}
EVAL_FRACTION = 0.2     # share of the problem space (by text hash) reserved for the eval split


def split_of(problem: str) -> str:
    """'eval' or 'train', fixed by a hash of the problem text (independent of any seed)."""
    bucket = int(hashlib.md5(problem.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return "eval" if bucket < EVAL_FRACTION else "train"


def _magnitudes(x: int, op: str, y: int) -> tuple[bool, int, int]:
    """How `x op y` (y >= 0) is worked: (adding, a, b). Same signs: add a = |x| and b = y.
    Different signs: subtract the smaller magnitude b from the larger a."""
    signed = y if op == "+" else -y
    if x == 0 or signed == 0 or (x > 0) == (signed > 0):
        return True, abs(x), y
    return False, max(abs(x), y), min(abs(x), y)


def _columns(adding: bool, a: int, b: int) -> list[tuple[int, int, int, int]]:
    """Column arithmetic of a + b or a - b (a >= b when subtracting), units first: per column
    (digit of a, digit of b, carry or borrow in, value). A value >= 10 carries out, a value
    below 0 borrows."""
    out, carry = [], 0
    while a or b:
        da, db = a % 10, b % 10
        value = da + db + carry if adding else da - db - carry
        out.append((da, db, carry, value))
        carry = int(value >= 10 or value < 0)
        a, b = a // 10, b // 10
    return out


def step_concepts(x: int, op: str, y: int) -> tuple[int, list[str]]:
    """Result of `x op y` (y >= 0) and the concepts used, by the magnitude algorithm.

    Same signs: add magnitudes (carry?). Different signs: subtract the smaller magnitude from the
    larger (borrow?). A result below 0 adds 'negative'.
    """
    result = x + y if op == "+" else x - y
    adding, a, b = _magnitudes(x, op, y)
    names = []
    if any(value >= 10 or value < 0 for *_, value in _columns(adding, a, b)):
        names.append("carry" if adding else "borrow")
    if result < 0:
        names.append("negative")
    return result, names


def column_work(x: int, op: str, y: int) -> str:
    """The columns of `x op y` (y >= 0), units first, by the algorithm of `step_concepts`.

    Same signs: add the magnitudes, ``a + b (+ 1) = s`` per column (+ 1: the carry in).
    Different signs: ``a - b :`` (larger magnitude first), then ``a - b (- 1) = d`` per column,
    or ``a + 10 - b (- 1) = d`` where the column borrows. A missing digit is written 0.
    """
    adding, a, b = _magnitudes(x, op, y)
    columns = []
    for da, db, carry, value in _columns(adding, a, b):
        extra = f" {'+' if adding else '-'} 1" if carry else ""
        if adding:
            columns.append(f"{da} + {db}{extra} = {value}")
        elif value < 0:
            columns.append(f"{da} + 10 - {db}{extra} = {value + 10}")
        else:
            columns.append(f"{da} - {db}{extra} = {value}")
    work = " , ".join(columns or ["0 + 0 = 0"])
    return work if adding else f"{a} - {b} : {work}"


def _operand(rng: random.Random, digits: int) -> int:
    return rng.randint(10 ** (digits - 1) if digits > 1 else 1, 10 ** digits - 1)


def make_problem(rng: random.Random, level: int, style: str = "steps") -> dict:
    """One problem of the given level: problem, answer, difficulty, notions, solution.

    `style` ('steps' | 'columns') changes only the solution text, never a random draw."""
    shape = LEVELS[level]
    if shape.carry:
        numbers = [_operand(rng, shape.first_digits)] + [
            _operand(rng, shape.digits) for _ in range(shape.ops)]
    else:       # single-digit additions whose sum stays below 10
        numbers = [rng.randint(1, 8)]
        numbers.append(rng.randint(1, 9 - numbers[0]))
    ops = [rng.choice("+-") if shape.subtraction else "+" for _ in range(shape.ops)]
    expression = str(numbers[0]) + "".join(f" {o} {n}" for o, n in zip(ops, numbers[1:]))
    value, lines, notions = numbers[0], [], []
    for i, (op, y) in enumerate(zip(ops, numbers[1:])):
        result, names = step_concepts(value, op, y)
        prefix = ("first " if i == 0 else "then ") if rng.random() < 0.5 else ""
        work = f"{value} {op} {y} : {column_work(value, op, y)} , " if style == "columns" else ""
        lines.append(" ".join([f"{prefix}{work}{value} {op} {y} = {result}", *names]))
        notions += [n for n in names if n not in notions]
        value = result
    closing = "so the answer is " if rng.random() < 0.5 else ""
    lines.append(f"{closing}\\boxed{{{value}}}")
    return {"problem": f"Compute {expression}.", "answer": str(value), "difficulty": level,
            "notions": [c for c in CONCEPTS if c in notions], "solution": "\n".join(lines)}


def generate_problems(n: int, seed: int, split: str = "train",
                      levels: Optional[Sequence[int]] = None, max_tries: int = 200,
                      style: str = "steps") -> list[dict]:
    """`n` problems of `split` ('train' | 'eval'), levels cycled in order (balanced), with
    solutions in `style` (`SOLUTION_STYLES`; the problems do not depend on it).

    Problems are unique within the list while the level's space allows (`max_tries` draws),
    and always belong to `split` (so train and eval never share a problem).
    """
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    if style not in SOLUTION_STYLES:
        raise ValueError(f"solution style must be one of {SOLUTION_STYLES}, got {style!r}")
    levels = list(levels or LEVELS)
    rng = random.Random(f"{seed}-{split}")
    seen: set[str] = set()
    out = []
    for i in range(n):
        level = levels[i % len(levels)]
        for attempt in range(max_tries):
            item = make_problem(rng, level, style)
            if split_of(item["problem"]) == split and (item["problem"] not in seen
                                                       or attempt >= max_tries // 2):
                break
        else:
            raise RuntimeError(f"no {split} problem found at level {level}")
        seen.add(item["problem"])
        out.append(item)
    return out


def to_verl_rows(problems: Iterable[dict], split: str = "train",
                 data_source: str = DATA_SOURCE) -> list[dict]:
    """verl-style rows, same schema as shared/data/*.parquet (plus difficulty/notions)."""
    return [{
        "data_source": data_source,
        "prompt": [{"role": "user", "content": p["problem"]}],
        "ability": "math",
        "reward_model": {"style": "rule", "ground_truth": {
            "question": p["problem"], "solution": p["solution"], "target": p["answer"]}},
        "extra_info": {"index": i, "split": split, "difficulty": p["difficulty"],
                       "notions": list(p["notions"])},
    } for i, p in enumerate(problems)]


def write_rows(rows: list[dict], path: str | Path) -> Path:
    """Write rows to `.parquet` or `.jsonl` (chosen by the suffix)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq
        pq.write_table(pa.Table.from_pylist(rows), path)
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        raise ValueError(f"unsupported suffix {path.suffix!r} (use .parquet or .jsonl)")
    return path


def read_rows(path: str | Path) -> list[dict]:
    """Read rows written by `write_rows` (or any verl parquet/jsonl file)."""
    path = Path(path)
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq
        return pq.read_table(path).to_pylist()
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    raise ValueError(f"unsupported suffix {path.suffix!r} (use .parquet or .jsonl)")


def write_task_files(out_dir: str | Path, n_train: int = 512, n_eval: int = 128, seed: int = 0,
                     suffix: str = ".parquet") -> tuple[Path, Path]:
    """Write train and eval files of the task to `out_dir`; returns their paths."""
    out_dir = Path(out_dir)
    paths = []
    for split, n in (("train", n_train), ("eval", n_eval)):
        rows = to_verl_rows(generate_problems(n, seed, split), split)
        paths.append(write_rows(rows, out_dir / f"synthetic_{split}{suffix}"))
    return paths[0], paths[1]
