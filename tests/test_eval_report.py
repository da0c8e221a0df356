"""Report files, report comparison, plot helpers and the resumable results store."""
import json
import math

import pytest

from masa_megatron.eval.report import (
    ResultsStore,
    build_report,
    compare_reports,
    pass_rate_predictions,
    plot_curves,
    write_report,
)

REPORT_FILES = ["report.json", "summary.md", "calibration.png", "pass_rate_scatter.png",
                "length_scatter.png", "pass_at_k.png"]


def synthetic_records(shift: float = 0.0) -> list[dict]:
    """12 problems on two benchmarks, 4 solutions each, deterministic."""
    records = []
    for i in range(12):
        c = i % 5                                    # correct solutions out of 4
        scores = [1] * c + [0] * (4 - c)
        lengths = [100 + 50 * j + 10 * i for j in range(4)]
        pred = [min(1.0, max(0.0, c / 4 + shift + (j - 1) / 8)) for j in range(3)]
        records.append({
            "benchmark": "bench_a" if i < 6 else "bench_b", "id": f"p{i}", "scores": scores,
            "lengths": lengths, "predicted_pass_rates": pred + [None],
            "predicted_length": 180 + 10 * i if i != 3 else None,
            "notion_net": {"carry": 1, "borrow": -1} if i % 2 else None,
        })
    return records


def _numbers(obj):
    if isinstance(obj, dict):
        for v in obj.values():
            yield from _numbers(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _numbers(v)
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        yield obj


@pytest.fixture(scope="module")
def two_reports(tmp_path_factory):
    """A "grpo" report and a "masa" one with shifted (worse) predictions, written once for the module."""
    root = tmp_path_factory.mktemp("reports")
    return root, {"grpo": write_report(synthetic_records(), root / "grpo"),
                  "masa": write_report(synthetic_records(shift=0.25), root / "masa")}


def test_write_report_produces_every_file_with_finite_numbers(two_reports):
    root, reports = two_reports
    report = reports["grpo"]
    for name in REPORT_FILES:
        assert (root / "grpo" / name).stat().st_size > 0, name
    on_disk = json.loads((root / "grpo" / "report.json").read_text())
    assert on_disk == report
    assert all(math.isfinite(x) for x in _numbers(on_disk))
    assert report["ks"] == [1, 2, 4]
    overall = report["overall"]
    assert overall["n_problems"] == 12
    # c per problem: 0,1,2,3,4,0,1,2,3,4,0,1 -> pass@1 = mean(c)/4 = 21/48
    assert overall["pass_at_k"]["1"]["mean"] == pytest.approx(21 / 48)
    meta = overall["meta"]
    assert meta["pass_rate"]["meta"]["coverage"] == 1.0
    assert meta["length"]["coverage"] == pytest.approx(11 / 12)
    assert meta["notion"]["micro"] == pytest.approx(0.5)
    for key in ("mae", "spearman", "ece"):
        assert meta["pass_rate"]["meta"][key] is not None
    summary = (root / "grpo" / "summary.md").read_text()
    assert "| bench_a |" in summary and "| all |" in summary and "pass@4 %" in summary


def test_pass_rate_sources_and_gating_fallback():
    assert pass_rate_predictions({"predicted_pass_rates": [0.5, None, 0.25]}) == {"meta": 0.375}
    assert pass_rate_predictions({"predicted_pass_rate": {"text": 0.5, "head": None}}) == \
        {"text": 0.5, "head": None}
    records = [{"benchmark": "b", "id": "1", "scores": [0, 0], "predicted_pass_rates": [0, 0]},
               {"benchmark": "b", "id": "2", "scores": [1, 0], "predicted_pass_rates": [0, 0],
                "gated": False}]
    gating = build_report(records)["overall"]["meta"]["gating"]
    assert (gating["tp"], gating["fn"], gating["tn"]) == (1, 0, 1)


def test_compare_reports_side_by_side(two_reports, tmp_path):
    root, written = two_reports
    reports = compare_reports([root / "grpo", root / "masa"], ["GRPO", "MASA"], tmp_path / "cmp")
    assert reports == {"GRPO": written["grpo"], "MASA": written["masa"]}
    table = (tmp_path / "cmp" / "comparison.md").read_text()
    assert "| metric | GRPO | MASA |" in table and "bench_b pass@1 %" in table
    for name in ["calibration.png", "pass_at_1.png", "meta_metrics.png"]:
        assert (tmp_path / "cmp" / name).stat().st_size > 0
    assert "| all: meta MAE | 0.017 | 0.201 |" in table     # the shifted predictions are worse
    with pytest.raises(ValueError):
        compare_reports([root / "grpo"], ["a", "b"], tmp_path / "x")


def test_plot_curves_writes_png(tmp_path):
    path = plot_curves(tmp_path / "acc.png", {"grpo": ([0, 10, 20], [0.1, 0.2, float("nan")]),
                                              "masa": ([0, 10, 20], [0.1, 0.25, 0.3])},
                       "step", "accuracy", "accuracy vs step")
    assert path.stat().st_size > 0


def test_results_store_resumes_after_truncated_line(tmp_path):
    records = synthetic_records()[:5]
    path = tmp_path / "run" / "results.jsonl"
    with ResultsStore(path) as store:
        for r in records[:3]:
            store.append(r)
    with open(path, "a") as f:                       # crash while writing the 4th record
        f.write(json.dumps(records[3])[:40])
    store = ResultsStore(path)
    assert store.completed_ids() == {"p0", "p1", "p2"}
    assert store.n_truncated_bytes == 40
    for r in records:                                # the driver loop
        if r["id"] not in store.completed_ids():
            store.append(r)
    store.close()
    reopened = ResultsStore(path)
    with ResultsStore(tmp_path / "clean.jsonl") as clean:
        clean.append_many(records)
    assert reopened.records() == ResultsStore(tmp_path / "clean.jsonl").records()
    assert path.read_bytes() == (tmp_path / "clean.jsonl").read_bytes()
    with pytest.raises(ValueError):
        reopened.append(records[0])                  # already stored
    reopened.close()


def test_results_store_skips_corrupt_middle_line(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text('{"id": "a", "x": 1}\nnot json\n{"id": "b"}\n[1, 2]\n')
    store = ResultsStore(path)
    assert [r["id"] for r in store.records()] == ["a", "b"]
    assert store.n_corrupt == 1
    store.close()
    assert path.read_text() == '{"id": "a", "x": 1}\nnot json\n{"id": "b"}\n'
