"""pass@k and meta-awareness metrics against hand-computed numbers."""
import math

import numpy as np
import pytest

from masa_megatron.eval import metrics as M


@pytest.mark.parametrize("n,c,k,expected", [
    (4, 1, 1, 0.25),
    (4, 1, 2, 0.5),            # 1 - C(3,2)/C(4,2) = 1 - 3/6
    (5, 2, 2, 0.7),            # 1 - C(3,2)/C(5,2) = 1 - 3/10
    (10, 3, 5, 0.9166666667),  # 1 - C(7,5)/C(10,5) = 1 - 21/252
    (8, 0, 4, 0.0),
    (5, 4, 2, 1.0),            # n - c = 1 < k
    (4, 4, 1, 1.0),
    (1000, 1, 1, 0.001),
])
def test_pass_at_k_hand_computed(n, c, k, expected):
    assert M.pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-9)


def test_pass_at_k_is_stable_for_large_n():
    n, c, k = 2000, 700, 1000
    exact = 1 - math.comb(n - c, k) / math.comb(n, k)
    assert M.pass_at_k(n, c, k) == pytest.approx(exact, rel=1e-12)
    with pytest.raises(ValueError):
        M.pass_at_k(4, 1, 5)


def test_pass_at_k_stats_mean_std_and_skip_short_problems():
    stats = M.pass_at_k_stats([[1, 0, 0, 0], [1, 1, 0, 0], [1]], ks=[1, 2])
    # k=1: [0.25, 0.5, 1.0]; k=2: [0.5, 5/6] (the 1-sample problem is left out)
    assert stats[1] == pytest.approx({"mean": 0.5833333333, "std": 0.3118047822, "n_problems": 3})
    assert stats[2] == pytest.approx({"mean": 0.6666666667, "std": 0.1666666667, "n_problems": 2})


def test_average_ranks_and_spearman_edge_cases():
    assert M.average_ranks([10, 20, 20, 5]).tolist() == [2.0, 3.5, 3.5, 1.0]
    assert math.isnan(M.spearman([0.5, 0.5, 0.5], [0.1, 0.2, 0.3]))   # constant side
    assert math.isnan(M.spearman([0.5], [0.1]))                       # < 2 pairs
    assert M.spearman([1, 2, 3], [30, 20, 10]) == pytest.approx(-1.0)


# Six hand-built problems (4 solutions each), predictions and gating decisions.
SCORES = [[1, 1, 1, 1], [1, 0, 0, 0], [0, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [0, 0, 0, 0]]
LENGTHS = [[100, 200, 300, 400], [200, 900, 900, 900], [50, 60, 70, 80], [300, 500, 50, 60],
           [100, 300, 200, 999], [10, 10, 10, 10]]
PRED_PASS = [0.875, 0.5, 0.125, None, 0.5, None]     # actual: 1, .25, 0, .5, .75, 0
PRED_LEN = [250, 200, 500, None, 400, None]
GATED = [True, True, True, True, None, False]        # truth: zero-var = P1, P3, P6


def test_pass_rate_metrics_hand_computed():
    m = M.pass_rate_metrics(PRED_PASS, SCORES)
    assert m["coverage"] == pytest.approx(4 / 6)
    # |.875-1| + |.5-.25| + |.125-0| + |.5-.75| = .75 over 4
    assert m["mae"] == pytest.approx(0.1875)
    # ranks pred [4, 2.5, 1, 2.5] vs actual [4, 2, 1, 3]: 4.5 / sqrt(4.5 * 5) = 3 / sqrt(10)
    assert m["spearman"] == pytest.approx(0.9486832981)
    # bins: {.125}: gap .125 (n 1); {.5, .5}: mean obs .5, gap 0 (n 2); {.875}: gap .125 (n 1)
    assert m["ece"] == pytest.approx(0.0625)
    curve = m["calibration"]
    assert curve["counts"] == [0, 1, 0, 0, 0, 2, 0, 0, 1, 0]
    assert curve["mean_predicted"][5] == pytest.approx(0.5)
    assert curve["mean_observed"][8] == pytest.approx(1.0)
    assert math.isnan(curve["mean_observed"][0])


def test_length_metrics_hand_computed():
    m = M.length_metrics(PRED_LEN, SCORES, LENGTHS)
    assert m["coverage"] == pytest.approx(4 / 6)
    # P1: 100 < 250 < 400 yes; P2: one correct, never; P5: C = 100..300, 400 no; P3/P6 no correct
    assert m["in_range"] == pytest.approx(1 / 3)
    assert m["mae"] == pytest.approx(200 / 3)   # vs mean(C): 250, 200, 200
    assert m["spearman"] == pytest.approx(0.0)


def test_gating_scores_hand_computed():
    g = M.gating_scores(GATED, SCORES)
    assert (g["tp"], g["fp"], g["fn"], g["tn"]) == (2, 2, 1, 0)
    assert g["precision"] == pytest.approx(0.5)
    assert g["recall"] == pytest.approx(2 / 3)
    assert g["f1"] == pytest.approx(4 / 7)
    assert g["coverage"] == pytest.approx(5 / 6)
    assert g["gated_fraction"] == pytest.approx(4 / 5)   # of the 5 problems with a decision
    assert math.isnan(M.gating_scores([False, False], [[1, 0], [0, 0]])["precision"])


def test_gating_decision_rule():
    assert M.gating_decision([0.0, 0.0, 0.0, None]) is True          # 3 of 4 parsed, all 0
    assert M.gating_decision([1.0, 0.875]) is True                    # std .0625, round(7.5) = 8
    assert M.gating_decision([0.5, 0.5]) is False
    assert M.gating_decision([None, None, None, 0.0]) is False        # 1 < ceil(4/2) parsed
    assert M.gating_decision(None) is None


def test_notion_normalisation_and_net_counts():
    assert set(M.notion_net_counts("[series, boxes, probabilities]", "", [], [])) == \
        {"series", "box", "probability"}
    assert M.notion_net_counts(["angles", "angle", "class"], "", [], []) == {"angle": 0, "class": 0}
    assert M.notion_net_counts(["angles", 3], "", [], []) is None  # malformed: reward gives 0
    problem = "Find the roots of x^2-5x+6."
    nets = M.notion_net_counts(
        ["quadratic equations", "Vieta's formulas", "roots", "factoring"], problem,
        ["By factoring we get a quadratic equation", "the quadratic equation gives 2 and 3",
         "Vieta's formula and factoring give 1"], [1, 1, 0])
    assert nets == {"quadratic equation": 2, "Vieta's formula": -1, "factoring": 0}  # root dropped
    # spec worked example: r_notion 0.5
    spec = M.notion_net_counts(["quadratic equations", "Vieta's formulas"], "p",
                               ["quadratic equation", "Vieta's formula", "quadratic equation"],
                               [1, 0, 1])
    assert M.notion_precision([spec])["micro"] == pytest.approx(0.5)


def test_notion_precision_micro_macro_coverage():
    p = M.notion_precision([{"a": 2, "b": -1, "c": 0}, None, {"d": 1}, {}])
    assert p["micro"] == pytest.approx(0.5)           # 2 positive of 4 notions
    assert p["macro"] == pytest.approx(2 / 3)         # mean(1/3, 1)
    assert p["coverage"] == pytest.approx(0.75)
    assert p["n_notions"] == 4


def test_meta_awareness_metrics_combines_sources():
    m = M.meta_awareness_metrics({"text": PRED_PASS, "head": [0.5] * 6}, SCORES, LENGTHS,
                                 PRED_LEN, None, GATED)
    assert set(m["pass_rate"]) == {"text", "head"}
    assert m["pass_rate"]["text"]["mae"] == pytest.approx(0.1875)
    assert math.isnan(m["pass_rate"]["head"]["spearman"])   # constant prediction
    assert m["gating"]["f1"] == pytest.approx(4 / 7)
    assert math.isnan(m["notion"]["micro"])


def test_paired_gain_is_the_mean_difference_with_a_bootstrap_standard_error():
    rng = np.random.default_rng(3)
    before = {f"p{i}": list(rng.integers(0, 2, 4).astype(float)) for i in range(200)}
    after = {k: [1.0, 1.0, *v[2:]] for k, v in before.items()}        # two more right per problem
    after["only-after"] = [1.0]                                        # unpaired: ignored
    result = M.paired_gain(before, after, n_boot=4000)
    d = np.array([np.mean(after[k]) - np.mean(before[k]) for k in before])
    assert result["problems"] == 200
    assert result["gain"] == pytest.approx(d.mean())
    assert result["se"] == pytest.approx(d.std() / np.sqrt(len(d)), rel=0.1)
    same = M.paired_gain(before, before)
    assert same["gain"] == 0.0 and same["se"] == 0.0
    with pytest.raises(ValueError, match="no problem is in both"):
        M.paired_gain({"a": [1.0]}, {"b": [0.0]})
