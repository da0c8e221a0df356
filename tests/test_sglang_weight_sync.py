"""Weight-sync building blocks without a server: buckets, the SGLang tensor payload format (our
serializer against the stand-in's independent SGLang-style decoder, in another process), the
weight check, the data-parallel flow without torch.distributed, colocation offload on CPU."""
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # for tests.sglang_standin

from masa_megatron.rollout.sglang_launch import EngineError  # noqa: E402
from masa_megatron.rollout.weight_sync import compare_weights  # noqa: E402
from masa_megatron.rollout.weight_sync.buckets import (bucketize, dtype_name,  # noqa: E402
                                                       flatten_bucket, unflatten_bucket)
from masa_megatron.rollout.weight_sync.tensor import (bucket_payload,  # noqa: E402
                                                      serialize_for_sglang)
from tests.sglang_standin.payload import ALLOWED_MODULE_PREFIXES, decode, named_tensors  # noqa

NAMED = [("model.embed_tokens.weight", torch.randn(11, 8)),
         ("model.layers.0.self_attn.q_proj.weight", torch.randn(8, 8)),
         ("model.norm.weight", torch.rand(8)),
         ("lm_head.weight", torch.randn(11, 8).to(torch.bfloat16))]


def test_bucketize_respects_size_and_dtype():
    buckets = list(bucketize(NAMED, 400))
    assert [[n for n, _ in b] for b in buckets] == [        # 352 B, 256 + 32 B, 176 B (bf16)
        ["model.embed_tokens.weight"],
        ["model.layers.0.self_attn.q_proj.weight", "model.norm.weight"], ["lm_head.weight"]]
    big = list(bucketize(NAMED, 10_000))
    assert [len(b) for b in big] == [3, 1]                    # the bf16 tensor starts a bucket
    with pytest.raises(ValueError):
        list(bucketize(NAMED, 0))


def test_flatten_round_trip():
    flat, meta = flatten_bucket(NAMED[:3])
    assert flat.shape == (11 * 8 + 64 + 8,) and [m.start_idx for m in meta] == [0, 88, 152]
    for (name, t), (name2, t2) in zip(NAMED[:3], unflatten_bucket(flat, meta)):
        assert name == name2 and torch.equal(t, t2)
    with pytest.raises(ValueError, match="one dtype"):
        flatten_bucket(NAMED)
    assert dtype_name(torch.bfloat16) == "bfloat16" and getattr(torch, dtype_name(torch.float32))


_DECODE = """
import sys, json
sys.path.insert(0, {root!r})
from tests.sglang_standin.payload import decode, named_tensors
for line in sys.stdin:
    fmt, text = json.loads(line)
    obj, seen = decode(text)
    print(json.dumps({{"globals": sorted(map(list, set(seen))),
                      "tensors": [[n, list(t.shape), str(t.dtype), t.double().sum().item()]
                                  for n, t in named_tensors(obj, fmt)]}}), flush=True)
"""


def test_tensor_payload_decodes_in_another_process():
    """The server is another process: CPU tensors travel by shared-memory file, and everything
    the pickle references is on SGLang's unpickler allow-list. Both load formats."""
    import json

    bucket = NAMED[:3]
    formats = ["flattened_bucket", None]
    lines = "".join(json.dumps([f, serialize_for_sglang(bucket_payload(bucket, f))]) + "\n"
                    for f in formats)
    root = str(Path(__file__).resolve().parents[1])
    run = subprocess.run([sys.executable, "-c", _DECODE.format(root=root)], input=lines,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    outs = [json.loads(line) for line in run.stdout.strip().splitlines()]
    assert len(outs) == len(formats)
    for fmt, out in zip(formats, outs):
        assert [t[0] for t in out["tensors"]] == [n for n, _ in bucket]
        for (_, shape, dtype, total), (_, ref) in zip(out["tensors"], bucket):
            assert shape == list(ref.shape) and dtype == str(ref.dtype)
            assert total == pytest.approx(ref.double().sum().item(), abs=1e-9)
        for module, _ in out["globals"]:
            assert any((module + ".").startswith(p) for p in ALLOWED_MODULE_PREFIXES), module
        metadata = ["sglang.srt.weight_sync.tensor_bucket", "FlattenedTensorMetadata"]
        assert (metadata in out["globals"]) == (fmt == "flattened_bucket")


def test_payload_decoder_blocks_foreign_globals():
    evil = pickle.dumps(subprocess.Popen)
    import base64

    with pytest.raises(pickle.UnpicklingError, match="blocked"):
        decode(base64.b64encode(evil).decode())
    obj, _ = decode(serialize_for_sglang(bucket_payload(NAMED[3:], "flattened_bucket")))
    ((name, tensor),) = named_tensors(obj, "flattened_bucket")
    assert name == "lm_head.weight" and torch.equal(tensor, NAMED[3][1])


def test_compare_weights():
    expected = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    assert compare_weights("w", expected, [[1.0, 2.0], [3.0, 4.0]], rtol=0, atol=0) is None
    assert "1 of 4 values differ" in compare_weights("w", expected, [[1.0, 2.0], [3.0, 4.5]],
                                                     rtol=1e-6, atol=1e-7)
    assert "sent 2 values" in compare_weights("w", expected, [1.0, 2.0], rtol=0, atol=0)


def test_dp_flow_without_distributed_calls_the_engine():
    from masa_megatron.rollout.dp_flow import generate_in_model_parallel_group

    assert generate_in_model_parallel_group(lambda reqs: [r * 2 for r in reqs], [1, 2]) == [2, 4]


def test_colocate_offload_is_a_logged_no_op_on_cpu(caplog):
    import logging

    from masa_megatron.rollout.colocate import (memory_metrics, offload_train_state,
                                                reload_train_state)

    if torch.cuda.is_available():
        pytest.skip("CPU behaviour")
    model = torch.nn.Linear(4, 4)
    before = model.weight.detach().clone()
    with caplog.at_level(logging.INFO, logger="masa_megatron.rollout.colocate"):
        state = offload_train_state([model], torch.optim.Adam(model.parameters()))
        metrics = reload_train_state(state)
    assert "no CUDA" in caplog.text
    assert set(state.metrics) == {"memory/offloaded/rss_gb"} and state.metrics[
        "memory/offloaded/rss_gb"] > 0
    assert set(metrics) == {"memory/reloaded/rss_gb"}
    assert torch.equal(model.weight, before)
    assert set(memory_metrics("x")) == {"memory/x/rss_gb"}


def test_unknown_weight_sync_name_is_a_clear_error():
    from masa_megatron.rollout.sglang_launch import EngineError
    from masa_megatron.rollout.weight_sync import SyncTarget, build_weight_sync

    with pytest.raises(EngineError, match="rollout.weight_sync='nccl'"):
        build_weight_sync("nccl", SyncTarget(urls=[], tp_sizes=[], http=None))


def test_standin_maps_sampling_seed_to_the_embedded_row_seed():
    """The stand-in serves SGLang's per-request sampling_seed s by giving the embedded engine a
    request seed x with mix_seed(x, 0) == s; if mix_seed changes, this inversion must follow."""
    import random

    from masa_megatron.rollout.embedded import mix_seed
    from tests.sglang_standin.backend import row_seed_to_request_seed

    rng = random.Random(0)
    for seed in [0, 1, 2 ** 63, 2 ** 64 - 1] + [rng.getrandbits(64) for _ in range(200)]:
        assert mix_seed(row_seed_to_request_seed(seed), 0) == seed


def _local_non_loopback_ipv4():
    import psutil
    for addrs in psutil.net_if_addrs().values():
        for a in addrs:
            if a.family.name == "AF_INET" and not a.address.startswith("127."):
                return a.address
    return None


def test_broadcast_sender_address_is_the_route_to_the_servers_and_checked():
    """The broadcast master address is the local address the servers are reached from (the
    route's source), not gethostbyname(gethostname()) (127.0.1.1 / 127.0.0.1 on many hosts);
    a configured one must be an address of this host; unresolvable servers and addresses name
    what to fix (issue 24, defect 1)."""
    from masa_megatron.rollout.weight_sync.broadcast import sender_address
    assert sender_address(["http://127.0.0.1:30000", "http://localhost:30001"]) == "127.0.0.1"
    mine = _local_non_loopback_ipv4()
    if mine is not None:     # a server on this host's network address: reached from it
        assert sender_address([f"http://{mine}:30000"]) == mine
    assert sender_address(["http://10.9.9.9:1"], configured="127.0.0.1") == "127.0.0.1"
    with pytest.raises(EngineError, match="rollout.weight_sync_master_address.*203.0.113.7"):
        sender_address(["http://127.0.0.1:1"], configured="203.0.113.7")  # not this host's
    with pytest.raises(EngineError, match="no-such-host.invalid"):
        sender_address(["http://no-such-host.invalid:30000"])
