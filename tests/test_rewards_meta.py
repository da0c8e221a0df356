"""Meta prediction parsing (both modes) and the self-alignment reward (spec sections 3 and 4)."""
import json
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from masa_megatron.rewards.meta import (
    difficulty_reward,
    length_reward,
    meta_reward,
    normalize_notions,
    parse_meta_prediction,
    singularize,
)

FULL = {"math_notion": ["a", "b"], "pass_rate": 4, "solution_length": 900}
COMPACT = '{"math_notion": ["a", "b"], "pass_rate": 4, "solution_length": 900}'


# ----------------------------------------------------------------------------- worked example
def test_spec_worked_example():
    prediction = {"math_notion": ["quadratic equations", "Vieta's formulas"], "pass_rate": 5,
                  "solution_length": 1500}
    responses = ["Expand the quadratic equation and factor: x = 2.",
                 "By Vieta's formula the sum is 4.",
                 "Solve the quadratic equation directly."]
    reward = meta_reward(prediction, [1, 0, 1], [1000, 3000, 2000], responses,
                         problem="Find the roots of x^2 - 5x + 6 = 0.")
    assert reward["notion"] == 0.5
    assert round(reward["difficulty"], 4) == 0.8254
    assert reward["length"] == 1.0
    assert round(reward["score"], 4) == 0.7751


# ----------------------------------------------------------------------------- parsing
PARSE_CASES = [
    # name, text, expected robust, expected reference (decided by hand from spec section 3)
    ("compact", f"<meta>think</meta>\n{COMPACT}", FULL, FULL),
    ("compact no spaces", '{"math_notion":["a","b"],"pass_rate":4,"solution_length":900}', FULL, FULL),
    ("pretty", '<meta>x</meta>\n{\n  "math_notion": ["a", "b"],\n  "pass_rate": 4,\n'
               '  "solution_length": 900\n}', FULL, {}),
    ("fenced compact", f"<meta>x</meta>\n```json\n{COMPACT}\n```", FULL, FULL),
    ("fenced pretty", '```json\n{\n "pass_rate": 4,\n "solution_length": 900,\n'
                      ' "math_notion": ["a", "b"]\n}\n```', FULL, {}),
    ("key order", '{"pass_rate": 4, "solution_length": 900, "math_notion": ["a", "b"]}', FULL, {}),
    ("space after brace", '{ "math_notion": ["a", "b"], "pass_rate": 4, "solution_length": 900}',
     FULL, {}),
    ("single quotes", "{'math_notion': ['a', 'b'], 'pass_rate': 4, 'solution_length': 900}", {}, {}),
    ("string numbers", '{"math_notion": ["a", "b"], "pass_rate": "4", "solution_length": "900"}',
     {"math_notion": ["a", "b"]}, {"math_notion": ["a", "b"]}),
    ("booleans", '{"math_notion": ["a", "b"], "pass_rate": true, "solution_length": false}',
     {"math_notion": ["a", "b"]}, {"math_notion": ["a", "b"]}),
    ("floats", '{"math_notion": ["a", "b"], "pass_rate": 4.0, "solution_length": 9e2}',
     {"math_notion": ["a", "b"]}, {"math_notion": ["a", "b"]}),
    ("notion as string", '{"math_notion": "a, b", "pass_rate": 4}',
     {"math_notion": "a, b", "pass_rate": 4}, {"math_notion": "a, b", "pass_rate": 4}),
    ("notion as number", '{"math_notion": 3, "pass_rate": 4}', {"pass_rate": 4}, {"pass_rate": 4}),
    ("trailing text", f"{COMPACT}\nI hope this helps {{not json}} :)", FULL, FULL),
    ("several objects, last wins",
     '{"math_notion": ["x"], "pass_rate": 1, "solution_length": 100}\nRevised:\n' + COMPACT, FULL, FULL),
    ("later invalid object is skipped", COMPACT + ' then {"pass_rate": 5,}', FULL, FULL),
    ("later object without keys is skipped", COMPACT + ' {"answer": 3}', FULL, FULL),
    ("brace inside a string", '{"math_notion": ["set {1,2}"], "pass_rate": 3}',
     {"math_notion": ["set {1,2}"], "pass_rate": 3}, {}),
    ("nested object belongs to the outer one", '{"pass_rate": 1, "extra": [{"y": 2}, {"pass_rate": 5}]}',
     {"pass_rate": 1}, {}),
    ("partial object", '{"pass_rate": 6}', {"pass_rate": 6}, {}),
    ("unquoted key fallback", '<meta>x</meta> math_notion: ["a", "b"], pass_rate: 4', {},
     {"math_notion": ["a", "b"]}),
    ("unquoted key fallback, comma split", "math_notion: [a, 'b' , \"c\"]", {},
     {"math_notion": ["a", "b", "c"]}),
    ("no json", "<meta>I cannot decide.</meta> The pass rate is 4.", {}, {}),
    ("empty", "", {}, {}),
    ("truncated", '<meta>x</meta> {"math_notion": ["a", "b"], "pass_ra', {}, {}),
]


@pytest.mark.parametrize("name, text, robust, reference", PARSE_CASES, ids=[c[0] for c in PARSE_CASES])
def test_parse_modes(name, text, robust, reference):
    assert parse_meta_prediction(text) == robust
    assert parse_meta_prediction(text, mode="robust") == robust
    assert parse_meta_prediction(text, mode="reference") == reference


def test_unknown_mode_is_an_error():
    with pytest.raises(ValueError, match="robust"):
        parse_meta_prediction("{}", mode="strict")


@pytest.mark.parametrize("mode", ["robust", "reference"])
def test_non_string_input(mode):
    assert parse_meta_prediction(None, mode) == {}
    assert parse_meta_prediction(b'{"pass_rate": 1}', mode) == {}


MEGABYTE = 1 << 20
ADVERSARIAL = {
    "open braces": "{" * MEGABYTE,
    "nested keys": '{"pass_rate":' * (MEGABYTE // 13),
    "nested reference objects": '{"math_notion":' * (MEGABYTE // 15),
    "unclosed arrays then answer": '{"a":[1,' * (MEGABYTE // 8) + COMPACT,
    "quotes and braces": '{"{"' * (MEGABYTE // 4),
    "unclosed notion lists": "math_notion: [" * (MEGABYTE // 14),
    "many small objects": '{"pass_rate": 1}' * (MEGABYTE // 16),
    "huge integer": '{"pass_rate": ' + "9" * MEGABYTE + "}",
    "long string": '{"math_notion": ["' + "a" * MEGABYTE + '"], "pass_rate": 2}',
    "deep list": '{"math_notion": ' + "[" * 100_000 + "]" * 100_000 + "}",
}


@pytest.mark.parametrize("mode", ["robust", "reference"])
@pytest.mark.parametrize("name", list(ADVERSARIAL))
def test_megabyte_inputs_are_parsed_in_linear_time(name, mode):
    start = time.process_time()
    result = parse_meta_prediction(ADVERSARIAL[name], mode)
    assert isinstance(result, dict)
    assert time.process_time() - start < 3.0  # CPU seconds; quadratic behaviour would take minutes


def test_adversarial_prefix_does_not_hide_the_answer():
    assert parse_meta_prediction(ADVERSARIAL["unclosed arrays then answer"]) == FULL


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(
        st.sampled_from(["math_notion", "pass_rate", "solution_length", "x"]) | st.text(max_size=5),
        children, max_size=4),
    max_leaves=12)
fragments = st.sampled_from([
    "{", "}", "[", "]", ":", ",", '"', "'", " ", "\n", "```json", "```", '"math_notion"',
    "'math_notion'", "math_notion", '"pass_rate"', '"solution_length"', "4", "-1", "1e999", "true",
    "null", "NaN", '"a"', "\\", "\\u", "\ud800", "<meta>", "</meta>", "9" * 30, "é",
])
any_character = st.characters(codec=None, exclude_categories=()) | st.characters(
    min_codepoint=0xD800, max_codepoint=0xDFFF, codec=None, exclude_categories=())  # lone surrogates
any_text = st.text(alphabet=any_character, max_size=300)
jsonish_text = st.lists(fragments, max_size=60).map("".join)


@settings(max_examples=100, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
@given(st.one_of(any_text, jsonish_text, json_values.map(json.dumps)))
def test_parsing_never_raises_and_keeps_types(text):
    for mode in ("robust", "reference"):
        result = parse_meta_prediction(text, mode)
        assert set(result) <= {"math_notion", "pass_rate", "solution_length"}
        for key in ("pass_rate", "solution_length"):
            if key in result:
                assert type(result[key]) is int
        if "math_notion" in result:
            assert isinstance(result["math_notion"], (list, str))


@settings(max_examples=100, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
@given(json_values, st.lists(st.tuples(st.sampled_from([0, 1, 0.0, 1.0]),
                                       st.integers(0, 10_000), any_text), max_size=5), any_text)
def test_reward_never_raises_and_is_bounded(prediction, rollouts, problem):
    scores = [r[0] for r in rollouts]
    lengths = [r[1] for r in rollouts]
    responses = [r[2] for r in rollouts]
    reward = meta_reward(prediction, scores, lengths, responses, problem)
    assert set(reward) == {"score", "notion", "difficulty", "length"}
    assert all(0.0 <= value <= 1.0 for value in reward.values())
    assert reward["score"] == pytest.approx((reward["notion"] + reward["difficulty"] + reward["length"]) / 3)


# ----------------------------------------------------------------------------- reward pieces
@pytest.mark.parametrize("phrase, singular", [
    ("quadratic equations", "quadratic equation"),
    ("inequalities", "inequality"),
    ("series", "series"),
    ("Taylor series", "Taylor series"),
    ("geometric Series", "geometric Series"),
    ("matches", "match"),
    ("wishes", "wish"),
    ("boxes", "box"),
    ("quizzes", "quizz"),
    ("heroes", "hero"),
    ("class", "class"),
    ("Vieta's formulas", "Vieta's formula"),
    ("analysis", "analysi"),  # the rules are crude on purpose
    ("triangle", "triangle"),
    ("", ""),
])
def test_singularize(phrase, singular):
    assert singularize(phrase) == singular


def test_notion_normalisation():
    assert normalize_notions("circles, [Vieta's formulas]", "") == ["circle", "Vieta's formula"]
    assert normalize_notions("[circles]", "") == ["[circles]"]  # no comma: one phrase, as is
    assert normalize_notions(["circles", "circle", "angles"], "") == ["circle", "angle"]
    assert normalize_notions(["triangles", "circle"], "In a triangle ABC ...") == ["circle"]
    assert normalize_notions(["circle", 3], "") is None
    assert normalize_notions(None, "") is None


def _notion(notions, scores, responses, problem="A problem."):
    prediction = {"math_notion": notions}
    return meta_reward(prediction, scores, [100] * len(scores), responses, problem)["notion"]


def test_notion_net_count_rule():
    responses = ["uses circle", "uses circle", "uses circle", "nothing"]
    assert _notion(["circles"], [1, 1, 0, 0], responses) == 1.0  # net 2 - 1 > 0
    assert _notion(["circles"], [1, 0, 0, 1], responses) == 0.0  # net 1 - 2 < 0
    assert _notion(["circles"], [1, 1, 1, 0], responses) == 1.0  # net 3
    assert _notion(["circles"], [1, 0, 1, 1], ["circle", "circle", "x", "y"]) == 0.0  # net 0
    assert _notion(["circles"], [1, 1, 0, 1], ["circle", "circle", "circle", "y"]) == 1.0  # net 1


def test_notion_duplicates_case_and_problem_text():
    responses = ["circle here", "no", "no"]
    scores = [1, 0, 0]
    assert _notion(["circles", "circle", "angles"], scores, responses) == 0.5  # 2 distinct notions
    assert _notion(["Circles"], scores, responses) == 0.0  # case-sensitive
    assert _notion(["circles"], scores, responses, problem="Find the circle's area.") == 0.0  # dropped
    assert _notion(["circles", "angles"], scores, ["angle here", "no", "no"],
                   problem="Two circles meet.") == 1.0  # "circle" is in the problem: only "angle" counts
    assert _notion([], scores, responses) == 0.0
    assert _notion(["circle", None], scores, responses) == 0.0  # malformed


def test_difficulty_reward():
    assert difficulty_reward(4, [1, 0]) == pytest.approx(1.0)
    assert difficulty_reward(0, [1, 1]) == pytest.approx(0.01)
    assert difficulty_reward(12, [1, 1]) == pytest.approx(0.01 ** 0.5)  # k is not clamped
    assert difficulty_reward(-8, [0, 0]) == pytest.approx(0.01)
    assert difficulty_reward(8, [1, 1], base=0.02) == pytest.approx(1.0)
    assert difficulty_reward(7, [1, 1], base=0.02) == pytest.approx(0.02 ** 0.125)
    assert difficulty_reward(10 ** 400, [1]) == 0.0
    for not_int in (True, False, "4", 4.0, None, [4]):
        assert difficulty_reward(not_int, [1, 0]) == 0.0
    assert difficulty_reward(4, []) == 0.0


def test_length_reward_is_strict():
    scores, lengths = [1, 0, 1, 1], [1000, 50, 2000, 1500]
    assert length_reward(1001, scores, lengths) == 1.0
    assert length_reward(1999, scores, lengths) == 1.0
    assert length_reward(1000, scores, lengths) == 0.0  # min(C) is excluded
    assert length_reward(2000, scores, lengths) == 0.0  # max(C) is excluded
    assert length_reward(60, scores, lengths) == 0.0  # only correct lengths count
    assert length_reward(1000, [1, 0], [1000, 5]) == 0.0  # a single correct answer: empty range
    assert length_reward(500, [0, 0], [100, 900]) == 0.0  # C empty
    for not_int in (True, "1500", 1500.0, None):
        assert length_reward(not_int, scores, lengths) == 0.0


def test_unparseable_or_empty_prediction_scores_zero():
    zero = {"score": 0.0, "notion": 0.0, "difficulty": 0.0, "length": 0.0}
    args = ([1, 0], [10, 20], ["a", "b"], "problem")
    assert meta_reward({}, *args) == zero
    assert meta_reward(None, *args) == zero
    assert meta_reward(parse_meta_prediction("no prediction here"), *args) == zero


def test_mismatched_rollout_lists_are_an_error():
    with pytest.raises(ValueError):
        meta_reward({"pass_rate": 4}, [1, 0], [10], ["a", "b"], "problem")


# ----------------------------------------------------------------------------- notion rule sets
@pytest.mark.parametrize("phrase, spec, reference", [
    # spec: suffixes tested case-sensitively, any phrase ending in "series" exempt;
    # reference (released reward code): suffixes tested on the lower-cased phrase, only the
    # word "series" itself exempt, the cut applied to the phrase as written
    ("Taylor series", "Taylor series", "Taylor sery"),
    ("FORMULAS", "FORMULAS", "FORMULA"),
    ("series", "series", "series"),
    ("IDENTITIES", "IDENTITIES", "IDENTITy"),  # the reference appends a lower-case "y"
    ("BOXES", "BOXES", "BOX"),
    ("class", "class", "class"),
    ("Vieta's formulas", "Vieta's formula", "Vieta's formula"),
])
def test_singularize_under_both_rule_sets(phrase, spec, reference):
    assert singularize(phrase) == spec
    assert singularize(phrase, "spec") == spec
    assert singularize(phrase, "reference") == reference


def test_reference_rules_drop_notions_found_anywhere_in_the_meta_prompt():
    """Spec: only notions in the problem are dropped; reference: notions in the whole meta prompt
    (its instructions mention "pass_rate" and "JSON object")."""
    problem = "Sum the FORMULA terms."
    meta_prompt = "Return a JSON object ... pass_rate ... Problem: " + problem
    notions = ["JSON objects", "FORMULAS", "Taylor series"]
    assert normalize_notions(notions, problem) == ["JSON object", "FORMULAS", "Taylor series"]
    assert normalize_notions(notions, meta_prompt, "reference") == ["Taylor sery"]


def test_notion_reward_under_both_rule_sets():
    """Hand-computed: texts mention "Taylor series" (correct) and "FORMULA" (wrong).
    spec: notions {"Taylor series": net +1, "FORMULAS": net 0 (case-sensitive, no cut)} -> 1/2;
    reference: {"Taylor sery": net 0, "FORMULA": net -1} -> 0."""
    prediction = {"math_notion": ["Taylor series", "FORMULAS"]}
    responses = ["expand the Taylor series", "apply the FORMULA"]
    args = (prediction, [1, 0], [10, 20], responses, "Find the limit.")
    assert meta_reward(*args)["notion"] == 0.5
    assert meta_reward(*args, notion_rules="reference")["notion"] == 0.0
    with pytest.raises(ValueError, match="notion rules"):
        meta_reward(*args, notion_rules="nope")
