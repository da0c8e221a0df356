"""One torchrun launch per layout (TP=2 or PP=2, 2 processes, gloo) checking, for every case:
logits vs transformers, Adam training losses, HF export, and (TP=2) a distributed checkpoint.

    python -m torch.distributed.run --nproc_per_node=2 layout_check.py --tp 2 --pp 1 \
        --cases-dir DIR --out DIR

Writes <out>/results.json (from rank 0): {case: {"max_logit_diff", "losses"}}; exports go to
<out>/export/<case>, distributed checkpoints to <out>/dist/<case>.
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--cases-dir", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--train-cases", default="llama,qwen3_tied")
    parser.add_argument("--save-dist", action="store_true")
    args = parser.parse_args()

    import torch

    import harness
    from masa_megatron.config import ModelConfig, ParallelConfig
    from masa_megatron.model import build_gpt_model, export_hf_checkpoint, load_hf_weights
    from masa_megatron.model.checkpoint_io import save_dist_checkpoint
    from masa_megatron.parallel import destroy_parallel, init_parallel

    init_parallel(ParallelConfig(tensor_model_parallel_size=args.tp,
                                 pipeline_model_parallel_size=args.pp))
    results = {}
    for case in harness.CASES:
        folder = args.cases_dir / case
        model_cfg = ModelConfig(hf_path=str(folder))
        model = build_gpt_model(folder, model_cfg)
        load_hf_weights(model, folder)
        logits = harness.megatron_logits(model, harness.input_ids())
        diff = torch.tensor(-1.0)
        if logits is not None:
            diff = (logits - torch.load(folder / "ref_logits.pt")).abs().max()
        torch.distributed.all_reduce(diff, op=torch.distributed.ReduceOp.MAX)
        results[case] = {"max_logit_diff": diff.item()}
        export_hf_checkpoint(model, args.out / "export" / case, dtype="fp32", source_dir=folder)
        if args.save_dist:
            save_dist_checkpoint(model, args.out / "dist" / case, hf_source_dir=folder)
        if case in args.train_cases.split(","):
            results[case]["losses"] = harness.train_losses(model)
    if torch.distributed.get_rank() == 0:
        (args.out / "results.json").write_text(json.dumps(results, indent=1))
    destroy_parallel()


if __name__ == "__main__":
    main()
