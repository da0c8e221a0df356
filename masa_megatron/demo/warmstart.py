"""The demo's starting point: a tokenizer and a tiny Qwen3 made on the fly, warm-started by SFT.

Nothing is downloaded. The tokenizer is a byte-level BPE trained on the task's texts
(`warmstart_data.tokenizer_corpus`); the model is a random tiny Qwen3 (`make_tiny_qwen3_config`)
trained with plain next-token SFT (transformers, fp32, AdamW, loss on response tokens only) on
worked solutions and on format-only meta answers (see `warmstart_data`: their pass_rate and
solution_length carry no information, so calibration seen later is learned by RL).

The result is an ordinary Hugging Face folder, cached under `cache_dir/warmstart-<key>` where the
key hashes every setting; a second run with the same settings reuses it. The folder is written to a
temporary name and renamed when complete, so an interrupted warm start is redone, never half-used.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass
class WarmStartConfig:
    seed: int = 0
    vocab_size: int = 640          # all merges of the corpus (~600): whole words, single digits
    hidden: int = 128
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    # 32 learned to copy operands far slower: Qwen3's q/k norm caps attention logits at
    # sqrt(head_dim)
    head_dim: int = 64
    intermediate: int = 384
    max_position: int = 1024
    max_len: int = 96              # {MAX} of the meta prompt = the demo's max response length
    solution_style: str = "steps"  # synthetic.SOLUTION_STYLES: 'columns': 2-4x longer solutions
    n_problems: int = 8000         # SFT problems (each gives a solution example, some a meta one)
    meta_fraction: float = 0.1
    # Easy levels repeated: a tiny model learns the addition table before long chains; levels
    # 7-8 are left out of SFT (the RL data has them: never solved, but long to predict).
    levels: tuple = (1, 1, 1, 2, 2, 2, 3, 3, 4, 4, 5, 6)
    steps: int = 1500
    batch_size: int = 16
    lr: float = 3e-3               # linear warm-up, then cosine down to lr / 10
    warmup: int = 30
    threads: int = 2               # torch threads of the SFT: fixed, not the machine's core count
    format_version: int = 2        # bump when the data or recipe changes meaning

    def key(self) -> str:
        blob = json.dumps(asdict(self), sort_keys=True, default=list).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


def default_cache_dir() -> Path:
    return Path(os.environ.get("MASA_CACHE_DIR", Path.home() / ".cache" / "masa_megatron"))


def _encode_example(tokenizer, example: dict) -> tuple[list[int], list[int]]:
    from masa_megatron.data.prompts import render_text
    prompt = tokenizer(render_text(tokenizer, example["messages"]),
                       add_special_tokens=False)["input_ids"]
    response = tokenizer(example["response"], add_special_tokens=False)["input_ids"]
    return prompt, response + [tokenizer.eos_token_id]


def length_sorted_batches(examples: list, batch_size: int, steps: int, seed: int,
                          pool: int = 8):
    """`steps` batches: shuffled epochs cut into pools of `pool` batches, each pool sorted by
    length before it is split, so a batch holds similar lengths and little padding."""
    rng, order, cursor = random.Random(seed), list(range(len(examples))), len(examples)
    made = 0
    while made < steps:
        if cursor + batch_size * pool > len(order):
            rng.shuffle(order)
            cursor = 0
        chunk = sorted((examples[j] for j in order[cursor:cursor + batch_size * pool]),
                       key=lambda ex: len(ex[0]) + len(ex[1]))
        cursor += batch_size * pool
        for start in range(0, len(chunk), batch_size):
            if made == steps:
                return
            yield chunk[start:start + batch_size]
            made += 1


def train_warm_start(cfg: WarmStartConfig, out_dir: Path, log=print) -> None:
    """Tokenizer + random tiny Qwen3 + SFT -> an HF folder at out_dir."""
    import torch
    from transformers import Qwen3ForCausalLM

    from masa_megatron.data.tiny_tokenizer import make_tiny_tokenizer
    from masa_megatron.demo.warmstart_data import (make_tiny_qwen3_config, tokenizer_corpus,
                                                   warmstart_examples)
    from masa_megatron.metrics import Progress

    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    tokenizer = make_tiny_tokenizer(
        tokenizer_corpus(cfg.seed, max_len=cfg.max_len, style=cfg.solution_style), cfg.vocab_size)
    config = make_tiny_qwen3_config(
        len(tokenizer), hidden=cfg.hidden, layers=cfg.layers, heads=cfg.heads,
        kv_heads=cfg.kv_heads, head_dim=cfg.head_dim, intermediate=cfg.intermediate,
        max_position=cfg.max_position, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
    config.architectures = ["Qwen3ForCausalLM"]
    model = Qwen3ForCausalLM(config).float()
    examples = [_encode_example(tokenizer, ex) for ex in warmstart_examples(
        cfg.n_problems, cfg.seed, cfg.max_len, cfg.meta_fraction, levels=cfg.levels,
        style=cfg.solution_style)]
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01,
                                  betas=(0.9, 0.98))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / cfg.warmup)
                                                 * (0.1 + 0.45 * (1 + math.cos(math.pi * s / cfg.steps))))
    progress = Progress(cfg.steps, "warm start (SFT)", every=50)
    model.train()
    for step, batch in enumerate(length_sorted_batches(examples, cfg.batch_size, cfg.steps, cfg.seed)):
        width = max(len(p) + len(r) for p, r in batch)
        ids = torch.full((len(batch), width), tokenizer.pad_token_id)
        labels = torch.full((len(batch), width), -100)
        for i, (p, r) in enumerate(batch):   # right padding: causal attention never sees it
            ids[i, :len(p) + len(r)] = torch.tensor(p + r)
            labels[i, len(p):len(p) + len(r)] = torch.tensor(r)
        loss = model(input_ids=ids, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        progress.update(step + 1, {"loss": loss.item()})
    model.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    (out_dir / "warmstart.json").write_text(json.dumps(
        {**asdict(cfg), "final_loss": loss.item(),
         "cpu_capability": torch.backends.cpu.get_cpu_capability()}, default=list, indent=1))


def cached_warm_start(cfg: WarmStartConfig, cache_dir: Path | None = None) -> Path | None:
    """The complete cached folder for `cfg`, or None."""
    final = Path(cache_dir or default_cache_dir()) / f"warmstart-{cfg.key()}"
    return final if (final / "warmstart.json").is_file() else None


def warm_start(cfg: WarmStartConfig, cache_dir: Path | None = None, log=print) -> Path:
    """The cached warm-start folder for `cfg`, training it first if missing."""
    cached = cached_warm_start(cfg, cache_dir)
    if cached:
        log(f"warm start: reusing {cached}")
        return cached
    cache_dir = Path(cache_dir or default_cache_dir())
    final = cache_dir / f"warmstart-{cfg.key()}"
    tmp = cache_dir / f".tmp-warmstart-{cfg.key()}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    started = time.time()
    log(f"warm start: training the tiny model ({cfg.steps} SFT steps), cached in {final}")
    try:
        train_warm_start(cfg, tmp, log=log)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"warm start: done in {time.time() - started:.0f} s")
    return final
