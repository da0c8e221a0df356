"""HF -> Megatron -> HF is bit-exact; exported folders load and generate with transformers."""
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "dist_scripts"))

import harness  # noqa: E402
from masa_megatron.config import ModelConfig  # noqa: E402
from masa_megatron.model import build_gpt_model, export_hf_checkpoint, load_hf_weights  # noqa: E402
from masa_megatron.model.convert_cli import megatron_to_hf_main  # noqa: E402
from masa_megatron.model.tiny import make_tiny_hf_model  # noqa: E402
from tests.support.timeouts import outlasting  # noqa: E402


@pytest.mark.parametrize("case", list(harness.CASES))
def test_tp1_export_is_bit_exact(case):
    harness.assert_bit_exact(harness.shared_cases() / case, harness.tp1_export(case))


@pytest.mark.slow
@outlasting(900)                            # harness.launch_layout's torchrun
@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)], ids=["tp2", "pp2"])
def test_parallel_export_is_bit_exact(tp, pp):
    _, out = harness.launch_layout(tp, pp)
    for case in harness.CASES:
        harness.assert_bit_exact(harness.shared_cases() / case, out / "export" / case)


@pytest.mark.slow
@outlasting(900)                            # harness.launch_layout's torchrun
@pytest.mark.parametrize("case", ["llama", "qwen3_tied"])
def test_tp2_dist_checkpoint_exported_at_tp1_is_bit_exact(case, tmp_path):
    _, out = harness.launch_layout(2, 1)
    target = tmp_path / "hf"
    assert megatron_to_hf_main(["--ckpt", str(out / "dist" / case), "--out", str(target),
                                "--dtype", "fp32"]) == 0
    harness.assert_bit_exact(harness.shared_cases() / case, target)


def test_export_copies_metadata_and_generates_like_the_original():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source, exported = harness.shared_cases() / "llama", harness.tp1_export("llama")
    for name in ("config.json", "generation_config.json", "tokenizer.json",
                 "tokenizer_config.json", "model.safetensors.index.json"):
        assert (exported / name).is_file(), name
    tokenizer = AutoTokenizer.from_pretrained(exported)
    ids = tokenizer("w5 w17 w300 w4 w999", return_tensors="pt").input_ids
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    want = AutoModelForCausalLM.from_pretrained(source).generate(ids, **kwargs)
    got = AutoModelForCausalLM.from_pretrained(exported).generate(ids, **kwargs)
    assert torch.equal(got, want) and got.shape[1] == ids.shape[1] + 8


def test_sharded_source_and_bf16_sharded_export(tmp_path, parallel_per_test):
    source = tmp_path / "src"
    make_tiny_hf_model(source, "qwen2", seed=5, max_shard_size="100KB")
    assert len(list(source.glob("*.safetensors"))) > 1
    model = build_gpt_model(source, ModelConfig(hf_path=str(source)))
    load_hf_weights(model, source)
    out = export_hf_checkpoint(model, tmp_path / "out", dtype="bf16", source_dir=source,
                               max_shard_bytes=60_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    want, got = harness.hf_tensors(source), harness.hf_tensors(out)
    assert sorted(got) == sorted(want)
    for name, tensor in want.items():
        assert got[name].dtype == torch.bfloat16 and torch.equal(got[name],
                                                                 tensor.to(torch.bfloat16))
    assert index["metadata"]["total_size"] == sum(t.numel() * 2 for t in got.values())
    assert not list(tmp_path.glob(".out.tmp-*"))


def test_fp8_tensors_are_dequantised_on_export():
    from masa_megatron.model.hf_io import to_export_tensor

    x = torch.randn(4, 4).to(torch.float8_e4m3fn)
    out = to_export_tensor(torch.nn.Parameter(x, requires_grad=False), torch.bfloat16)
    assert out.dtype == torch.bfloat16 and torch.equal(out, x.to(torch.bfloat16))

    class FakeQuantized(torch.Tensor):  # stands in for TE's Float8Tensor
        def dequantize(self):
            return torch.full(self.shape, 2.0)

    fake = torch.zeros(2, 2).as_subclass(FakeQuantized)
    assert torch.equal(to_export_tensor(fake, torch.float32), torch.full((2, 2), 2.0))


def test_reads_into_a_non_cpu_tensor_go_through_host_memory(tmp_path):
    """A CUDA parameter has no numpy view to read into, so the reader stages its slice on the
    host and copies it over (the meta device stands in for CUDA here; the GPU check loads real
    CUDA parameters)."""
    from safetensors.torch import save_file

    from masa_megatron.model.safetensors_io import SafetensorsFile

    save_file({"w": torch.arange(12.0).reshape(3, 4)}, str(tmp_path / "m.safetensors"))
    file = SafetensorsFile(tmp_path / "m.safetensors")
    try:
        out = torch.empty(2, 4, device="meta")
        assert file.read("w", rows=slice(1, 3), out=out) is out
        host = torch.empty(2, 2)
        assert torch.equal(file.read("w", rows=slice(1, 3), cols=slice(2, 4), out=host),
                           torch.tensor([[6.0, 7.0], [10.0, 11.0]]))
    finally:
        file.close()
