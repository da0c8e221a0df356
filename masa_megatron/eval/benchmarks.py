"""Benchmark files -> `Problem`s.

Row formats (parquet or jsonl, one row per problem):
- verl: ``prompt`` = list of chat messages ``{"role", "content"}`` whose last ``user`` content is
  the bare problem; answer = ``reward_model.ground_truth.target`` (or ``reward_model.ground_truth``
  when that is itself the answer string).
- flat (convenience for hand-written jsonl): ``{"problem": str, "answer": str}``.
Answers must be non-empty strings (an int is accepted and turned into its decimal string; a bool,
float, list or empty string is not). Any other row is malformed: it is skipped and counted in
`Benchmark.n_skipped`, never raised.

Names (`BENCHMARKS`): ``aime2025``, ``amc23``, ``math_test`` read ``<data_dir>/<name>.parquet``.
``math_test500`` is a seeded sample of 500 valid ``math_test`` problems (numpy
``default_rng(MATH_TEST500_SEED).choice(n, 500, replace=False)``, kept in file order). It is NOT the
official MATH-500 list (Lightman et al.): the shared files do not identify those problems, so numbers
on it are comparable only with other runs of this project. Any other argument ending in
``.parquet``/``.jsonl`` is read as a file; its stem is the benchmark name.

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

BENCHMARKS: dict[str, str] = {"aime2025": "aime2025.parquet", "amc23": "amc23.parquet",
                              "math_test": "math_test.parquet", "math_test500": "math_test.parquet"}
MATH_TEST500_SEED = 0
MATH_TEST500_SIZE = 500
_REPO_ROOT = Path(__file__).resolve().parents[2]


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


def _answer_of(row: dict) -> str | None:
    rm = row.get("reward_model")
    if isinstance(rm, dict):
        gt = rm.get("ground_truth")
        value = gt.get("target") if isinstance(gt, dict) else gt
    else:
        value = row.get("answer")
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    return value if isinstance(value, str) and value.strip() else None


def _problem_text_of(row: dict) -> str | None:
    prompt = row.get("prompt")
    if prompt is None and isinstance(row.get("problem"), str):
        prompt = [{"role": "user", "content": row["problem"]}]
    if not isinstance(prompt, list):
        return None
    users = [m for m in prompt if isinstance(m, dict) and m.get("role") == "user"]
    text = users[-1].get("content") if users else None
    return text if isinstance(text, str) and text.strip() else None


def parse_row(row: Any, problem_id: str, source: str) -> Problem | None:
    """One row -> `Problem`, or None when the row is malformed."""
    if not isinstance(row, dict):
        return None
    text, answer = _problem_text_of(row), _answer_of(row)
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
                  what: str = "benchmark file") -> Benchmark:
    """Read a .parquet/.jsonl file (its first `limit` rows when given) into a `Benchmark`;
    errors call the file `what` (e.g. the config field naming a training file)."""
    path = Path(path)
    if path.suffix not in (".parquet", ".jsonl"):
        raise UserError(f"{what} {path}: expected a .parquet or .jsonl file")
    if not path.is_file():
        raise UserError(f"{what} {path}: not found")
    source = source or path.stem
    bench = Benchmark(name=source, path=path)
    for i, row in enumerate(_iter_rows(path, limit, what)):
        problem = parse_row(row, f"{source}/{i}", source)
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
                   limit: int | None = None) -> Benchmark:
    """A registered benchmark name (see `BENCHMARKS`) or a path to a .parquet/.jsonl file.

    `limit` reads only the first `limit` rows of the file (for math_test500: samples from them)."""
    key = str(name_or_path)
    if key in BENCHMARKS:
        directory = Path(data_dir) if data_dir is not None else default_data_dir()
        bench = read_problems(directory / BENCHMARKS[key], source=key, limit=limit)
        if key == "math_test500":
            bench.problems = seeded_sample(bench.problems, MATH_TEST500_SIZE, MATH_TEST500_SEED)
        return bench
    if key.endswith((".parquet", ".jsonl")):
        return read_problems(key, limit=limit)
    directory = Path(data_dir) if data_dir is not None else default_data_dir()
    raise UserError(f"unknown benchmark {key!r}: known names are {', '.join(BENCHMARKS)} "
                    f"(files in {directory}), or give a path to a .parquet/.jsonl file")


def load_benchmarks(names: list[str], data_dir: str | Path | None = None,
                    limit: int | None = None) -> list[Benchmark]:
    """`load_benchmark` for each name, in order."""
    return [load_benchmark(n, data_dir=data_dir, limit=limit) for n in names]
