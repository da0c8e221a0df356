"""One trainer attempt against a running stand-in server (broadcast sync), for resume tests.

    python tests/dist_scripts/sync_attempt.py --hf-dir DIR --url URL --out F --seed S \
        [--die-in-broadcast N]

Attaches an SGLangEngine to URL, perturbs its weights with `seed`, syncs and generates. With
--die-in-broadcast N the process vanishes (os._exit) inside the N-th tensor broadcast of the sync,
as a killed training rank would, leaving the server in that broadcast and its group behind.
Otherwise it writes F: whether the served weights equal the trainer's, the group name used, and
the greedy tokens generated.
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
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--die-in-broadcast", type=int, default=0)
    args = parser.parse_args()

    from masa_megatron.config import ModelConfig, ParallelConfig
    from masa_megatron.model import build_gpt_model, load_hf_weights
    from masa_megatron.parallel import init_parallel
    from masa_megatron.rollout.base import GenerationRequest, SamplingParams
    from masa_megatron.rollout.sglang import SGLangEngine
    from masa_megatron.rollout.weight_sync.tensor import all_stage_buckets
    from tests.sglang_standin.weights import hf_checksum

    init_parallel(ParallelConfig())
    model = build_gpt_model(args.hf_dir, ModelConfig(hf_path=args.hf_dir))
    load_hf_weights(model, args.hf_dir)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(args.seed)
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=gen))
    engine = SGLangEngine(args.hf_dir, urls=[args.url], weight_sync="broadcast",
                          health_timeout_s=60, request_timeout_s=60,
                          sync_options={"group_timeout_s": 60})
    engine.weight_sync.bucket_bytes = 16 << 10
    if args.die_in_broadcast:
        calls, real = [0], torch.distributed.broadcast

        def broadcast(tensor, *a, **kw):
            calls[0] += 1
            if calls[0] == args.die_in_broadcast:
                os._exit(9)        # killed mid-transfer: the server waits in this broadcast
            return real(tensor, *a, **kw)
        torch.distributed.broadcast = broadcast
    engine.update_weights(model, version=args.seed)
    trainer = hf_checksum({n: t.clone() for b in all_stage_buckets([model], 1 << 20) for n, t in b})
    served = engine.http.call(args.url, "/standin/checksums", method="GET").body
    out = engine.generate([GenerationRequest([5, 17, 3], SamplingParams(max_new_tokens=4,
                                                                        temperature=0.0))])
    Path(args.out).write_text(json.dumps({
        "equal": served == [trainer], "group": engine.weight_sync.group_name,
        "tokens": out[0].completions[0].token_ids}))
    os._exit(0)


if __name__ == "__main__":
    main()
