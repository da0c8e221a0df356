"""Our side of SGLang checked with SGLang's own code (the version pinned in setup.py).

SGLang cannot run here, but its request classes, JSON contract gate, serializer and argument
parsers import on CPU in a side environment (tools/sglang_side_env.sh, built by .ci/run). This
module drives the real client (SGLangEngine: generation, colocation release/resume, every weight
sync, abort, flush, the weight check) against a recording stand-in server, then hands what was
sent, tensor payloads made by our serializer, our launch command lines and the stand-in's schemas
and routes to tests/sglang_contract/side_check.py, which judges them with SGLang's classes. The
checker's own power is shown by cases built to fail (a renamed stand-in field, an unknown
request field, a payload pickled another way, an unknown launch flag).

Skipped, with the reason, only when the side environment is not built.
"""
import base64
import hashlib
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("megatron.core")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))                                  # for tests.sglang_standin
from tests.support.timeouts import outlasting  # noqa: E402

SIDE_PYTHON = REPO / (os.environ.get("SGLANG_SIDE_VENV") or ".venv-sglang") / "bin" / "python"
SIDE_CHECK = REPO / "tests" / "sglang_contract" / "side_check.py"
# Finished only with the stamp the build script writes last (a venv whose install failed is not).
SIDE_MISSING = subprocess.run(["bash", str(REPO / "tools" / "sglang_side_env.sh"), "--check"],
                              capture_output=True, text=True)

pytestmark = [outlasting(60, 900), pytest.mark.skipif(   # the recording, then the side check
    SIDE_MISSING.returncode != 0,
    reason=f"the SGLang side environment is not built: "
           f"{(SIDE_MISSING.stdout + SIDE_MISSING.stderr).strip()}; run `make sglang-side-env` "
           f"(CI's .ci/run does)")]


def _digest(tensor) -> str:
    data = tensor.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes()
    return hashlib.sha256(data).hexdigest()


def _expected(named) -> list:
    return [{"name": n, "shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", ""),
             "sha256": _digest(t)} for n, t in named]


def _sent_requests(tmp_path_factory) -> tuple[list, int, object]:
    """Every request the real client sends in one life cycle, recorded by the stand-in."""
    from masa_megatron.config import ModelConfig, ParallelConfig
    from masa_megatron.model import build_gpt_model, load_hf_weights
    from masa_megatron.model.tiny import make_tiny_hf_model
    from masa_megatron.parallel import destroy_parallel, init_parallel
    from masa_megatron.rollout.base import GenerationRequest, SamplingParams
    from masa_megatron.rollout.sglang import HTTPClient, SGLangEngine
    from tests.sglang_standin import start_standin

    tiny = tmp_path_factory.mktemp("contract_hf")
    make_tiny_hf_model(tiny, "qwen3", seed=5)
    server = start_standin(str(tiny), extra_args=["--record"],
                           log_dir=str(tmp_path_factory.mktemp("contract_logs")))
    requests = [
        GenerationRequest([5, 17, 30], SamplingParams(max_new_tokens=4, temperature=0.0)),
        GenerationRequest([8, 3], SamplingParams(max_new_tokens=4, temperature=1.0, seed=11, n=2)),
        GenerationRequest([40, 41], SamplingParams(max_new_tokens=4, temperature=0.7, top_k=20,
                                                   top_p=0.9, n=2)),
        GenerationRequest([9, 2], SamplingParams(max_new_tokens=4, temperature=0.0,
                                                 stop_token_ids=[7], ignore_eos=True)),
    ]
    try:
        init_parallel(ParallelConfig())
        model = build_gpt_model(str(tiny), ModelConfig(hf_path=str(tiny)))
        load_hf_weights(model, tiny)
        vocab = model.masa_hf_config["vocab_size"]
        syncs = [("disk", {}), ("tensor", {"load_format": "flattened_bucket"}),
                 ("tensor", {"load_format": None}), ("broadcast", {}),
                 ("broadcast", {"load_format": "flattened_bucket"})]
        for sync, options in syncs:
            engine = SGLangEngine(str(tiny), urls=[server.url], weight_sync=sync,
                                  sync_options=options, colocate=True, deterministic=True,
                                  verify_sync=True, bucket_mb=1, health_timeout_s=60,
                                  sync_dir=str(tmp_path_factory.mktemp("sync")))
            try:
                engine.generate(requests)
                engine.pause()                      # colocated: release, sync, resume
                engine.update_weights(model)
                engine.resume()
                engine.generate(requests[:1])
                engine.abort("masa-contract-rid")
                engine.abort()
                engine.flush_cache()
            finally:
                engine.shutdown()
        http = HTTPClient(timeout_s=30)
        try:
            stats = http.call(server.url, "/standin/stats", method="GET").body
        finally:
            http.close()
        return stats["bodies"], vocab, model
    finally:
        server.stop()
        destroy_parallel()


@pytest.fixture(scope="module")
def verdicts(tmp_path_factory):
    """One run of the side checker over everything (SGLang's imports take most of a minute)."""
    from masa_megatron.rollout.sglang_launch import ServerOptions, router_command, server_command
    from masa_megatron.rollout.weight_sync.buckets import stage_hf_tensors
    from masa_megatron.rollout.weight_sync.tensor import bucket_payload, serialize_for_sglang
    from tests.sglang_standin import schemas as standin_schemas
    from tests.sglang_standin.server import ROUTES

    bodies, vocab, model = _sent_requests(tmp_path_factory)
    sent = [{"path": path, "body": body} for _, path, body in bodies]

    named = list(stage_hf_tensors([model]))[:4]
    named.append(("lm_head.weight", named[0][1].to(torch.bfloat16)))   # a second dtype
    keep = []                                  # CPU payloads live while the checker decodes
    payloads = []
    for fmt, bucket in (("flattened_bucket", named[:4]), (None, named)):
        keep.append(bucket_payload(bucket, fmt))
        payloads.append({"text": serialize_for_sglang(keep[-1]), "load_format": fmt,
                         "tensors": _expected(bucket)})
    # built to fail: a payload pickled another way (plain pickle of numpy arrays)
    foreign = base64.b64encode(pickle.dumps([(n, t.numpy()) for n, t in named[:1]])).decode()
    payloads.append({"text": foreign, "load_format": None, "tensors": _expected(named[:1])})

    opts = ServerOptions(model_path="/models/qwen3", tp=2, mem_fraction=0.6, port=30001,
                         base_gpu_id=2, memory_saver=True, seed=7, dtype="bfloat16",
                         deterministic=True, context_length=8192)
    launch = {"server": server_command(opts)[3:],
              "router": router_command(["http://10.0.0.1:30000", "http://10.0.0.2:30000"],
                                       "0.0.0.0", 30100)[3:]}
    recorded = standin_schemas.RECORDED["schemas"]
    renamed = dict(recorded["UpdateWeightsFromTensorReqInput"])
    renamed["serialized_tensors"] = renamed.pop("serialized_named_tensors")   # built to fail
    cases = {
        "vocab_size": vocab,
        "requests": sent + [{"path": "/generate",                              # built to fail
                             "body": {"input_ids": [1, 2], "rid": "x", "return_logprob": True,
                                      "sampling_params": {"max_new_tokens": 2, "seed": 3}}},
                            {"path": "/abort_request", "body": {"rid": "x", "abort": True}}],
        "payloads": payloads,
        "launch": launch,
        "standin": {"schemas": recorded,
                    "routes": {p: {"methods": sorted(m), "request": c}
                               for p, (m, c, _) in ROUTES.items()}},
    }
    bad = {"launch": {"server": launch["server"] + ["--no-such-flag"], "router": launch["router"]},
           "standin": {"schemas": {"UpdateWeightsFromTensorReqInput": renamed}, "routes": {}}}
    folder = tmp_path_factory.mktemp("contract")
    out = {}
    for name, payload in (("ours", cases), ("bad", bad)):
        (folder / f"{name}.json").write_text(json.dumps(payload))
        run = subprocess.run([str(SIDE_PYTHON), str(SIDE_CHECK), "check",
                              str(folder / f"{name}.json"), str(folder / f"{name}_out.json")],
                             capture_output=True, text=True, timeout=900)
        assert run.returncode == 0, run.stderr[-4000:]
        out[name] = json.loads((folder / f"{name}_out.json").read_text())
    del keep
    out["sent"] = sent
    return out


def pinned_sglang() -> str:
    import re

    return re.search(r'^SGLANG = "(.+)"$', (REPO / "setup.py").read_text(), re.M).group(1)


def test_side_environment_runs_the_pinned_sglang(verdicts):
    from tests.sglang_standin.schemas import SGLANG_VERSION

    assert verdicts["ours"]["sglang_version"] == pinned_sglang() == SGLANG_VERSION


def test_every_request_we_send_is_a_valid_sglang_request(verdicts):
    sent, problems = verdicts["sent"], verdicts["ours"]["requests"][:-2]
    paths = {r["path"] for r in sent}
    assert {"/generate", "/release_memory_occupation", "/resume_memory_occupation",
            "/update_weights_from_disk", "/update_weights_from_tensor",
            "/init_weights_update_group", "/update_weights_from_distributed",
            "/destroy_weights_update_group", "/begin_weight_update", "/end_weight_update",
            "/get_weights_by_name", "/abort_request", "/flush_cache"} <= paths
    flagged = [(r["path"], p) for r, p in zip(sent, problems) if p]
    assert flagged == []


def test_contract_flags_unknown_fields_and_sampling_parameters(verdicts):
    seed_typo, abort_typo = verdicts["ours"]["requests"][-2:]
    assert any("SamplingParams rejects" in p and "seed" in p for p in seed_typo), seed_typo
    assert any("['abort'] are not in SGLang's AbortReq" in p for p in abort_typo), abort_typo


def test_tensor_payloads_decode_with_sglangs_serializer(verdicts):
    ours_flat, ours_list, foreign = verdicts["ours"]["payloads"]
    assert ours_flat == [] and ours_list == []
    assert foreign and "cannot decode" in foreign[0]


def test_launch_flags_parse_with_sglangs_parsers(verdicts):
    assert verdicts["ours"]["launch"] == []
    assert any("--no-such-flag" in p for p in verdicts["bad"]["launch"])


def test_standin_schemas_and_routes_match_the_pinned_sglang(verdicts):
    assert verdicts["ours"]["standin"] == []
    renamed = verdicts["bad"]["standin"]
    assert len(renamed) == 1 and "serialized_named_tensors" in renamed[0] \
        and "serialized_tensors" in renamed[0]
