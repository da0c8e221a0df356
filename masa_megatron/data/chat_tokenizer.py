"""The policy's tokenizer, checked when a run starts rather than at the first prompt.

Prompts are rendered with `apply_chat_template`, so a model folder must hold tokenizer files and
a chat template. Without them transformers can quietly build a one-token tokenizer and the run
dies much later inside the template; `load_chat_tokenizer` raises one UserError naming the folder.
"""
from __future__ import annotations

from pathlib import Path

from masa_megatron.errors import UserError

VOCAB_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


def load_chat_tokenizer(folder: str | Path, what: str):
    """AutoTokenizer of `folder` (`what` names it in errors, e.g. the config field)."""
    from transformers import AutoTokenizer

    folder = Path(folder)
    if not any((folder / name).is_file() for name in VOCAB_FILES):
        raise UserError(f"{what} {folder}: no tokenizer ({' / '.join(VOCAB_FILES)} missing); "
                        f"copy the tokenizer files of the base model into it")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError, TypeError, KeyError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UserError(f"{what} {folder}: its tokenizer cannot be loaded ({first})") from None
    if len(tokenizer) <= 1:
        raise UserError(f"{what} {folder}: its tokenizer has {len(tokenizer)} token(s)")
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(f"{what} {folder}: its tokenizer has no chat template (prompts are "
                        f"rendered with apply_chat_template); add chat_template.jinja or a "
                        f"chat_template entry in tokenizer_config.json")
    return tokenizer
