"""A tiny policy and a problem file for tests that run `masa train` parts end to end."""
import json
from pathlib import Path


def write_tiny_policy_and_problems(root: Path, problems: list[str], *, extra_texts=(),
                                   vocab_size: int = 300,
                                   max_position_embeddings: int = 256) -> tuple[Path, Path]:
    """<root>/policy: a byte-level BPE tokenizer trained on the problems (and `extra_texts`) and
    a random tiny Qwen3 over its vocabulary; <root>/train.jsonl: one verl-style row per problem
    (ground truth "0"). Returns (policy folder, train file)."""
    from masa_megatron.data.tiny_tokenizer import make_tiny_tokenizer
    from masa_megatron.model.tiny import make_tiny_hf_model

    hf = root / "policy"
    tokenizer = make_tiny_tokenizer(list(problems) * 3 + list(extra_texts) * 3,
                                    vocab_size=vocab_size)
    tokenizer.save_pretrained(str(hf))
    make_tiny_hf_model(hf, "qwen3", vocab_size=len(tokenizer),
                       max_position_embeddings=max_position_embeddings, bos_token_id=None,
                       eos_token_id=tokenizer.eos_token_id)
    rows = [{"prompt": [{"role": "user", "content": p}],
             "reward_model": {"ground_truth": {"target": "0"}}} for p in problems]
    train = root / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return hf, train
