"""The files a rehearsal trains on, made offline: a tokenizer, a tiny random model, problems.

The tokenizer is a byte-level BPE trained on the synthetic task's texts (data/tiny_tokenizer.py,
the demo's corpus); the model is a random tiny HF checkpoint (model/tiny.py) of `TinyShape` whose
vocabulary exceeds the tokenizer's (shrink.model_vocab_size); the problems are the synthetic
arithmetic task in verl's parquet layout (train and eval splits). The tokenizer is made once per
process and the model folder once per shape (`ensure_assets` reuses a folder whose
`rehearsal_shape.json` matches).
"""
from __future__ import annotations

import functools
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from masa_megatron.rehearsal.shrink import RESPONSE_TOKENS, TinyShape

TOKENIZER_VOCAB = 320
TRAIN_PROBLEMS, EVAL_PROBLEMS = 64, 16
SEED = 0


@dataclass(frozen=True)
class Assets:
    model_dir: Path
    train_file: Path
    eval_file: Path
    tokenizer_size: int
    model_vocab: int
    prompt_tokens: int           # the longest prompt (meta prompt) of any problem


@functools.lru_cache(maxsize=1)
def tiny_tokenizer():
    from masa_megatron.data.tiny_tokenizer import make_tiny_tokenizer
    from masa_megatron.demo.warmstart_data import tokenizer_corpus

    return make_tiny_tokenizer(tokenizer_corpus(SEED, n=400, max_len=RESPONSE_TOKENS),
                               vocab_size=TOKENIZER_VOCAB)


def longest_prompt(tokenizer, problems: list[str]) -> int:
    """Tokens of the longest meta prompt (it embeds the solution prompt) at {MAX} = the
    rehearsal's response length."""
    from masa_megatron.data.prompts import PromptConfig, encode_messages, meta_messages

    config = PromptConfig(max_response_length=RESPONSE_TOKENS)
    return max(len(ids) for ids in encode_messages(
        tokenizer, [meta_messages(p, config) for p in problems]))


def ensure_assets(root: Path, shape: TinyShape, model_vocab_of) -> Assets:
    """Tokenizer + model under root/model, problems under root/data; `model_vocab_of(n)` is the
    model's vocabulary for a tokenizer of n ids."""
    from masa_megatron.data import synthetic
    from masa_megatron.model.tiny import make_tiny_hf_model

    tokenizer = tiny_tokenizer()
    data = root / "data"
    train, evals = (data / "synthetic_train.parquet", data / "synthetic_eval.parquet")
    if not (train.is_file() and evals.is_file()):
        train, evals = synthetic.write_task_files(data, TRAIN_PROBLEMS, EVAL_PROBLEMS, SEED)
    problems = [r["problem"] for r in synthetic.generate_problems(TRAIN_PROBLEMS, SEED, "train")]
    problems += [r["problem"] for r in synthetic.generate_problems(EVAL_PROBLEMS, SEED, "eval")]
    prompt_tokens = longest_prompt(tokenizer, problems)
    vocab = model_vocab_of(len(tokenizer))
    model = root / "model"
    positions = 2 * (prompt_tokens + RESPONSE_TOKENS)
    stamp = {"shape": asdict(shape), "vocab": vocab, "positions": positions}
    marker = model / "rehearsal_shape.json"
    if not (marker.is_file() and json.loads(marker.read_text()) == stamp):
        tokenizer.save_pretrained(str(model))
        make_tiny_hf_model(model, shape.family, seed=SEED, bos_token_id=None,
                           eos_token_id=tokenizer.eos_token_id,
                           **shape.hf_kwargs(vocab, positions))
        marker.write_text(json.dumps(stamp))
    return Assets(model, train, evals, len(tokenizer), vocab, prompt_tokens)
