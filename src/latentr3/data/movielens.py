"""The embedded default data set: MovieLens-100K (as shipped inside the ``recbole`` package) converted
into the paper's split format.

Processing, the same as the paper's Amazon splits:

* iterative ``min_count``-core filter (users and items both have at least ``min_count`` interactions,
  repeated until nothing changes);
* each user's interactions sorted by timestamp (ties keep the file order);
* every interaction after a user's first is one sample whose history is the previous
  ``<= max_history`` items;
* all samples sorted by target timestamp (stable) and cut into train / valid / test
  (``floor(0.8 n)``, ``floor(0.1 n)``, the rest).

Kept items are renumbered ``0..n_items-1`` in the order of their original (numeric) id.  Titles are
``"{movie_title} ({release_year})"``, so that distinct movies keep distinct titles as far as possible.

recbole is only used as a file source: its modules are never imported.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
from collections import Counter
from fractions import Fraction
from pathlib import Path
from typing import Sequence

from latentr3.data.splits import _atomic_write_text, write_catalogue, write_split

__all__ = [
    "RECBOLE_INSTALL_HINT",
    "SPLIT_NAMES",
    "CATALOGUE_NAME",
    "STATS_NAME",
    "SPLIT_COLUMNS",
    "find_movielens_files",
    "movielens_title",
    "prepare_movielens",
    "default_data_dir",
    "ensure_movielens",
]

RECBOLE_INSTALL_HINT = "pip install --no-deps recbole==1.2.1"
SPLIT_NAMES = ("train", "valid", "test")
CATALOGUE_NAME = "info.txt"
STATS_NAME = "stats.json"
SPLIT_COLUMNS = (
    "user_id",
    "history_item_id",
    "item_id",
    "history_item_title",
    "item_title",
    "history_rating",
    "rating",
    "history_timestamp",
    "timestamp",
)
_YEAR = re.compile(r"^\d{4}$")


def find_movielens_files() -> tuple[Path, Path]:
    """Paths of ``ml-100k.inter`` and ``ml-100k.item`` inside the installed recbole package.

    recbole is located with ``importlib.util.find_spec`` only; none of its modules is imported.
    """
    spec = importlib.util.find_spec("recbole")
    if spec is None:
        raise ModuleNotFoundError(
            "MovieLens-100K is read from the files shipped with the recbole package, which is not "
            f"installed; install it (without its dependencies) with: {RECBOLE_INSTALL_HINT}",
            name="recbole",
        )
    roots = list(spec.submodule_search_locations or [])
    if not roots and spec.origin:
        roots = [str(Path(spec.origin).parent)]
    for root in roots:
        directory = Path(root) / "dataset_example" / "ml-100k"
        inter, item = directory / "ml-100k.inter", directory / "ml-100k.item"
        if inter.is_file() and item.is_file():
            return inter, item
    raise FileNotFoundError(
        f"the installed recbole package ({', '.join(roots) or spec.origin}) has no "
        f"dataset_example/ml-100k/ml-100k.inter and ml-100k.item; reinstall it with: {RECBOLE_INSTALL_HINT}"
    )


def movielens_title(movie_title: str, release_year: str) -> str:
    """``"Title (YYYY)"``; the title alone when the year is missing or not a 4-digit year, or when the
    title already ends with that year."""
    movie_title = " ".join(movie_title.split())
    year = release_year.strip()
    if not _YEAR.match(year) or movie_title.endswith(f"({year})"):
        return movie_title
    return f"{movie_title} ({year})"


def _read_atomic_table(path: Path, needed: Sequence[str]) -> tuple[dict[str, int], list[list[str]], int]:
    """A recbole atomic file: tab-separated, header ``name:type``. Returns column index by bare name."""
    with open(path, encoding="utf-8", newline="") as handle:
        lines = handle.read().split("\n")
    header = lines[0].rstrip("\r").split("\t")
    index = {name.split(":", 1)[0]: i for i, name in enumerate(header)}
    missing = [name for name in needed if name not in index]
    if missing:
        raise ValueError(f"{path} line 1: missing column(s) {', '.join(missing)}; found {', '.join(header)}")
    rows = []
    for line_no, line in enumerate(lines[1:], start=2):
        line = line.rstrip("\r")
        if not line:
            continue
        fields = line.split("\t")
        if len(fields) != len(header):
            raise ValueError(f"{path} line {line_no}: expected {len(header)} fields, found {len(fields)}")
        rows.append(fields)
    return index, rows, len(lines)


def _id_key(token: str):
    """Sort key of an original id token: numeric when it is a number."""
    return (0, int(token), "") if token.isdigit() else (1, 0, token)


def _number(text: str) -> int | float:
    value = float(text)
    return int(value) if value.is_integer() else value


def _split_sizes(n: int, split: Sequence[float]) -> tuple[int, int, int]:
    if len(split) != 3 or any(f < 0 for f in split):
        raise ValueError(f"split must be three non-negative fractions, got {split!r}")
    fractions = [Fraction(str(f)) for f in split]  # exact decimal: floor(0.8 * n) without float error
    if abs(sum(fractions) - 1) > Fraction(1, 10**9):
        raise ValueError(f"split fractions must sum to 1, got {split!r}")
    n_train = math.floor(fractions[0] * n)
    n_valid = math.floor(fractions[1] * n)
    return n_train, n_valid, n - n_train - n_valid


def prepare_movielens(
    out_dir: str | os.PathLike,
    max_history: int = 10,
    min_count: int = 5,
    split: Sequence[float] = (0.8, 0.1, 0.1),
) -> dict:
    """Convert MovieLens-100K into ``train.csv``, ``valid.csv``, ``test.csv``, ``info.txt`` and
    ``stats.json`` under ``out_dir``; returns the statistics written to ``stats.json``."""
    if max_history < 1:
        raise ValueError(f"max_history must be >= 1, got {max_history}")
    if min_count < 1:
        raise ValueError(f"min_count must be >= 1, got {min_count}")
    inter_path, item_path = find_movielens_files()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    # ---- items: original id -> title
    item_cols, item_rows, _ = _read_atomic_table(item_path, ("item_id", "movie_title", "release_year"))
    raw_title: dict[str, str] = {}
    no_year: list[str] = []
    for fields in item_rows:
        item = fields[item_cols["item_id"]]
        year = fields[item_cols["release_year"]]
        raw_title[item] = movielens_title(fields[item_cols["movie_title"]], year)
        if not _YEAR.match(year.strip()):
            no_year.append(item)

    # ---- interactions, in file order
    inter_cols, inter_rows, _ = _read_atomic_table(inter_path, ("user_id", "item_id", "rating", "timestamp"))
    iu, ii, ir, it = (inter_cols[c] for c in ("user_id", "item_id", "rating", "timestamp"))
    interactions = [
        (fields[iu], fields[ii], float(fields[ir]), _number(fields[it])) for fields in inter_rows
    ]  # (user, item, rating, timestamp); list position = file order
    unknown = sorted({item for _, item, _, _ in interactions if item not in raw_title}, key=_id_key)
    if unknown:
        raise ValueError(f"{inter_path}: item ids without a row in {item_path}: {unknown[:10]}")
    n_raw = len(interactions)
    raw_users = len({u for u, _, _, _ in interactions})
    raw_items = len({i for _, i, _, _ in interactions})

    # ---- iterative k-core filter
    kept = list(range(n_raw))
    rounds = 0
    while True:
        user_count = Counter(interactions[k][0] for k in kept)
        item_count = Counter(interactions[k][1] for k in kept)
        still = [k for k in kept if user_count[interactions[k][0]] >= min_count and item_count[interactions[k][1]] >= min_count]
        rounds += 1
        if len(still) == len(kept):
            break
        kept = still
    if not kept:
        raise ValueError(f"no interaction survives the {min_count}-core filter")

    # ---- item renumbering: sorted by original id
    kept_items = sorted({interactions[k][1] for k in kept}, key=_id_key)
    new_id = {item: index for index, item in enumerate(kept_items)}
    titles = [raw_title[item] for item in kept_items]

    # ---- per-user sequences, sorted by (timestamp, file order)
    by_user: dict[str, list[int]] = {}
    for k in kept:  # kept is in file order
        by_user.setdefault(interactions[k][0], []).append(k)
    samples = []  # (target timestamp, row); list columns pre-rendered as Python list literals
    for user in sorted(by_user, key=_id_key):
        seq = sorted(by_user[user], key=lambda k: (interactions[k][3], k))
        # Each element rendered once; "[" + ", ".join(...) + "]" is exactly repr() of the list.
        ids = [str(new_id[interactions[k][1]]) for k in seq]
        seq_titles = [raw_title[interactions[k][1]] for k in seq]
        title_reprs = [repr(title) for title in seq_titles]
        ratings = [repr(interactions[k][2]) for k in seq]
        stamps = [repr(interactions[k][3]) for k in seq]
        for pos in range(1, len(seq)):
            start = max(0, pos - max_history)
            samples.append(
                (
                    interactions[seq[pos]][3],
                    {
                        "user_id": user,
                        "history_item_id": "[" + ", ".join(ids[start:pos]) + "]",
                        "item_id": ids[pos],
                        "history_item_title": "[" + ", ".join(title_reprs[start:pos]) + "]",
                        "item_title": seq_titles[pos],
                        "history_rating": "[" + ", ".join(ratings[start:pos]) + "]",
                        "rating": ratings[pos],
                        "history_timestamp": "[" + ", ".join(stamps[start:pos]) + "]",
                        "timestamp": stamps[pos],
                    },
                )
            )
    samples.sort(key=lambda pair: pair[0])  # stable: ties keep (user id, position) order
    rows = [row for _, row in samples]
    n_train, n_valid, n_test = _split_sizes(len(rows), split)
    parts = {
        "train": rows[:n_train],
        "valid": rows[n_train : n_train + n_valid],
        "test": rows[n_train + n_valid :],
    }

    # ---- statistics
    title_count = Counter(titles)
    shared = {title: count for title, count in title_count.items() if count > 1}
    stats = {
        "source": {"inter": str(inter_path), "item": str(item_path)},
        "params": {"max_history": max_history, "min_count": min_count, "split": list(split)},
        "raw": {"interactions": n_raw, "users": raw_users, "items": raw_items},
        "core_filter_rounds": rounds,
        "interactions": len(kept),
        "users": len(by_user),
        "items": len(kept_items),
        "samples": {name: len(part) for name, part in parts.items()},
        "samples_total": len(rows),
        "target_timestamp_range": {
            name: [_number(part[0]["timestamp"]), _number(part[-1]["timestamp"])] if part else None
            for name, part in parts.items()
        },
        "distinct_titles": len(title_count),
        "duplicate_titles": len(shared),
        "items_with_duplicate_title": sum(shared.values()),
        "duplicate_title_examples": sorted(shared)[:10],
        "items_without_year": [new_id[item] for item in no_year if item in new_id],
    }

    # ---- write: data files first, stats.json last (its presence marks a complete run)
    for name, part in parts.items():
        if not part:
            raise ValueError(f"the {name} split is empty ({len(rows)} samples, split {split!r})")
    stats_path = out / STATS_NAME
    if stats_path.exists():
        stats_path.unlink()
    for name, part in parts.items():
        write_split(out / f"{name}.csv", part)
    write_catalogue(out / CATALOGUE_NAME, range(len(kept_items)), titles)
    _atomic_write_text(stats_path, lambda handle: handle.write(json.dumps(stats, indent=2) + "\n"))
    return stats


def default_data_dir() -> Path:
    """``$LATENTR3_CACHE/data/ml-100k``, or ``~/.cache/latentr3/data/ml-100k``."""
    cache = os.environ.get("LATENTR3_CACHE")
    root = Path(cache).expanduser() if cache else Path.home() / ".cache" / "latentr3"
    return root / "data" / "ml-100k"


def ensure_movielens(data_dir: str | os.PathLike | None = None) -> Path:
    """The directory of the prepared MovieLens-100K split, preparing it (default settings) if any of
    its files is missing."""
    directory = Path(data_dir) if data_dir is not None else default_data_dir()
    needed = [f"{name}.csv" for name in SPLIT_NAMES] + [CATALOGUE_NAME, STATS_NAME]
    if not all((directory / name).is_file() for name in needed):
        prepare_movielens(directory)
    return directory
