"""The synthetic demo task and its warm-start data: determinism, exactness, format."""
import json
import random
import re
from collections import Counter, defaultdict

import pytest

from masa_megatron.data import synthetic
from masa_megatron.data.prompts import META_SYSTEM, PromptConfig, meta_messages, solution_messages
from masa_megatron.demo import warmstart_data as W

REFERENCE_META_RE = re.compile(r"\{[\"']math_notion[\"']:[^\}]*\}", re.DOTALL)   # spec section 3


def test_same_seed_same_problems_and_different_seed_differs():
    assert synthetic.generate_problems(64, seed=3) == synthetic.generate_problems(64, seed=3)
    assert synthetic.generate_problems(64, seed=3) != synthetic.generate_problems(64, seed=4)
    assert W.warmstart_examples(32, seed=1) == W.warmstart_examples(32, seed=1)


def test_train_and_eval_are_disjoint_for_any_seeds():
    train = {p["problem"] for s in range(3) for p in synthetic.generate_problems(400, s, "train")}
    evals = {p["problem"] for s in range(3) for p in synthetic.generate_problems(100, s, "eval")}
    assert not train & evals
    assert all(synthetic.split_of(p) == "eval" for p in evals)


def test_eval_problems_are_unique_where_the_level_allows():
    items = synthetic.generate_problems(80, seed=0, split="eval")
    per_level = Counter(p["difficulty"] for p in items)
    assert set(per_level) == set(synthetic.LEVELS) and len(set(per_level.values())) == 1
    hard = [p["problem"] for p in items if p["difficulty"] >= 3]
    assert len(set(hard)) == len(hard)


@pytest.mark.parametrize("seed", range(5))
def test_answers_match_python_evaluation(seed):
    for p in synthetic.generate_problems(200, seed, "train") + synthetic.generate_problems(
            50, seed, "eval"):
        expression = p["problem"].removeprefix("Compute ").removesuffix(".")
        assert re.fullmatch(r"\d+( [+-] \d+)+", expression)
        assert p["answer"] == str(eval(expression))                    # plain integer answer
        assert p["solution"].endswith(f"\\boxed{{{p['answer']}}}")


def test_each_solution_line_is_correct_and_names_its_concepts():
    for p in synthetic.generate_problems(300, seed=7):
        for line in p["solution"].splitlines()[:-1]:
            m = re.fullmatch(r"(?:first |then )?(-?\d+) ([+-]) (\d+) = (-?\d+)((?: \w+)*)", line)
            assert m, line
            x, op, y, result = int(m[1]), m[2], int(m[3]), int(m[4])
            assert result == (x + y if op == "+" else x - y)
            names = m[5].split()
            assert ("negative" in names) == (result < 0)
            assert set(names) <= set(synthetic.CONCEPTS)


def _columns_value(work: str) -> int:
    """Read the magnitude off `column_work` text: each column's digit, units first, and the
    last column's carry out."""
    values = [int(v) for v in re.findall(r"= (\d+)", work)]
    digits = [v % 10 for v in values] + ([values[-1] // 10] if values[-1] >= 10 else [])
    return int("".join(map(str, reversed(digits))))


@pytest.mark.parametrize("seed", range(3))
def test_column_work_spells_the_result_and_carries_or_borrows_as_named(seed):
    rng = random.Random(seed)
    for _ in range(500):
        x, op, y = rng.randint(-9999, 9999), rng.choice("+-"), rng.randint(0, 9999)
        result, names = synthetic.step_concepts(x, op, y)
        work = synthetic.column_work(x, op, y)
        assert _columns_value(work.split(" : ")[-1]) == abs(result), (x, op, y, work)
        carried = any(int(v) >= 10 for v in re.findall(r"= (\d+)", work))
        assert carried == ("carry" in names), (x, op, y, work)
        assert (" + 10 -" in work) == ("borrow" in names), (x, op, y, work)
    assert synthetic.column_work(85, "-", 91) == "91 - 85 : 1 + 10 - 5 = 6 , 9 - 8 - 1 = 0"
    assert synthetic.column_work(47, "+", 38) == "7 + 8 = 15 , 4 + 3 + 1 = 8"


def test_columns_style_changes_only_the_solution_text():
    steps = synthetic.generate_problems(160, seed=4, split="eval")
    columns = synthetic.generate_problems(160, seed=4, split="eval", style="columns")
    for a, b in zip(steps, columns):
        assert {**a, "solution": ""} == {**b, "solution": ""}
        # the same result lines, each with its column work in front
        assert re.sub(r"(?m)^((?:first |then )?)[^\n]* : [^\n]* , ", r"\1", b["solution"]) \
            == a["solution"]
        assert len(b["solution"]) > len(a["solution"])
    assert sum(len(p["solution"]) for p in columns) > 2.5 * sum(len(p["solution"]) for p in steps)
    with pytest.raises(ValueError, match="solution style must be one of"):
        synthetic.generate_problems(1, seed=0, style="prose")


def test_carry_and_borrow_rules():
    assert synthetic.step_concepts(47, "+", 38) == (85, ["carry"])
    assert synthetic.step_concepts(41, "+", 38) == (79, [])
    assert synthetic.step_concepts(85, "-", 91) == (-6, ["borrow", "negative"])
    assert synthetic.step_concepts(95, "-", 91) == (4, [])
    assert synthetic.step_concepts(100, "-", 1) == (99, ["borrow"])
    assert synthetic.step_concepts(-6, "-", 5) == (-11, ["carry", "negative"])
    assert synthetic.step_concepts(-6, "+", 10) == (4, ["borrow"])
    assert synthetic.step_concepts(-6, "+", 3) == (-3, ["negative"])


def test_notions_are_in_solution_and_never_in_problem():
    items = synthetic.generate_problems(400, seed=2)
    seen = Counter()
    for p in items:
        prompt = solution_messages(p["problem"])[0]["content"]
        for concept in synthetic.CONCEPTS:
            assert concept not in prompt
            assert (concept in p["solution"]) == (concept in p["notions"])
        seen.update(p["notions"])
    assert all(seen[c] > 20 for c in synthetic.CONCEPTS)


def test_solution_length_grows_with_difficulty():
    lengths = defaultdict(list)
    for p in synthetic.generate_problems(800, seed=0):
        lengths[p["difficulty"]].append(len(re.findall(r"\d|\S+", p["solution"])))
    means = [sum(lengths[d]) / len(lengths[d]) for d in sorted(lengths)]
    assert all(a < b for a, b in zip(means, means[1:])), means


def test_correct_solutions_of_one_problem_vary_in_length():
    """Optional wording gives a problem's correct solutions >= 3 lengths (r_len attainable)."""
    lengths = defaultdict(set)
    for s in range(2000):
        item = synthetic.make_problem(random.Random(s), 1)
        lengths[item["problem"]].add(len(item["solution"]))
    assert max(len(v) for v in lengths.values()) >= 3


@pytest.mark.parametrize("suffix", [".parquet", ".jsonl"])
def test_verl_rows_round_trip(tmp_path, suffix):
    items = synthetic.generate_problems(24, seed=5, split="eval")
    rows = synthetic.to_verl_rows(items, split="eval")
    back = synthetic.read_rows(synthetic.write_rows(rows, tmp_path / f"eval{suffix}"))
    assert back == rows
    row = back[3]
    assert row["prompt"] == [{"role": "user", "content": items[3]["problem"]}]
    assert row["reward_model"]["ground_truth"]["target"] == items[3]["answer"]
    assert row["extra_info"]["difficulty"] == items[3]["difficulty"]


def test_write_task_files(tmp_path):
    train, evals = synthetic.write_task_files(tmp_path, n_train=16, n_eval=8, seed=1)
    assert len(synthetic.read_rows(train)) == 16 and len(synthetic.read_rows(evals)) == 8


def test_meta_answers_are_compact_json_in_the_reference_format():
    metas = [e for e in W.warmstart_examples(200, seed=0, max_len=96) if e["kind"] == "meta"]
    assert 60 < len(metas) < 140
    for e in metas:
        assert e["messages"][0] == {"role": "system", "content": META_SYSTEM}
        assert "solution_length (integer from 128 to 96)" in e["messages"][1]["content"]
        assert re.fullmatch(r"<meta> [^<]* </meta>\n\{.*\}", e["response"])
        obj = json.loads(REFERENCE_META_RE.findall(e["response"])[-1])
        assert list(obj) == ["math_notion", "pass_rate", "solution_length"]
        assert 0 <= obj["pass_rate"] <= 8 and 8 <= obj["solution_length"] <= 96
        assert obj["math_notion"] and set(obj["math_notion"]) <= set(synthetic.CONCEPTS)


def test_meta_predictions_carry_no_information_about_difficulty():
    """The k-th meta answer's numbers come from a seed-only stream, whatever the problems."""
    def numbers(levels):
        out = []
        for e in W.warmstart_examples(120, seed=9, levels=levels, meta_fraction=1.0):
            if e["kind"] == "meta":
                obj = json.loads(e["response"].split("\n", 1)[1])
                out.append((obj["pass_rate"], obj["solution_length"]))
        return out
    easy, hard = numbers([1]), numbers([8])
    assert easy == hard
    assert len({k for k, _ in easy}) == 9                  # uniform on 0..8: all values seen


def test_meta_prompt_follows_the_spec_wording():
    text = meta_messages("Compute 1 + 2.", PromptConfig(max_response_length=256))[1]["content"]
    assert text.startswith("Think step-by-step between <meta> and </meta>, ensuring")
    assert "- pass_rate (integer from 0 to 8)\n- solution_length (integer from 128 to 256)" in text
    assert text.endswith("\n\nProblem: Compute 1 + 2. Let's think step by step and output the "
                         "final answer within \\boxed{}.")


@pytest.mark.parametrize("style", synthetic.SOLUTION_STYLES)
def test_tokenizer_corpus_covers_every_character(style):
    corpus = W.tokenizer_corpus(seed=0, n=200, style=style)
    chars = set("".join(corpus))
    examples = W.warmstart_examples(50, seed=11, max_len=64, style=style)
    for ex in examples:
        texts = [m["content"] for m in ex["messages"]] + [ex["response"]]
        assert set("".join(texts)) <= chars
    solutions = [ex["response"] for ex in examples if ex["kind"] == "solution"]
    assert all((" : " in text) == (style == "columns") for text in solutions)
    assert all(m in corpus for m in W.CHAT_MARKERS)


def test_tiny_qwen3_config():
    pytest.importorskip("transformers")
    cfg = W.make_tiny_qwen3_config(300)
    assert (cfg.vocab_size, cfg.hidden_size, cfg.num_hidden_layers) == (300, 128, 4)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (4, 2, 32)
    assert cfg.tie_word_embeddings is False


def test_small_levels_fill_large_eval_sets():
    # level 1 has 36 problems, 8 of them in the eval split: a large request repeats them, never fails
    for seed in range(5):
        problems = synthetic.generate_problems(300, seed, "eval", [1])
        assert len({p["problem"] for p in problems}) == 8
        assert all(synthetic.split_of(p["problem"]) == "eval" for p in problems)


def test_tiny_tokenizer_spells_numbers_with_the_same_digit_tokens_everywhere():
    pytest.importorskip("tokenizers")
    from masa_megatron.data.tiny_tokenizer import make_tiny_tokenizer
    tokenizer = make_tiny_tokenizer(W.tokenizer_corpus(seed=0, n=200), vocab_size=320)
    problem_ids = tokenizer("Compute 74 + 2.", add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer("\\boxed{742}", add_special_tokens=False)["input_ids"]
    digits = [tokenizer.convert_tokens_to_ids(d) for d in "742"]
    assert problem_ids[problem_ids.index(digits[0]):][:2] == digits[:2]
    assert answer_ids[-4:-1] == digits
    assert tokenizer.decode(problem_ids) == "Compute 74 + 2."


def test_warm_start_batches_hold_similar_lengths_and_cover_the_steps():
    from masa_megatron.demo.warmstart import length_sorted_batches
    rng = random.Random(0)
    examples = [([0] * rng.randint(5, 200), [1] * rng.randint(1, 50)) for _ in range(300)]
    batches = list(length_sorted_batches(examples, batch_size=8, steps=100, seed=3))
    assert len(batches) == 100 and all(len(b) == 8 for b in batches)
    spread = [max(map(len, (p + r for p, r in b))) - min(map(len, (p + r for p, r in b)))
              for b in batches]
    assert sum(spread) / len(spread) < 40      # random batches of this data: about 170
