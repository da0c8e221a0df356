"""Warm-start (SFT) data, tokenizer corpus and tiny model config for the CPU demo.

The demo starts from a randomly initialised tiny Qwen3, so before RL it gets a short supervised
warm start on two kinds of examples, both in chat form (`messages` + target `response`):

- `solution`: solution prompt (`prompts.solution_messages`: problem + the spec's suffix) -> the
  worked solution of `masa_megatron.data.synthetic`, in its `style` (`SOLUTION_STYLES`).
- `meta`: the spec's meta prompt (`prompts.meta_messages`, {MAX} = `max_len`) -> a meta answer,
  ``<meta> {n} steps with {d} digit numbers </meta>`` then compact JSON
  ``{"math_notion": [...], "pass_rate": k, "solution_length": l}``.

What the meta answers teach is the FORMAT only. `pass_rate` is uniform on 0..8 and
`solution_length` uniform on `length_range`, drawn from an RNG seeded by the seed alone, so they
carry no information about the problem; `math_notion` is a random non-empty subset of
`synthetic.CONCEPTS` (so every concept word is in the vocabulary of meta answers, but which one
fits a problem is not taught). The short reasoning restates what is visible in the problem
(number of operations, digits); it is not a prediction. Any calibration of pass rate, length or
notions seen later is therefore learned by the RL self-alignment reward, not by SFT.
"""
from __future__ import annotations

import json
import random
from typing import Optional, Sequence

from masa_megatron.data import synthetic
from masa_megatron.data.prompts import (META_SYSTEM, META_USER_TEMPLATE, SOLUTION_SUFFIX,
                                         PromptConfig, meta_messages, solution_messages)

# Qwen-style chat markers; the corpus includes them so a tiny tokenizer covers the template.
CHAT_MARKERS = ("<|im_start|>", "<|im_end|>", "<|endoftext|>", "system", "user", "assistant")


def meta_answer(item: dict, rng: random.Random, length_range: tuple[int, int]) -> str:
    """A format-only meta answer: reasoning restating the problem's shape + uninformative JSON."""
    shape = synthetic.LEVELS[item["difficulty"]]
    n_ops, digits = shape.ops, max(shape.first_digits, shape.digits)
    k = rng.randint(0, 8)
    length = rng.randint(*length_range)
    notions = [c for c in synthetic.CONCEPTS if rng.random() < 0.5] or [rng.choice(
        synthetic.CONCEPTS)]
    payload = json.dumps({"math_notion": notions, "pass_rate": k, "solution_length": length})
    return f"<meta> {n_ops} steps with {digits} digit numbers </meta>\n{payload}"


def warmstart_examples(n: int, seed: int = 0, max_len: int = 128, meta_fraction: float = 0.5,
                       length_range: Optional[tuple[int, int]] = None,
                       levels: Optional[Sequence[int]] = None,
                       style: str = "steps") -> list[dict]:
    """SFT examples from `n` train-split problems: dicts with kind, messages, response, difficulty.

    Every problem yields a solution example; a `meta_fraction` share of them also yields a meta
    example (so `n` counts problems, the list has about n * (1 + meta_fraction) entries).
    `max_len` is {MAX} of the meta prompt; `length_range` (default (8, max_len)) is the range of
    the uninformative solution_length values; `style` the solutions' (`synthetic.SOLUTION_STYLES`).
    """
    length_range = length_range or (8, max_len)
    prompt_config = PromptConfig(max_response_length=max_len)
    problems = synthetic.generate_problems(n, seed, "train", levels, style=style)
    meta_rng = random.Random(f"meta-answers-{seed}")   # depends on the seed only
    pick_rng = random.Random(f"meta-pick-{seed}")
    out = []
    for item in problems:
        out.append({"kind": "solution", "messages": solution_messages(item["problem"], prompt_config),
                    "response": item["solution"], "difficulty": item["difficulty"]})
        if pick_rng.random() < meta_fraction:
            out.append({"kind": "meta", "messages": meta_messages(item["problem"], prompt_config),
                        "response": meta_answer(item, meta_rng, length_range),
                        "difficulty": item["difficulty"]})
    return out


def tokenizer_corpus(seed: int = 0, n: int = 2000, max_len: int = 128,
                     style: str = "steps") -> list[str]:
    """Texts covering everything the demo tokenizes: problems, prompts, solutions (in `style`),
    meta answers, chat markers, digits and concept words."""
    texts = [*CHAT_MARKERS, META_SYSTEM, SOLUTION_SUFFIX, " ".join(synthetic.CONCEPTS),
             "0 1 2 3 4 5 6 7 8 9 - + = { } [ ] , : \" \\boxed{}", META_USER_TEMPLATE]
    for split in ("train", "eval"):
        texts += [p["problem"] + "\n" + p["solution"]
                  for p in synthetic.generate_problems(n if split == "train" else n // 4, seed,
                                                       split, style=style)]
    for ex in warmstart_examples(n // 4, seed, max_len, meta_fraction=1.0, style=style):
        texts += [m["content"] for m in ex["messages"]] + [ex["response"]]
    return texts


def make_tiny_qwen3_config(vocab_size: int, hidden: int = 128, layers: int = 4, heads: int = 4,
                           kv_heads: int = 2, head_dim: int = 32, intermediate: int = 384,
                           max_position: int = 512, rope_theta: float = 10000.0,
                           **overrides):
    """A `transformers.Qwen3Config` for the demo's tiny model (untied embeddings, fp32).

    Defaults (hidden 128, 4 layers, 4 heads / 2 KV heads of dim 32, MLP 384): 0.92 M parameters
    in the transformer blocks plus 2 * 128 * vocab_size in the untied embedding and LM head
    (vocab 300: ~1.0 M in total).
    """
    from transformers import Qwen3Config

    return Qwen3Config(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
                       intermediate_size=intermediate, max_position_embeddings=max_position,
                       tie_word_embeddings=False, rope_theta=rope_theta, **overrides)
