"""Solution and meta prompts (spec section 2), rendered with the tokenizer's chat template.

solution prompt = [user: problem + SOLUTION_SUFFIX]                      (suffix added once;
                  the bare problem when `suffix_solution_prompt` is off, as the reference's
                  evaluation prompts were)
meta prompt     = [system: META_SYSTEM, user: META_USER_TEMPLATE with {MAX} and
                   {PROBLEM} = the full solution-prompt content substituted]
{MAX} = max response length (default) or max prompt length (the reference code's choice).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal, Sequence, TypeVar

SOLUTION_SUFFIX = " Let's think step by step and output the final answer within \\boxed{}."
META_SYSTEM = "You are a helpful assistant."
META_USER_TEMPLATE = (
    "Think step-by-step between <meta> and </meta>, ensuring comprehensive and detailed reasoning "
    "especially for determining the pass_rate and solution_length values. For each component "
    "(math_notion, pass_rate, solution_length), provide a comprehensive illustration or example "
    "during your reasoning in the <meta> section to clarify how each value is decided. When "
    "determining math_notion, ensure that the notions listed do not directly include the notions "
    "already written in the problem statement. After </meta>, return a JSON object with three keys:\n"
    "- math_notion (list[str])\n"
    "- pass_rate (integer from 0 to 8)\n"
    "- solution_length (integer from 128 to {MAX})\n"
    "\n"
    "Problem: {PROBLEM}"
)

T = TypeVar("T")
Messages = list[dict[str, str]]


@dataclass(frozen=True)
class PromptConfig:
    """Prompt settings. `max_source` picks what {MAX} in the meta prompt stands for;
    `suffix_solution_prompt` off leaves the solution prompt the bare problem (the meta prompt's
    {PROBLEM} keeps the suffix: it is the prompt the meta rollouts were trained on)."""

    max_prompt_length: int = 2048
    max_response_length: int = 8192
    max_source: Literal["response", "prompt"] = "response"
    solution_suffix: str = SOLUTION_SUFFIX
    suffix_solution_prompt: bool = True
    meta_system: str = META_SYSTEM
    meta_user_template: str = META_USER_TEMPLATE

    def __post_init__(self):
        if self.max_source not in ("response", "prompt"):
            raise ValueError(f"max_source must be 'response' or 'prompt', got {self.max_source!r}")

    @property
    def meta_max(self) -> int:
        """The value substituted for {MAX}."""
        return self.max_response_length if self.max_source == "response" else self.max_prompt_length


def solution_content(problem: str, config: PromptConfig = PromptConfig()) -> str:
    """problem + suffix, unless the problem already ends with the suffix."""
    suffix = config.solution_suffix
    if problem.rstrip().endswith(suffix.strip()):
        return problem
    return problem + suffix


def solution_prompt_text(problem: str, config: PromptConfig = PromptConfig()) -> str:
    """The solution prompt's user message: problem + suffix, or the bare problem."""
    return solution_content(problem, config) if config.suffix_solution_prompt else problem


def solution_messages(problem: str, config: PromptConfig = PromptConfig()) -> Messages:
    return [{"role": "user", "content": solution_prompt_text(problem, config)}]


def meta_content(problem: str, config: PromptConfig = PromptConfig()) -> str:
    # {MAX} first, so that a "{MAX}" inside the problem text is left alone.
    text = config.meta_user_template.replace("{MAX}", str(config.meta_max))
    return text.replace("{PROBLEM}", solution_content(problem, config))


def meta_messages(problem: str, config: PromptConfig = PromptConfig()) -> Messages:
    return [{"role": "system", "content": config.meta_system},
            {"role": "user", "content": meta_content(problem, config)}]


def render_text(tokenizer: Any, messages: Messages) -> str:
    """The chat-template rendering with the assistant turn opened (add_generation_prompt=True)."""
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def encode_messages(tokenizer: Any, messages_batch: Sequence[Messages]) -> list[list[int]]:
    """Token ids of each rendered conversation (the template supplies any special tokens)."""
    if not messages_batch:
        return []
    texts = [render_text(tokenizer, messages) for messages in messages_batch]
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def render_solution_prompt(tokenizer: Any, problem: str, config: PromptConfig = PromptConfig()) -> list[int]:
    return encode_messages(tokenizer, [solution_messages(problem, config)])[0]


def render_meta_prompt(tokenizer: Any, problem: str, config: PromptConfig = PromptConfig()) -> list[int]:
    return encode_messages(tokenizer, [meta_messages(problem, config)])[0]


def filter_by_prompt_length(
    items: Sequence[T], tokenizer: Any, config: PromptConfig = PromptConfig(),
    problem_of: Callable[[T], str] = lambda item: item,  # type: ignore[assignment,return-value]
    with_meta: bool = True,
) -> tuple[list[T], int]:
    """Keep the items whose longest prompt has at most config.max_prompt_length tokens: the meta
    prompt when meta rollouts are made (it embeds the solution prompt, so it is the longer one),
    else the solution prompt. Returns (kept items, number dropped)."""
    render = meta_messages if with_meta else solution_messages
    lengths = [len(ids) for ids in encode_messages(
        tokenizer, [render(problem_of(item), config) for item in items])]
    kept = [item for item, length in zip(items, lengths) if length <= config.max_prompt_length]
    return kept, len(items) - len(kept)
