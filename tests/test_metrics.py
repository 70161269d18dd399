import csv
import math
from collections import Counter
from pathlib import Path

import pytest

from latentr3.evaluation.metrics import (
    DEFAULT_KS,
    compute_metrics,
    item_hits,
    legacy_hits,
    popularity_ranking,
)

DATA = Path(__file__).resolve().parents[1].parent / "shared/data/cds_and_vinyl"


def test_legacy_hits_ranks():
    preds = [["a", "b", "c"], ["x", "y", "t"], ["p", "q"], []]
    targets = ["a", "t", "z", "a"]
    assert legacy_hits(preds, targets) == [1, 3, 0, 0]


def test_compute_metrics_hand_computed():
    # row 0: hit at rank 1 (title unique); row 1: hit at rank 3 on a title shared by 3 items;
    # row 2: miss
    preds = [["a", "b", "c"], ["x", "y", "G"], ["p", "q"]]
    targets = ["a", "G", "z"]
    counts = {"a": 1, "b": 1, "c": 1, "x": 1, "y": 1, "G": 3, "p": 1, "q": 1, "z": 1}
    m = compute_metrics(preds, targets, counts, ks=(1, 3, 5))
    d3 = 1 / math.log2(4)
    assert m["n_rows"] == 3
    assert m["legacy/HR@1"] == pytest.approx(1 / 3)
    assert m["legacy/NDCG@1"] == pytest.approx(1 / 3)
    assert m["legacy/HR@3"] == pytest.approx(2 / 3)
    assert m["legacy/NDCG@3"] == pytest.approx((1 + d3) / 3)
    assert m["legacy/HR@5"] == pytest.approx(2 / 3)
    assert m["item/HR@1"] == pytest.approx(1 / 3)
    assert m["item/HR@3"] == pytest.approx((1 + 1 / 3) / 3)
    assert m["item/NDCG@3"] == pytest.approx((1 + d3 / 3) / 3)
    assert m["item/NDCG@5"] == pytest.approx((1 + d3 / 3) / 3)
    assert m["share_nonunique_target_titles"] == pytest.approx(1 / 3)
    assert set(m) == {
        f"{p}/{n}@{k}" for p in ("legacy", "item") for n in ("HR", "NDCG") for k in (1, 3, 5)
    } | {"n_rows", "share_nonunique_target_titles"}
    assert item_hits(preds, targets, counts) == [(1, 1.0), (3, pytest.approx(1 / 3)), (0, 0.0)]


def test_default_ks_and_short_lists():
    m = compute_metrics([["a"]], ["a"], {"a": 2})
    for k in DEFAULT_KS:
        assert m[f"legacy/HR@{k}"] == 1.0
        assert m[f"item/HR@{k}"] == 0.5
        assert m[f"item/NDCG@{k}"] == 0.5
    # hit at rank 20 counts only from K=20 on
    preds = [[f"t{i}" for i in range(19)] + ["a"]]
    m = compute_metrics(preds, ["a"], {"a": 1})
    assert m["legacy/HR@10"] == 0.0
    assert m["legacy/HR@20"] == 1.0
    assert m["legacy/NDCG@20"] == pytest.approx(1 / math.log2(21))


def test_errors():
    with pytest.raises(ValueError, match="rows"):
        compute_metrics([["a"]], ["a", "b"], {"a": 1, "b": 1})
    with pytest.raises(ValueError, match="repeat"):
        compute_metrics([["a", "b", "a"]], ["b"], {"a": 1, "b": 1})
    with pytest.raises(ValueError, match="repeat"):
        legacy_hits([["a", "a"]], ["z"])
    with pytest.raises(ValueError, match="title_counts"):
        compute_metrics([["a"]], ["a"], {})


def test_popularity_ranking_ties_by_first_occurrence():
    src = ["b", "a", "c", "a", "c", "d", "b", "e"]
    # counts: b2 a2 c2 d1 e1; first occurrence b<a<c, d<e
    assert popularity_ranking(src, 10) == ["b", "a", "c", "d", "e"]
    assert popularity_ranking(src, 2) == ["b", "a"]
    assert popularity_ranking([], 3) == []


def _target_titles(path: Path) -> list[str]:
    with open(path, newline="", encoding="utf-8") as fh:
        return [row["item_title"] for row in csv.DictReader(fh)]


def test_popularity_on_cds_and_vinyl():
    if not DATA.is_dir():
        pytest.skip(f"released CDs_and_Vinyl split not found at {DATA}")
    titles = []
    for line in (DATA / "info.txt").read_text(encoding="utf-8").splitlines():
        if line.strip():
            title, _id = line.rsplit("\t", 1)
            titles.append(title)
    counts = Counter(titles)
    assert len(titles) == 5841 and len(counts) == 5377
    valid = _target_titles(DATA / "valid.csv")
    test = _target_titles(DATA / "test.csv")
    assert len(test) == 6157
    assert all(t in counts for t in test)
    pop = popularity_ranking(valid, 20)
    m = compute_metrics([pop] * len(test), test, counts)
    print(
        f"\npopularity (valid -> test): legacy HR@10 {m['legacy/HR@10']:.6f} "
        f"NDCG@10 {m['legacy/NDCG@10']:.6f}; item HR@10 {m['item/HR@10']:.6f} "
        f"NDCG@10 {m['item/NDCG@10']:.6f}; share non-unique {m['share_nonunique_target_titles']:.6f}"
    )
    assert 0.05 <= m["legacy/HR@10"] <= 0.058
    assert m["share_nonunique_target_titles"] == pytest.approx(846 / 6157)
    assert m["item/HR@10"] <= m["legacy/HR@10"]
