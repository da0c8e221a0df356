"""Bad checkpoints and configs fail with errors naming the file and the tensor; a failed export
leaves no output folder behind."""
import json
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from masa_megatron.config import ModelConfig
from masa_megatron.model import (
    ModelLoadError, build_gpt_model, export_hf_checkpoint, family_for, load_hf_weights)
from masa_megatron.model.convert_cli import megatron_to_hf_main
from masa_megatron.model.tiny import make_tiny_hf_model


@pytest.fixture
def tiny(tmp_path, parallel_per_test):
    folder = tmp_path / "tiny"
    make_tiny_hf_model(folder, "llama", seed=1)
    return folder


def _load(folder: Path):
    model = build_gpt_model(folder, ModelConfig(hf_path=str(folder)))
    load_hf_weights(model, folder)


def test_unsupported_architecture_names_the_supported_ones():
    with pytest.raises(ModelLoadError) as err:
        family_for({"architectures": ["MistralForCausalLM"], "model_type": "mistral"})
    for name in ("MistralForCausalLM", "LlamaForCausalLM", "Qwen2ForCausalLM",
                 "Qwen3ForCausalLM"):
        assert name in str(err.value)


def test_unsupported_option_is_named():
    with pytest.raises(ModelLoadError, match="use_sliding_window=True"):
        family_for({"architectures": ["Qwen2ForCausalLM"], "use_sliding_window": True})


def test_missing_shard_names_file_and_tensor(tmp_path, parallel_per_test):
    folder = tmp_path / "sharded"
    make_tiny_hf_model(folder, "llama", seed=2, max_shard_size="100KB")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    victim = sorted(set(index["weight_map"].values()))[-1]
    (folder / victim).unlink()
    with pytest.raises(ModelLoadError, match=rf"{victim}: shard file is missing.*tensor '"):
        _load(folder)


def test_wrong_shape_names_file_and_tensor(tiny):
    tensors = load_file(str(tiny / "model.safetensors"))
    name = "model.layers.1.self_attn.o_proj.weight"
    tensors[name] = tensors[name][:, :32].contiguous()
    save_file(tensors, str(tiny / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match=rf"model\.safetensors: tensor '{name}' has shape "
                                             r"\[64, 32\].*needs \[64, 64\]"):
        _load(tiny)


def test_config_weights_mismatch_names_file_and_tensor(tiny):
    config = json.loads((tiny / "config.json").read_text())
    config["intermediate_size"] = 96
    (tiny / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match=r"model\.safetensors: tensor "
                                             r"'model\.layers\.0\.mlp\.gate_proj\.weight'"):
        _load(tiny)


def test_missing_tensor_is_named(tiny):
    tensors = load_file(str(tiny / "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(tiny / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match=r"tensor 'model\.layers\.1\.mlp\.up_proj\.weight' "
                                             r"is not in the checkpoint"):
        _load(tiny)


def test_truncated_file_names_file_and_tensor(tiny):
    path = tiny / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(ModelLoadError, match=r"model\.safetensors: truncated: tensor '"):
        _load(tiny)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ModelLoadError, match=r"model\.safetensors: truncated"):
        _load(tiny)


def test_failed_export_leaves_no_output_folder(tiny, tmp_path, monkeypatch):
    from masa_megatron.model.safetensors_io import SafetensorsWriter

    model = build_gpt_model(tiny, ModelConfig(hf_path=str(tiny)))
    load_hf_weights(model, tiny)
    real_write, calls = SafetensorsWriter.write, []

    def failing_write(self, *args):
        calls.append(self.path)
        if len(calls) == 5:
            raise OSError("disk full")
        real_write(self, *args)

    monkeypatch.setattr(SafetensorsWriter, "write", failing_write)
    with pytest.raises(OSError, match="disk full"):
        export_hf_checkpoint(model, tmp_path / "out", max_shard_bytes=50_000)
    assert len(calls) == 5
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))
    monkeypatch.undo()
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError):
        export_hf_checkpoint(model, tmp_path / "out")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]


def test_converter_reports_a_bad_checkpoint_folder(tmp_path, capsys):
    code = megatron_to_hf_main(["--ckpt", str(tmp_path / "nothing"), "--out",
                                str(tmp_path / "hf")])
    assert code == 2 and "masa_model.json" in capsys.readouterr().err
    assert not (tmp_path / "hf").exists()


@pytest.mark.parametrize("tp, field", [(3, "num_attention_heads=4"), (4, "num_key_value_heads=2")])
def test_tensor_parallel_size_that_does_not_divide_the_heads_is_one_config_error(
        tiny, monkeypatch, tp, field):
    from masa_megatron.model import builder
    monkeypatch.setattr(builder, "_parallel_sizes", lambda: (tp, 1, 1))
    with pytest.raises(ModelLoadError, match=rf"{field} is not divisible by the tensor-parallel "
                                             rf"size {tp}"):
        builder.transformer_config_from_hf(tiny, ModelConfig(hf_path=str(tiny)))


def test_model_load_errors_are_user_errors():
    from masa_megatron.errors import UserError
    assert issubclass(ModelLoadError, UserError)


def test_mcore2hf_of_a_truncated_shard_names_the_checkpoint_and_the_shard(tiny, tmp_path, capsys):
    from masa_megatron.model.convert_cli import hf_to_megatron_main
    ckpt = tmp_path / "mcore"
    assert hf_to_megatron_main(["--hf", str(tiny), "--out", str(ckpt)]) == 0
    shard = sorted(ckpt.glob("*.distcp"))[-1]
    shard.write_bytes(shard.read_bytes()[:1000])
    capsys.readouterr()
    assert megatron_to_hf_main(["--ckpt", str(ckpt), "--out", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err.strip()
    assert f"checkpoint {ckpt} is damaged: shard {shard.name} has 1000 bytes" in err
    assert len(err.splitlines()) == 1 and not (tmp_path / "hf").exists()


def test_train_config_whose_tp_cannot_split_the_heads_fails_before_any_rank_starts(tiny):
    from masa_megatron.config import ExperimentConfig
    from masa_megatron.config_checks import validate_environment
    from masa_megatron.errors import UserError
    cfg = ExperimentConfig()
    cfg.model.hf_path = str(tiny)
    cfg.parallel.tensor_model_parallel_size = 3
    with pytest.raises(UserError, match=r"parallel.tensor_model_parallel_size' = 3: .*config.json: "
                                        r"num_attention_heads=4 is not divisible"):
        validate_environment(cfg)


def test_train_config_whose_uniform_recompute_cannot_group_a_stages_layers_fails_before_start(tiny):
    from masa_megatron.config import ExperimentConfig
    from masa_megatron.config_checks import validate_environment
    from masa_megatron.errors import UserError
    cfg = ExperimentConfig()
    cfg.model.hf_path = str(tiny)
    cfg.model.recompute, cfg.model.recompute_num_layers = "full", 3
    with pytest.raises(UserError, match=r"model.recompute_num_layers' = 3: .*config.json: .*2 "
                                        r"layers of each pipeline stage"):
        validate_environment(cfg)
    cfg.model.recompute_method = "block"
    validate_environment(cfg)
