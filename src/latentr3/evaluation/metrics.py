"""HR@K / NDCG@K for title-generating recommenders, under two protocols, plus a popularity baseline.

Every row has one target item; the recommender returns a ranked list of distinct catalogue titles.

* legacy (the paper's protocol): rank r (1-based) is a hit when predicted_titles[row][r-1] equals
  the target title as a string. HR@K = mean [rank <= K]; NDCG@K = mean 1/log2(rank + 1) for
  rank <= K (one relevant item, IDCG = 1). A title shared by several catalogue items therefore
  counts as a hit for any of them.
* item: a predicted title carried by m catalogue items stands for each of them with weight 1/m
  (picking one of them uniformly finds the target with probability 1/m). The gain of a hit at rank
  r is 1/m(target title); HR@K = mean gain within K; NDCG@K = mean gain / log2(rank + 1).
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Mapping, Sequence

__all__ = [
    "DEFAULT_KS",
    "legacy_hits",
    "item_hits",
    "per_user_metrics",
    "compute_metrics",
    "popularity_ranking",
]

DEFAULT_KS: tuple[int, ...] = (1, 3, 5, 10, 20)


def _check_inputs(predicted_titles: Sequence[Sequence[str]], target_titles: Sequence[str]) -> None:
    if len(predicted_titles) != len(target_titles):
        raise ValueError(
            f"predicted_titles has {len(predicted_titles)} rows but target_titles has "
            f"{len(target_titles)}"
        )
    for row, preds in enumerate(predicted_titles):
        if isinstance(preds, str):
            raise ValueError(f"row {row}: predicted titles must be a list of titles, got a string")
        if len(set(preds)) != len(preds):
            dup = [t for t, c in Counter(preds).items() if c > 1]
            raise ValueError(f"row {row}: predicted titles repeat {dup!r} (must be distinct)")


def legacy_hits(
    predicted_titles: Sequence[Sequence[str]], target_titles: Sequence[str]
) -> list[int]:
    """1-based rank of the target title in each row's predictions, 0 for a miss.

    Predicted lists must hold distinct titles (ValueError otherwise), so at most one rank hits.
    """
    _check_inputs(predicted_titles, target_titles)
    ranks = []
    for preds, target in zip(predicted_titles, target_titles):
        rank = 0
        for r, title in enumerate(preds, start=1):
            if title == target:
                rank = r
                break
        ranks.append(rank)
    return ranks


def item_hits(
    predicted_titles: Sequence[Sequence[str]],
    target_titles: Sequence[str],
    title_counts: Mapping[str, int],
) -> list[tuple[int, float]]:
    """(rank, gain) per row under the item-level protocol: gain = 1 / title_counts[target title]
    where the target title is predicted at 1-based `rank`; (0, 0.0) for a miss."""
    ranks = legacy_hits(predicted_titles, target_titles)
    out = []
    for row, (rank, target) in enumerate(zip(ranks, target_titles)):
        if rank == 0:
            out.append((0, 0.0))
            continue
        m = title_counts.get(target, 0)
        if m < 1:
            raise ValueError(
                f"row {row}: target title {target!r} has no catalogue items in title_counts"
            )
        out.append((rank, 1.0 / m))
    return out


def _discount(rank: int) -> float:
    return 1.0 / math.log2(rank + 1)


def per_user_metrics(
    predicted_titles: Sequence[Sequence[str]],
    target_titles: Sequence[str],
    title_counts: Mapping[str, int],
    ks: Sequence[int] = DEFAULT_KS,
) -> dict[str, list[float]]:
    """Each user's gain under both protocols at every K: legacy/HR@K, legacy/NDCG@K, item/HR@K and
    item/NDCG@K, one value per row (the table's metrics are their means; the bootstrap resamples them)."""
    for k in ks:
        if int(k) < 1:
            raise ValueError(f"K must be >= 1, got {k}")
    gains = item_hits(predicted_titles, target_titles, title_counts)
    out: dict[str, list[float]] = {}
    for k in ks:
        hit = [1.0 if 0 < rank <= k else 0.0 for rank, _ in gains]
        disc = [_discount(rank) if 0 < rank <= k else 0.0 for rank, _ in gains]
        out[f"legacy/HR@{k}"] = hit
        out[f"legacy/NDCG@{k}"] = disc
        out[f"item/HR@{k}"] = [h * g for h, (_, g) in zip(hit, gains)]
        out[f"item/NDCG@{k}"] = [d * g for d, (_, g) in zip(disc, gains)]
    return out


def compute_metrics(
    predicted_titles: Sequence[Sequence[str]],
    target_titles: Sequence[str],
    title_counts: Mapping[str, int],
    ks: Sequence[int] = DEFAULT_KS,
) -> dict[str, float]:
    """Both protocols at every K.

    Keys: legacy/HR@K, legacy/NDCG@K, item/HR@K, item/NDCG@K for K in ks, n_rows, and
    share_nonunique_target_titles (share of rows whose target title is carried by more than one
    catalogue item). Empty input gives 0.0 for every metric.
    """
    per_user = per_user_metrics(predicted_titles, target_titles, title_counts, ks)
    n = len(target_titles)
    out: dict[str, float] = {key: sum(v) / max(n, 1) for key, v in per_user.items()}
    out["n_rows"] = n
    nonunique = sum(1 for t in target_titles if title_counts.get(t, 0) > 1)
    out["share_nonunique_target_titles"] = nonunique / max(n, 1)
    return out


def popularity_ranking(train_target_titles: Sequence[str], k: int) -> list[str]:
    """The k most frequent target titles of the source split, one list for every user.

    Ties are broken by first occurrence in the source split, so the result is deterministic.
    """
    counts: Counter[str] = Counter()
    first: dict[str, int] = {}
    for i, title in enumerate(train_target_titles):
        counts[title] += 1
        first.setdefault(title, i)
    ranked = sorted(counts, key=lambda t: (-counts[t], first[t]))
    return ranked[: max(int(k), 0)]
