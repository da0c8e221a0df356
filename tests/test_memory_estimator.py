"""The memory estimator models the colocated cycle phase by phase (train/handoff.py): the peak is
the largest phase, offloading decides what of the trainer sits beside SGLang, and SGLang's KV
cache follows from mem_fraction of the memory free when the servers start."""
from pathlib import Path

import pytest

from masa_megatron.memory_estimator import (CUDA_CONTEXT_GIB, GPU_MEMORY_GIB, SGLANG_RUNTIME_GIB,
                                            estimate, format_estimate)
from recipes import get_recipe, get_recipe_info, list_recipes, markdown_recipe_table
from recipes.qwen3 import ARCHS

GPU_RECIPES = [n for n in list_recipes() if get_recipe_info(n).gpus_per_node]
TRAINER_STATE = ("weights", "gradients", "optimizer")


def _cfg(name="qwen3_8b_masa_1n8g"):
    return get_recipe(name), get_recipe_info(name).arch


def test_peak_is_the_largest_phase_not_the_sum():
    est = estimate(*_cfg())
    totals = est.phase_totals
    assert set(totals) == {"generation", "weight_sync", "update"}
    assert est.total == max(totals.values()) == totals[est.peak_phase]
    assert est.total < sum(totals.values())
    # every phase is the sum of its own components
    for phase, parts in est.phases.items():
        assert totals[phase] == pytest.approx(sum(parts.values()))
    assert est.dominant == max(est.phases[est.peak_phase], key=est.phases[est.peak_phase].get)


def test_offload_off_puts_the_trainer_state_and_its_allocator_cache_into_generation():
    cfg, arch = _cfg()
    offloaded = estimate(cfg, arch)
    assert not set(TRAINER_STATE) & set(offloaded.phases["generation"])
    cfg.rollout.offload_train_state = False
    resident = estimate(cfg, arch)
    gen = resident.phases["generation"]
    for part in TRAINER_STATE:
        assert gen[part] == pytest.approx(resident.components[part])
    # no empty_cache without offload: the update's activations/logits stay reserved
    cached = sum(resident.components[k] for k in ("activations", "logits", "fragmentation"))
    assert gen["trainer_cache"] == pytest.approx(cached)
    assert resident.phase_totals["generation"] - offloaded.phase_totals["generation"] == \
        pytest.approx(sum(resident.components[k] for k in TRAINER_STATE) + cached)


def test_update_phase_holds_only_sglang_runtime_beside_the_trainer():
    cfg, arch = _cfg()
    update = estimate(cfg, arch).phases["update"]
    assert update["sglang_runtime"] == SGLANG_RUNTIME_GIB
    assert not {"sglang_weights", "sglang_kv", "sglang_graphs"} & set(update)
    assert {"weights", "gradients", "optimizer", "activations", "logits"} <= set(update)


def test_weight_sync_holds_trainer_params_sglang_weights_and_one_bucket():
    cfg, arch = _cfg()
    sync = estimate(cfg, arch).phases["weight_sync"]
    assert sync["sglang_weights"] == pytest.approx(arch.total_params * 2 / cfg.rollout.sglang_tp
                                                   / 2 ** 30)
    assert sync["sync_bucket"] == pytest.approx(cfg.rollout.weight_sync_bucket_mb / 1024)
    assert "weights" in sync and not {"gradients", "optimizer", "sglang_kv"} & set(sync)


def test_kv_cache_is_mem_fraction_of_the_memory_free_when_servers_start():
    cfg, arch = _cfg()
    est = estimate(cfg, arch)
    free_at_start = GPU_MEMORY_GIB - CUDA_CONTEXT_GIB - SGLANG_RUNTIME_GIB
    pool = cfg.rollout.sglang_mem_fraction * free_at_start
    gen = est.phases["generation"]
    assert gen["sglang_weights"] + gen["sglang_kv"] == pytest.approx(pool)
    kv_bytes = gen["sglang_kv"] * cfg.rollout.sglang_tp * 2 ** 30
    assert est.kv_tokens == int(kv_bytes // arch.kv_cache_bytes_per_token())
    # the trainer allocates after the servers started: its size does not shrink the KV cache
    cfg.rollout.offload_train_state = False
    cfg.grpo.micro_batch_tokens *= 2
    assert estimate(cfg, arch).kv_tokens == est.kv_tokens


def test_meta_head_forward_during_rollouts_brings_params_beside_the_pool():
    cfg, arch = _cfg()
    cfg.masa.predictor = "head"
    est = estimate(cfg, arch)
    head = est.phases["head_forward"]
    gen = est.phases["generation"]
    assert head["weights"] == pytest.approx(est.components["weights"])
    assert head["sglang_kv"] == gen["sglang_kv"] and head["head_forward"] > 0
    assert est.phase_totals["head_forward"] > est.phase_totals["generation"]
    cfg.masa.predictor = "text"
    assert "head_forward" not in estimate(cfg, arch).phases


def test_disaggregated_trainer_has_only_the_update_phase():
    est = estimate(*_cfg("qwen3_14b_masa_2n8g"))
    assert set(est.phases) == {"update"} and "sglang_runtime" not in est.phases["update"]
    assert est.kv_tokens > 100_000         # one SGLang TP 2 server on its own node


def test_format_names_the_peak_phase_and_what_dominates_it():
    est = estimate(*_cfg())
    text = format_estimate(est, "x")
    assert f"peak: {est.peak_phase}" in text and est.dominant in text and "fits" in text


@pytest.mark.parametrize("name", GPU_RECIPES)
def test_every_gpu_recipe_peak_phase_is_under_80_gib(name):
    est = estimate(get_recipe(name), get_recipe_info(name).arch)
    assert est.total < GPU_MEMORY_GIB, format_estimate(est, name)


def test_docs_recipe_table_is_the_estimators():
    """docs/launching.md carries the table `markdown_recipe_table()` prints, so it cannot drift."""
    docs = (Path(__file__).parents[1] / "docs" / "launching.md").read_text()
    table = markdown_recipe_table()
    assert table in docs, ("docs/launching.md's recipe table differs from the estimator's; "
                           "paste `masa recipes --markdown`:\n" + table)
    assert ARCHS["8b"].name.split("-")[1] in table
