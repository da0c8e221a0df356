"""Metric sinks and the progress line."""
import io
import json
import math

import pytest

from masa_megatron.config import LoggingConfig
from masa_megatron.metrics import JsonlSink, Progress, open_sinks, read_jsonl


def test_jsonl_sink_appends_one_row_per_step_and_survives_truncation(tmp_path):
    path = tmp_path / "m.jsonl"
    sink = JsonlSink(path)
    sink.log(1, {"loss": 0.5, "nan": float("nan"), "flag": True})
    sink.log(2, {"loss": 0.25})
    sink.close()
    with open(path, "a") as f:
        f.write('{"step": 3, "loss"')  # a crash mid-write
    rows = read_jsonl(path)
    assert rows[1:] == [{"step": 2, "loss": 0.25}]
    assert rows[0]["flag"] == 1 and rows[0]["loss"] == 0.5 and math.isnan(rows[0]["nan"])


def test_non_finite_metrics_read_back_as_floats(tmp_path):
    """The file stays strict JSON ("nan" / "inf" strings); the reader gives floats back, so a
    report dividing by a NaN metric gets NaN, not a TypeError."""
    path = tmp_path / "m.jsonl"
    sink = JsonlSink(path)
    sink.log(1, {"mae": float("nan"), "up": float("inf"), "down": float("-inf"), "name": "x"})
    sink.close()
    assert "NaN" not in path.read_text() and "Infinity" not in path.read_text()
    row = read_jsonl(path)[0]
    assert math.isnan(row["mae"]) and row["up"] == math.inf and row["down"] == -math.inf
    assert row["name"] == "x"
    JsonlSink(path, resume_step=1).close()   # a resume rewrites the kept rows: still strict JSON
    assert "NaN" not in path.read_text() and math.isnan(read_jsonl(path)[0]["mae"])


def test_tensorboard_sink_writes_event_file(tmp_path):
    pytest.importorskip("tensorboard")
    sinks = open_sinks(LoggingConfig(jsonl=True, tensorboard=True), tmp_path)
    sinks.log(1, {"reward": 0.5})
    sinks.close()
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert json.loads((tmp_path / "metrics.jsonl").read_text())["reward"] == 0.5


def test_progress_line_shows_step_eta_and_metrics():
    stream = io.StringIO()
    progress = Progress(total=4, label="grpo", stream=stream)
    progress.update(2, {"acc": 0.123456})
    line = stream.getvalue().strip()
    assert line.startswith("grpo step 2/4") and "ETA" in line and "acc=0.1235" in line


def test_progress_disabled_prints_nothing():
    stream = io.StringIO()
    Progress(total=2, stream=stream, enabled=False).update(1, {"x": 1.0})
    assert stream.getvalue() == ""



def test_resumed_jsonl_sink_keeps_one_row_per_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    sink = JsonlSink(path)
    for step in range(5):          # the crashed run logged steps 0-4; its checkpoint is step 3
        sink.log(step, {"x": float(step)})
    sink.close()
    with open(path, "a") as f:
        f.write('{"step": 5, "x"')  # cut mid-line by the crash
    sink = JsonlSink(path, resume_step=3)
    sink.log(4, {"x": 40.0})
    sink.close()
    rows = read_jsonl(path)
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]
    assert rows[-1]["x"] == 40.0


def test_fresh_start_into_an_old_folder_drops_the_old_rows(tmp_path):
    path = tmp_path / "metrics.jsonl"
    sink = JsonlSink(path)
    for step in range(3):
        sink.log(step, {"x": 1.0})
    sink.close()
    sink = JsonlSink(path, resume_step=0)
    sink.log(0, {"x": 2.0})
    sink.close()
    assert read_jsonl(path) == [{"step": 0, "x": 2.0}]
