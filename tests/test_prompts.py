"""Prompt rendering (spec section 2): suffix once, meta wording, {MAX} switch, length filter."""
import pytest

from masa_megatron.data.prompts import (
    META_SYSTEM,
    SOLUTION_SUFFIX,
    PromptConfig,
    filter_by_prompt_length,
    meta_content,
    meta_messages,
    render_meta_prompt,
    render_solution_prompt,
    render_text,
    solution_content,
    solution_messages,
)
from masa_megatron.data.tiny_tokenizer import make_tiny_tokenizer

PROBLEM = "What is $1+1$?"

# The user message of spec section 2, verbatim, with {MAX} = 8192 and {PROBLEM} substituted.
EXPECTED_META_USER = (
    "Think step-by-step between <meta> and </meta>, ensuring comprehensive and detailed reasoning "
    "especially for determining the pass_rate and solution_length values. For each component "
    "(math_notion, pass_rate, solution_length), provide a comprehensive illustration or example "
    "during your reasoning in the <meta> section to clarify how each value is decided. When "
    "determining math_notion, ensure that the notions listed do not directly include the notions "
    "already written in the problem statement. After </meta>, return a JSON object with three keys:\n"
    "- math_notion (list[str])\n"
    "- pass_rate (integer from 0 to 8)\n"
    "- solution_length (integer from 128 to 8192)\n"
    "\n"
    "Problem: What is $1+1$? Let's think step by step and output the final answer within \\boxed{}."
)


@pytest.fixture(scope="module")
def tokenizer():
    corpus = [PROBLEM, EXPECTED_META_USER, META_SYSTEM, "The answer is \\boxed{2}."] * 4
    return make_tiny_tokenizer(corpus, vocab_size=400)


def test_solution_suffix_is_appended_once():
    once = PROBLEM + " Let's think step by step and output the final answer within \\boxed{}."
    assert solution_content(PROBLEM) == once
    assert solution_content(once) == once
    assert solution_content(once + "\n") == once + "\n"
    assert solution_messages(PROBLEM) == [{"role": "user", "content": once}]
    assert SOLUTION_SUFFIX.startswith(" Let's")


def test_meta_prompt_exact_wording():
    assert meta_content(PROBLEM) == EXPECTED_META_USER
    assert meta_messages(PROBLEM) == [{"role": "system", "content": "You are a helpful assistant."},
                                      {"role": "user", "content": EXPECTED_META_USER}]
    # a problem that already carries the suffix is embedded unchanged
    assert meta_content(solution_content(PROBLEM)) == EXPECTED_META_USER


def test_max_switch():
    response = PromptConfig(max_prompt_length=1024, max_response_length=4096)
    prompt = PromptConfig(max_prompt_length=1024, max_response_length=4096, max_source="prompt")
    assert "(integer from 128 to 4096)" in meta_content(PROBLEM, response)
    assert "(integer from 128 to 1024)" in meta_content(PROBLEM, prompt)
    assert PromptConfig().meta_max == 8192
    with pytest.raises(ValueError):
        PromptConfig(max_source="both")


def test_braces_and_placeholders_in_the_problem_are_kept():
    problem = "Let $f(x)=\\frac{1}{x}$; what is {MAX} or {PROBLEM}?"
    content = meta_content(problem, PromptConfig(max_response_length=100))
    assert content.endswith("Problem: " + problem + SOLUTION_SUFFIX)
    assert "(integer from 128 to 100)" in content


def test_rendering_uses_the_chat_template(tokenizer):
    text = render_text(tokenizer, meta_messages(PROBLEM))
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                    f"<|im_start|>user\n{EXPECTED_META_USER}<|im_end|>\n<|im_start|>assistant\n")
    ids = render_meta_prompt(tokenizer, PROBLEM)
    assert tokenizer.decode(ids) == text
    solution_ids = render_solution_prompt(tokenizer, PROBLEM)
    assert tokenizer.decode(solution_ids) == (
        f"<|im_start|>user\n{solution_content(PROBLEM)}<|im_end|>\n<|im_start|>assistant\n")
    assert len(solution_ids) < len(ids)
    assert ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")


def test_tiny_tokenizer_basics(tokenizer):
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.eos_token_id != tokenizer.pad_token_id
    text = "unseen ünïcode ∑ text 12345"
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text


def test_filter_by_prompt_length(tokenizer):
    problems = [PROBLEM, "Compute " + "very " * 300 + "long things.", "What is 2+2?"]
    lengths = [len(render_meta_prompt(tokenizer, p)) for p in problems]
    limit = max(lengths[0], lengths[2])
    assert lengths[1] > limit
    config = PromptConfig(max_prompt_length=limit)
    kept, dropped = filter_by_prompt_length(problems, tokenizer, config)
    assert kept == [PROBLEM, "What is 2+2?"] and dropped == 1
    # the limit is inclusive, and items may be records
    records = [{"q": p} for p in problems]
    kept, dropped = filter_by_prompt_length(
        records, tokenizer, PromptConfig(max_prompt_length=lengths[0]), problem_of=lambda r: r["q"])
    assert {"q": PROBLEM} in kept and dropped == sum(n > lengths[0] for n in lengths)
    assert filter_by_prompt_length([], tokenizer, config) == ([], 0)


def test_filter_uses_the_solution_prompt_when_no_meta_rollouts_are_made(tokenizer):
    solution_len = len(render_solution_prompt(tokenizer, PROBLEM))
    config = PromptConfig(max_prompt_length=solution_len)
    assert filter_by_prompt_length([PROBLEM], tokenizer, config) == ([], 1)
    assert filter_by_prompt_length([PROBLEM], tokenizer, config, with_meta=False) == ([PROBLEM], 0)


def test_raw_problem_solution_prompt_keeps_the_meta_prompt():
    """data.solution_suffix=false (the reference's evaluation): the solution prompt is the bare
    problem; the meta prompt is still the trained one, suffix included."""
    from masa_megatron.config import ExperimentConfig
    from masa_megatron.masa.planner import prompt_config_from

    cfg = ExperimentConfig()
    assert prompt_config_from(cfg).suffix_solution_prompt is True       # default: today's prompt
    cfg.data.solution_suffix = False
    raw = prompt_config_from(cfg)
    assert solution_messages(PROBLEM, raw) == [{"role": "user", "content": PROBLEM}]
    assert meta_content(PROBLEM, raw) == EXPECTED_META_USER
    assert solution_messages(PROBLEM) == [{"role": "user", "content": solution_content(PROBLEM)}]


def test_model_folder_without_tokenizer_or_chat_template_is_refused_at_start(tmp_path):
    from masa_megatron.data.chat_tokenizer import load_chat_tokenizer
    from masa_megatron.errors import UserError
    from masa_megatron.model.tiny import make_tiny_hf_model

    bare = tmp_path / "bare"
    make_tiny_hf_model(bare, "qwen3")
    with pytest.raises(UserError, match=rf"model.hf_path {bare}: no tokenizer"):
        load_chat_tokenizer(bare, "model.hf_path")
    plain = tmp_path / "plain"
    tokenizer = make_tiny_tokenizer(["one two three"], vocab_size=300)
    tokenizer.chat_template = None
    tokenizer.save_pretrained(str(plain))
    with pytest.raises(UserError, match=rf"model.hf_path {plain}: its tokenizer has no chat "
                                        rf"template"):
        load_chat_tokenizer(plain, "model.hf_path")
    good = tmp_path / "good"
    make_tiny_tokenizer(["one two three"], vocab_size=300).save_pretrained(str(good))
    assert load_chat_tokenizer(good, "model.hf_path").chat_template
