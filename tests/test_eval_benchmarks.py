"""Benchmark files -> Problems: shared parquet files, math_test500 sample, malformed rows."""
import json

import pytest

from masa_megatron.errors import UserError
from masa_megatron.eval.benchmarks import (
    BENCHMARKS,
    PAPER_SUITES,
    Problem,
    default_data_dir,
    load_benchmark,
    parse_field_overrides,
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


def test_answer_and_problem_fields_read_any_schema(tmp_path):
    """Named fields are used when a row has them; a one-item list answer (OlympiadBench's
    final_answer) is its item; rows without them fall back to the verl/flat rules."""
    rows = [{"question": "1+2?", "final_answer": ["3"]},
            {"question": "2+2?", "final_answer": "4"},
            {"problem": "3+3?", "answer": "6"},                 # flat row: the default rules
            {"question": "x?", "final_answer": []}]             # empty list: malformed
    path = tmp_path / "olympiad.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    bench = read_problems(path, problem_field="question", answer_field="final_answer")
    assert [(p.problem, p.answer) for p in bench.problems] == [("1+2?", "3"), ("2+2?", "4"),
                                                               ("3+3?", "6")]
    assert bench.n_skipped == 1
    assert read_problems(path).n_skipped == 3            # no fields named: only the flat row


def test_paper_suites_resolve_or_say_how_to_obtain_them(shared_data, tmp_path):
    assert set(PAPER_SUITES) == {"aime24", "aime25", "amc23", "math500", "minerva",
                                 "olympiadbench"}
    aime25 = load_benchmark("aime25", data_dir=shared_data, limit=1)   # the shipped aime2025
    assert aime25.name == "aime25" and aime25.problems[0].answer == "70"
    with pytest.raises(UserError, match=r"minerva\.(jsonl|parquet).*reproducing"):
        load_benchmark("minerva", data_dir=shared_data)
    (tmp_path / "minerva.jsonl").write_text(json.dumps({"question": "q", "answer": "1"}) + "\n")
    minerva = load_benchmark("minerva", data_dir=tmp_path)
    assert [(p.id, p.problem, p.answer) for p in minerva.problems] == [("minerva/0", "q", "1")]


def test_field_overrides_per_benchmark():
    assert parse_field_overrides(None) == {}
    assert parse_field_overrides("answer") == {"*": "answer"}
    assert parse_field_overrides("minerva=answer,olympiadbench=final_answer") == {
        "minerva": "answer", "olympiadbench": "final_answer"}
    with pytest.raises(UserError, match="--answer-field"):
        parse_field_overrides("a=,b=c", "--answer-field")
