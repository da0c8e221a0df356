"""Embedded-engine generation under TP=2, PP=2 and DP=2 against TP=1, in one 2-process launch.

    python -m torch.distributed.run --nproc_per_node=2 rollout_parallel.py --hf DIR --out FILE

DIR holds a tiny HF checkpoint (vocab 1003, so TP=2 pads the vocabulary). The script runs the
same seeded/greedy requests with: TP=1 on each rank alone (the reference), DP=2 (each rank its
half), TP=2, PP=2. Rank 0 writes FILE (JSON): results per layout, whether every rank of a
model-parallel group returned the same results, rollout-vs-forward log-prob gaps (TP=2) and
whether forwards after generation equal forwards before it (PP=2).
"""
import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

EOS = 2


def requests():
    from masa_megatron.rollout.base import GenerationRequest, SamplingParams

    prompts = [[5, 17, 301, 44, 9, 120, 7], [88, 3], [400, 401, 402, 403, 11], [999], [6, 6, 6]]
    greedy = [SamplingParams(max_new_tokens=m, temperature=0.0, stop_token_ids=s)
              for m, s in ((10, ()), (4, ()), (12, (77,)), (8, ()), (6, ()))]
    sampled = [SamplingParams(max_new_tokens=10, temperature=1.0, seed=100 + i, n=2)
               for i in range(len(prompts))]
    truncated = [SamplingParams(max_new_tokens=9, temperature=0.7, top_p=0.9, top_k=50,
                                seed=200 + i) for i in range(len(prompts))]
    reqs = []
    for i, p in enumerate(prompts):
        for kind, params in (("greedy", greedy), ("sampled", sampled), ("truncated", truncated)):
            reqs.append(GenerationRequest(p, params[i], f"{kind}-{i}"))
    return reqs


def serialise(results):
    return [{"id": r.request_id, "completions": [
        {"tokens": c.token_ids, "logprobs": c.logprobs, "finish": c.finish_reason}
        for c in r.completions]} for r in results]


def build(folder, tp, pp):
    from masa_megatron.config import ModelConfig, ParallelConfig
    from masa_megatron.model import build_gpt_model, load_hf_weights
    from masa_megatron.parallel import init_parallel
    from masa_megatron.rollout.embedded import EmbeddedEngine

    init_parallel(ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp))
    model = build_gpt_model(str(folder), ModelConfig(hf_path=str(folder)))
    load_hf_weights(model, folder)
    vocab = model.masa_hf_config["vocab_size"]
    return model, EmbeddedEngine(model, vocab_size=vocab, eos_token_ids=[EOS])


def all_ranks(obj):
    box = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(box, obj)
    return box


def max_forward_logprob_gap(model, reqs, results):
    """Largest |rollout log-prob - plain forward log-prob| (TP: gathered logits, PP=1 only)."""
    from masa_megatron.rollout.sampling import token_logprobs

    vocab, gap = model.masa_hf_config["vocab_size"], 0.0
    model.eval()
    for req, res in zip(reqs, results):
        for c in res.completions:
            ids = torch.tensor([list(req.prompt_token_ids) + c.token_ids])
            with torch.no_grad():
                logits = model(ids, torch.arange(ids.size(1)).unsqueeze(0), None,
                               runtime_gather_output=True)[0, :, :vocab]
            pred = logits[len(req.prompt_token_ids) - 1:-1]
            ref = token_logprobs(pred, torch.tensor(c.token_ids), req.sampling.temperature)
            gap = max(gap, (torch.tensor(c.logprobs) - ref).abs().max().item())
    return gap


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hf", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    from masa_megatron.parallel import destroy_parallel

    reqs = requests()
    report = {}

    # TP=1 (world 2 = DP 2): the reference on each rank alone, then each DP rank its half
    model, engine = build(args.hf, 1, 1)
    ref = serialise(engine.generate(reqs))
    report["ref_same_on_ranks"] = all(r == ref for r in all_ranks(ref))
    rank = torch.distributed.get_rank()
    share = serialise(engine.generate(reqs[rank::2]))
    halves = all_ranks(share)
    merged = [None] * len(reqs)
    merged[0::2], merged[1::2] = halves[0], halves[1]
    report["dp2"] = merged
    report["ref"] = ref

    # TP=2: one model-parallel group of both ranks
    model, engine = build(args.hf, 2, 1)
    tp = serialise(engine.generate(reqs))
    report["tp2"] = tp
    report["tp2_same_on_ranks"] = all(r == tp for r in all_ranks(tp))
    results = engine.generate(reqs)
    report["tp2_repeat_equal"] = serialise(results) == tp
    report["tp2_forward_gap"] = max_forward_logprob_gap(model, reqs, results)

    # PP=2: stages pass hidden states; forwards through Megatron's schedule before and after
    import harness

    model, engine = build(args.hf, 1, 2)
    ids = harness.input_ids()
    before = harness.megatron_logits(model, ids)
    pp = serialise(engine.generate(reqs))
    after = harness.megatron_logits(model, ids)
    report["pp2"] = pp
    report["pp2_same_on_ranks"] = all(r == pp for r in all_ranks(pp))
    same = True if before is None else bool(torch.equal(before, after))
    report["pp2_forward_unchanged"] = all(all_ranks(same))
    destroy_parallel()
    if rank == 0:
        args.out.write_text(json.dumps(report))


if __name__ == "__main__":
    main()
