"""Benchmark files -> Problems: shared parquet files, math_test500 sample, malformed rows."""
import json

import pytest

from masa_megatron.errors import UserError
from masa_megatron.eval.benchmarks import (
    BENCHMARKS,
    Problem,
    default_data_dir,
    load_benchmark,
    read_problems,
)


@pytest.mark.parametrize("name", ["aime2025", "amc23", "math_test"])
def test_reads_first_rows_of_each_shared_file(shared_data, name):
    bench = load_benchmark(name, data_dir=shared_data, limit=10)
    assert bench.name == name and bench.n_skipped == 0
    assert len(bench.problems) == 10
    first = bench.problems[0]
    assert first.id == f"{name}/0" and first.source == name
    assert first.problem.strip() and first.answer.strip()
    assert "Let's think step by step" not in first.problem      # bare problem text


def test_aime2025_first_answer(shared_data):
    assert load_benchmark("aime2025", data_dir=shared_data, limit=1).problems[0].answer == "70"


def test_math_test500_is_a_deterministic_sample(shared_data):
    first = load_benchmark("math_test500", data_dir=shared_data)
    again = load_benchmark("math_test500", data_dir=shared_data)
    assert len(first.problems) == 500
    assert len({p.id for p in first.problems}) == 500
    assert [p.id for p in first.problems] == [p.id for p in again.problems]
    assert all(p.source == "math_test500" for p in first.problems)
    assert first.n_skipped == 1          # math_test has one row with an empty target


def test_bare_path_and_default_data_dir(shared_data, monkeypatch):
    bench = load_benchmark(str(shared_data / "amc23.parquet"), limit=3)
    assert bench.name == "amc23" and [p.id for p in bench.problems] == ["amc23/0", "amc23/1",
                                                                       "amc23/2"]
    monkeypatch.setenv("MASA_DATA_DIR", "/somewhere/else")
    assert str(default_data_dir()) == "/somewhere/else"
    monkeypatch.delenv("MASA_DATA_DIR")
    assert default_data_dir() == shared_data.resolve()


def test_malformed_jsonl_rows_are_counted(tmp_path):
    good = {"prompt": [{"role": "system", "content": "sys"}, {"role": "user", "content": "1+1?"}],
            "reward_model": {"ground_truth": {"target": "2"}}}
    lines = [json.dumps(good),
             json.dumps({"problem": "2+2?", "answer": 4}),                 # flat form, int answer
             json.dumps({"prompt": [{"role": "user", "content": "x"}]}),   # no target
             json.dumps({"prompt": "not a list", "reward_model": {"ground_truth": {"target": "1"}}}),
             json.dumps({"prompt": [{"role": "user", "content": "y"}],
                         "reward_model": {"ground_truth": {"target": ["1"]}}}),  # wrong type
             json.dumps([1, 2]), "{broken json", ""]
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    bench = load_benchmark(str(path))
    assert bench.problems == [Problem("bad/0", "1+1?", "2", "bad"),
                              Problem("bad/1", "2+2?", "4", "bad")]
    assert bench.n_skipped == 6


def test_malformed_parquet_rows_are_counted(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    table = pa.table({
        "prompt": [[{"role": "user", "content": "p0"}], None, [], [{"role": "user", "content": "p3"}]],
        "reward_model": [{"ground_truth": {"target": "a"}}, {"ground_truth": {"target": "b"}},
                         {"ground_truth": {"target": "c"}}, {"ground_truth": {"target": ""}}],
    })
    pq.write_table(table, tmp_path / "t.parquet")
    bench = read_problems(tmp_path / "t.parquet")
    assert [(p.id, p.answer) for p in bench.problems] == [("t/0", "a")]
    assert bench.n_skipped == 3


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(UserError) as err:
        load_benchmark("aime2024", data_dir=tmp_path)
    assert all(name in str(err.value) for name in BENCHMARKS) and str(tmp_path) in str(err.value)
    with pytest.raises(UserError, match="aime2025.parquet"):
        load_benchmark("aime2025", data_dir=tmp_path)
    with pytest.raises(UserError, match="missing.jsonl"):
        load_benchmark(str(tmp_path / "missing.jsonl"))
    (tmp_path / "junk.parquet").write_text("not parquet")
    with pytest.raises(UserError, match="junk.parquet"):
        load_benchmark(str(tmp_path / "junk.parquet"))
