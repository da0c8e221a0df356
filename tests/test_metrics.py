"""Metric sinks and the progress line."""
import io
import json

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
    assert rows == [{"step": 1, "loss": 0.5, "nan": "nan", "flag": 1}, {"step": 2, "loss": 0.25}]


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

