"""The converter tools: --help, and HF -> Megatron dist checkpoint -> HF bit-exact at TP=1."""
import importlib.util
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "dist_scripts"))

import harness  # noqa: E402

TOOLS = Path(__file__).parent.parent / "tools"


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(name, TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", ["convert_hf_to_megatron", "convert_megatron_to_hf"])
def test_tools_have_main_and_help(name, capsys):
    main = _tool(name).main
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    assert "--out" in capsys.readouterr().out


def test_hf_to_megatron_to_hf_round_trip(tmp_path, capsys):
    source = harness.shared_cases() / "llama"
    ckpt, out = tmp_path / "mcore", tmp_path / "hf"
    assert _tool("convert_hf_to_megatron").main(["--hf", str(source), "--out", str(ckpt)]) == 0
    meta = json.loads((ckpt / "masa_model.json").read_text())
    assert meta["family"] == "llama" and meta["padded_vocab_size"] == 1024
    assert (ckpt / "hf" / "tokenizer.json").is_file()
    assert _tool("convert_megatron_to_hf").main(
        ["--ckpt", str(ckpt), "--out", str(out), "--dtype", "fp32"]) == 0
    harness.assert_bit_exact(source, out)
    assert (out / "tokenizer.json").is_file()
    capsys.readouterr()
    assert _tool("convert_megatron_to_hf").main(
        ["--ckpt", str(ckpt), "--out", str(out), "--dtype", "fp32"]) == 2  # exists
    err = capsys.readouterr().err
    assert "--overwrite" in err and "overwrite=True" not in err and str(out) in err
    assert _tool("convert_megatron_to_hf").main(
        ["--ckpt", str(ckpt), "--out", str(out), "--dtype", "fp32", "--overwrite"]) == 0
    harness.assert_bit_exact(source, out)


def test_mcore2hf_writes_the_checkpoints_own_dtype_by_default_and_says_which(tmp_path, capsys):
    source = harness.shared_cases() / "llama"
    for dtype in ("fp32", "bf16"):
        ckpt, out = tmp_path / f"mcore_{dtype}", tmp_path / f"hf_{dtype}"
        assert _tool("convert_hf_to_megatron").main(
            ["--hf", str(source), "--out", str(ckpt), "--dtype", dtype]) == 0
        capsys.readouterr()
        assert _tool("convert_megatron_to_hf").main(["--ckpt", str(ckpt), "--out", str(out)]) == 0
        assert f"dtype {dtype}" in capsys.readouterr().err
        written = json.loads((out / "config.json").read_text())["torch_dtype"]
        assert written == {"fp32": "float32", "bf16": "bfloat16"}[dtype]
    harness.assert_bit_exact(source, tmp_path / "hf_fp32")  # the default round trip is lossless


def test_hf2mcore_refuses_an_existing_out_unless_overwrite(tmp_path, capsys):
    source = harness.shared_cases() / "llama"
    out = tmp_path / "mcore"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    convert = _tool("convert_hf_to_megatron").main
    assert convert(["--hf", str(source), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert str(out) in err and "--overwrite" in err
    assert (out / "keep.txt").read_text() == "user data"
    assert convert(["--hf", str(source), "--out", str(out), "--overwrite"]) == 0
    assert (out / "masa_model.json").is_file() and not (out / "keep.txt").exists()
