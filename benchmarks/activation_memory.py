"""Stored activations per token per layer of the trainer's model, against the memory estimator.

Builds a scaled-down Qwen3 layer stack with the project's builder (local layer spec, bf16, the
same module types as training on CPU), runs one training forward of b x s tokens and adds up
the bytes of every tensor autograd saves for backward inside the transformer layers (each
storage counted once, parameters left out), per rank. The estimator's figure is
`memory_estimator._activation_bytes_per_token_layer(arch, tp, sequence_parallel)`:

    act = 8h / t_sp + (2(hq + 2hkv) + 2hq + 2(hq + hkv) + 6f) / t     bytes per token per layer

Sequence parallelism divides the first term by TP (the norm inputs and the inputs of the
column-parallel layers hold s/TP rows), which is what defect 2 of issue 23 was about: without
it applied the measured figure at TP 4 was the no-SP one. The Transformer Engine spec used on
GPUs stores a different mix (e.g. the fused norm+linear keeps the norm output), so this checks
the formula's accounting on the path that runs here, not TE's.

    python benchmarks/activation_memory.py                       # TP 1
    torchrun --nproc_per_node=2 benchmarks/activation_memory.py --sp [--label tp2sp]

Prints one JSON line per rank; rank 0 merges {label: result} into
benchmarks/results/activation_memory.json.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

OUT = Path(__file__).parent / "results" / "activation_memory.json"
HF = {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "vocab_size": 512,
      "hidden_size": 512, "intermediate_size": 1536, "num_hidden_layers": 2,
      "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 64,
      "max_position_embeddings": 1024, "rms_norm_eps": 1e-6, "tie_word_embeddings": True,
      "rope_theta": 10000.0, "initializer_range": 0.02}


def saved_bytes(model, tokens: torch.Tensor) -> dict[str, int]:
    """Bytes of the distinct non-parameter storages saved for backward inside the decoder layers
    ("layers"), of which first saved inside their MLPs ("mlp", FC1's input included) and norms
    ("norms": the two layer norms and the Q/K norms), over one forward of `tokens`."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    where, storages = [None], {}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        if where[0] and storage.data_ptr() not in params:
            storages.setdefault(storage.data_ptr(), (where[0], storage.nbytes()))
        return t

    def enter(part):
        return lambda *args: where.__setitem__(0, part)

    for layer in model.decoder.layers:
        layer.register_forward_pre_hook(enter("layer"))
        layer.register_forward_hook(enter(None))
        attention = layer.self_attention
        for part, module in (("mlp", layer.mlp), ("norms", layer.input_layernorm),
                             ("norms", layer.pre_mlp_layernorm), ("norms", attention.q_layernorm),
                             ("norms", attention.k_layernorm)):
            module.register_forward_pre_hook(enter(part))
            module.register_forward_hook(enter("layer"))
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(tokens, positions, None)
    out.float().sum().backward()
    return {"layers": sum(n for _, n in storages.values()),
            **{name: sum(n for part, n in storages.values() if part == name)
               for name in ("mlp", "norms")}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sp", action="store_true", help="sequence parallelism (TP > 1)")
    parser.add_argument("--rows", type=int, default=2)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--fused-swiglu", action="store_true",
                        help="Megatron's fused SwiGLU, as the builder sets on GPUs")
    parser.add_argument("--label", default=None)
    args = parser.parse_args()

    from masa_megatron.config import ModelConfig, ParallelConfig
    from masa_megatron.memory_estimator import ModelArch, _activation_bytes_per_token_layer
    from masa_megatron.model import build_gpt_model
    from masa_megatron.parallel import destroy_parallel, init_parallel

    tp = int(os.environ.get("WORLD_SIZE", "1"))
    torch.set_num_threads(1 if tp > 1 else 2)
    init_parallel(ParallelConfig(tensor_model_parallel_size=tp, sequence_parallel=args.sp))
    model = build_gpt_model(HF, ModelConfig(hf_path="<dict>", dtype="bf16", random_init=True))
    model.config.bias_activation_fusion = args.fused_swiglu   # read by the MLP's forward
    tokens = torch.randint(0, HF["vocab_size"], (args.rows, args.seq),
                           generator=torch.Generator().manual_seed(0))
    per = {k: v / (args.rows * args.seq * HF["num_hidden_layers"])
           for k, v in saved_bytes(model, tokens).items()}
    arch = ModelArch("scaled-qwen3", HF["hidden_size"], HF["num_hidden_layers"],
                     HF["num_attention_heads"], HF["num_key_value_heads"], HF["head_dim"],
                     HF["intermediate_size"], HF["vocab_size"], True)
    estimated = _activation_bytes_per_token_layer(arch, tp, args.sp)
    h, hq, hkv = arch.hidden, arch.q_width, arch.kv_width
    rank = torch.distributed.get_rank()
    result = {"tp": tp, "sequence_parallel": args.sp, "fused_swiglu": args.fused_swiglu,
              "rank": rank, "rows": args.rows, "seq": args.seq, "shape": HF,
              "measured_bytes_per_token_layer": per["layers"],
              "estimated_bytes_per_token_layer": estimated,
              "measured_over_estimated": per["layers"] / estimated,
              # the estimator's MLP share: FC1's input 2h / t_sp, FC1 out + SwiGLU out 6f / t
              "mlp_measured": per["mlp"],
              "mlp_estimated": 2 * h / (tp if args.sp else 1) + 6 * HF["intermediate_size"] / tp,
              # two norm inputs 4h / t_sp, Q/K norm inputs 2(hq + hkv) / t
              "norms_measured": per["norms"],
              "norms_estimated": 4 * h / (tp if args.sp else 1) + 2 * (hq + hkv) / tp}
    print(json.dumps(result), flush=True)
    destroy_parallel()
    if rank == 0:
        saved = json.loads(OUT.read_text()) if OUT.exists() else {}
        default = f"tp{tp}{'sp' if args.sp else ''}{'_fused' if args.fused_swiglu else ''}"
        saved[args.label or default] = result
        OUT.write_text(json.dumps(saved, indent=1) + "\n")


if __name__ == "__main__":
    main()
