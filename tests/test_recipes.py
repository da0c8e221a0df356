"""Recipes build and validate, follow the spec's hyperparameters, and fit 80 GB by the estimator."""
import json

import pytest

from masa_megatron.config import ConfigError, load_config, to_yaml
from masa_megatron.config_checks import validate_static
from masa_megatron.errors import UserError
from masa_megatron.memory_estimator import GPU_MEMORY_GIB, ModelArch, estimate
from recipes import get_recipe, get_recipe_info, list_recipes, recipe_table
from recipes.qwen3 import ARCHS, LAYOUTS, METHODS, recipe_name

GPU_RECIPES = [n for n in list_recipes() if get_recipe_info(n).gpus_per_node]
CPU_RECIPES = [n for n in list_recipes() if not get_recipe_info(n).gpus_per_node]
TINY_MODEL = ["model.hf_path=/tmp/tiny-model"]


@pytest.mark.parametrize("name", list_recipes())
def test_every_recipe_builds_and_validates_statically(name):
    cfg = get_recipe(name)
    assert cfg.name == name
    validate_static(cfg)
    overrides = TINY_MODEL if name in CPU_RECIPES else []
    resolved = load_config(overrides=overrides, base=cfg)     # what `masa train --recipe` does
    assert to_yaml(resolved)


def test_grid_has_every_size_method_and_precision():
    expected = {recipe_name(size, method, fp8)
                for size in ("1p7b", "4b", "8b", "14b") for method in METHODS
                for fp8 in (False, True)}
    paper = {recipe_name(size, method, False, paper=True)
             for size in ("1p7b", "4b", "8b", "14b") for method in METHODS}
    assert expected | paper == set(GPU_RECIPES) and len(GPU_RECIPES) == 36
    assert "qwen3_8b_masa_paper_1n8g" in paper
    assert "qwen3_8b_masa_efficient_1n8g" in expected
    assert {"tiny_cpu_grpo", "tiny_cpu_masa", "tiny_cpu_masa_efficient"} == set(CPU_RECIPES)


@pytest.mark.parametrize("name", GPU_RECIPES)
def test_gpu_recipes_follow_the_reference_hyperparameters(name):
    cfg = get_recipe(name)
    assert cfg.data.prompt_batch_size == 128
    assert (cfg.grpo.group_size, cfg.masa.meta_group_size, cfg.grpo.kl_coef) == (16, 8, 0.0)
    o = cfg.optimizer
    assert (o.name, o.lr, o.weight_decay, o.clip_grad) == ("adam", 1e-6, 0.1, 1.0)
    assert (o.warmup_steps, o.schedule) == (20, "constant")
    r = cfg.rollout
    assert (r.max_prompt_length, r.max_response_length, r.temperature, r.top_p) == \
        (2048, 8192, 1.0, 1.0)
    assert cfg.trainer.steps == 314
    assert cfg.masa.mode in name
    assert cfg.model.hf_path.startswith("/models/Qwen3-") and cfg.model.dtype == "bf16"
    assert r.engine == "sglang" and r.weight_sync == ("tensor" if r.colocate else "broadcast")
    assert cfg.grpo.micro_batch_tokens >= r.max_prompt_length + r.max_response_length
    if name.endswith("_fp8"):
        assert (cfg.model.fp8, cfg.model.layer_spec) == ("hybrid", "te")
    else:
        assert cfg.model.fp8 is None


@pytest.mark.parametrize("name", GPU_RECIPES)
def test_fp8_recipes_correct_fp8_training_against_bf16_rollouts_by_truncated_is(name):
    cfg = get_recipe(name)
    if name.endswith("_fp8"):
        assert cfg.grpo.tis_cap is not None and cfg.grpo.tis_cap > 1.0
    else:
        assert cfg.grpo.tis_cap is None


def test_gpu_recipes_fit_80_gb_by_the_estimate():
    totals = {name: estimate(get_recipe(name), get_recipe_info(name).arch).total
              for name in GPU_RECIPES}
    too_big = {name: total for name, total in totals.items() if total >= GPU_MEMORY_GIB}
    assert not too_big, f"over {GPU_MEMORY_GIB} GiB: {too_big}\n{recipe_table()}"


def test_unknown_recipe_suggests_the_closest_name():
    with pytest.raises(UserError, match="did you mean 'qwen3_8b_masa_1n8g'"):
        get_recipe("qwen3_8b_mas_1n8g")


def test_tiny_recipe_needs_the_callers_model_folder():
    with pytest.raises(ConfigError, match="model.hf_path"):
        load_config(base=get_recipe("tiny_cpu_grpo"))
    cfg = load_config(overrides=TINY_MODEL, base=get_recipe("tiny_cpu_masa_efficient"))
    assert cfg.parallel.world_size == 2 and cfg.rollout.engine == "embedded"
    assert cfg.model.dtype == "fp32" and cfg.masa.mode == "masa_efficient"


def test_recipes_are_fresh_objects():
    get_recipe("qwen3_4b_masa_1n8g").trainer.steps = 1
    assert get_recipe("qwen3_4b_masa_1n8g").trainer.steps == 314


@pytest.mark.parametrize("size, total, non_embedding", [
    # Qwen3 technical report / model cards: parameters, non-embedding parameters (billions)
    ("1p7b", 1.7, 1.4), ("4b", 4.0, 3.6), ("8b", 8.2, 6.95), ("14b", 14.8, 13.2)])
def test_architecture_numbers_give_the_published_sizes(size, total, non_embedding):
    arch = ARCHS[size]
    assert arch.total_params / 1e9 == pytest.approx(total, rel=0.03)
    assert arch.layers * arch.layer_params / 1e9 == pytest.approx(non_embedding, rel=0.03)


def test_model_arch_reads_a_hugging_face_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({
        "hidden_size": 4096, "num_hidden_layers": 36, "num_attention_heads": 32,
        "num_key_value_heads": 8, "head_dim": 128, "intermediate_size": 12288,
        "vocab_size": 151936, "tie_word_embeddings": False}))
    arch = ModelArch.from_hf_config(tmp_path)
    assert arch.layer_params == ARCHS["8b"].layer_params
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(UserError, match="num_attention_heads"):
        ModelArch.from_hf_config(tmp_path)


def test_estimator_components_follow_the_documented_formulas():
    cfg, arch = get_recipe("qwen3_8b_masa_1n8g"), ARCHS["8b"]
    base = estimate(cfg, arch).components
    params_per_rank = (arch.layers * arch.layer_params + 2 * arch.vocab * arch.hidden) / 4
    assert base["weights"] == pytest.approx(params_per_rank * 2 / 2 ** 30)
    assert base["gradients"] == pytest.approx(params_per_rank * 4 / 2 ** 30)
    assert base["optimizer"] == pytest.approx(params_per_rank * 12 / 2 / 2 ** 30)   # DP 2
    # 6 bytes per logit element + the entropy's chunks (benchmarks/vocab_parallel_memory.py)
    assert base["logits"] == pytest.approx(16384 * arch.vocab / 4 * 6 / 2 ** 30 + 0.2)
    # Qwen3-8B, TP 1, no SP: 33.5 h bytes per token per layer (Korthikanti's 34 h for GPT)
    cfg.parallel.tensor_model_parallel_size, cfg.parallel.sequence_parallel = 1, False
    per_token_layer = estimate(cfg, arch).components["activations"] * 2 ** 30 / 16384 / arch.layers
    assert per_token_layer / arch.hidden == pytest.approx(33.5, abs=0.1)
    cfg.parallel.use_distributed_optimizer = False
    assert estimate(cfg, arch).components["optimizer"] == pytest.approx(4 * base["optimizer"] * 2)


def test_full_recompute_keeps_unit_inputs_and_rebuilds_one_unit():
    cfg, arch = get_recipe("qwen3_8b_masa_1n8g"), ARCHS["8b"]   # TP 4 with SP
    stored = estimate(cfg, arch).components["activations"]
    per_layer = stored / arch.layers
    layer_input = 16384 * 2 * arch.hidden / 4 / 2 ** 30     # bf16 hidden state, s / TP rows
    cfg.model.recompute = "selective"                        # nothing to save with flash attention
    assert estimate(cfg, arch).components["activations"] == pytest.approx(stored)
    cfg.model.recompute, cfg.model.recompute_method, cfg.model.recompute_num_layers = \
        "full", "uniform", 4
    assert estimate(cfg, arch).components["activations"] == pytest.approx(9 * layer_input + 4 * per_layer)
    cfg.model.recompute_method = "block"
    assert estimate(cfg, arch).components["activations"] == pytest.approx(
        4 * layer_input + (arch.layers - 4 + 1) * per_layer)


def test_recipe_table_lists_every_recipe_with_its_estimate():
    table = recipe_table()
    assert all(name in table for name in list_recipes())
    assert "GiB/GPU" in table and "TP/PP/DP" in table and "1+1" in table
    assert LAYOUTS["14b"].scale == "2n8g"
