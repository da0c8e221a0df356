"""Peak host memory of the actor's per-token log-prob / entropy path (train/vocab_parallel.py).

What the actor runs on the last pipeline stage for each micro-batch, on this TP rank's vocabulary
slice (logits [s, b, V/TP] in the model dtype, here bf16):

    logprobs : no grad; z = scaled_vocab_logits(logits), entropy(z), logp = CE(z, labels)
               (Actor.logprobs with_entropy, i.e. the old-log-prob pass)
    train    : with grad; z, logp, then backward of sum(logp) to the logits (Actor.update)

Each case runs in a fresh process; the figure is the peak resident memory during the call above
what the process held just before it (the bf16 logits and labels already allocated), read from
/proc/self/status after resetting VmHWM (`echo 5 > /proc/self/clear_refs`; Linux only). Every
tensor here is far above glibc's mmap threshold, so freed copies go back to the OS and the
high-water mark is the sum of the live copies. Each case runs at --tokens/2 and --tokens; a line
through the two peaks gives bytes per logit element and a fixed part (chunk-sized temporaries);
`extrapolated_gib` applies them, with the bf16 logits where the model holds them, to the Qwen3
recipes' micro-batch of 16,384 tokens at TP 4 (V = 151,936), the shape the memory estimator
sizes. The measured shapes are scaled down to fit a CPU box.

    python benchmarks/vocab_parallel_memory.py [--tokens 2048] [--tp 4] [--label after]

Prints a summary and merges {label: result} into benchmarks/results/vocab_parallel_memory.json.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

QWEN3_VOCAB = 151936
RECIPE_TOKENS = 16384
HELD_LOGITS_BYTES = {"logprobs": 2, "train": 0}   # see main()
OUT = Path(__file__).parent / "results" / "vocab_parallel_memory.json"


def _status(key: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def measure(case: str, tokens: int, vocab_slice: int) -> dict:
    """In this process: peak bytes above the baseline during one call of `case`."""
    import torch

    from masa_megatron.config import ParallelConfig
    from masa_megatron.parallel import destroy_parallel, init_parallel
    from masa_megatron.train.vocab_parallel import (scaled_vocab_logits, vocab_parallel_entropy,
                                                    vocab_parallel_logprobs)

    torch.set_num_threads(2)
    init_parallel(ParallelConfig())
    gen = torch.Generator().manual_seed(0)
    logits = (4 * torch.randn(tokens, 1, vocab_slice, generator=gen)).to(torch.bfloat16)
    labels = torch.randint(0, vocab_slice - 64, (tokens, 1), generator=gen)
    pad_from = vocab_slice - 64            # Megatron's vocabulary padding on the last rank
    if case == "train":
        logits.requires_grad_(True)
    open("/proc/self/clear_refs", "w").write("5")
    baseline = _status("VmRSS:")
    if case == "logprobs":
        with torch.no_grad():
            z = scaled_vocab_logits(logits, 0.9, pad_from)
            entropy = vocab_parallel_entropy(z)
            logp = vocab_parallel_logprobs(z, labels)
            del z
    else:
        z = scaled_vocab_logits(logits, 0.9, pad_from)
        logp = vocab_parallel_logprobs(z, labels)
        del z
        logp.sum().backward()
        entropy = logits.grad
    peak = _status("VmHWM:") - baseline
    finite = bool(torch.isfinite(logp).all() and torch.isfinite(entropy).all())
    destroy_parallel()
    elements = tokens * vocab_slice
    return {"case": case, "tokens": tokens, "vocab_slice": vocab_slice, "finite": finite,
            "peak_above_baseline_mib": peak / 2 ** 20,
            "bytes_per_logit_element": peak / elements}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--tp", type=int, default=4)
    parser.add_argument("--label", default="current")
    parser.add_argument("--case", choices=("logprobs", "train"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    vocab_slice = QWEN3_VOCAB // args.tp
    if args.case:       # the child process
        print(json.dumps(measure(args.case, args.tokens, vocab_slice)))
        return
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, cwd=Path(__file__).parent).stdout.strip()
    result = {"commit": commit, "command": " ".join(sys.argv), "cases": {}}
    sizes = (args.tokens // 2, args.tokens)
    for case in ("logprobs", "train"):
        runs = []
        for tokens in sizes:
            proc = subprocess.run([sys.executable, __file__, "--case", case, "--tokens",
                                   str(tokens), "--tp", str(args.tp)],
                                  capture_output=True, text=True, check=True)
            runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        # peak = per_element * elements + fixed (the entropy's chunk temporaries), fitted on the
        # two sizes. The model holds its bf16 logits (2 bytes) during the no-grad pass; in the
        # update it frees them after the forward, and the backward peak (the fp32 gradient and
        # its bf16 copy, measured here as the held logits' gradient) is the larger one
        (e1, p1), (e2, p2) = [(r["tokens"] * vocab_slice, r["peak_above_baseline_mib"] * 2 ** 20)
                              for r in runs]
        per_element = (p2 - p1) / (e2 - e1)
        fixed = p2 - per_element * e2
        recipe = RECIPE_TOKENS * vocab_slice
        measured = {"runs": runs, "bytes_per_element": per_element, "fixed_mib": fixed / 2 ** 20,
                    "extrapolated_gib": ((per_element + HELD_LOGITS_BYTES[case]) * recipe
                                         + fixed) / 2 ** 30}
        result["cases"][case] = measured
        print(f"{case:<9} peak above the logits = {per_element:.2f} B per logit element + "
              f"{fixed / 2 ** 20:.0f} MiB (fitted on {sizes} tokens); at {RECIPE_TOKENS} tokens, "
              f"TP {args.tp}: {measured['extrapolated_gib']:.1f} GiB")
    saved = json.loads(OUT.read_text()) if OUT.exists() else {}
    saved[args.label] = result
    OUT.write_text(json.dumps(saved, indent=1) + "\n")


if __name__ == "__main__":
    main()
