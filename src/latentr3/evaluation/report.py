"""The evidence behind a results table: intervals, paired tests, seeds, and what the lists look like.

A table row is a recommender scored on a fixed set of test users, possibly once per training seed.
For every row this module gives

* the metrics (HR@K / NDCG@K, both protocols; with several seeds, the mean over seeds) with a 95 %
  bootstrap interval over test users (evaluation/stats.py) and, with several seeds, the standard
  deviation over seeds.  With seeds, a user's value is first averaged over the seeds, then users are
  resampled: the interval is for the seed-averaged model on this test population;
* a paired comparison with a reference row on the same users (Δ NDCG@K and Δ HR@K, interval, p);
* metrics by target popularity: head / torso / tail by how often the TARGET item is a target in the
  training split (`PopularityBins`: equal thirds of the training interactions, so each group holds about
  a third of the test targets when test resembles training; the thresholds are printed);
* the lists themselves: catalogue coverage (distinct titles recommended over all users / distinct
  catalogue titles), the number of distinct lists, and the share of users whose whole top-K list equals
  the most common list.  A popularity prior shows as coverage near K / titles and a share near 1.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np

from .metrics import compute_metrics, per_user_metrics
from .stats import CI_METHOD, bootstrap_ci, paired_comparison, seed_mean_std

__all__ = ["PopularityBins", "RowScores", "score_row", "list_stats", "build_evidence", "render_evidence",
           "main_k"]

GROUPS = ("head", "torso", "tail")


@dataclass
class PopularityBins:
    """Head / torso / tail of the catalogue by training frequency of an item as a target.

    Items are sorted by that frequency; head is the most frequent items that together make the first
    third of the training targets, torso the next third, tail the rest and every item never seen as a
    training target.  Cuts fall between frequency values, so items of equal frequency share a group
    (the thirds are therefore approximate).  ``head_min``: smallest frequency in head; ``torso_min``:
    smallest in torso (tail is below it)."""

    freq: dict[int, int]
    head_min: int
    torso_min: int

    @classmethod
    def from_targets(cls, train_target_ids: Sequence[int]) -> "PopularityBins":
        freq = Counter(int(i) for i in train_target_ids)
        total = sum(freq.values())
        values = sorted(freq.values(), reverse=True)
        head_min = torso_min = 1
        if total:
            cuts = []
            for target in (total / 3, 2 * total / 3):
                # the smallest frequency f such that items with freq >= f hold >= target interactions
                cum = 0
                for v in values:
                    cum += v
                    if cum >= target:
                        cuts.append(v)
                        break
            head_min, torso_min = cuts[0], cuts[1]
            if head_min == torso_min:  # a few items hold everything: torso takes the frequency below
                lower = [v for v in values if v < head_min]
                torso_min = lower[0] if lower else head_min
        return cls(dict(freq), head_min, torso_min)

    def group(self, item_id: int) -> str:
        f = self.freq.get(int(item_id), 0)
        if f >= self.head_min:
            return "head"
        if f >= self.torso_min and self.torso_min < self.head_min:
            return "torso"
        return "tail"

    def describe(self) -> dict:
        items = Counter(self.group(i) for i in self.freq)
        mass = Counter()
        for i, f in self.freq.items():
            mass[self.group(i)] += f
        total = max(sum(self.freq.values()), 1)
        return {
            "rule": "target item's frequency as a training target; equal thirds of training interactions",
            "head": f">= {self.head_min}", "torso": f"{self.torso_min}..{self.head_min - 1}",
            "tail": f"< {self.torso_min} (incl. never a training target)",
            "items": {g: items.get(g, 0) for g in GROUPS},
            "share_of_training_targets": {g: mass.get(g, 0) / total for g in GROUPS},
        }


def list_stats(predicted: Sequence[Sequence[str]], n_catalogue_titles: int) -> dict:
    """Coverage and sameness of the recommended lists (module docstring)."""
    lists = Counter(tuple(p) for p in predicted)
    distinct = {t for p in predicted for t in p}
    n = max(len(predicted), 1)
    return {"coverage": len(distinct) / max(n_catalogue_titles, 1), "distinct_titles": len(distinct),
            "distinct_lists": len(lists),
            "share_most_common_list": (lists.most_common(1)[0][1] / n) if lists else 0.0}


@dataclass
class RowScores:
    """One table row: per-user values averaged over seeds, plus each seed's metrics and lists."""

    per_user: dict[str, np.ndarray]
    seed_metrics: list[dict] = field(default_factory=list)
    seed_lists: list[dict] = field(default_factory=list)


def score_row(predicted_per_seed: Sequence[Sequence[Sequence[str]]], targets: Sequence[str],
              title_counts: Mapping[str, int], ks: Sequence[int], n_catalogue_titles: int) -> RowScores:
    """Scores one row from its lists (one set of lists per seed, each over the same users in order)."""
    if not predicted_per_seed:
        raise ValueError("a row needs the lists of at least one seed")
    per_seed = [per_user_metrics(p, targets, title_counts, ks) for p in predicted_per_seed]
    per_user = {k: np.mean([np.asarray(s[k]) for s in per_seed], axis=0) for k in per_seed[0]}
    return RowScores(per_user,
                     [compute_metrics(p, targets, title_counts, ks) for p in predicted_per_seed],
                     [list_stats(p, n_catalogue_titles) for p in predicted_per_seed])


def main_k(ks: Sequence[int]) -> int:
    """The cut-off of the paired and per-group columns: 10 when reported, else the largest."""
    return 10 if 10 in ks else max(ks)


def build_evidence(rows: Mapping[str, RowScores], target_ids: Sequence[int], bins: PopularityBins,
                   reference: str | None, ks: Sequence[int], n_boot: int = 1000, seed: int = 0,
                   level: float = 0.95) -> dict:
    """JSON-ready evidence for every row (module docstring); `reference` names the paired row."""
    if reference is not None and reference not in rows:
        raise ValueError(f"reference row {reference!r} is not among the rows {list(rows)}")
    k = main_k(ks)
    groups = np.array([bins.group(i) for i in target_ids])
    out: dict = {"method": CI_METHOD.format(n_boot=n_boot, seed=seed), "level": level, "n_boot": n_boot,
                 "bootstrap_seed": seed, "reference": reference, "k": k, "popularity_bins": bins.describe(),
                 "group_users": {g: int((groups == g).sum()) for g in GROUPS}, "rows": {}}
    for name, row in rows.items():
        metric_keys = list(row.seed_metrics[0])
        agg = {m: seed_mean_std([s[m] for s in row.seed_metrics]) for m in metric_keys}
        entry = {"metrics": {m: v[0] for m, v in agg.items()},
                 "seed_std": {m: v[1] for m, v in agg.items()} if len(row.seed_metrics) > 1 else {},
                 "seeds": len(row.seed_metrics),
                 "ci": {m: list(v) for m, v in bootstrap_ci(row.per_user, n_boot, seed, level).items()},
                 "lists": {m: float(np.mean([s[m] for s in row.seed_lists])) for m in row.seed_lists[0]},
                 "by_popularity": {}}
        for g in GROUPS:
            sel = groups == g
            sub = {m: row.per_user[m][sel] for m in (f"legacy/NDCG@{k}", f"item/NDCG@{k}", f"item/HR@{k}")}
            ci = bootstrap_ci(sub, n_boot, seed, level)
            entry["by_popularity"][g] = {m: {"value": float(v.mean()) if v.size else 0.0, "ci": list(ci[m])}
                                         for m, v in sub.items()}
        if reference is not None and name != reference:
            ref = rows[reference]
            entry["paired"] = {m: paired_comparison(row.per_user[m], ref.per_user[m], n_boot, seed, level)
                               for p in ("legacy", "item") for m in (f"{p}/NDCG@{k}", f"{p}/HR@{k}")}
        out["rows"][name] = entry
    return out


def _cell(value: float, ci=None, sd=None) -> str:
    text = f"{value:.4f}"
    if sd is not None:
        text += f" ± {sd:.4f}"
    if ci is not None:
        text += f" [{ci[0]:.4f}, {ci[1]:.4f}]"
    return text


def _p(p: float) -> str:
    return "p<0.001" if p < 0.001 else f"p={p:.3g}"


def _paired_cell(p: dict) -> str:
    star = " *" if p["lo"] > 0 or p["hi"] < 0 else ""
    return f"{p['diff']:+.4f} [{p['lo']:+.4f}, {p['hi']:+.4f}] {_p(p['p'])}{star}"


def render_evidence(ev: dict, ks: Sequence[int], protocol: str) -> str:
    """Markdown: the metrics table of one protocol with intervals (and seed sd) and the paired columns."""
    if protocol not in ("legacy", "item"):
        raise ValueError(f"protocol must be 'legacy' or 'item', got {protocol!r}")
    k, ref = ev["k"], ev["reference"]
    cols = [f"HR@{c}" for c in ks] + [f"NDCG@{c}" for c in ks]
    paired = [f"Δ NDCG@{k} vs ref", f"Δ HR@{k} vs ref"] if ref else []
    lines = ["| method | " + " | ".join(cols + paired) + " |", "|---|" + "---:|" * (len(cols) + len(paired))]
    for name, row in ev["rows"].items():
        cells = []
        for c in cols:
            key = f"{protocol}/{c}"
            v = row["metrics"].get(key)
            cells.append("-" if v is None else _cell(v, row["ci"].get(key), row["seed_std"].get(key)))
        if ref:
            if name == ref:
                cells += ["(reference)", "(reference)"]
            else:
                cells += [_paired_cell(row["paired"][f"{protocol}/{m}@{k}"]) for m in ("NDCG", "HR")]
        label = str(name).replace("|", "\\|")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def render_lists(ev: dict) -> str:
    """Markdown: per-group NDCG@K / HR@K (item level) and the list statistics of every row."""
    k, bins, n = ev["k"], ev["popularity_bins"], ev["group_users"]
    head = (f"Target popularity groups ({bins['rule']}): head {bins['head']}, torso {bins['torso']}, "
            f"tail {bins['tail']} training occurrences; items {bins['items']}; test users "
            f"{n}.\n")
    cols = [f"{g} NDCG@{k}" for g in GROUPS] + [f"{g} HR@{k}" for g in GROUPS] + [
        "coverage", "distinct lists", "same-list share"]
    lines = [head, "| method | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    for name, row in ev["rows"].items():
        bp = row["by_popularity"]
        cells = [_cell(bp[g][f"item/NDCG@{k}"]["value"], bp[g][f"item/NDCG@{k}"]["ci"]) for g in GROUPS]
        cells += [_cell(bp[g][f"item/HR@{k}"]["value"], bp[g][f"item/HR@{k}"]["ci"]) for g in GROUPS]
        li = row["lists"]
        cells += [f"{li['coverage']:.4f} ({li['distinct_titles']:.0f})", f"{li['distinct_lists']:.0f}",
                  f"{li['share_most_common_list']:.3f}"]
        lines.append(f"| {str(name).replace('|', chr(92) + '|')} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def significance_sentences(ev: dict) -> list[str]:
    """One plain sentence per paired comparison (item-level NDCG@K), for reports and the README."""
    k, ref = ev["k"], ev["reference"]
    level = ev.get("level", 0.95)
    alpha, pct = 1 - level, f"{100 * level:g} %"
    out = []
    for name, row in ev["rows"].items():
        if "paired" not in row:
            continue
        p = row["paired"][f"item/NDCG@{k}"]
        apart, tested = p["lo"] > 0 or p["hi"] < 0, p["p"] < alpha
        # The paired-bootstrap interval and the randomization test can disagree near the boundary; only
        # their agreement is called a significant difference.
        if apart and tested:
            verdict = f"significantly {'higher' if p['diff'] > 0 else 'lower'} at the {pct} level"
        elif apart or tested:
            verdict = (f"borderline, not established: the {pct} interval {'excludes' if apart else 'includes'} 0 "
                       f"but the randomization test gives p {'>=' if apart else '<'} {alpha:g}")
        else:
            verdict = f"not significantly different at the {pct} level"
        out.append(f"{name} vs {ref}: item NDCG@{k} {p['diff']:+.4f} [{p['lo']:+.4f}, {p['hi']:+.4f}], "
                   f"{_p(p['p'])}: {verdict}.")
    return out
