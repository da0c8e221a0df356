"""Paper reproduction choices (docs/reproducing.md): every one has the spec's behaviour by
default, the paper recipes select the reference's, and the in-loop validation reads its fields."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from masa_megatron.config import ConfigError, ExperimentConfig, load_config
from masa_megatron.config_checks import optimizer_steps_per_rl_step, validate_static
from recipes import get_recipe, list_recipes

MODEL = ["model.hf_path=/m"]
PAPER_RECIPES = [n for n in list_recipes() if "_paper_" in n]
REPO = Path(__file__).resolve().parents[1]


def test_a_default_config_resolves_to_todays_behaviour():
    cfg = load_config(overrides=MODEL)
    g, m, t = cfg.grpo, cfg.masa, cfg.trainer
    assert (g.mini_batch_sequences, g.mini_batches_per_step, g.balance_sequences) == (0, 1, False)
    assert optimizer_steps_per_rl_step(cfg) == 1
    assert (m.parser, m.notion_rules, m.audit_fraction, m.max_source) == \
        ("robust", "spec", 0.05, "response")
    assert cfg.data.solution_suffix is True
    assert (t.eval_top_p, t.eval_subset) == (None, 0)
    assert g.tis_cap is None


def test_paper_recipes_exist_for_every_size_and_method():
    assert len(PAPER_RECIPES) == 12 and "qwen3_8b_masa_paper_1n8g" in PAPER_RECIPES
    assert not [n for n in PAPER_RECIPES if n.endswith("_fp8")]


@pytest.mark.parametrize("name", PAPER_RECIPES)
def test_paper_recipes_resolve_with_every_reference_choice_set(name):
    cfg = load_config(base=get_recipe(name))        # what `masa train --recipe NAME` resolves
    g, m, t = cfg.grpo, cfg.masa, cfg.trainer
    assert (g.mini_batch_sequences, g.balance_sequences) == (128 * 16, True)
    assert (m.parser, m.notion_rules, m.audit_fraction) == ("reference", "reference", 0.0)
    assert (cfg.data.prompt_batch_size, g.group_size, m.meta_group_size) == (128, 16, 8)
    assert cfg.data.eval_files == ["/data/math/test.parquet"]
    assert (t.eval_every, t.eval_n, t.eval_meta_n) == (5, 1, 0)
    assert (t.eval_temperature, t.eval_top_p, t.eval_subset) == (1.0, 0.7, 500)
    assert cfg.model.fp8 is None
    # 128 x (16 + 8) = 3,072 sequences: 2,048 + 1,024; GRPO's 2,048: one
    assert optimizer_steps_per_rl_step(cfg) == (1 if m.mode == "grpo" else 2)


def test_masa_config_validate_accepts_a_paper_recipe():
    env = dict(os.environ, PYTHONPATH=str(REPO))
    result = subprocess.run([sys.executable, "-m", "masa_megatron.cli", "config", "validate",
                             "--recipe", "qwen3_8b_masa_paper_1n8g"], capture_output=True,
                            text=True, timeout=120, env=env, cwd=REPO)
    assert result.returncode == 0, result.stderr


BAD = [
    (["grpo.mini_batch_sequences=4", "grpo.mini_batches_per_step=2"],
     ["grpo.mini_batch_sequences", "not both"]),
    (["grpo.mini_batch_sequences=-1"], ["grpo.mini_batch_sequences", ">= 0"]),
    (["grpo.mini_batch_sequences=2048", "grpo.old_logprobs=policy"],
     ["grpo.old_logprobs", "3072", "2048"]),
    (["grpo.mini_batch_sequences=100", "parallel.world_size=8"],
     ["grpo.mini_batch_sequences", "100", "data-parallel size 8"]),
    (["masa.notion_rules=verl"], ["masa.notion_rules", "verl", "reference"]),
    (["trainer.eval_top_p=1.5"], ["trainer.eval_top_p", "1.5"]),
    (["trainer.eval_subset=-2"], ["trainer.eval_subset", "-2"]),
]


@pytest.mark.parametrize("overrides, words", BAD, ids=[" ".join(o) for o, _ in BAD])
def test_bad_reproduction_fields_are_named(overrides, words):
    with pytest.raises(ConfigError) as err:
        load_config(overrides=MODEL + overrides)
    assert all(w in str(err.value) for w in words), str(err.value)


def test_in_loop_validation_reads_top_p_and_a_fixed_seeded_subset(shared_data):
    """trainer.eval_top_p reaches the evaluator's sampling and trainer.eval_subset keeps the
    same seeded sample of data.eval_files every time (here 5 of amc23's 40)."""
    from masa_megatron.data.tiny_tokenizer import make_tiny_tokenizer
    from masa_megatron.eval.benchmarks import read_problems, seeded_sample
    from masa_megatron.train.main import EVAL_SUBSET_SEED, build_evaluator

    cfg = ExperimentConfig()
    cfg.model.hf_path = "/m"
    cfg.data.eval_files = [str(shared_data / "amc23.parquet")]
    cfg.trainer.eval_every, cfg.trainer.eval_top_p, cfg.trainer.eval_subset = 5, 0.7, 5
    validate_static(cfg)
    tokenizer = make_tiny_tokenizer(["a b c"] * 4, vocab_size=100)
    evaluator, problems = build_evaluator(cfg, None, tokenizer, None, None)
    assert evaluator.planner.cfg.rollout.top_p == 0.7 and cfg.rollout.top_p == 1.0
    expected = seeded_sample(read_problems(cfg.data.eval_files[0]).problems, 5, EVAL_SUBSET_SEED)
    assert [p.id for _, p in problems] == [p.id for p in expected]
    assert [p.id for _, p in build_evaluator(cfg, None, tokenizer, None, None)[1]] == \
        [p.id for p in expected]
    cfg.trainer.eval_subset, cfg.trainer.eval_top_p = 0, None        # defaults: all, rollout's
    evaluator, problems = build_evaluator(cfg, None, tokenizer, None, None)
    assert len(problems) == 40 and evaluator.planner.cfg.rollout.top_p == 1.0
