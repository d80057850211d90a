"""What the benchmarks share (`internvl_batch/bench/common.py`): the statistics of paired
rounds (order-statistics median interval, Student's t, the crossover estimate, Amdahl) and
the result document written as a run goes."""
from __future__ import annotations

import json
import math

import pytest

from internvl_batch.bench import common


# -- statistics of paired rounds ---------------------------------------------------------------

def _binom_cdf(n: int, k: int) -> float:
    return sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n


def test_median_ci_uses_the_textbook_ranks():
    s = common.median_ci(range(1, 21))  # n = 20: 6th and 15th order statistics
    assert (s["lo"], s["hi"], s["median"]) == (6, 15, 10.5)
    assert s["coverage"] == pytest.approx(1 - 2 * _binom_cdf(20, 5), abs=1e-4)
    assert s["coverage"] >= 0.95


@pytest.mark.parametrize("n", [6, 7, 10, 20, 25, 30, 41, 60])
def test_median_ci_is_the_tightest_interval_with_95_percent(n):
    xs = list(range(n))
    s = common.median_ci(reversed(xs))  # order of the samples must not matter
    j = int(s["lo"]) + 1  # 1-based rank of the lower bound
    assert s["hi"] == xs[n - j]  # symmetric ranks
    assert 1 - 2 * _binom_cdf(n, j - 1) >= 0.95
    assert 1 - 2 * _binom_cdf(n, j) < 0.95  # one rank further in would fall short


def test_median_ci_small_and_empty_samples():
    s = common.median_ci([3.0, 1.0, 2.0])
    assert (s["lo"], s["median"], s["hi"]) == (1.0, 2.0, 3.0)
    assert s["coverage"] == pytest.approx(0.75)  # [min, max] of 3 covers 75 %
    assert common.median_ci([])["median"] is None


def test_paired_speedup_pairs_rounds():
    s = common.paired_speedup([2.0, 4.0, 6.0], [1.0, 2.0, 2.0])
    assert s["median"] == 2.0 and s["n"] == 3
    assert s["of_medians"] == pytest.approx(4.0 / 2.0)
    assert common.paired_speedup([1.0], [0.0])["n"] == 0  # a zero time is not a ratio


def test_t_quantile_matches_the_tables():
    # two-sided 95 % (and one 99 %) critical values of Student's t, from the printed tables
    for df, t in ((1, 12.706), (2, 4.303), (4, 2.776), (5, 2.571), (10, 2.228), (18, 2.101),
                  (30, 2.042), (120, 1.980)):
        assert common.t_two_sided(df) == pytest.approx(t, abs=5e-4)
    assert common.t_two_sided(10, 0.99) == pytest.approx(3.169, abs=5e-4)
    with pytest.raises(ValueError):
        common.t_two_sided(0)


def test_crossover_takes_the_order_effect_out():
    """Rounds alternate the order; the mode that runs second is 3 % faster. The per-round
    ratios then swing ±3 % around the true 1.05 (the median's interval spans the swing), while
    the crossover estimate recovers 1.05 and the 3 % with a narrow interval."""
    noise = [0.002, -0.001, 0.0, 0.001, -0.002, 0.001, -0.001, 0.0]
    second = [k % 2 == 0 for k in range(8)]  # num (compiled) runs second in even rounds
    ratios = [1.05 * (1.03 if s else 1 / 1.03) * math.exp(e) for s, e in zip(second, noise)]
    x = common.crossover(ratios, second)
    assert x["n"] == 8 and x["df"] == 6 and x["n_num_second"] == 4
    assert x["estimate"] == pytest.approx(1.05, rel=2e-3)
    assert x["order_effect"] == pytest.approx(1.03, rel=2e-3)
    assert x["lo"] < 1.05 < x["hi"] and x["half_width_pct"] < 0.5
    med = common.median_ci(ratios)
    assert 100 * (med["hi"] - med["lo"]) / 2 / med["median"] > 2.5
    # the interval is the t interval of the two groups' pooled variance
    a = [math.log(r) for r, s in zip(ratios, second) if s]
    b = [math.log(r) for r, s in zip(ratios, second) if not s]
    import statistics
    se = math.sqrt((3 * statistics.variance(a) + 3 * statistics.variance(b)) / 6 * 0.5) / 2
    assert math.log(x["hi"] / x["estimate"]) == pytest.approx(common.t_two_sided(6) * se)
    # no order effect, no noise: the geometric mean, an interval of zero width
    y = common.crossover([1.1, 1.1, 1.1, 1.1], [True, False, True, False])
    assert y["estimate"] == pytest.approx(1.1) and y["lo"] == pytest.approx(1.1)
    assert y["order_effect"] == pytest.approx(1.0)
    # fewer than two rounds of each order: no estimate (and failed rounds do not count)
    z = common.crossover([1.1, 1.2, 1.0, None], [True, True, False, False])
    assert z["estimate"] is None and z["n"] == 3


def test_predicted_speedup_is_amdahl():
    assert common.predicted_speedup(0.0, 2.0) == 1.0
    assert common.predicted_speedup(1.0, 2.0) == 2.0
    assert common.predicted_speedup(0.2, 1.1) == pytest.approx(1 / (0.8 + 0.2 / 1.1))


# -- the result document -----------------------------------------------------------------------

def test_recorder_rewrites_the_document_and_records_errors_as_one_line(tmp_path):
    doc = {"name": "r", "errors": [], "rounds": []}
    rec = common.Recorder(doc, tmp_path / "out")
    rec.save()
    doc["rounds"].append(1)
    try:
        raise RuntimeError("first line\nsecond line")
    except RuntimeError as e:
        rec.error("round 0", e)
    rec.error("note", "plain text")
    rec.save()
    saved = json.loads((tmp_path / "out" / "r.json").read_text())
    assert saved["rounds"] == [1]
    assert saved["errors"] == [{"where": "round 0", "error": "RuntimeError: first line"},
                               {"where": "note", "error": "plain text"}]
    assert not list((tmp_path / "out").glob("*.part"))  # written atomically
