"""Config loading, overrides and static validation: every bad config is one clear message."""
import subprocess
import sys

import pytest

from masa_megatron.config import ConfigError, ExperimentConfig, load_config, to_yaml
from masa_megatron.config_checks import validate_static

MODEL = ["model.hf_path=/tmp/some-model"]


def write(tmp_path, text):
    path = tmp_path / "exp.yaml"
    path.write_text(text)
    return path


def test_defaults_follow_the_spec_hyperparameters():
    cfg = load_config(overrides=MODEL)
    assert (cfg.grpo.group_size, cfg.masa.meta_group_size) == (16, 8)
    assert (cfg.grpo.clip_low, cfg.grpo.clip_high, cfg.grpo.dual_clip) == (0.2, 0.28, 10.0)
    assert cfg.grpo.loss_agg == "token-mean" and cfg.grpo.kl_coef == 0.0
    assert (cfg.optimizer.lr, cfg.optimizer.weight_decay, cfg.optimizer.warmup_steps) == \
        (1e-6, 0.1, 20)
    assert (cfg.masa.efficient_start_step, cfg.masa.gate_sigma, cfg.masa.cutoff_margin) == \
        (80, 0.1, 2.0)


def test_yaml_file_and_dotted_overrides_merge_in_order(tmp_path):
    path = write(tmp_path, "model:\n  hf_path: /m\ngrpo:\n  group_size: 4\nmasa:\n  mode: grpo\n")
    cfg = load_config(path, ["grpo.group_size=8", "rollout.temperature=0.6"])
    assert cfg.model.hf_path == "/m" and cfg.grpo.group_size == 8
    assert cfg.masa.mode == "grpo" and cfg.rollout.temperature == 0.6


def test_resolved_yaml_round_trips(tmp_path):
    cfg = load_config(overrides=MODEL + ["masa.mode=masa_efficient"])
    path = write(tmp_path, to_yaml(cfg))
    assert load_config(path) == cfg


BAD_CONFIGS = [
    # (overrides, words the single message must contain)
    (["grpo.group_sise=4"], ["grpo.group_sise", "did you mean 'group_size'"]),
    (["modle.hf_path=/x"], ["modle", "did you mean 'model'"]),
    (["grpo.group_size=four"], ["grpo.group_size", "four"]),
    (["grpo.group_size=1"], ["grpo.group_size", "1", "at least 2"]),
    (["masa.mode=masa_eficient"], ["masa.mode", "masa_eficient", "did you mean 'masa_efficient'"]),
    (["masa.predictor=hed"], ["masa.predictor", "hed", "did you mean 'head'", "import path"]),
    (["masa.predictor=no_such_pkg.PREDICTOR"], ["masa.predictor", "cannot import"]),
    (["parallel.tensor_model_parallel_size=3", "parallel.world_size=8"],
     ["parallel.world_size", "8", "TP x PP x CP"]),
    (["parallel.tensor_model_parallel_size=0"], ["parallel.tensor_model_parallel_size", "0"]),
    (["rollout.top_p=1.5"], ["rollout.top_p", "1.5", "<= 1.0"]),
    (["rollout.temperature=0"], ["rollout.temperature", "0"]),
    (["grpo.loss_agg=mean"], ["grpo.loss_agg", "mean", "token-mean"]),
    (["grpo.dual_clip=0.5"], ["grpo.dual_clip", "0.5", "> 1"]),
    # no reference model is wired: a KL penalty passed validation, then failed at step 1
    (["grpo.kl_coef=0.05"], ["grpo.kl_coef", "0.05", "reference"]),
    (["grpo.old_logprobs=policy", "grpo.ppo_epochs=2"], ["grpo.old_logprobs", "ppo_epochs = 1"]),
    (["grpo.old_logprobs=rollout"], ["grpo.old_logprobs", "rollout", "recompute"]),
    (["model.fp8=hybrid", "model.layer_spec=local"], ["model.fp8", "hybrid", "Transformer Engine"]),
    (["model.fp8_param=true"], ["model.fp8_param", "model.fp8"]),
    (["parallel.sequence_parallel=true"], ["parallel.sequence_parallel", "tensor_model_parallel"]),
    (["parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true"],
     ["parallel.sequence_parallel", "embedded engine"]),
    (["trainer.ratio_tolerance=0"], ["trainer.ratio_tolerance", "0", "> 0"]),
    (["model.recompute=layers"], ["model.recompute", "layers", "full"]),
    (["model.recompute_method=blocks"], ["model.recompute_method", "blocks", "block"]),
    (["model.recompute_num_layers=0"], ["model.recompute_num_layers", "0"]),
    (["masa.meta_group_size=1"], ["masa.meta_group_size", "1"]),
    (["masa.audit_fraction=2"], ["masa.audit_fraction", "2"]),
    (["optimizer.lr=1e-6", "optimizer.min_lr=1e-3"], ["optimizer.min_lr", "0.001"]),
    (["trainer.eval_every=10"], ["trainer.eval_every", "data.eval_files"]),
    (["rollout.weight_sync=broadcast"], ["rollout.weight_sync", "broadcast", "embedded"]),
    (["grpo"], ["grpo", "key=value"]),
    (["data.train_files=[a, 'b"], ["data.train_files"]),
]


@pytest.mark.parametrize("overrides,words", BAD_CONFIGS, ids=[" ".join(o) for o, _ in BAD_CONFIGS])
def test_bad_config_gives_one_message_naming_field_and_value(overrides, words):
    with pytest.raises(ConfigError) as err:
        load_config(overrides=MODEL + overrides)
    message = str(err.value)
    assert "\n" not in message
    for word in words:
        assert word in message, f"{word!r} missing from: {message}"


def test_missing_required_model_path_is_named():
    with pytest.raises(ConfigError, match="model.hf_path"):
        load_config()


def test_missing_and_malformed_files_are_named(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = write(tmp_path, "grpo: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    listing = write(tmp_path, "- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(listing)


def test_unknown_key_in_yaml_names_file_and_suggests(tmp_path):
    path = write(tmp_path, "model:\n  hf_path: /m\nrollout:\n  temprature: 0.5\n")
    with pytest.raises(ConfigError, match=r"exp.yaml.*rollout.temprature.*temperature"):
        load_config(path)


def test_gpu_recipe_validates_statically_without_gpu():
    cfg = ExperimentConfig()
    cfg.model.hf_path = "/models/Qwen3-8B-Base"
    cfg.model.dtype, cfg.model.fp8, cfg.model.layer_spec = "bf16", "hybrid", "te"
    cfg.parallel.tensor_model_parallel_size, cfg.parallel.world_size = 4, 8
    cfg.rollout.engine, cfg.rollout.weight_sync = "sglang", "tensor"
    validate_static(cfg)  # no CUDA, no TE here: static checks still pass


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "masa_megatron.cli", *args],
                          capture_output=True, text=True, timeout=120)


def test_cli_config_show_prints_resolved_yaml(tmp_path):
    path = write(tmp_path, "model:\n  hf_path: /m\n")
    result = run_cli("config", "show", str(path), "grpo.group_size=4")
    assert result.returncode == 0, result.stderr
    assert "group_size: 4" in result.stdout and "hf_path: /m" in result.stdout


def test_cli_bad_config_exits_2_without_traceback(tmp_path):
    path = write(tmp_path, "model:\n  hf_path: /m\n")
    result = run_cli("config", "show", str(path), "grpo.group_size=1")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1 and "grpo.group_size" in result.stderr


def test_sglang_extra_args_may_not_set_a_flag_another_field_owns():
    from masa_megatron.config import ConfigError, ExperimentConfig
    from masa_megatron.config_checks import validate_static
    cfg = ExperimentConfig()
    cfg.rollout.sglang_extra_args = ["--chunked-prefill-size", "4096"]
    validate_static(cfg)
    cfg.rollout.sglang_extra_args = ["--disable-radix-cache", "--tp-size=4"]
    with pytest.raises(ConfigError, match=r"rollout.sglang_extra_args\[1\].*rollout.sglang_tp"):
        validate_static(cfg)


def test_the_environment_check_looks_for_the_configured_server_module(tmp_path):
    """rollout.sglang_server_module: its package must be importable here (the stand-in's is;
    a misspelt one is named)."""
    from masa_megatron.config_checks import validate_environment
    from masa_megatron.model.tiny import make_tiny_hf_model

    make_tiny_hf_model(tmp_path, "qwen3")
    base = [f"model.hf_path={tmp_path}", "rollout.engine=sglang", "model.layer_spec=local"]
    validate_environment(load_config(overrides=base + [
        "rollout.sglang_server_module=tests.sglang_standin.server"]))
    with pytest.raises(ConfigError, match="no_such_sglang .*rollout.sglang_server_module"):
        validate_environment(load_config(overrides=base + [
            "rollout.sglang_server_module=no_such_sglang.launch_server"]))
