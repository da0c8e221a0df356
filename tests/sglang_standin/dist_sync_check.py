"""Weight sync and the data-parallel flow from a sharded trainer into the stand-in server.

    python -m torch.distributed.run --nproc_per_node=2 tests/sglang_standin/dist_sync_check.py \
        --hf-dir DIR --url http://127.0.0.1:PORT --out DIR

The server runs with --tp-size 2 (one TP-2 server colocated with the 2 trainer ranks). For each
layout (TP=2, then PP=2; gloo on CPU, one launch) and each sync (disk, broadcast per tensor,
broadcast of flattened buckets, tensor payloads per server TP rank): the trainer perturbs its
shards, syncs, and generates through the SGLang engine (the model-parallel group's first rank
sends, dp_flow broadcasts the results) and with the embedded engine on the sharded model. Rank 0
writes <out>/results.json: per layout and sync, whether tokens match, the largest log-prob
difference, whether every rank saw the same results, how many /generate calls reached the server
(only the sending rank's), and whether each server TP rank's full weight checksum equals the
trainer's.
"""
import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from masa_megatron.rollout.base import GenerationRequest, SamplingParams  # noqa: E402

REQUESTS = [
    GenerationRequest([5, 17, 301, 44, 9], SamplingParams(max_new_tokens=8, temperature=0.0)),
    GenerationRequest([88, 3], SamplingParams(max_new_tokens=8, temperature=1.0, seed=11, n=2)),
]


def _flatten(results):
    return [(c.token_ids, c.logprobs, c.finish_reason) for r in results for c in r.completions]


def _perturb(model, seed: int) -> None:
    """The same noise stream on every rank: TP-replicated parameters (norms) stay identical."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=gen))


def run_layout(args, tp: int, pp: int) -> dict:
    from masa_megatron.config import ModelConfig, ParallelConfig
    from masa_megatron.model import build_gpt_model, load_hf_weights
    from masa_megatron.parallel import destroy_parallel, init_parallel
    from masa_megatron.rollout.embedded import EmbeddedEngine
    from masa_megatron.rollout.sglang import SGLangEngine

    init_parallel(ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp))
    model = build_gpt_model(args.hf_dir, ModelConfig(hf_path=args.hf_dir))
    load_hf_weights(model, args.hf_dir)
    embedded = EmbeddedEngine(model, vocab_size=model.masa_hf_config["vocab_size"],
                              eos_token_ids=[model.masa_hf_config["eos_token_id"]])
    out = {}
    variants = {"disk": ("disk", None), "broadcast": ("broadcast", None),
                "broadcast_flat": ("broadcast", {"load_format": "flattened_bucket"}),
                "tensor": ("tensor", {"load_format": "flattened_bucket"}),
                "tensor_list": ("tensor", {"load_format": None})}
    for k, (variant, (sync, options)) in enumerate(variants.items()):
        engine = SGLangEngine(args.hf_dir, urls=[args.url], weight_sync=sync, bucket_mb=1,
                              sync_options=options, tp=2,
                              sync_dir=str(Path(args.out) / f"sync-tp{tp}pp{pp}"),
                              verify_sync=True, health_timeout_s=60, request_timeout_s=120)
        _perturb(model, seed=10 * tp + pp + k)
        engine.update_weights(model)
        trainer_sum = _trainer_checksum(model)
        server_sums = engine.http.call(args.url, "/standin/checksums", method="GET").body
        calls_before = _generate_calls(engine, args.url)
        got = _flatten(engine.generate(REQUESTS))
        calls = _generate_calls(engine, args.url) - calls_before
        want = _flatten(embedded.generate(REQUESTS))
        everyone = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(everyone, got)
        out[variant] = {
            "tokens_match": [g[0] for g in got] == [w[0] for w in want],
            "reasons_match": [g[2] for g in got] == [w[2] for w in want],
            "max_logprob_diff": max(abs(a - b) for g, w in zip(got, want)
                                    for a, b in zip(g[1], w[1])),
            "same_on_all_ranks": all(e == got for e in everyone),
            "generate_calls": calls,
            "sync_stats": engine.last_sync_stats,
            "server_checksums_equal_trainer": server_sums == [trainer_sum] * 2,
        }
        engine.shutdown()
    destroy_parallel()
    return out


def _trainer_checksum(model) -> str:
    """The full HF weights of the sharded trainer (collective), hashed as the stand-in does."""
    from masa_megatron.rollout.weight_sync.tensor import all_stage_buckets
    from tests.sglang_standin.weights import hf_checksum

    return hf_checksum({name: t.clone() for bucket in all_stage_buckets([model], 1 << 20)
                        for name, t in bucket})


def _generate_calls(engine, url: str) -> int:
    stats = engine.http.call(url, "/standin/stats", method="GET").body
    return stats["paths"].get("/generate", 0)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hf-dir", required=True)
    parser.add_argument("--url", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.distributed.init_process_group("gloo")
    results = {"tp2": run_layout(args, 2, 1), "pp2": run_layout(args, 1, 2)}
    if torch.distributed.get_rank() == 0:
        Path(args.out, "results.json").write_text(json.dumps(results, indent=1))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
