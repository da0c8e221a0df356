"""One trainer rank syncing by broadcast into a stand-in server on another (simulated) node.

    python tests/dist_scripts/node_broadcast_sync.py --hf-dir DIR --url http://node1:PORT --out F

World size 1 (gloo, rendezvous on this node's loopback). The trainer perturbs its weights, syncs
(rollout.weight_sync=broadcast), then writes F: the master address it gave the server, whether the
server's full weight checksum equals the trainer's, and the error if the sync failed.
"""
import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hf-dir", required=True)
    parser.add_argument("--url", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--timeout-s", type=float, default=40.0)
    args = parser.parse_args()
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29555")
    torch.distributed.init_process_group("gloo", rank=0, world_size=1)

    from masa_megatron.config import ModelConfig, ParallelConfig
    from masa_megatron.model import build_gpt_model, load_hf_weights
    from masa_megatron.parallel import init_parallel
    from masa_megatron.rollout.sglang import SGLangEngine
    from masa_megatron.rollout.weight_sync.tensor import all_stage_buckets
    from tests.sglang_standin.weights import hf_checksum

    init_parallel(ParallelConfig())
    model = build_gpt_model(args.hf_dir, ModelConfig(hf_path=args.hf_dir))
    load_hf_weights(model, args.hf_dir)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(3)
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=gen))
    engine = SGLangEngine(args.hf_dir, urls=[args.url], weight_sync="broadcast", bucket_mb=1,
                          health_timeout_s=60, request_timeout_s=60,
                          sync_options={"group_timeout_s": args.timeout_s})
    result = {}
    try:
        engine.update_weights(model)
        result["master_address"] = engine.weight_sync.master_address
        trainer = hf_checksum({n: t.clone() for b in all_stage_buckets([model], 1 << 20)
                               for n, t in b})
        served = engine.http.call(args.url, "/standin/checksums", method="GET").body
        result["checksums_equal"] = served == [trainer]
    except Exception as err:   # reported to the test
        result["error"] = f"{type(err).__name__}: {err}"
        result["master_address"] = getattr(engine.weight_sync, "master_address", None)
    Path(args.out).write_text(json.dumps(result))
    os._exit(0)   # a failed group may leave threads waiting; the result is written


if __name__ == "__main__":
    main()
