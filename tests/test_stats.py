"""Intervals, paired tests, popularity groups and list statistics of the results tables."""
import math

import numpy as np
import pytest

from latentr3.evaluation.report import (PopularityBins, build_evidence, list_stats, render_evidence,
                                        render_lists, score_row, significance_sentences)
from latentr3.evaluation.stats import bootstrap_ci, paired_comparison, seed_mean_std


def test_bootstrap_matches_binomial_interval():
    # 4,000 users, 400 hits: the normal-approximation binomial interval is p +- 1.96 sqrt(p(1-p)/n)
    n, hits = 4000, 400
    x = np.zeros(n)
    x[np.random.default_rng(3).choice(n, hits, replace=False)] = 1.0
    p = hits / n
    half = 1.959964 * math.sqrt(p * (1 - p) / n)
    lo, hi = bootstrap_ci({"hr": x}, n_boot=4000, seed=0)["hr"]
    assert lo == pytest.approx(p - half, abs=0.0012)
    assert hi == pytest.approx(p + half, abs=0.0012)
    # a 90 % interval is narrower, and a different seed moves the bounds only within Monte-Carlo error
    lo90, hi90 = bootstrap_ci({"hr": x}, n_boot=4000, seed=0, level=0.9)["hr"]
    assert lo < lo90 < hi90 < hi
    lo2, hi2 = bootstrap_ci({"hr": x}, n_boot=4000, seed=7)["hr"]
    assert abs(lo2 - lo) < 0.002 and abs(hi2 - hi) < 0.002


def test_bootstrap_is_seeded_and_shares_resamples():
    rng = np.random.default_rng(0)
    a = rng.random(300)
    one = bootstrap_ci({"a": a, "b": 2 * a}, n_boot=500, seed=11)
    again = bootstrap_ci({"a": a}, n_boot=500, seed=11)
    assert one["a"] == pytest.approx(again["a"], rel=1e-12)
    # the same resamples for every metric: b = 2a gives exactly doubled bounds
    assert one["b"][0] == pytest.approx(2 * one["a"][0]) and one["b"][1] == pytest.approx(2 * one["a"][1])
    with pytest.raises(ValueError, match="differ in length"):
        bootstrap_ci({"a": a, "b": a[:10]})
    with pytest.raises(ValueError, match="level"):
        bootstrap_ci({"a": a}, level=95)


def test_paired_comparison():
    rng = np.random.default_rng(1)
    base = (rng.random(2000) < 0.1).astype(float)
    same = paired_comparison(base, base, n_boot=500)
    assert same["diff"] == 0.0 and same["p"] == 1.0 and same["lo"] == same["hi"] == 0.0
    # b: the same users plus 60 extra hits -> a real, paired improvement of 0.03
    better = base.copy()
    better[np.flatnonzero(base == 0)[:60]] = 1.0
    r = paired_comparison(better, base, n_boot=1000)
    assert r["diff"] == pytest.approx(0.03)
    assert r["lo"] > 0 and r["p"] < 0.01
    # closed form: the paired difference's standard error is sd(d) / sqrt(n)
    d = better - base
    half = 1.96 * d.std(ddof=1) / math.sqrt(len(d))
    assert r["lo"] == pytest.approx(0.03 - half, abs=0.002) and r["hi"] == pytest.approx(0.03 + half, abs=0.002)
    # two independent draws of the same rate: no significant difference
    other = (rng.random(2000) < 0.1).astype(float)
    null = paired_comparison(other, base, n_boot=1000)
    assert null["lo"] < 0 < null["hi"] and null["p"] > 0.05
    with pytest.raises(ValueError, match="same users"):
        paired_comparison(base, base[:5])


def test_seed_mean_std():
    assert seed_mean_std([0.1]) == (0.1, 0.0)
    m, s = seed_mean_std([1.0, 2.0, 3.0])
    assert m == 2.0 and s == pytest.approx(1.0)


def test_popularity_bins_thirds():
    # item 1: 60 occurrences, items 2-4: 10 each (30), items 5-34: 1 each (30) -> 120 training targets
    targets = [1] * 60 + [2] * 10 + [3] * 10 + [4] * 10 + list(range(5, 35))
    bins = PopularityBins.from_targets(targets)
    assert (bins.head_min, bins.torso_min) == (60, 10)
    assert [bins.group(i) for i in (1, 2, 4, 5, 999)] == ["head", "torso", "torso", "tail", "tail"]
    d = bins.describe()
    assert d["items"] == {"head": 1, "torso": 3, "tail": 30}
    assert d["share_of_training_targets"]["head"] == pytest.approx(0.5)


def test_list_stats_exposes_a_popularity_prior():
    same = [["a", "b", "c"]] * 10
    s = list_stats(same, n_catalogue_titles=100)
    assert s == {"coverage": 0.03, "distinct_titles": 3, "distinct_lists": 1, "share_most_common_list": 1.0}
    varied = [[f"t{i}", f"t{i + 1}", f"t{i + 2}"] for i in range(10)]
    v = list_stats(varied, n_catalogue_titles=100)
    assert v["distinct_lists"] == 10 and v["share_most_common_list"] == pytest.approx(0.1)
    assert v["coverage"] == pytest.approx(0.12)


def test_evidence_table_with_seeds_and_reference():
    titles = [f"t{i}" for i in range(30)]
    counts = {t: 1 for t in titles}
    rng = np.random.default_rng(5)
    targets_idx = rng.integers(0, 30, size=400)
    targets = [titles[i] for i in targets_idx]
    target_ids = [int(i) for i in targets_idx]
    pop = [titles[:10]] * 400
    # a "model" whose list starts with the target for most users; two seeds that differ a little
    def model_lists(shift):
        out = []
        for u, t in enumerate(targets_idx):
            first = t if (u + shift) % 5 else (t + 1) % 30
            out.append([titles[first]] + [x for x in titles if x != titles[first]][:9])
        return out
    rows = {"pop": score_row([pop], targets, counts, [1, 10], 30),
            "model": score_row([model_lists(0), model_lists(1)], targets, counts, [1, 10], 30)}
    bins = PopularityBins.from_targets(target_ids)
    ev = build_evidence(rows, target_ids, bins, "pop", [1, 10], n_boot=300, seed=0)
    m = ev["rows"]["model"]
    assert m["seeds"] == 2 and m["metrics"]["legacy/HR@1"] == pytest.approx(0.8)
    assert m["seed_std"]["legacy/HR@1"] == pytest.approx(0.0, abs=0.01)
    assert ev["rows"]["pop"]["seed_std"] == {} and "paired" not in ev["rows"]["pop"]
    assert m["paired"]["item/NDCG@10"]["diff"] > 0.3 and m["paired"]["item/NDCG@10"]["p"] < 0.01
    assert ev["rows"]["pop"]["lists"]["share_most_common_list"] == 1.0
    assert sum(ev["group_users"].values()) == 400
    table = render_evidence(ev, [1, 10], "legacy")
    assert "(reference)" in table and " *" in table and " ± " in table and "[" in table
    assert "same-list share" in render_lists(ev)
    (sentence,) = significance_sentences(ev)
    assert sentence.startswith("model vs pop") and "significantly higher" in sentence
    with pytest.raises(ValueError, match="reference row"):
        build_evidence(rows, target_ids, bins, "nope", [1, 10])


def test_sentences_call_a_difference_significant_only_when_interval_and_test_agree():
    def ev(lo, hi, p):
        return {"k": 10, "reference": "ref", "level": 0.95,
                "rows": {"ref": {}, "m": {"paired": {"item/NDCG@10": {"diff": (lo + hi) / 2, "lo": lo, "hi": hi,
                                                                      "p": p}}}}}
    assert "significantly higher at the 95 % level" in significance_sentences(ev(0.001, 0.008, 0.01))[0]
    assert "significantly lower" in significance_sentences(ev(-0.008, -0.001, 0.001))[0]
    # the case seen on a SmolLM2 run: interval [+0.0006, +0.0083] but p = 0.055
    s = significance_sentences(ev(0.0006, 0.0083, 0.0549))[0]
    assert "borderline, not established" in s and "excludes 0" in s and "significantly higher" not in s
    s = significance_sentences(ev(-0.001, 0.008, 0.03))[0]
    assert "borderline" in s and "includes 0" in s
    assert "not significantly different" in significance_sentences(ev(-0.002, 0.004, 0.4))[0]
