"""Two pipeline stages syncing by broadcast into two stand-in servers (torchrun, 2 ranks, gloo).

    python -m torch.distributed.run --nproc_per_node=2 tests/dist_scripts/pp_broadcast_order.py \
        --hf-dir DIR --urls URL1,URL2 --out DIR

Small buckets (many per stage), two syncs. Rank 0 writes <out>/results.json: per server, the
group name of every /update_weights_from_distributed it received, in order, and whether its
weights equal the trainer's after the last sync.
"""
import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hf-dir", required=True)
    parser.add_argument("--urls", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.distributed.init_process_group("gloo")
    from masa_megatron.config import ModelConfig, ParallelConfig
    from masa_megatron.model import build_gpt_model, load_hf_weights
    from masa_megatron.parallel import init_parallel
    from masa_megatron.rollout.sglang import SGLangEngine
    from masa_megatron.rollout.weight_sync.tensor import all_stage_buckets
    from tests.sglang_standin.weights import hf_checksum

    init_parallel(ParallelConfig(pipeline_model_parallel_size=2))
    model = build_gpt_model(args.hf_dir, ModelConfig(hf_path=args.hf_dir))
    load_hf_weights(model, args.hf_dir)
    urls = args.urls.split(",")
    engine = SGLangEngine(args.hf_dir, urls=urls, weight_sync="broadcast",
                          health_timeout_s=60, request_timeout_s=120,
                          sync_options={"group_timeout_s": 60})
    engine.weight_sync.bucket_bytes = 16 << 10       # many buckets per stage
    for version in (1, 2):
        with torch.no_grad():
            gen = torch.Generator().manual_seed(version)
            for p in model.parameters():
                p.add_(0.02 * torch.randn(p.shape, generator=gen))
        engine.update_weights(model, version=version)
    trainer = hf_checksum({n: t.clone() for b in all_stage_buckets([model], 1 << 20) for n, t in b})
    if torch.distributed.get_rank() == 0:
        results = {}
        for url in urls:
            stats = engine.http.call(url, "/standin/stats", method="GET").body
            served = engine.http.call(url, "/standin/checksums", method="GET").body
            results[url] = {
                "groups": [body["group_name"] for method, path, body in stats["bodies"]
                           if path == "/update_weights_from_distributed"],
                "equal": served == [trainer]}
        Path(args.out, "results.json").write_text(json.dumps(results, indent=1))
    torch.distributed.barrier()
    engine.shutdown()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
