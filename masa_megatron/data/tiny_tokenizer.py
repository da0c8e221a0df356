"""A tiny byte-level BPE tokenizer trained on the fly, with Qwen-style chat template and special
tokens. Offline and fast: for tests and the CPU demo, never for real training."""
from __future__ import annotations

from typing import Iterable

PAD_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"

# Qwen-style: <|im_start|>role\ncontent<|im_end|>\n ... then <|im_start|>assistant\n
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def make_tiny_tokenizer(texts: Iterable[str], vocab_size: int = 512, split_digits: bool = True):
    """Train a byte-level BPE on `texts` and wrap it as a transformers PreTrainedTokenizerFast.

    Every string is encodable (256 byte symbols); eos = <|im_end|>, pad = <|endoftext|>.
    `split_digits`: every digit is its own token and the space before a number is a token of its
    own, so a number is spelled by the same tokens wherever it occurs (" 74" in a problem and
    "{74}" in an answer share "7", "4"), which a tiny model needs to learn copying and
    column arithmetic in a few hundred steps.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = [PAD_TOKEN, IM_START, IM_END]
    backend = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), byte_level]) if split_digits else byte_level
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=max(vocab_size, 256 + len(specials)),
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(list(texts), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token=IM_END, pad_token=PAD_TOKEN,
        additional_special_tokens=[IM_START],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer
