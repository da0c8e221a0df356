"""`masa rehearse`: the shrinker keeps what shapes each recipe's run (fast, no processes), the
checks fail on what is wrong, and one real rehearsal of the smallest recipe at its topology."""
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("megatron.core")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))   # for tests.sglang_standin


def test_a_standin_started_by_a_torchrun_rank_runs_its_own_world(tmp_path, monkeypatch):
    """A colocated trainer rank launches the servers, so they inherit torchrun's RANK,
    WORLD_SIZE, MASTER_ADDR/PORT and TORCHELASTIC_USE_AGENT_STORE (with which even a tcp://
    rendezvous waits for torchrun's store); the stand-in (like SGLang) must not join the trainer's
    world with them (it waited there forever) but start on its own."""
    from masa_megatron.model.tiny import make_tiny_hf_model
    from masa_megatron.ports import free_port
    from tests.sglang_standin import start_standin

    make_tiny_hf_model(tmp_path / "tiny", "qwen3", seed=1)
    for name, value in (("RANK", "0"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "0"),
                        ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(free_port())),
                        ("TORCHELASTIC_RUN_ID", "none"), ("TORCHELASTIC_USE_AGENT_STORE", "True")):
        monkeypatch.setenv(name, value)
    server = start_standin(str(tmp_path / "tiny"), log_dir=str(tmp_path / "logs"),
                           health_timeout_s=90.0)
    server.stop()


# ---------------------------------------------------------------- the shrinker (no processes)

def _rehearsable():
    from recipes import get_recipe_info, list_recipes

    infos = [get_recipe_info(n) for n in list_recipes()]
    return [i.name for i in infos if i.arch is not None and i.build().rollout.colocate]


def test_every_single_node_gpu_recipe_is_rehearsable():
    """27 recipes: {1.7B, 4B, 8B} x {grpo, masa, masa_efficient} x {bf16, fp8, paper}."""
    assert len(_rehearsable()) == 27


@pytest.mark.parametrize("name", _rehearsable())
def test_the_tiny_model_keeps_what_the_real_one_has(name):
    from recipes import get_recipe_info

    from masa_megatron.model.builder import padded_vocab_size
    from masa_megatron.model.hf_config import decoder_shape, parallel_layout_problem
    from masa_megatron.model.tiny import tiny_hf_config
    from masa_megatron.rehearsal.shrink import model_vocab_size, tiny_shape

    info = get_recipe_info(name)
    cfg, arch = info.build(), info.arch
    tiny = tiny_shape(arch, cfg)
    tp, stp = cfg.parallel.tensor_model_parallel_size, cfg.rollout.sglang_tp
    assert tiny.family == "qwen3"
    assert tiny.heads * arch.kv_heads == arch.heads * tiny.kv_heads        # GQA ratio
    assert tiny.kv_heads % tp == 0 and tiny.kv_heads % stp == 0 and tiny.heads % tp == 0
    assert (tiny.heads * tiny.head_dim == tiny.hidden) == (arch.heads * arch.head_dim
                                                           == arch.hidden)
    assert tiny.tied == arch.tie_word_embeddings
    assert tiny.intermediate % tp == 0 and tiny.layers % cfg.parallel.pipeline_model_parallel_size == 0
    tokenizer = 320
    vocab = model_vocab_size(tokenizer, cfg)
    assert tokenizer < vocab < padded_vocab_size(vocab, cfg.model.make_vocab_size_divisible_by, tp)
    hf = tiny_hf_config(tiny.family, **tiny.hf_kwargs(vocab, 64)).to_dict()
    assert parallel_layout_problem(decoder_shape(hf), tp,
                                   cfg.parallel.pipeline_model_parallel_size) is None


KEPT = ("parallel", "rollout.colocate", "rollout.weight_sync", "rollout.offload_train_state",
        "rollout.sglang_tp", "rollout.sglang_num_servers", "rollout.sglang_router",
        "rollout.engine", "masa.mode", "masa.predictor", "grpo.tis_cap", "grpo.loss_agg",
        "grpo.balance_sequences", "grpo.old_logprobs", "grpo.dynamic_sampling", "optimizer.name",
        "checkpoint.keep_last", "checkpoint.resume", "trainer.check_ratio_invariant",
        "masa.parser", "masa.notion_rules", "masa.audit_fraction")


def _get(cfg, dotted):
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


@pytest.mark.parametrize("name", _rehearsable())
def test_the_shrunk_recipe_keeps_what_shapes_the_run(name):
    """Layout, colocation, sync, offload, method, checkpointing and the loss stay the recipe's;
    the batch, lengths and steps shrink so that the layout check of the launcher passes and an
    RL step has as many optimizer steps as the recipe's."""
    from recipes import get_recipe_info
    from recipes.launch import check_layout, topology_for

    from masa_megatron.config import load_config
    from masa_megatron.config_checks import optimizer_steps_per_rl_step
    from masa_megatron.rehearsal.shrink import shrink_overrides

    info = get_recipe_info(name)
    recipe = info.build()
    overrides = shrink_overrides(recipe, prompt_tokens=559, steps=3) + [
        "model.hf_path=/tiny", "data.train_files=[/train.parquet]",
        "data.eval_files=[/eval.parquet]"]
    cfg = load_config(overrides=overrides, base=info.build())
    for field in KEPT:
        assert _get(cfg, field) == _get(recipe, field), field
    assert cfg.trainer.steps == 3 and cfg.checkpoint.save_every == 3
    assert cfg.model.dtype == "fp32" and cfg.model.fp8 is None and cfg.model.layer_spec == "local"
    assert not cfg.grpo.shared_prefix       # the padded layout, as the recipe's GPU run trains
    assert optimizer_steps_per_rl_step(cfg) == optimizer_steps_per_rl_step(recipe)
    assert cfg.masa.efficient_start_step < 3 or cfg.masa.mode != "masa_efficient"
    check_layout(cfg, topology_for(info, cfg))


# ---------------------------------------------------------------- the checks fail on what is wrong

GEN, REL, RES = "/generate", "/release_memory_occupation", "/resume_memory_occupation"
UPD = "/update_weights_from_tensor"
ALL = ["kv_cache", "weights", "cuda_graph"]
CYCLE = [[GEN, None], [GEN, None], [REL, ALL], ["/begin_weight_update", None],
         [RES, ["weights"]], [UPD, None], ["/end_weight_update", None],
         [RES, ["kv_cache", "cuda_graph"]], [GEN, None]]


def _handoff(calls, colocated=True):
    from masa_megatron.rehearsal.checks import handoff_order

    return handoff_order([{"recorded": True, "calls": calls}], colocated)


def test_the_handoff_cycle_passes_and_each_break_of_it_fails():
    assert _handoff(CYCLE).status == "PASS"
    generate_released = CYCLE[:7] + [[GEN, None]]          # generates before the KV cache is back
    assert "generate while ['cuda_graph', 'kv_cache'] released" in _handoff(generate_released).detail
    into_released = CYCLE[:4] + CYCLE[5:]                   # updates weights it has not resumed
    assert _handoff(into_released).status == "FAIL"
    assert "into released weights" in _handoff(into_released).detail
    never_handed = CYCLE + [[GEN, None]] * 2 + [[UPD, None], [GEN, None]]
    assert _handoff(never_handed).status == "FAIL"          # a second step without a release
    assert _handoff(CYCLE, colocated=False).status == "FAIL"


def test_a_loop_that_never_releases_is_not_wired_not_passed():
    check = _handoff([[UPD, None], [GEN, None], [UPD, None], [GEN, None]])
    assert check.status == "NOT-WIRED" and "not wired yet" in check.detail
    assert _handoff([[UPD, None], [GEN, None]], colocated=False).status == "PASS"


def test_weight_checksums_gaps_and_out_of_tokenizer_ids_fail_when_wrong():
    from masa_megatron.rehearsal import checks

    good = {"version": 1, "trainer": "aa", "servers": [["aa", "aa"]], "step": 0}
    assert checks.weight_sync_checksums([good], 1).status == "PASS"
    bad = dict(good, servers=[["aa", "ab"]])
    assert checks.weight_sync_checksums([good, bad], 2).status == "FAIL"
    assert checks.weight_sync_checksums([good], 2).status == "FAIL"        # a sync went missing
    row = {"step": 0, "max_gap": 2e-7, "tokens": 8, "oov_tokens": 1, "oov_logprobs_finite": True,
           "has_rollout_logprobs": True}
    assert checks.logprob_gap([row], [0]).status == "PASS"
    assert checks.logprob_gap([row], [0, 1]).status == "FAIL"               # step 1 unseen
    assert checks.logprob_gap([dict(row, max_gap=float("nan"))], [0]).status == "FAIL"
    assert checks.logprob_gap([dict(row, max_gap=2e-4)], [0]).status == "FAIL"
    fine = {0: {"train/loss": 0.1, "train/skipped_step": 0}}
    assert checks.out_of_tokenizer_ids([row], fine, 320, 339).status == "PASS"
    assert checks.out_of_tokenizer_ids([dict(row, oov_tokens=0)], fine, 320, 339).status == "FAIL"
    skipped = {0: {"train/loss": float("nan"), "train/skipped_step": 1}}
    assert checks.out_of_tokenizer_ids([row], skipped, 320, 339).status == "FAIL"
    assert checks.out_of_tokenizer_ids([dict(row, oov_logprobs_finite=False)], fine, 320,
                                       339).status == "FAIL"


def test_sequence_parallel_layers_fail_without_sp_or_with_an_unpadded_sequence():
    from masa_megatron.rehearsal.checks import sequence_parallel_layers

    sharded = [{"ColumnParallelLinear|sp=True|in_sp=True": [52], "RowParallelLinear|sp=True|"
                "in_sp=False": [104]}]
    assert sequence_parallel_layers(sharded, sp=True, tp=2).status == "PASS"
    unsharded = [{"ColumnParallelLinear|sp=False|in_sp=False": [104]}]
    assert sequence_parallel_layers(unsharded, sp=True, tp=2).status == "FAIL"
    assert sequence_parallel_layers(unsharded, sp=False, tp=2).status == "PASS"
    odd = [{"RowParallelLinear|sp=True|in_sp=False": [103]}]
    assert "not divisible by TP 2" in sequence_parallel_layers(odd, sp=True, tp=2).detail


# ---------------------------------------------------------------- real rehearsals

SMALLEST = "qwen3_1p7b_grpo_1n8g"     # 8 ranks (TP 1, DP 8), 8 colocated stand-ins
# one recipe per single-node layout, with masa_efficient (its k inside the 3 steps)
LAYOUTS = ["qwen3_1p7b_masa_efficient_1n8g",   # TP 1 / DP 8, 8 servers x TP 1
           "qwen3_4b_masa_efficient_1n8g",     # TP 2 + SP / DP 4, offload, 4 servers x TP 2
           "qwen3_8b_masa_efficient_1n8g"]     # TP 4 + SP / DP 2, offload, untied, 4 x TP 2


@pytest.mark.slow
@pytest.mark.parametrize("recipe", LAYOUTS)
def test_each_single_node_layout_rehearses_at_its_topology(recipe, tmp_path):
    """8 trainer ranks and the servers they launch, 3 steps, resume for one, export: every
    check passes, the colocation hand-off's call order included."""
    from masa_megatron.rehearsal.run import rehearse

    results = {c.name: c for c in rehearse(recipe, 3, tmp_path, say=lambda m: None)}
    lines = "\n".join(c.line() for c in results.values())
    for name in ("run", "resume", "checkpoint_resume", "weight_sync_checksum", "logprob_gap",
                 "out_of_tokenizer_ids", "sequence_parallel_layers", "export_hf",
                 "handoff_order"):
        assert results[name].status == "PASS", lines
    # each run syncs at start-up (the hand-off's first cycle), then after every step: 4 + 2
    assert "6 syncs" in results["weight_sync_checksum"].detail, lines


@pytest.mark.slow
def test_a_server_that_corrupts_the_weights_fails_the_rehearsal(tmp_path):
    """The same recipe against stand-ins that shift one tensor of every update by 1e-3: the
    checksum check names the differing TP ranks and the exit code is non-zero."""
    from masa_megatron.rehearsal.run import rehearse

    results = {c.name: c for c in rehearse(SMALLEST, 1, tmp_path, say=lambda m: None,
                                           server_module="tests.support.corrupting_standin")}
    lines = "\n".join(c.line() for c in results.values())
    assert results["run"].status == "PASS", lines
    sync = results["weight_sync_checksum"]
    assert sync.status == "FAIL" and "8 of 8 served TP ranks differ" in sync.detail, lines


def test_masa_rehearse_prints_one_line_per_check_and_fails_on_any_fail(monkeypatch, capsys):
    from masa_megatron.cli import main
    from masa_megatron.rehearsal import run
    from masa_megatron.rehearsal.checks import Check

    verdicts = [Check("run", "PASS", "exit code 0"), Check("handoff_order", "NOT-WIRED", "x")]
    monkeypatch.setattr(run, "rehearse", lambda recipe, steps, root: list(verdicts))
    assert main(["rehearse", SMALLEST, "--steps", "2"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[:2] == ["PASS run exit code 0", "NOT-WIRED handoff_order x"]
    verdicts.append(Check("logprob_gap", "FAIL", "step 1: max gap 0.2 >= 0.0001"))
    assert main(["rehearse", SMALLEST]) == 1
    assert "FAIL logprob_gap step 1: max gap 0.2 >= 0.0001" in capsys.readouterr().out
    assert main(["rehearse", SMALLEST, "--steps", "0"]) == 2


def test_a_recipe_without_a_real_model_is_refused_in_one_line(capsys):
    from masa_megatron.cli import main

    assert main(["rehearse", "tiny_cpu_grpo"]) == 2
    err = capsys.readouterr().err
    assert "recipe 'tiny_cpu_grpo' brings no model to shrink" in err and err.count("\n") == 1
    assert main(["rehearse", "qwen3_1p7b_grpo_1n8h"]) == 2
    assert "did you mean 'qwen3_1p7b_grpo_1n8g'" in capsys.readouterr().err
