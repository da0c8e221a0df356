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


def test_hf_to_megatron_to_hf_round_trip(tmp_path):
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
    assert _tool("convert_megatron_to_hf").main(
        ["--ckpt", str(ckpt), "--out", str(out), "--dtype", "fp32"]) == 1  # exists
    assert _tool("convert_megatron_to_hf").main(
        ["--ckpt", str(ckpt), "--out", str(out), "--dtype", "fp32", "--overwrite"]) == 0
    harness.assert_bit_exact(source, out)
