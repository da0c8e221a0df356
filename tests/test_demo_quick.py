"""`masa demo --quick` end to end: warm start, the three modes through the real trainer, report."""
import json
import math
import subprocess
import sys

import pytest

from masa_megatron.demo.run import MODES
from tests.support.timeouts import outlasting

pytestmark = pytest.mark.slow


def _finite_numbers(row: dict) -> list[float]:
    return [v for v in row.values() if isinstance(v, (int, float)) and not isinstance(v, bool)]


@outlasting(900)
def test_quick_demo_writes_a_report_with_finite_metrics_for_all_modes(tmp_path):
    out, cache = tmp_path / "demo", tmp_path / "cache"
    done = subprocess.run(
        [sys.executable, "-m", "masa_megatron.cli", "demo", "--quick", "--out", str(out),
         "--cache-dir", str(cache)], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert f"report: {out / 'summary.md'}" in done.stdout

    for name in ("summary.md", "summary.json", "accuracy.png", "meta_awareness.png",
                 "pass_rate_before_after.png", "efficiency.png"):
        assert (out / name).stat().st_size > 0, name
    summary = json.loads((out / "summary.json").read_text())
    rows = {r["mode"]: r for r in summary["modes"]}
    assert [c["name"] for c in summary["claims"]] == [
        "GRPO raises held-out accuracy", "MASA makes the model meta-aware",
        "MASA-efficient generates fewer tokens at MASA's accuracy"]
    assert sorted(r["mode"] for r in summary["runs"]) == sorted(MODES)
    assert "## Claims, seed by seed" in (out / "summary.md").read_text()
    assert set(rows) == set(MODES)
    for mode in MODES:
        for key in ("acc_start", "acc_end", "mae_start", "mae_end", "train_tokens"):
            assert math.isfinite(rows[mode][key]), (mode, key, rows[mode][key])
        metrics = [json.loads(line) for line in
                   (out / "runs" / f"{mode}-s0" / "metrics.jsonl").read_text().splitlines()]
        steps = [m for m in metrics if m["step"] > 0]
        assert [m["step"] for m in steps] == [1, 2, 3]
        for m in metrics:
            assert all(math.isfinite(v) for v in _finite_numbers(m)), (mode, m)
        assert all(m["tokens/total"] > 0 for m in steps)
        assert "eval/accuracy" in metrics[0] and "eval/accuracy" in metrics[-1]
        # meta rollouts are generated only in the MASA modes
        meta_tokens = sum(m.get("tokens/meta", 0) for m in steps)
        assert (meta_tokens > 0) == (mode != "grpo"), (mode, meta_tokens)

    # runs were trained in parallel worker processes, each with its own log
    timing = json.loads((out / "timing.json").read_text())
    assert timing["jobs"] >= 1 and timing["peak_rss_total_gib"] > 0
    assert timing["total_cpu_s"] > sum(timing["runs_cpu_s"].values()) > 0
    assert timing["warm_start_cpu_s"] > 0
    for mode in MODES:
        assert f"{mode}-s0 step 3/3" in (out / "runs" / f"{mode}-s0" / "log.txt").read_text()
        usage = json.loads((out / "runs" / f"{mode}-s0" / "usage.json").read_text())
        assert usage["threads"] == 1
        if timing["pinned_cpu_kernels"]:      # x86-64: the workers ran the pinned kernels
            assert usage["cpu_capability"] in ("AVX2", "DEFAULT"), usage

    # the warm start was cached: a second demo reuses it
    assert len(list(cache.glob("warmstart-*"))) == 1
