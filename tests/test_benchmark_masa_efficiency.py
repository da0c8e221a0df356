"""The time-to-accuracy arithmetic of benchmarks/masa_efficiency.py, on hand-made metrics rows."""
import importlib.util
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "masa_efficiency.py"
_SPEC = importlib.util.spec_from_file_location("masa_efficiency", _PATH)
masa_efficiency = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(masa_efficiency)


def rows(accuracies: dict, tokens_per_step: float, seconds_per_step: float, steps: int = 4,
         gated: float = 0.0, precision=None, no_signal: float = 0.5) -> list[dict]:
    out = []
    for step in range(steps + 1):
        row = {"step": step}
        if step:
            row.update({"tokens/total": tokens_per_step, "time/step": seconds_per_step,
                        "gating/fraction": gated if step > 2 else 0.0,
                        "solution/zero_variance_fraction": no_signal})
            if precision is not None and step > 2:
                row["gating/audit_precision"] = precision
        if step in accuracies:
            row["eval/accuracy"] = accuracies[step]
        out.append(row)
    return out


def test_cost_to_target_sums_steps_one_to_the_first_evaluation_reaching_it():
    run = masa_efficiency.time_to_target(rows({0: 0.5, 2: 0.3, 4: 0.5}, 100, 2.0), target=0.45)
    # step 0 is already above the target but costs nothing, so it does not count; step 4 is the
    # first later evaluation >= 0.45
    assert run["reached"] == {"step": 4, "accuracy": 0.5, "wall_s": 8.0, "tokens": 400}
    assert run["final_accuracy"] == 0.5 and run["total_tokens"] == 400
    never = masa_efficiency.time_to_target(rows({0: 0.1, 4: 0.2}, 100, 2.0), target=0.45)
    assert never["reached"] is None


def test_speedup_is_grpo_cost_over_config_cost_median_over_seeds_that_both_reach():
    per_seed = {
        0: {"grpo": masa_efficiency.time_to_target(rows({2: 0.5}, 100, 1.0), 0.5),
            "x": masa_efficiency.time_to_target(rows({2: 0.5}, 50, 4.0), 0.5)},
        1: {"grpo": masa_efficiency.time_to_target(rows({4: 0.5}, 100, 1.0), 0.5),
            "x": masa_efficiency.time_to_target(rows({2: 0.5}, 100, 1.0), 0.5)},
        2: {"grpo": masa_efficiency.time_to_target(rows({4: 0.1}, 100, 1.0), 0.5),
            "x": masa_efficiency.time_to_target(rows({2: 0.5}, 100, 1.0), 0.5)},
    }
    ratios = masa_efficiency.speedups(per_seed, "x")
    # seed 0: tokens 200/100 = 2, wall 2/8 = 0.25; seed 1: 400/200 = 2, 4/2 = 2; seed 2 left out
    assert ratios["tokens"] == 2.0 and ratios["tokens_seeds"] == 2
    assert ratios["wall_s"] == pytest.approx((0.25 + 2.0) / 2)


def test_gate_shares_count_the_steps_after_k_and_estimate_recall():
    # the loop logs its 0-based step k, the first gated one, as k + 1: rows() gates from 3
    run = masa_efficiency.time_to_target(
        rows({4: 0.2}, 100, 1.0, gated=0.5, precision=0.8, no_signal=0.6), 0.9, k=2)
    shares = run["from_k"]
    assert shares["gating/fraction"] == 0.5
    assert shares["gating/audit_precision"] == pytest.approx(0.8)
    # skipped 0.5 * 0.8 = 0.4 of the problems without signal, missed 0.5 * 0.6 = 0.3
    assert shares["gating/recall"] == pytest.approx(0.4 / 0.7)
    assert masa_efficiency.gate_recall(0.0, None, 0.8) == 0.0
    assert masa_efficiency.gate_recall(None, None, None) is None
    assert masa_efficiency.gate_recall(0.3, None, 0.8) is None  # gated, but never audited


@pytest.mark.parametrize("args, message", [
    (["--task", "columns"], "--task columns has no target without --pool"),
    (["--task", "prose"], "invalid choice: 'prose'"),
    (["--pool", "12"], "--pool 12: must be a multiple of 8"),
    (["--plot", "no_such_race"], "--plot no_such_race: no results file"),
    (["--configs", "masa"], "--configs masa: must include grpo"),
])
def test_bad_flags_are_a_usage_error_naming_the_flag(args, message, monkeypatch, capsys):
    monkeypatch.setattr("sys.argv", ["masa_efficiency.py", *args])
    with pytest.raises(SystemExit) as exit_info:
        masa_efficiency.main()
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_every_task_has_a_warm_start_style_and_a_target():
    from masa_megatron.data.synthetic import SOLUTION_STYLES
    for name, task in masa_efficiency.TASKS.items():
        assert task.solution_style in SOLUTION_STYLES, name
        assert task.target_accuracy is not None or task.target_pool_accuracy is not None, name


def test_target_and_lr_flags_replace_the_tasks_target_and_the_demos_lr(monkeypatch, tmp_path):
    """--target reruns a recorded race with its own target and --lr sets the policy's learning
    rate; --from-runs summarises without training, so both are read back from the results."""
    import json
    metrics = rows({1: 0.45, 2: 0.52}, 100.0, 1.0)   # 0.4375 at step 1, 0.51 at step 2
    work = tmp_path / "work"
    run = masa_efficiency.run_dir(work, "grpo", 0)
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in metrics))
    monkeypatch.setattr(masa_efficiency, "RESULTS_DIR", tmp_path)
    monkeypatch.setattr("sys.argv", ["masa_efficiency.py", "--task", "columns", "--pool", "32",
                                     "--seeds", "1", "--configs", "grpo", "--target", "0.51",
                                     "--lr", "1e-4", "--from-runs", str(work), "--name", "t"])
    masa_efficiency.main()
    written = json.loads((tmp_path / "t.json").read_text())
    assert written["settings"]["target_accuracy"] == 0.51
    assert written["settings"]["budget"]["lr"] == 1e-4
    assert written["per_seed"]["0"]["grpo"]["reached"]["step"] == 2


def test_plot_writes_a_png_from_a_results_dict(tmp_path):
    per_seed = {str(seed): {name: masa_efficiency.time_to_target(
        rows({0: 0.3, 2: 0.4 + 0.01 * seed, 4: 0.5}, tokens, 1.0), 0.45)
        for name, tokens in (("grpo", 100.0), ("masa_efficient/head", 80.0))}
        for seed in (0, 1)}
    results = {"per_seed": per_seed, "settings": {
        "target_accuracy": 0.45, "pool": 32, "budget": {"efficient_start": 0.5, "steps": 4}}}
    out = masa_efficiency.plot_races(results, tmp_path / "race.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
