"""Benchmark files -> `Problem`s.

Row formats (parquet or jsonl, one row per problem):
- verl: ``prompt`` = list of chat messages ``{"role", "content"}`` whose last ``user`` content is
  the bare problem; answer = ``reward_model.ground_truth.target`` (or ``reward_model.ground_truth``
  when that is itself the answer string).
- flat (convenience for hand-written jsonl): ``{"problem": str, "answer": str}``.
- any schema: `problem_field` / `answer_field` name the columns holding the problem text and the
  answer (e.g. ``question`` / ``final_answer``); a row that has them is read from them, a row
  that does not falls back to the two forms above.
Answers must be non-empty strings (an int is accepted and turned into its decimal string; a
one-item list is its item, as OlympiadBench's ``final_answer`` is read by the Qwen2.5-Math
evaluation; a bool, float, other list or empty string is not). Any other row is malformed: it is
skipped and counted in `Benchmark.n_skipped`, never raised.

Names (`BENCHMARKS`): ``aime2025``, ``math_test`` read ``<data_dir>/<name>.parquet``.
``math_test500`` is a seeded sample of 500 valid ``math_test`` problems (numpy
``default_rng(MATH_TEST500_SEED).choice(n, 500, replace=False)``, kept in file order). It is NOT the
official MATH-500 list (Lightman et al.): the shared files do not identify those problems, so numbers
on it are comparable only with other runs of this project. Any other argument ending in
``.parquet``/``.jsonl`` is read as a file; its stem is the benchmark name.

Paper suites (`PAPER_SUITES`: the paper's six evaluation benchmarks): ``aime24``, ``aime25``,
``amc23``, ``math500``, ``minerva``, ``olympiadbench`` read ``<data_dir>/<name>.parquet`` or
``.jsonl`` (``aime25`` and ``amc23`` also the shipped ``aime2025.parquet`` / ``amc23.parquet``)
with each suite's problem and answer columns as published (docs/reproducing.md says where each
comes from; only aime25 and amc23 ship with the project).

Problem ids are ``"<benchmark>/<row number in the file>"`` (unique across benchmarks, stable while
the file is unchanged); `Problem.source` is the benchmark name, used to group results.
Data dir: argument, else env ``MASA_DATA_DIR``, else ``<repo root>/../shared/data``.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from masa_megatron.errors import UserError

BENCHMARKS: dict[str, str] = {"aime2025": "aime2025.parquet",
                              "math_test": "math_test.parquet", "math_test500": "math_test.parquet"}
MATH_TEST500_SEED = 0
MATH_TEST500_SIZE = 500
_REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Suite:
    """A paper benchmark: candidate file names in the data dir (first found is read) and the
    columns of its published form (rows in verl/flat form are read as such)."""
    files: tuple[str, ...]
    problem_field: str | None = None
    answer_field: str | None = None


PAPER_SUITES: dict[str, Suite] = {
    "aime24": Suite(("aime24.parquet", "aime24.jsonl"), "problem", "answer"),
    "aime25": Suite(("aime25.parquet", "aime25.jsonl", "aime2025.parquet"), "problem", "answer"),
    "amc23": Suite(("amc23.parquet", "amc23.jsonl"), "question", "answer"),
    "math500": Suite(("math500.parquet", "math500.jsonl"), "problem", "answer"),
    "minerva": Suite(("minerva.parquet", "minerva.jsonl"), "question", "answer"),
    "olympiadbench": Suite(("olympiadbench.parquet", "olympiadbench.jsonl"), "question",
                           "final_answer"),
}


@dataclass(frozen=True)
class Problem:
    id: str
    problem: str
    answer: str
    source: str


@dataclass
class Benchmark:
    """Problems read from `path`; `n_skipped` malformed rows were dropped."""
    name: str
    path: Path
    problems: list[Problem] = field(default_factory=list)
    n_skipped: int = 0


def default_data_dir() -> Path:
    """``$MASA_DATA_DIR`` if set, else ``<repo root>/../shared/data``."""
    env = os.environ.get("MASA_DATA_DIR")
    return Path(env) if env else (_REPO_ROOT.parent / "shared" / "data").resolve()


def _answer_of(row: dict, answer_field: str | None = None) -> str | None:
    rm = row.get("reward_model")
    if answer_field is not None and answer_field in row:
        value = row[answer_field]
        if isinstance(value, list) and len(value) == 1:
            value = value[0]
    elif isinstance(rm, dict):
        gt = rm.get("ground_truth")
        value = gt.get("target") if isinstance(gt, dict) else gt
    else:
        value = row.get("answer")
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    return value if isinstance(value, str) and value.strip() else None


def _problem_text_of(row: dict, problem_field: str | None = None) -> str | None:
    if problem_field is not None and problem_field in row:
        text = row[problem_field]
        return text if isinstance(text, str) and text.strip() else None
    prompt = row.get("prompt")
    if prompt is None and isinstance(row.get("problem"), str):
        prompt = [{"role": "user", "content": row["problem"]}]
    if not isinstance(prompt, list):
        return None
    users = [m for m in prompt if isinstance(m, dict) and m.get("role") == "user"]
    text = users[-1].get("content") if users else None
    return text if isinstance(text, str) and text.strip() else None


def parse_row(row: Any, problem_id: str, source: str, problem_field: str | None = None,
              answer_field: str | None = None) -> Problem | None:
    """One row -> `Problem`, or None when the row is malformed."""
    if not isinstance(row, dict):
        return None
    text, answer = _problem_text_of(row, problem_field), _answer_of(row, answer_field)
    if text is None or answer is None:
        return None
    return Problem(id=problem_id, problem=text, answer=answer, source=source)


def _iter_rows(path: Path, limit: int | None, what: str) -> Iterator[Any]:
    """Raw rows (dict, or a marker for an undecodable jsonl line) in file order."""
    if path.suffix == ".jsonl":
        with open(path, encoding="utf-8") as f:
            for i, line in enumerate(f):
                if limit is not None and i >= limit:
                    return
                if not line.strip():
                    yield None
                    continue
                try:
                    yield json.loads(line)
                except json.JSONDecodeError:
                    yield None
        return
    import pyarrow as pa
    import pyarrow.parquet as pq
    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise UserError(f"{what} {path}: not a readable parquet file ({exc})") from exc
    count = 0
    for batch in parquet.iter_batches(batch_size=1024):
        for row in batch.to_pylist():
            if limit is not None and count >= limit:
                return
            count += 1
            yield row


def read_problems(path: str | Path, source: str | None = None, limit: int | None = None,
                  problem_field: str | None = None, answer_field: str | None = None,
                  what: str = "benchmark file") -> Benchmark:
    """Read a .parquet/.jsonl file (its first `limit` rows when given) into a `Benchmark`;
    `problem_field` / `answer_field` name the columns of a non-verl schema; errors call the file
    `what` (e.g. the config field naming a training file)."""
    path = Path(path)
    if path.suffix not in (".parquet", ".jsonl"):
        raise UserError(f"{what} {path}: expected a .parquet or .jsonl file")
    if not path.is_file():
        raise UserError(f"{what} {path}: not found")
    source = source or path.stem
    bench = Benchmark(name=source, path=path)
    for i, row in enumerate(_iter_rows(path, limit, what)):
        problem = parse_row(row, f"{source}/{i}", source, problem_field, answer_field)
        if problem is None:
            bench.n_skipped += 1
        else:
            bench.problems.append(problem)
    return bench


def seeded_sample(problems: list[Problem], size: int, seed: int) -> list[Problem]:
    """`size` problems drawn without replacement by numpy ``default_rng(seed)``, in input order."""
    import numpy as np
    if len(problems) <= size:
        return list(problems)
    keep = np.sort(np.random.default_rng(seed).choice(len(problems), size=size, replace=False))
    return [problems[int(i)] for i in keep]


def load_benchmark(name_or_path: str | Path, data_dir: str | Path | None = None,
                   limit: int | None = None, problem_field: str | None = None,
                   answer_field: str | None = None) -> Benchmark:
    """A registered benchmark name (see `BENCHMARKS`, `PAPER_SUITES`) or a path to a
    .parquet/.jsonl file. Fields given here replace a suite's columns.

    `limit` reads only the first `limit` rows of the file (for math_test500: samples from them)."""
    key = str(name_or_path)
    directory = Path(data_dir) if data_dir is not None else default_data_dir()
    if key in PAPER_SUITES:
        suite = PAPER_SUITES[key]
        found = next((directory / f for f in suite.files if (directory / f).is_file()), None)
        if found is None:
            raise UserError(f"benchmark {key!r}: none of {', '.join(suite.files)} in {directory}; "
                            f"docs/reproducing.md says where to obtain it")
        return read_problems(found, source=key, limit=limit,
                             problem_field=problem_field or suite.problem_field,
                             answer_field=answer_field or suite.answer_field)
    if key in BENCHMARKS:
        bench = read_problems(directory / BENCHMARKS[key], source=key, limit=limit,
                              problem_field=problem_field, answer_field=answer_field)
        if key == "math_test500":
            bench.problems = seeded_sample(bench.problems, MATH_TEST500_SIZE, MATH_TEST500_SEED)
        return bench
    if key.endswith((".parquet", ".jsonl")):
        return read_problems(key, limit=limit, problem_field=problem_field,
                             answer_field=answer_field)
    known = list(BENCHMARKS) + [n for n in PAPER_SUITES if n not in BENCHMARKS]
    raise UserError(f"unknown benchmark {key!r}: known names are {', '.join(known)} "
                    f"(files in {directory}), or give a path to a .parquet/.jsonl file")


def benchmark_name(name_or_path: str) -> str:
    """The name results are grouped by: a registered name, or a file's stem."""
    return Path(name_or_path).stem if name_or_path.endswith((".parquet", ".jsonl")) \
        else name_or_path


def parse_field_overrides(text: str | None, option: str = "field") -> dict[str, str]:
    """ "FIELD" (every benchmark: key "*") or "NAME=FIELD,NAME=FIELD" -> {name: field}."""
    if not text:
        return {}
    if "=" not in text:
        return {"*": text}
    out = {}
    for item in text.split(","):
        name, _, value = item.partition("=")
        if not name.strip() or not value.strip():
            raise UserError(f"{option} {text!r}: expected FIELD or NAME=FIELD[,NAME=FIELD...]")
        out[name.strip()] = value.strip()
    return out


def load_benchmarks(names: list[str], data_dir: str | Path | None = None,
                    limit: int | None = None, problem_fields: dict[str, str] | None = None,
                    answer_fields: dict[str, str] | None = None) -> list[Benchmark]:
    """`load_benchmark` for each name, in order; fields per benchmark name ("*": all)."""
    def field(fields, name):
        fields = fields or {}
        return fields.get(benchmark_name(name), fields.get("*"))
    return [load_benchmark(n, data_dir=data_dir, limit=limit,
                           problem_field=field(problem_fields, n),
                           answer_field=field(answer_fields, n)) for n in names]
