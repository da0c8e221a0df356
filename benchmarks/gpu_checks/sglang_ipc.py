"""GPU checks of the SGLang colocation paths that need no SGLang install (run by sglang_ipc.sh).

1. CUDA IPC payloads: CUDA buckets (flattened and list formats) pickled by masa's SGLang
   serializer are decoded in another process by the stand-in's SGLang-style unpickler (allow-list,
   device UUID mapping as SGLang's patched rebuild_cuda_tensor does); checksums must match, the
   device argument must be the GPU's UUID, and the time to hand over a 1 GiB bucket is recorded.
2. Colocation offload: a Megatron model with DDP buffers and an Adam optimizer after one step is
   offloaded (memory must drop by at least the parameter + optimizer bytes) and reloaded
   (the next forward must give the same logits and a training step must run).

    python benchmarks/gpu_checks/sglang_ipc.py --out benchmarks/results/gpu_sglang_ipc.json
"""
from __future__ import annotations

import argparse
import json
import pickletools
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

_CHILD = """
import sys, json, time
sys.path.insert(0, {repo!r})
import torch
from tests.sglang_standin.payload import decode, named_tensors
for line in sys.stdin:
    fmt, text = json.loads(line)
    start = time.perf_counter()
    obj, seen = decode(text)
    named = named_tensors(obj, fmt)
    sums = [[n, t.double().sum().item(), str(t.device)] for n, t in named]
    torch.cuda.synchronize()
    print(json.dumps({{"fmt": fmt, "sums": sums, "seconds": time.perf_counter() - start,
                      "globals": sorted(map(list, set(seen)))}}), flush=True)
"""


def check_ipc() -> dict:
    from masa_megatron.rollout.weight_sync.tensor import bucket_payload, serialize_for_sglang

    gen = torch.Generator(device="cuda").manual_seed(0)
    bucket = [(f"model.layers.{i}.mlp.up_proj.weight",
               torch.randn(8192, 16384, device="cuda", generator=gen, dtype=torch.bfloat16))
              for i in range(4)]                                   # 4 x 256 MiB = 1 GiB
    uuid = str(torch.cuda.get_device_properties(0).uuid)
    lines, serialize_s = [], {}
    for fmt in ("flattened_bucket", None):
        start = time.perf_counter()
        text = serialize_for_sglang(bucket_payload(bucket, fmt))
        serialize_s[str(fmt)] = time.perf_counter() - start
        import base64
        raw = base64.b64decode(text)
        strings = {arg for op, arg, _ in pickletools.genops(raw) if isinstance(arg, str)}
        assert uuid in strings, "device UUID missing from the CUDA payload"
        lines.append(json.dumps([fmt, text]))
    run = subprocess.run([sys.executable, "-c", _CHILD.format(repo=str(REPO))],
                         input="\n".join(lines) + "\n", capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    want = [[n, t.double().sum().item()] for n, t in bucket]
    out = {}
    for line in run.stdout.strip().splitlines():
        got = json.loads(line)
        assert [[n, s] for n, s, _ in got["sums"]] == want, got["sums"]
        assert all(dev.startswith("cuda") for _, _, dev in got["sums"])
        out[str(got["fmt"])] = {"decode_and_checksum_s": got["seconds"],
                                "serialize_s": serialize_s[str(got["fmt"])],
                                "globals": got["globals"]}
    return {"bucket_bytes": sum(t.numel() * t.element_size() for _, t in bucket), **out}


def check_offload(tmp: Path) -> dict:
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from masa_megatron.config import ModelConfig, ParallelConfig
    from masa_megatron.model import build_gpt_model, load_hf_weights
    from masa_megatron.model.tiny import make_tiny_hf_model
    from masa_megatron.parallel import init_parallel
    from masa_megatron.rollout.colocate import offload_train_state, reload_train_state

    make_tiny_hf_model(tmp, "llama", hidden_size=1024, intermediate_size=4096,
                       num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=4,
                       head_dim=64, vocab_size=32000)
    init_parallel(ParallelConfig())
    model = build_gpt_model(str(tmp), ModelConfig(hf_path=str(tmp), layer_spec="local"))
    load_hf_weights(model, tmp)
    ddp = DistributedDataParallel(config=model.config, module=model,
                                  ddp_config=DistributedDataParallelConfig(
                                      grad_reduce_in_fp32=True, use_distributed_optimizer=False))
    opt = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-5, bf16=False,
                                                 params_dtype=torch.float32), [ddp])
    ids = torch.randint(0, 32000, (2, 65), device="cuda")
    pos = torch.arange(64, device="cuda").unsqueeze(0).expand(2, 64)

    def step():
        ddp.zero_grad_buffer()
        opt.zero_grad()
        ddp(ids[:, :-1], pos, None, labels=ids[:, 1:]).float().mean().backward()
        opt.step()
    step()
    torch.cuda.synchronize()
    with torch.no_grad():
        logits = ddp(ids[:, :-1], pos, None).float().clone()
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    before = torch.cuda.memory_allocated()
    state = offload_train_state([ddp], opt)
    during = torch.cuda.memory_allocated()
    metrics = reload_train_state(state)
    with torch.no_grad():
        again = ddp(ids[:, :-1], pos, None).float()
    step()
    freed = before - during
    assert freed >= 3 * params, f"offload freed {freed} bytes, parameters alone are {params}"
    assert torch.equal(logits, again), "logits changed across offload/reload"
    return {"param_bytes": params, "allocated_before": before, "allocated_offloaded": during,
            "freed_bytes": freed, "reload_metrics": metrics}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO / "benchmarks/results/gpu_sglang_ipc.json"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs CUDA")
    import tempfile

    result = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
              "ipc": check_ipc()}
    print("ipc:", json.dumps(result["ipc"], indent=1), flush=True)   # kept if offload fails
    with tempfile.TemporaryDirectory() as tmp:
        result["offload"] = check_offload(Path(tmp))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
