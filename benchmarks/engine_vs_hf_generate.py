"""Tokens/s of the embedded engine vs transformers' `generate`, same weights, batch and lengths.

    python benchmarks/engine_vs_hf_generate.py [--batch 16 --prompt 64 --new 128 --rounds 3
                                                --threads N]

A random ~100M-parameter Qwen3 (tied embeddings) is saved with save_pretrained and loaded into
Megatron (TP=1, fp32, CPU unless CUDA is present). Both generate greedily with EOS ignored, so
every row produces exactly `--new` tokens. Runs alternate (engine, HF, engine, HF, ...) after one
warm-up each; the figure is the ratio of median tokens/s. Writes
benchmarks/results/engine_vs_hf_generate.json and prints it.
"""
import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from machine import machine_info, machine_label   # benchmarks/, the script's folder

MODEL = dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
             num_attention_heads=12, num_key_value_heads=4, head_dim=64,
             max_position_embeddings=4096)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="torch intra-op threads for both generators (default: torch's)")
    parser.add_argument("--out", type=Path,
                        default=Path(__file__).parent / "results" / "engine_vs_hf_generate.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_before = machine_info()["load_average"]

    from masa_megatron.config import ModelConfig, ParallelConfig
    from masa_megatron.model import build_gpt_model, load_hf_weights
    from masa_megatron.model.tiny import make_tiny_hf_model
    from masa_megatron.parallel import destroy_parallel, init_parallel
    from masa_megatron.rollout.base import GenerationRequest, SamplingParams
    from masa_megatron.rollout.embedded import EmbeddedEngine

    init_parallel(ParallelConfig())
    with tempfile.TemporaryDirectory() as folder:
        hf = make_tiny_hf_model(folder, "qwen3", seed=0, tied=True, **MODEL)
        model = build_gpt_model(folder, ModelConfig(hf_path=folder))
        load_hf_weights(model, folder)
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    hf = hf.to(device).eval()
    params = sum(p.numel() for p in hf.parameters())

    prompts = torch.randint(3, MODEL["vocab_size"], (args.batch, args.prompt),
                            generator=torch.Generator().manual_seed(0))
    engine = EmbeddedEngine(model, vocab_size=MODEL["vocab_size"], eos_token_ids=[2],
                            max_batch_size=args.batch)
    greedy = SamplingParams(max_new_tokens=args.new, temperature=0.0, ignore_eos=True)
    requests = [GenerationRequest(p.tolist(), greedy) for p in prompts]

    def run_engine():
        return [r.completions[0].token_ids for r in engine.generate(requests)]

    def run_hf():
        with torch.inference_mode():
            out = hf.generate(prompts.to(device), attention_mask=torch.ones_like(prompts).to(device),
                              do_sample=False, max_new_tokens=args.new, min_new_tokens=args.new,
                              pad_token_id=0)
        return out[:, args.prompt:].tolist()

    def timed(fn):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        tokens = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        assert all(len(t) == args.new for t in tokens)
        return args.batch * args.new / seconds, tokens

    engine_tokens, hf_tokens = run_engine(), run_hf()          # warm-up
    same = sum(a == b for a, b in zip(engine_tokens, hf_tokens))
    speeds = {"engine": [], "hf": []}
    for _ in range(args.rounds):
        speeds["engine"].append(timed(run_engine)[0])
        speeds["hf"].append(timed(run_hf)[0])
    engine_tps, hf_tps = statistics.median(speeds["engine"]), statistics.median(speeds["hf"])
    import megatron.core
    import transformers
    machine = machine_info()
    report = {
        "ratio_engine_over_hf": round(engine_tps / hf_tps, 3),
        "engine_tokens_per_s": round(engine_tps, 1),
        "hf_generate_tokens_per_s": round(hf_tps, 1),
        "runs_tokens_per_s": {k: [round(v, 1) for v in vs] for k, vs in speeds.items()},
        "greedy_rows_identical": f"{same}/{args.batch}",
        "batch": args.batch, "prompt_tokens": args.prompt, "new_tokens": args.new,
        "rounds": args.rounds, "parameters": params, "model": MODEL, "dtype": "fp32",
        "device": torch.cuda.get_device_name() if device.type == "cuda" else
        f"cpu ({machine['cpu_model']}), {torch.get_num_threads()} threads",
        "machine_info": machine, "machine_label": machine_label(machine),
        "load_average_before": load_before,
        "torch": torch.__version__, "megatron_core": megatron.core.__version__,
        "transformers": transformers.__version__,
    }
    destroy_parallel()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
