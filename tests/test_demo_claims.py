"""The demo's claims are checked seed by seed from the runs' evaluations (demo/claims.py)."""
import json
import math
import random

from masa_megatron.demo.claims import check_claims, claims_markdown, run_stats
from masa_megatron.demo.report import run_series
from masa_megatron.metrics import JsonlSink, read_jsonl


def make_run(root, mode, seed, acc, mae, meta_reward, tokens, problems=60):
    """A run folder: step-0 and step-4 evaluations (per-problem scores drawn at the given
    accuracies, 4 samples each) and 4 steps of metrics with `tokens` per step."""
    rng = random.Random(f"{mode}-{seed}")
    run = root / f"{mode}-s{seed}"
    (run / "eval").mkdir(parents=True)
    rows = []
    for step, a, m, r in zip((0, 4), acc, mae, meta_reward):
        records = [{"id": f"q{i}", "scores": [float(rng.random() < a) for _ in range(4)]}
                   for i in range(problems)]
        (run / "eval" / f"step_{step:06d}.jsonl").write_text(
            "".join(json.dumps(x) + "\n" for x in records))
        accuracy = sum(sum(x["scores"]) / 4 for x in records) / problems
        rows.append({"step": step, "eval/accuracy": accuracy, "eval/meta_pass_rate_mae": m,
                     "eval/meta_reward": r})
    steps = [{"step": s, "tokens/total": tokens, "time/step": 1.0} for s in (1, 2, 3)]
    rows = [rows[0], *steps, {**rows[1], "tokens/total": tokens, "time/step": 1.0}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in rows))
    return run


def claims_of(tmp_path, runs):
    dirs = {(mode, seed): make_run(tmp_path, mode, seed, *spec)
            for (mode, seed), spec in runs.items()}
    stats = {key: run_stats(d, run_series(d), k_step=1) for key, d in dirs.items()}
    return check_claims(stats, dirs), stats


def three_modes(grpo_acc):
    return {("grpo", 0): (grpo_acc, (1.0, 0.9), (0.1, 0.1), 100),
            ("masa", 0): ((0.2, 0.5), (1.0, 0.2), (0.1, 0.3), 200),
            ("masa_efficient", 0): ((0.2, 0.5), (1.0, 0.25), (0.1, 0.3), 150)}


def test_claims_hold_when_every_seed_shows_them(tmp_path):
    claims, stats = claims_of(tmp_path, three_modes((0.2, 0.6)))
    assert [c.holds for c in claims] == [True, True, True], [c.detail for c in claims]
    assert stats["grpo", 0]["gain"] > 0.3 and 0 < stats["grpo", 0]["gain_se"] < 0.1
    assert stats["masa", 0]["mae_ratio"] == 5.0
    text = "\n".join(claims_markdown(claims, stats))
    assert "GRPO raises held-out accuracy: holds" in text and "| masa_efficient | 0 |" in text


def test_a_gain_within_noise_or_a_calibrating_control_breaks_the_claims(tmp_path):
    runs = three_modes((0.3, 0.32))
    runs["grpo", 0] = (runs["grpo", 0][0], (1.0, 0.3), (0.1, 0.3), 100)   # GRPO calibrates too
    runs["masa_efficient", 0] = ((0.2, 0.1), (1.0, 0.25), (0.1, 0.3), 250)
    claims, _ = claims_of(tmp_path, runs)
    assert [c.holds for c in claims] == [False, False, False]
    assert "needs >= +0.10" in claims[0].detail and "tokens/step 1.25x" in claims[2].detail


def test_claims_name_the_modes_that_were_not_run(tmp_path):
    claims, _ = claims_of(tmp_path, {("masa", 1): ((0.2, 0.5), (1.0, 0.2), (0.1, 0.3), 200)})
    assert [c.holds for c in claims] == [None, None, None]
    assert claims[0].detail == "grpo was not run"


def test_a_run_whose_meta_error_ends_as_nan_still_gets_its_claims_checked(tmp_path):
    """A run whose metas stop parsing logs its pass-rate error as NaN (written "nan" by the
    metrics sink); the report must still check the claims (it raised a TypeError at the end of
    the demo, losing the summary)."""
    runs = three_modes((0.2, 0.6))
    dirs = {key: make_run(tmp_path, *key, *spec) for key, spec in runs.items()}
    metrics = dirs["grpo", 0] / "metrics.jsonl"
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    rows[-1]["eval/meta_pass_rate_mae"] = float("nan")
    metrics.unlink()
    sink = JsonlSink(metrics)
    for row in rows:
        sink.log(row.pop("step"), row)
    sink.close()
    assert math.isnan(read_jsonl(metrics)[-1]["eval/meta_pass_rate_mae"])
    stats = {key: run_stats(d, run_series(d), k_step=1) for key, d in dirs.items()}
    assert math.isnan(stats["grpo", 0]["mae_ratio"])
    claims = check_claims(stats, dirs)
    assert claims[0].holds is True and claims[1].holds is not None
