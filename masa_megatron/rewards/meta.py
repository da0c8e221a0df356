"""Meta rollouts: parse the predicted {math_notion, pass_rate, solution_length} and score it.

Reward of one prediction (k = pass_rate, l = solution_length, N = math_notion) against the
solution rollouts of the same problem (scores s_i in {0,1}, token lengths L_i, texts O_i):

    p       = mean(s),   C = {L_i : s_i = 1}
    r_diff  = base ** |p - k/8|          if k is an int (bools are not), else 0; k is not clamped
    r_len   = 1 if C and min(C) < l < max(C) (strict), else 0;   0 if l is not an int
    r_notion = mean_n [net(n) > 0],  net(n) = #{s_i=1, n in O_i} - #{s_i=0, n in O_i}
              over the normalised, singularised notions not contained in the problem text
              (rule sets "spec" and "reference": see `singularize` and `notion_context`)
    r_meta  = (r_notion + r_diff + r_len) / 3

Parsed predictions only hold well-typed fields: `pass_rate` / `solution_length` only when they are
JSON integers (not bools, not strings such as "4", not floats), `math_notion` only when it is a
list or a string. Anything else is absent, so the reward treats it as missing.
"""
from __future__ import annotations

import json
import re
from typing import Any, Sequence

META_KEYS = ("math_notion", "pass_rate", "solution_length")
PARSE_MODES = ("robust", "reference")
NOTION_RULES = ("spec", "reference")

# Bounds on the robust parser's work: JSON decoding attempts and characters decoded in total.
_MAX_DECODE_ATTEMPTS = 20_000
_DECODE_CHAR_BUDGET_FACTOR = 4
_DECODE_CHAR_BUDGET_MIN = 200_000
_FIRST_WINDOW = 2048

_REFERENCE_OBJECT = re.compile(r"\{[\"']math_notion[\"']:[^\}]*\}", re.DOTALL)
_REFERENCE_NOTION_LIST = re.compile(r"math_notion\s*:\s*(\[[^\]]*\])")
_OBJECT_START = re.compile(r"\{\s*\"")
_KEY_STRINGS = tuple(f'"{key}"' for key in META_KEYS)


def is_int(value: Any) -> bool:
    """JSON integer: an int that is not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


def _well_typed(obj: dict) -> dict:
    out = {}
    if isinstance(obj.get("math_notion"), (list, str)):
        out["math_notion"] = obj["math_notion"]
    for key in ("pass_rate", "solution_length"):
        if is_int(obj.get(key)):
            out[key] = obj[key]
    return out


# ----------------------------------------------------------------------------- parsing
def parse_meta_prediction(text: str, mode: str = "robust") -> dict:
    """The prediction in a meta rollout as a dict with (a subset of) math_notion, pass_rate and
    solution_length; {} when nothing parses. Never raises on model output.

    mode "robust": the last valid JSON object (fenced or not, any key order or whitespace) with at
    least one of the three keys; an object nested in a qualifying object belongs to it.
    mode "reference": the authors' parser (see `_parse_reference`).
    """
    if mode not in PARSE_MODES:
        raise ValueError(f"unknown meta parse mode {mode!r}; expected one of {PARSE_MODES}")
    if not isinstance(text, str) or not text:
        return {}
    try:
        return _parse_reference(text) if mode == "reference" else _parse_robust(text)
    except (RecursionError, MemoryError):
        return {}


def _parse_reference(text: str) -> dict:
    """LAST match of  \\{["']math_notion["']:[^\\}]*\\}  json-decoded; if that fails, only
    math_notion from  math_notion\\s*:\\s*(\\[[^\\]]*\\])  (json list, else comma split, quotes
    stripped).

    The text is cut after its last "}" (resp. "]"): every match attempt then finds its closing
    character, which keeps the regexes linear-time without changing their matches.
    """
    last_close = text.rfind("}")
    matches = list(_REFERENCE_OBJECT.finditer(text, 0, last_close + 1)) if last_close >= 0 else []
    if matches:
        try:
            obj = json.loads(matches[-1].group(0))
        except (ValueError, RecursionError):
            obj = None
        if isinstance(obj, dict):
            return _well_typed(obj)
    last_bracket = text.rfind("]")
    match = _REFERENCE_NOTION_LIST.search(text, 0, last_bracket + 1) if last_bracket >= 0 else None
    if match is None:
        return {}
    raw = match.group(1)
    try:
        notions = json.loads(raw)
    except (ValueError, RecursionError):
        notions = [item.strip().strip("'\"").strip() for item in raw[1:-1].split(",")]
        notions = [item for item in notions if item]
    return {"math_notion": notions} if isinstance(notions, list) else {}


def _parse_robust(text: str) -> dict:
    """Scan candidate object starts ('{' then '"') from the right with JSONDecoder.raw_decode.

    The first qualifying object found (the last in the text) is kept; further left, only a
    qualifying object that encloses it replaces it (earlier separate objects lose).
    Starts after the last key string cannot qualify and are skipped. Work is bounded by
    _MAX_DECODE_ATTEMPTS and a character budget proportional to len(text).
    """
    last_key = max(text.rfind(key) for key in _KEY_STRINGS)
    if last_key < 0:
        return {}
    starts = [m.start() for m in _OBJECT_START.finditer(text, 0, last_key + 1)]
    decoder = json.JSONDecoder()
    budget = _DECODE_CHAR_BUDGET_FACTOR * len(text) + _DECODE_CHAR_BUDGET_MIN
    best: tuple[int, int, dict] | None = None  # (start, end, object)
    for attempt, start in enumerate(reversed(starts)):
        if attempt >= _MAX_DECODE_ATTEMPTS or budget <= 0:
            break
        obj, end, cost = _decode_at(decoder, text, start, budget)
        budget -= cost
        if isinstance(obj, dict) and any(key in obj for key in META_KEYS):
            if best is None or end >= best[1]:
                best = (start, end, obj)  # the first found, or one that encloses it
    return _well_typed(best[2]) if best is not None else {}


def _decode_at(decoder: json.JSONDecoder, text: str, start: int, budget: int):
    """raw_decode of the JSON value at text[start:] -> (value or None, end, characters used).

    Decodes growing windows of the text: a JSONDecodeError computes its line number by scanning the
    whole document up to the error, which over many failed attempts on a 1 MB text is quadratic.
    A failure is only retried with a larger window when the window cut could have caused it (an
    error near the window end, or an unterminated string).
    """
    window, used = _FIRST_WINDOW, 0
    while True:
        chunk = text[start:start + window]
        used += len(chunk)
        try:
            value, end = decoder.raw_decode(chunk)
            return value, start + end, used
        except json.JSONDecodeError as exc:
            cut = start + len(chunk) < len(text) and (
                exc.pos >= len(chunk) - 10 or exc.msg.startswith("Unterminated string"))
            if not cut or used >= budget:
                return None, 0, used
        except (ValueError, RecursionError):  # e.g. an integer beyond int max str digits
            return None, 0, used
        window *= 4


# ----------------------------------------------------------------------------- reward
def singularize(phrase: str, rules: str = "spec") -> str:
    """Crude suffix rules: ies->y; ches/shes/xes/zes/oes drop 2; s drops 1 unless the phrase ends
    in "ss". Rule sets (`NOTION_RULES`):
    - "spec": suffixes tested on the phrase as written (case-sensitive); any phrase ending in
      "series" (any case) is left alone;
    - "reference" (the released reward code): suffixes tested on the lower-cased phrase, only the
      word "series" itself is exempt ("Taylor series" -> "Taylor sery"); the cut is applied to
      the phrase as written ("FORMULAS" -> "FORMULA")."""
    _check_rules(rules)
    if rules == "spec":
        if phrase.lower().endswith("series"):
            return phrase
        test = phrase
    else:
        test = phrase.lower()
        if test == "series":
            return phrase
    if test.endswith("ies"):
        return phrase[:-3] + "y"
    if test.endswith(("ches", "shes", "xes", "zes", "oes")):
        return phrase[:-2]
    if test.endswith("s") and not test.endswith("ss"):
        return phrase[:-1]
    return phrase


def _check_rules(rules: str) -> None:
    if rules not in NOTION_RULES:
        raise ValueError(f"unknown notion rules {rules!r}; expected one of {NOTION_RULES}")


def normalize_notions(notions: Any, context: str, rules: str = "spec") -> list[str] | None:
    """Notion phrases to score: split a comma string (strip spaces and brackets), keep a list,
    wrap anything else; singularise (`rules`); drop phrases contained in `context`; deduplicate.
    `context` is the problem text under the spec's rules and the whole meta prompt under the
    reference's (the caller passes it: `notion_context`). None when malformed (a non-string
    phrase)."""
    if isinstance(notions, str) and "," in notions:
        phrases = [part.strip(" []") for part in notions.split(",")]
    elif isinstance(notions, list):
        phrases = notions
    else:
        phrases = [notions]
    if not all(isinstance(phrase, str) for phrase in phrases):
        return None
    context = context if isinstance(context, str) else ""
    kept: dict[str, None] = {}
    for phrase in phrases:
        singular = singularize(phrase, rules)
        if singular not in context:
            kept[singular] = None
    return list(kept)


def notion_context(problem: str, meta_prompt: str, rules: str = "spec") -> str:
    """The text whose notions are not rewarded: the problem (spec) or the whole meta prompt
    (reference)."""
    _check_rules(rules)
    return problem if rules == "spec" else meta_prompt


def _is_correct(score: float) -> bool:
    return score > 0.5


def notion_reward(notions: Any, scores: Sequence[float], responses: Sequence[str], context: str,
                  rules: str = "spec") -> float:
    """r_notion = mean over remaining notions n of [net(n) > 0]; 0 if none remain or malformed."""
    phrases = normalize_notions(notions, context, rules)
    if not phrases:
        return 0.0
    texts = [(_is_correct(s), o if isinstance(o, str) else "") for s, o in zip(scores, responses)]
    positive = 0
    for phrase in phrases:
        net = sum((1 if correct else -1) for correct, text in texts if phrase in text)
        positive += net > 0
    return positive / len(phrases)


def difficulty_reward(pass_rate: Any, scores: Sequence[float], base: float = 0.01) -> float:
    """r_diff = base ** |mean(scores) - k/8| for an int k (not bool, not clamped), else 0."""
    if not is_int(pass_rate) or len(scores) == 0:
        return 0.0
    p = sum(float(s) for s in scores) / len(scores)
    try:
        gap = abs(p - pass_rate / 8)
    except OverflowError:  # |k| beyond float range: base ** inf
        return 0.0
    return float(base ** gap)


def length_reward(solution_length: Any, scores: Sequence[float], lengths: Sequence[int]) -> float:
    """r_len = 1 if C = {L_i : s_i = 1} is non-empty and min(C) < l < max(C) (strict), else 0."""
    if not is_int(solution_length):
        return 0.0
    correct_lengths = [length for s, length in zip(scores, lengths) if _is_correct(s)]
    if not correct_lengths:
        return 0.0
    return 1.0 if min(correct_lengths) < solution_length < max(correct_lengths) else 0.0


def meta_reward(prediction: dict, scores: Sequence[float], lengths: Sequence[int],
                responses: Sequence[str], problem: str, base: float = 0.01,
                notion_rules: str = "spec") -> dict:
    """{"score": r_meta, "notion": r_notion, "difficulty": r_diff, "length": r_len} for one parsed
    prediction against the problem's solution rollouts (a score counts as correct when > 0.5).
    `problem` is the text whose notions are dropped (`notion_context`). An empty or non-dict
    prediction scores 0 everywhere."""
    _check_rules(notion_rules)
    if not (len(scores) == len(lengths) == len(responses)):
        raise ValueError(f"scores/lengths/responses differ in length: "
                         f"{len(scores)}/{len(lengths)}/{len(responses)}")
    zero = {"score": 0.0, "notion": 0.0, "difficulty": 0.0, "length": 0.0}
    if not isinstance(prediction, dict) or not prediction:
        return zero
    r_notion = notion_reward(prediction.get("math_notion"), scores, responses, problem,
                             notion_rules)
    r_diff = difficulty_reward(prediction.get("pass_rate"), scores, base)
    r_len = length_reward(prediction.get("solution_length"), scores, lengths)
    return {"score": (r_notion + r_diff + r_len) / 3, "notion": r_notion,
            "difficulty": r_diff, "length": r_len}
